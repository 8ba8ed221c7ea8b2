//! Snapshot manifests: `snapshots/<id>.json`, the last object a backup writes.

use crate::id::SnapshotId;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub time: chrono::DateTime<chrono::Utc>,
    pub host: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub volumes: Vec<VolumeEntry>,
    /// Seconds the backup took.
    pub duration: f64,
    pub rime_version: String,
    /// How the volumes were captured: providers, the freeze window, the writers held.
    /// Absent in snapshots made before Rime recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// The virtual machines on the volumes (`--vm-aware`): their layout, their state at the
    /// snapshot, and where each of their files is in it (docs/VMS.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<VmSection>,
}

/// `kind` of a volume entry that holds one VM file a backup carried into the snapshot (domain
/// XML, NVRAM, managed-save image kept outside the backed-up volumes); it is listed among the
/// volumes so that every reader (verify, prune, older versions) keeps its data.
pub const VM_FILE_KIND: &str = "vm-file";

/// The VMs of a `--vm-aware` backup.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmSection {
    /// "full" or "partial": which VMs the backup stopped (docs/VMS.md).
    pub criterion: String,
    /// CD/DVD and floppy images counted as the VMs' files.
    pub media: bool,
    /// "after-snapshot" or "after-backup": when the stopped VMs were started again.
    pub resume: String,
    /// The libvirt connection.
    pub uri: String,
    pub domains: Vec<VmRecord>,
}

/// One VM at backup time.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub uuid: String,
    /// Its state when the backup found it, as docs/VMS.md names states ("running", "saved").
    pub state: String,
    /// Its state in the snapshot ("saved" for one the backup stopped).
    pub state_in_snapshot: String,
    /// "full" or "partial" coverage by the backup's volumes.
    pub coverage: String,
    /// Persistent (defined), rather than transient.
    pub persistent: bool,
    /// What the backup did with it, in words.
    pub action: String,
    /// Milliseconds from the save being asked for to the VM running again (for a VM the backup
    /// stopped and started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interruption_ms: Option<f64>,
    /// Every file is in the snapshot: the VM can be restored from it alone.
    pub complete: bool,
    pub files: Vec<VmFileRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Set for a VM backed up by `rime backup --vm` (docs/VMS.md): how its disks were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveBackupRecord>,
}

/// How `rime backup --vm` read one VM.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LiveBackupRecord {
    /// "libvirt-pull" (a running VM through libvirt's backup API) or "disk-files" (a VM that was
    /// shut off or saved, from its disk images).
    pub method: String,
    /// The checkpoint this snapshot's changes count to: the base of the next incremental.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// The snapshot (and its checkpoint) an incremental counted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_checkpoint: Option<String>,
    /// "application-consistent" (the guest agent froze its filesystems) or "crash-consistent".
    pub consistency: String,
    /// Why, in words (the filesystems frozen, or why the agent was not used).
    pub consistency_detail: String,
    pub disks: Vec<LiveDiskRecord>,
}

/// One disk of a live backup.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LiveDiskRecord {
    /// The guest's name for it ("vda").
    pub target: String,
    /// The snapshot volume holding the guest's view of it.
    pub volume: String,
    /// "full" or "incremental".
    pub mode: String,
    /// Why a disk that could have been incremental was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One file of a VM, and where it is in the snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VmFileRecord {
    /// "domain-xml", "disk", "backing", "cdrom", "floppy", "nvram", "managed-save",
    /// "snapshot-disk", "snapshot-memory".
    pub role: String,
    /// Its path on the host.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The host volume holding it, and where that was mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// Where the snapshot holds it (None: it is not in the snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_snapshot: Option<FileInSnapshot>,
    /// For a disk the snapshot holds as the guest saw it (a live backup): the image format of
    /// the host file ("qcow2", "raw"), which a restore writes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// A file inside a snapshot: a path in the filesystem of one of its volumes (or of one
/// partition of it), or a whole volume (a device, or a file the backup carried).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileInSnapshot {
    /// The snapshot's volume name.
    pub volume: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// The path inside its filesystem; None: the whole volume is the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// How one backup's volumes were captured (docs/CONSISTENCY.md).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Consistency {
    /// Every volume was captured at one instant (or not written at all).
    pub coherent: bool,
    /// Why, or why not, in words.
    pub instant: String,
    /// Milliseconds from the first freeze (hook or writer) to the last thaw; absent when
    /// nothing was frozen.
    #[serde(default)]
    pub freeze_window_ms: Option<f64>,
    /// Milliseconds the write gates of the `rime serve` volumes were closed (from the first
    /// closing to the last reopening); absent when no served volume was snapshotted.
    #[serde(default)]
    pub gate_closed_ms: Option<f64>,
    /// Milliseconds taking every volume's snapshot took.
    #[serde(default)]
    pub capture_ms: f64,
    /// The writers held for the snapshot, with what each reported.
    #[serde(default)]
    pub writers: Vec<WriterRecord>,
    /// With `--freeze try`: the writers that could not be held, and why; the data they hold
    /// is only crash-consistent in this snapshot. Empty: every writer found was held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_held: Vec<String>,
}

