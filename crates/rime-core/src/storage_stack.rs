//! The storage stack a backup found inside a volume (LVM physical volumes with their volume
//! groups and logical volumes, LUKS), as the snapshot manifest records it.
//!
//! Each logical volume is given the name `--volume` takes to browse it: the volume's name, the
//! partition number when the PV is a partition, then `VG/LV` (`disk.img:2/rhel/root`).

use rime_repo::snapshot::{EncryptionEntry, LogicalVolumeEntry, PhysicalVolumeEntry, VolumeGroupEntry};
use rime_volume::luks::LuksInfo;
use rime_volume::lvm::PvInfo;

/// `holder` names the PV: `disk.img:2` or, for a PV given directly, `pv.img`.
pub fn pv_entry(info: PvInfo, holder: &str) -> PhysicalVolumeEntry {
    let vg_name = info.vg.as_ref().map(|v| v.name.clone()).unwrap_or_default();
    PhysicalVolumeEntry {
        pv_uuid: info.uuid,
        volume_group: info.vg.map(|v| VolumeGroupEntry {
            name: v.name,
            uuid: v.uuid,
            seqno: v.seqno,
            extent_size: v.extent_size,
            pe_start: v.pe_start,
            pe_count: v.pe_count,
        }),
        logical_volumes: info
            .lvs
            .into_iter()
            .map(|lv| LogicalVolumeEntry {
                path: format!("{holder}/{vg_name}/{}", lv.name),
                name: lv.name,
                uuid: lv.uuid,
                layout: lv.layout,
                role: lv.role,
                size: lv.size,
                visible: lv.visible,
                pool: lv.pool,
                origin: lv.origin,
                filesystem: lv.filesystem,
                map: lv.map,
                encrypted: lv.encrypted.map(encryption_entry),
            })
            .collect(),
        problem: info.problem,
    }
}

pub fn encryption_entry(luks: LuksInfo) -> EncryptionEntry {
    EncryptionEntry { format: format!("LUKS{}", luks.version), cipher: luks.cipher, uuid: luks.uuid, label: luks.label }
}
