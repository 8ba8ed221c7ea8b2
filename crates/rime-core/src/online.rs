//! Online backups of protected volumes (`rime serve`): the snapshot is taken through the
//! server's control socket and the ordinary pipeline reads the snapshot view as a `Volume`.
//!
//! Order, per volume: take the snapshot (the server waits for its write-inactivity period) →
//! map the used blocks *through the snapshot view* and apply exclusions → materialise that map
//! (so nothing re-reads filesystem metadata after blocks start leaving the protection area) →
//! narrow the protection area to the used blocks, minus the chunks an incremental backup reuses
//! → archive, every read leaving the protection area → after the manifest is written, tell the
//! server, whose changed-block map then counts from this snapshot's instant.

use crate::incremental::{Materialized, Reuse};
use anyhow::{Context, Result};
use rime_repo::{ChunkIndex, Repository};
use rime_serve::SnapshotSource;
use rime_snapshot::Bitmap;
use rime_volume::usedmap::UsedMap;
use rime_volume::{Volume, VolumeKind};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The control socket of the server protecting `path` (the socket itself, the served volume,
/// or its FUSE file), if there is one.
pub fn protected(path: &Path) -> Option<PathBuf> {
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        return Some(path.to_path_buf());
    }
    rime_serve::find_server(path).map(|r| r.control)
}

/// One protected volume being backed up online.
pub struct OnlineVolume {
    pub source: Arc<SnapshotSource>,
    used: Bitmap,
    partial: Bitmap,
    reuse: Option<Reuse>,
}

/// The volume that reads a snapshot's view (named after the served volume).
pub fn volume_of(source: &Arc<SnapshotSource>) -> Volume {
    let kind = match std::fs::metadata(&source.volume) {
        Ok(m) if m.file_type().is_block_device() => VolumeKind::BlockDevice,
        _ => VolumeKind::File,
    };
    Volume::from_source(source.volume.clone(), kind, source.size, source.clone())
}

/// After the layout and exclusions are known: replaces the map with its materialised copy,
/// narrows the protection area, sets up the incremental reuse, and switches the snapshot
/// source to archiving reads.
pub fn prepare(
    repo: &Repository,
    index: &Arc<ChunkIndex>,
    source: Arc<SnapshotSource>,
    volume: &Volume,
    map: &mut Box<dyn UsedMap>,
) -> Result<OnlineVolume> {
    let bs = source.block_size as u64;
    let blocks = source.blocks();
    let used = Bitmap::new(blocks);
    let partial = Bitmap::new(blocks);
    let materialized = Materialized::build(map.as_mut(), volume.size, bs, &used, &partial)
        .with_context(|| format!("mapping the used blocks of {}", volume.path.display()))?;
    *map = Box::new(materialized);
    // A block partly used and partly not counts as partial only.
    let used_or_partial = used.copy();
    used_or_partial.or_with(&partial);
    for b in partial.ones_from(0, usize::MAX) {
        used.clear(b);
    }

    let reuse = find_reuse(repo, index, &source, volume, &used, &partial)?;
    let area = used_or_partial;
    if let Some(r) = &reuse {
        r.unprotect(&area);
    }
    source.protect(&area).context("narrowing the snapshot's protection area")?;
    source.start_archiving();
    Ok(OnlineVolume { source, used, partial, reuse })
}

impl OnlineVolume {
    /// What the archive takes from the previous snapshot instead of the volume.
    pub fn reuse(&mut self) -> Option<&mut Reuse> {
        self.reuse.as_mut()
    }

    pub fn describe(&self) -> String {
        match &self.reuse {
            Some(r) => format!("online snapshot via rime serve; {}", r.describe()),
            None => "online snapshot via rime serve".to_string(),
        }
    }

    /// The backup `snapshot` was published.
    pub fn finish(&self, snapshot: &str) -> Result<()> {
        Ok(self.source.finish(snapshot, &self.used, &self.partial)?)
    }
}

/// What this backup can take from the one the server's changed-block map counts from: the
/// same volume (by source, size and chunk size) in that snapshot.
fn find_reuse(
    repo: &Repository,
    chunk_index: &Arc<ChunkIndex>,
    source: &SnapshotSource,
    volume: &Volume,
    used: &Bitmap,
    partial: &Bitmap,
) -> Result<Option<Reuse>> {
    let (base, changed, prev_used) = source.changes()?;
    let (Some(base), Some(prev_used)) = (base, prev_used) else {
        return Ok(None);
    };
    let Ok(manifest) = repo.resolve(&base) else {
        return Ok(None);
    };
    if manifest.id != base {
        return Ok(None);
    }
    let source_name = volume.path.display().to_string();
    let Some(entry) = manifest.volumes.iter().find(|v| v.source == source_name && v.size == volume.size) else {
        return Ok(None);
    };
    Reuse::find(repo, chunk_index, base, entry, source.block_size as u64, changed, &prev_used, used, partial)
}