/// One writer held for a snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WriterRecord {
    /// "fsfreeze", "sqlite", "postgresql", "custom".
    pub kind: String,
    pub name: String,
    /// What the writer reported (for PostgreSQL: its data directory, version, checkpoint).
    #[serde(default)]
    pub details: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeEntry {
    /// Name unique within the snapshot, used by `--volume`.
    pub name: String,
    /// The path the volume was read from.
    pub source: String,
    /// "block-device" or "file".
    pub kind: String,
    /// The snapshot provider that captured it ("rime-serve", "reflink", "btrfs-snapshot",
    /// "offline"); absent in snapshots made before Rime recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Seconds since the Unix epoch of its snapshot instant (absent for offline volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_at: Option<f64>,
    pub size: u64,
    pub chunk_size: u32,
    /// Filesystem found on the volume ("ext4", ...), or null when none was recognised.
    pub filesystem: Option<String>,
    /// How the used-block map was made: "ext4 block bitmaps", "all blocks", "non-zero chunks", ...
    pub map: String,
    /// Bytes the used-block map marked as used.
    pub used_bytes: u64,
    /// Bytes read from the volume.
    pub read_bytes: u64,
    /// Bytes this volume added to the repository (compressed, after dedup).
    pub added_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub new_chunks: u64,
    /// Files whose data was left out (`--exclude-file`, swap files).
    #[serde(default)]
    pub excluded: Vec<ExcludedFile>,
    /// "gpt" or "mbr" when the volume is a partitioned disk.
    #[serde(default)]
    pub partition_table: Option<String>,
    #[serde(default)]
    pub partitions: Vec<PartitionEntry>,
    /// Set when the volume itself is an LVM physical volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<PhysicalVolumeEntry>,
    /// Set when the volume is LUKS-encrypted (imaged whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<EncryptionEntry>,
    /// Object path of the volume index, and its BLAKE3 digest.
    pub index: String,
    pub index_digest: String,
}

/// A file whose data blocks were left out of the image: restored with its size and zeros.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExcludedFile {
    pub path: String,
    pub size: u64,
    /// Bytes of the volume the file's data occupied.
    pub bytes: u64,
    /// "requested" (`--exclude-file`) or "swap file" (found by its signature).
    pub reason: String,
}

/// One partition of a whole-disk volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// 1-based, as Linux numbers partitions (`--volume disk:2`).
    pub number: u32,
    /// Byte offset within the volume.
    pub start: u64,
    pub size: u64,
    /// GPT type GUID or MBR type byte.
    #[serde(rename = "type")]
    pub type_id: String,
    #[serde(default)]
    pub name: String,
    pub filesystem: Option<String>,
    pub map: String,
    /// Set when the partition is an LVM physical volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<PhysicalVolumeEntry>,
    /// Set when the partition is LUKS-encrypted (imaged whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<EncryptionEntry>,
}

/// An LVM2 physical volume, its volume group and the logical volumes with bytes on it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhysicalVolumeEntry {
    pub pv_uuid: Option<String>,
    /// Absent when the PV's metadata could not be read (see `problem`).
    pub volume_group: Option<VolumeGroupEntry>,
    pub logical_volumes: Vec<LogicalVolumeEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeGroupEntry {
    pub name: String,
    pub uuid: String,
    /// The metadata sequence number the map was made from.
    pub seqno: u64,
    pub extent_size: u64,
    /// Byte offset of the first extent in the PV, and the PV's extent count.
    pub pe_start: u64,
    pub pe_count: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogicalVolumeEntry {
    pub name: String,
    /// What `--volume` takes to browse it: `disk.img:2/rhel/root`.
    pub path: String,
    pub uuid: String,
    /// "linear", "striped (2 stripes of 64 KiB)", "thin", "thin-pool", "raid1", ...
    pub layout: String,
    /// How the map treats it: "data", "thin-pool metadata", ...
    pub role: String,
    pub size: u64,
    /// Hidden LVs (pool data and metadata, RAID images) are false.
    pub visible: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The origin of a thin snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub filesystem: Option<String>,
    pub map: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<EncryptionEntry>,
}

/// A LUKS volume: imaged whole, since Rime cannot see inside it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncryptionEntry {
    /// "LUKS1" or "LUKS2".
    pub format: String,
    pub cipher: String,
    pub uuid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl Manifest {
    pub fn snapshot_id(&self) -> SnapshotId {
        SnapshotId(self.id.clone())
    }

    pub fn path(id: &SnapshotId) -> String {
        format!("snapshots/{id}.json")
    }

    /// The volumes imaged from the host, without the VM files a backup carried along.
    pub fn data_volumes(&self) -> impl Iterator<Item = &VolumeEntry> {
        self.volumes.iter().filter(|v| v.kind != VM_FILE_KIND)
    }

    /// Identity of "the same set of volumes" for cyclic backups and retention.
    pub fn group_key(&self) -> (String, Vec<String>) {
        let mut sources: Vec<String> = self.data_volumes().map(|v| v.source.clone()).collect();
        sources.sort();
        (self.host.clone(), sources)
    }

    pub fn total_size(&self) -> u64 {
        self.data_volumes().map(|v| v.size).sum()
    }

    pub fn added_bytes(&self) -> u64 {
        self.volumes.iter().map(|v| v.added_bytes).sum()
    }

    pub fn volume(&self, name: &str) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

pub fn volume_index_path(snapshot: &SnapshotId, volume_number: usize) -> String {
    format!("volumes/{snapshot}/{volume_number}.vidx")
}
