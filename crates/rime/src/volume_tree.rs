//! `rime snapshots -l`: each volume of a snapshot as the tree of layers the backup found in it,
//! disk → partition → PV → VG → LV → filesystem, with how each leaf was mapped.

use crate::output::size;
use rime_repo::snapshot::{EncryptionEntry, PhysicalVolumeEntry};
use rime_repo::{Manifest, VolumeEntry};

pub fn print(m: &Manifest) {
    for v in m.volumes.iter() {
        print_volume(v);
    }
}

fn print_volume(v: &VolumeEntry) {
    let what = match (&v.partition_table, &v.filesystem) {
        (Some(t), _) => format!("{t} disk"),
        (None, Some(fs)) => fs.clone(),
        (None, None) if v.lvm.is_some() => "LVM2 PV".into(),
        (None, None) => v.map.clone(),
    };
    println!("  {}  {}  {what}  (used {}, read {})", v.name, size(v.size), size(v.used_bytes), size(v.read_bytes));
    if let Some(e) = &v.encrypted {
        println!("    {}", encryption(e));
    }
    if let Some(pv) = &v.lvm {
        print_pv(pv, "    ");
    }
    for p in &v.partitions {
        let name = if p.name.is_empty() { String::new() } else { format!(" \"{}\"", p.name) };
        let fs = match (&p.filesystem, &p.lvm, &p.encrypted) {
            (Some(fs), _, _) => format!("{fs}: {}", p.map),
            (None, Some(_), _) => "LVM2 PV".into(),
            (None, None, Some(e)) => encryption(e),
            (None, None, None) => p.map.clone(),
        };
        println!("    {}:{}{name}  {}  {fs}", v.name, p.number, size(p.size));
        if let Some(pv) = &p.lvm {
            print_pv(pv, "      ");
        }
    }
}

fn print_pv(pv: &PhysicalVolumeEntry, indent: &str) {
    let uuid = pv.pv_uuid.as_deref().unwrap_or("?");
    match &pv.volume_group {
        None => println!("{indent}PV {uuid}: {}", pv.problem.as_deref().unwrap_or("no volume group")),
        Some(vg) => {
            println!("{indent}PV {uuid}  VG {} (seqno {}, extents of {})", vg.name, vg.seqno, size(vg.extent_size));
            for lv in &pv.logical_volumes {
                let name = if lv.visible { lv.path.clone() } else { format!("[{}]", lv.name) };
                let fs = match (&lv.filesystem, &lv.encrypted) {
                    (_, Some(e)) => encryption(e),
                    (Some(fs), None) => format!("{fs}: {}", lv.map),
                    (None, None) => lv.map.clone(),
                };
                let origin = lv.origin.as_deref().map(|o| format!(", snapshot of {o}")).unwrap_or_default();
                println!("{indent}  LV {name}  {}  {}{origin}  {fs}", size(lv.size), lv.layout);
            }
        }
    }
}

fn encryption(e: &EncryptionEntry) -> String {
    let label = e.label.as_deref().map(|l| format!(", label {l}")).unwrap_or_default();
    format!("{} encrypted ({}, UUID {}{label}): imaged whole", e.format, e.cipher, e.uuid)
}
