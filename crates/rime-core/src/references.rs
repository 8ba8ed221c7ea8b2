//! Which chunks do snapshots reference? Shared by `verify`, `prune` and failed-backup cleanup.

use anyhow::{Context, Result};
use rime_repo::index::IdSet;
use rime_repo::volume_index::VolumeIndexReader;
use rime_repo::{ChunkId, Manifest, Repository, VolumeEntry};

/// Calls `f` with every non-zero chunk id of one volume, checking the index against the
/// digest its manifest recorded.
pub fn scan_volume(repo: &Repository, volume: &VolumeEntry, mut f: impl FnMut(ChunkId)) -> Result<()> {
    let reader = VolumeIndexReader::open(repo.backend.as_ref(), &volume.index)?;
    reader.for_each(Some(&volume.index_digest), |_, id| {
        if !id.is_zero_marker() {
            f(id);
        }
        Ok(())
    })
}

/// Every chunk any of `manifests` references. Fails if any volume index cannot be read: callers
/// that delete data must never act on a partial answer.
pub fn referenced_ids(repo: &Repository, manifests: &[Manifest]) -> Result<IdSet> {
    let mut ids = IdSet::default();
    for m in manifests {
        for v in &m.volumes {
            scan_volume(repo, v, |id| {
                ids.insert(id);
            })
            .with_context(|| format!("snapshot {} volume {}", m.id, v.name))?;
        }
    }
    Ok(ids)
}
