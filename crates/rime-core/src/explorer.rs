//! Opening the file tree of a backed-up volume (or of one partition of a backed-up disk) for
//! `rime ls`, `rime extract` and `rime mount`, reading straight from the repository.
//!
//! Volumes are chosen with `--volume NAME` (the volume's name in the snapshot),
//! `--volume NAME:N` (partition N, numbered as Linux numbers them, of a whole-disk volume;
//! `disk.img:2` is the second partition), or a logical volume: `NAME:N/VG/LV` when the PV is a
//! partition, `NAME/VG/LV`, or just `VG/LV` when that names one LV in the snapshot. An LV is
//! read by assembling its volume group again from the PVs in the snapshot (their metadata
//! areas are always imaged), so thin and striped LVs read exactly as LVM maps them. Without
//! `--volume`, a snapshot with one volume uses it; a whole disk with exactly one partition
//! holding a readable filesystem uses that one.

use crate::snapshot_reader::{load_chunk_index, ReadCounter, SnapshotReader, DEFAULT_CACHE_BYTES};
use anyhow::{anyhow, bail, Context, Result};
use rime_explore::FileTree;
use rime_repo::lock::{LockMode, RepoLock};
use rime_repo::snapshot::{LogicalVolumeEntry, PartitionEntry};
use rime_repo::{Manifest, Repository, VolumeEntry};
use rime_volume::Region;
use std::sync::Arc;
use std::time::Duration;

/// What the user selected: a volume, maybe one of its partitions, maybe a logical volume on
/// it (then `partition` is the PV holding it, if the PV is a partition).
#[derive(Clone, Debug)]
pub struct Selection {
    pub volume: VolumeEntry,
    pub partition: Option<PartitionEntry>,
    pub lv: Option<SelectedLv>,
}

#[derive(Clone, Debug)]
pub struct SelectedLv {
    pub vg: String,
    pub vg_uuid: String,
    pub entry: LogicalVolumeEntry,
}

impl Selection {
    /// `NAME`, `NAME:N` or the LV's path (`NAME:N/VG/LV`).
    pub fn label(&self) -> String {
        match (&self.lv, &self.partition) {
            (Some(lv), _) => lv.entry.path.clone(),
            (None, Some(p)) => format!("{}:{}", self.volume.name, p.number),
            (None, None) => self.volume.name.clone(),
        }
    }

    /// What was found there, for messages.
    fn found(&self) -> Option<String> {
        match (&self.lv, &self.partition) {
            (Some(lv), _) => lv.entry.filesystem.clone(),
            (None, Some(p)) => p.filesystem.clone(),
            (None, None) => self.volume.filesystem.clone(),
        }
    }
}

/// Every logical volume the snapshot recorded, with the volume and partition holding it.
pub fn logical_volumes(m: &Manifest) -> Vec<Selection> {
    let mut out = Vec::new();
    for v in m.data_volumes() {
        let holders = std::iter::once((None, v.lvm.as_ref()))
            .chain(v.partitions.iter().map(|p| (Some(p.clone()), p.lvm.as_ref())));
        for (partition, pv) in holders {
            let Some(pv) = pv else { continue };
            let Some(vg) = &pv.volume_group else { continue };
            for lv in &pv.logical_volumes {
                out.push(Selection {
                    volume: v.clone(),
                    partition: partition.clone(),
                    lv: Some(SelectedLv { vg: vg.name.clone(), vg_uuid: vg.uuid.clone(), entry: lv.clone() }),
                });
            }
        }
    }
    out
}

/// The LV `spec` names: its full path, `NAME/VG/LV`, or `VG/LV` alone when it names one LV of
/// the snapshot (an LV spanning several volumes is still one LV).
fn select_lv(m: &Manifest, spec: &str) -> Result<Option<Selection>> {
    let all = logical_volumes(m);
    if let Some(s) = all.iter().find(|s| s.lv.as_ref().is_some_and(|l| l.entry.path == spec)) {
        return Ok(Some(s.clone()));
    }
    let matches: Vec<&Selection> = all
        .iter()
        .filter(|s| {
            let lv = s.lv.as_ref().expect("logical_volumes returns LVs");
            let vg_lv = format!("{}/{}", lv.vg, lv.entry.name);
            spec == vg_lv || spec == format!("{}/{vg_lv}", s.volume.name)
        })
        .collect();
    let mut distinct: Vec<(&str, &str)> = matches
        .iter()
        .map(|s| s.lv.as_ref().expect("an LV"))
        .map(|l| (l.vg_uuid.as_str(), l.entry.uuid.as_str()))
        .collect();
    distinct.sort_unstable();
    distinct.dedup();
    match distinct.len() {
        0 => Ok(None),
        1 => Ok(Some(matches[0].clone())),
        _ => {
            let paths: Vec<&str> = matches.iter().map(|s| s.lv.as_ref().expect("an LV").entry.path.as_str()).collect();
            bail!("'{spec}' names several logical volumes ({}); give the full name", paths.join(", "))
        }
    }
}

