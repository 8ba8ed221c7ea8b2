//! Opening the file tree of a backed-up volume (or of one partition of a backed-up disk) for
//! `rime ls`, `rime extract` and `rime mount`, reading straight from the repository.
//!
//! Volumes are chosen with `--volume NAME` (the volume's name in the snapshot) or
//! `--volume NAME:N` (partition N, numbered as Linux numbers them, of a whole-disk volume;
//! `disk.img:2` is the second partition). Without `--volume`, a snapshot with one volume uses
//! it; a whole disk with exactly one partition holding a readable filesystem uses that one.

use crate::snapshot_reader::{load_chunk_index, ReadCounter, SnapshotReader, DEFAULT_CACHE_BYTES};
use anyhow::{anyhow, bail, Context, Result};
use rime_explore::FileTree;
use rime_repo::lock::{LockMode, RepoLock};
use rime_repo::snapshot::PartitionEntry;
use rime_repo::{Manifest, Repository, VolumeEntry};
use rime_volume::Region;
use std::sync::Arc;
use std::time::Duration;

/// What the user selected: a volume, and maybe one of its partitions.
#[derive(Clone, Debug)]
pub struct Selection {
    pub volume: VolumeEntry,
    pub partition: Option<PartitionEntry>,
}

impl Selection {
    /// `NAME` or `NAME:N`.
    pub fn label(&self) -> String {
        match &self.partition {
            Some(p) => format!("{}:{}", self.volume.name, p.number),
            None => self.volume.name.clone(),
        }
    }
}

fn volume_names(m: &Manifest) -> String {
    m.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn partition_list(v: &VolumeEntry) -> String {
    v.partitions
        .iter()
        .map(|p| format!("{}:{} ({})", v.name, p.number, p.filesystem.as_deref().unwrap_or("no known filesystem")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Picks the volume (and partition) named by `spec`.
pub fn select(manifest: &Manifest, spec: Option<&str>) -> Result<Selection> {
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
        return Ok(Selection { volume: volume.clone(), partition: Some(p.clone()) });
    }
    if !volume.partitions.is_empty() && volume.filesystem.is_none() {
        let readable: Vec<&PartitionEntry> = volume.partitions.iter().filter(|p| p.filesystem.is_some()).collect();
        if readable.len() == 1 {
            return Ok(Selection { volume: volume.clone(), partition: Some(readable[0].clone()) });
        }
        bail!(
            "volume {} is a partitioned disk; choose a partition with --volume {}:N (partitions: {})",
            volume.name,
            volume.name,
            partition_list(volume)
        );
    }
    Ok(Selection { volume: volume.clone(), partition: None })
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
                let found = match &self.selection.partition {
                    Some(p) => p.filesystem.clone(),
                    None => self.selection.volume.filesystem.clone(),
                };
                let hint = if self.selection.partition.is_none() && !self.selection.volume.partitions.is_empty() {
                    format!(
                        " (it is a partitioned disk: choose a partition, {})",
                        partition_list(&self.selection.volume)
                    )
                } else {
                    String::new()
                };
                match found {
                    Some(fs) => bail!(
                        "volume {} holds {fs}, which Rime cannot browse (ext2/3/4, XFS, FAT and NTFS can be); `rime mount` shows it as an image file{hint}",
                        self.selection.label()
                    ),
                    None => bail!("volume {} has no filesystem Rime can read{hint}", self.selection.label()),
                }
            }
            Err(e) => Err(e).with_context(|| format!("volume {}", self.selection.label())),
        }
    }
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
        let lock = repo.lock(LockMode::Shared, "explore", Duration::from_secs(30))?;
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
        let region = match &selection.partition {
            Some(p) => whole
                .sub(p.start, p.size)
                .with_context(|| format!("partition {} of {}", p.number, selection.volume.name))?,
            None => whole,
        };
        Ok(OpenVolume { snapshot: self.manifest.id.clone(), selection, reader, region })
    }

    pub fn open_volume(&self, spec: Option<&str>) -> Result<OpenVolume> {
        let selection = select(&self.manifest, spec)?;
        self.open_selection(selection)
    }
}