fn volume_names(m: &Manifest) -> String {
    m.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn partition_list(v: &VolumeEntry) -> String {
    v.partitions
        .iter()
        .map(|p| match &p.lvm {
            Some(pv) => {
                let lvs: Vec<&str> = pv.logical_volumes.iter().filter(|l| l.visible).map(|l| l.path.as_str()).collect();
                format!("{}:{} (LVM2 PV with {})", v.name, p.number, lvs.join(", "))
            }
            None => format!("{}:{} ({})", v.name, p.number, p.filesystem.as_deref().unwrap_or("no known filesystem")),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Picks the volume (and partition) named by `spec`.
pub fn select(manifest: &Manifest, spec: Option<&str>) -> Result<Selection> {
    if let Some(s) = spec.filter(|s| manifest.volume(s).is_none() && s.contains('/')) {
        if let Some(sel) = select_lv(manifest, s)? {
            return Ok(sel);
        }
        let lvs: Vec<String> = logical_volumes(manifest)
            .into_iter()
            .filter_map(|s| s.lv.filter(|l| l.entry.visible).map(|l| l.entry.path))
            .collect();
        if !lvs.is_empty() {
            bail!("snapshot {} has no logical volume '{s}' (it has: {})", manifest.id, lvs.join(", "));
        }
    }
    let (volume, number) = match spec {
        None => match manifest.data_volumes().collect::<Vec<_>>()[..] {
            [only] => (only, None),
            ref several => bail!(
                "snapshot {} holds {} volumes ({}); choose one with --volume",
                manifest.id,
                several.len(),
                volume_names(manifest)
            ),
        },
        Some(s) => match manifest.volume(s) {
            Some(v) => (v, None),
            None => {
                let parsed = s.rsplit_once(':').and_then(|(n, p)| Some((manifest.volume(n)?, p.parse::<u32>().ok()?)));
                match parsed {
                    Some((v, p)) => (v, Some(p)),
                    None => bail!("snapshot {} has no volume '{s}' (it has: {})", manifest.id, volume_names(manifest)),
                }
            }
        },
    };
    if let Some(n) = number {
        let p = volume.partitions.iter().find(|p| p.number == n).ok_or_else(|| {
            if volume.partitions.is_empty() {
                anyhow!("volume {} has no partition table, so it has no partition {n}", volume.name)
            } else {
                anyhow!("volume {} has no partition {n} (it has: {})", volume.name, partition_list(volume))
            }
        })?;
        return Ok(Selection { volume: volume.clone(), partition: Some(p.clone()), lv: None });
    }
    if !volume.partitions.is_empty() && volume.filesystem.is_none() {
        // Filesystems on partitions and in logical volumes: pick one only when it is the only one.
        let mut readable: Vec<Selection> = volume
            .partitions
            .iter()
            .filter(|p| p.filesystem.is_some())
            .map(|p| Selection { volume: volume.clone(), partition: Some(p.clone()), lv: None })
            .collect();
        let mut seen = Vec::new();
        for sel in logical_volumes(manifest).into_iter().filter(|s| s.volume.name == volume.name) {
            let lv = &sel.lv.as_ref().expect("logical_volumes returns LVs").entry;
            if lv.visible && lv.filesystem.is_some() && !seen.contains(&lv.uuid) {
                seen.push(lv.uuid.clone());
                readable.push(sel);
            }
        }
        if readable.len() == 1 {
            return Ok(readable.remove(0));
        }
        bail!(
            "volume {} is a partitioned disk; choose a partition or logical volume with --volume (partitions: {})",
            volume.name,
            partition_list(volume)
        );
    }
    Ok(Selection { volume: volume.clone(), partition: None, lv: None })
}

/// A volume of a snapshot, opened for reading from the repository.
pub struct OpenVolume {
    pub snapshot: String,
    pub selection: Selection,
    pub reader: Arc<SnapshotReader>,
    /// The bytes of the selection: the whole volume or one partition.
    pub region: Region,
}

impl OpenVolume {
    /// Opens the filesystem; a clear error when there is none Rime can read.
    pub fn file_tree(&self) -> Result<Box<dyn FileTree>> {
        match rime_explore::open(&self.region) {
            Ok(Some(fs)) => Ok(fs),
            Ok(None) => {
                let found = self.selection.found();
                let hint = if self.selection.lv.is_none() && self.has_lvs() {
                    let lvs: Vec<String> = logical_volumes_of(&self.selection)
                        .into_iter()
                        .filter(|l| l.visible)
                        .map(|l| format!("{} ({})", l.path, l.filesystem.as_deref().unwrap_or("no known filesystem")))
                        .collect();
                    format!(" (it is an LVM physical volume: choose a logical volume, {})", lvs.join(", "))
                } else if self.selection.partition.is_none() && !self.selection.volume.partitions.is_empty() {
                    format!(
                        " (it is a partitioned disk: choose a partition, {})",
                        partition_list(&self.selection.volume)
                    )
                } else {
                    String::new()
                };
                match found {
                    Some(fs) => bail!(
                        "volume {} holds {fs}, which Rime cannot browse (ext2/3/4, XFS, btrfs, FAT and NTFS can be); `rime mount` shows it as an image file{hint}",
                        self.selection.label()
                    ),
                    None => bail!("volume {} has no filesystem Rime can read{hint}", self.selection.label()),
                }
            }
            Err(e) => Err(e).with_context(|| format!("volume {}", self.selection.label())),
        }
    }
}

impl OpenVolume {
    fn has_lvs(&self) -> bool {
        !logical_volumes_of(&self.selection).is_empty()
    }
}

/// The LVs on the PV a selection names (the volume itself, or its partition).
fn logical_volumes_of(sel: &Selection) -> Vec<LogicalVolumeEntry> {
    let pv = match &sel.partition {
        Some(p) => p.lvm.as_ref(),
        None => sel.volume.lvm.as_ref(),
    };
    pv.map(|pv| pv.logical_volumes.clone()).unwrap_or_default()
}

/// The repository, its lock and the chunk index shared by every volume a command opens.
pub struct Explorer {
    pub repo: Repository,
    pub manifest: Manifest,
    pub counter: Arc<ReadCounter>,
    index: Arc<rime_repo::ChunkIndex>,
    cache_bytes: u64,
    _lock: RepoLock,
}

impl Explorer {
    /// Takes the shared repository lock (so no prune removes chunks under us), resolves the
    /// snapshot and loads the chunk index.
    pub fn open(repo: Repository, snapshot: &str, cache_bytes: Option<u64>) -> Result<Explorer> {
        Explorer::open_for(repo, snapshot, cache_bytes, "explore")
    }

    /// [`Explorer::open`], with the command that holds the lock named (`rime locks`, and the
    /// refusal a prune meets, name it).
    pub fn open_for(repo: Repository, snapshot: &str, cache_bytes: Option<u64>, command: &str) -> Result<Explorer> {
        let lock = repo.lock(LockMode::Shared, command, Duration::from_secs(30))?;
        let manifest = repo.resolve(snapshot)?;
        let counter = Arc::new(ReadCounter::default());
        let index = load_chunk_index(&repo, &counter)?;
        Ok(Explorer {
            repo,
            manifest,
            counter,
            index,
            cache_bytes: cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
            _lock: lock,
        })
    }

    /// A reader of a whole volume.
    pub fn reader(&self, volume: &VolumeEntry) -> Result<Arc<SnapshotReader>> {
        Ok(Arc::new(SnapshotReader::open(
            &self.repo,
            self.index.clone(),
            volume,
            self.cache_bytes,
            self.counter.clone(),
        )?))
    }

    pub fn open_selection(&self, selection: Selection) -> Result<OpenVolume> {
        let reader = self.reader(&selection.volume)?;
        let whole = Region::from_source(reader.clone(), &selection.volume.name, reader.size());
        let region = match (&selection.lv, &selection.partition) {
            (Some(lv), _) => self.open_lv(lv)?,
            (None, Some(p)) => whole
                .sub(p.start, p.size)
                .with_context(|| format!("partition {} of {}", p.number, selection.volume.name))?,
            (None, None) => whole,
        };
        Ok(OpenVolume { snapshot: self.manifest.id.clone(), selection, reader, region })
    }

    /// Assembles the volume group again from the PVs of every volume of the snapshot, as the
    /// snapshot holds them (a VG may span volumes), and opens the LV through it.
    fn open_lv(&self, lv: &SelectedLv) -> Result<Region> {
        let mut candidates = Vec::new();
        for v in self.manifest.data_volumes() {
            if v.lvm.is_none() && v.partitions.iter().all(|p| p.lvm.is_none()) {
                continue;
            }
            let reader = self.reader(v)?;
            let whole = Region::from_source(reader.clone(), &v.name, reader.size());
            if v.lvm.is_some() {
                candidates.push((whole.clone(), v.name.clone()));
            }
            for p in v.partitions.iter().filter(|p| p.lvm.is_some()) {
                let region =
                    whole.sub(p.start, p.size).with_context(|| format!("partition {} of {}", p.number, v.name))?;
                candidates.push((region, format!("{}:{}", v.name, p.number)));
            }
        }
        let assembly = rime_volume::lvm::Assembly::new(candidates);
        assembly
            .open_lv(&lv.vg, Some(&lv.vg_uuid), &lv.entry.name)
            .with_context(|| format!("logical volume {}", lv.entry.path))
    }

    pub fn open_volume(&self, spec: Option<&str>) -> Result<OpenVolume> {
        let selection = select(&self.manifest, spec)?;
        self.open_selection(selection)
    }
}
