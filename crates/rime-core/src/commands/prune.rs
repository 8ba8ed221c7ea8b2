//! `rime prune`: delete data no snapshot references, crash-safely.
//!
//! Under the exclusive lock: (1) find every referenced chunk by reading all volume indexes (any
//! unreadable index aborts the prune: never delete on a partial answer); (2) packs with no
//! referenced chunk lose their index file, then the pack; (3) packs mostly garbage are repacked:
//! their live chunks are checked and copied into a new pack, which is published (pack, then
//! index) before the old index and pack are removed. A crash between steps leaves either both
//! copies (harmless duplicates) or an unindexed pack (removed by the next prune).

use crate::progress::Progress;
use anyhow::{Context, Result};
use rime_repo::index::ChunkIndex;
use rime_repo::lock::LockMode;
use rime_repo::pack::{self, index_path, pack_path, PackWriter};
use rime_repo::{PackId, Repository};
use serde::Serialize;
use std::collections::HashSet;
use std::time::Duration;

/// Repack a pack when at least this share of its bytes is garbage.
const REPACK_GARBAGE_RATIO: f64 = 0.2;

#[derive(Debug, Default, Serialize, Clone)]
pub struct PruneSummary {
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub orphan_packs_deleted: u64,
    pub orphan_volume_indexes_deleted: u64,
    pub chunks_deleted: u64,
    pub bytes_freed: u64,
    pub packs_kept: u64,
}

pub fn prune(repo: &Repository, progress: &dyn Progress, lock_wait: Duration) -> Result<PruneSummary> {
    let _lock = repo.lock(LockMode::Exclusive, "prune", lock_wait)?;
    let backend = repo.backend.as_ref();
    let mut summary = PruneSummary::default();
    repo.backend.clean_scratch()?;

    let (manifests, bad) = repo.manifests()?;
    if let Some((path, reason)) = bad.first() {
        anyhow::bail!("refusing to prune: manifest {path} is unreadable ({reason})");
    }
    let referenced = crate::references::referenced_ids(repo, &manifests).context("refusing to prune")?;
    let (index, bad_indexes) = ChunkIndex::load(backend)?;
    // Packs whose index is unreadable are left alone: their contents are unknown.
    let untouchable: HashSet<String> = bad_indexes
        .iter()
        .filter_map(|b| b.path.strip_prefix("index/").and_then(|n| n.strip_suffix(".idx")).map(str::to_string))
        .collect();

    // Orphan volume indexes (a crash between removing a manifest and its indexes, or a killed
    // backup).
    let live_snapshots: HashSet<&str> = manifests.iter().map(|m| m.id.as_str()).collect();
    for path in backend.list("volumes")? {
        let snap = path.split('/').nth(1).unwrap_or("");
        if !live_snapshots.contains(snap) {
            backend.remove(&path)?;
            summary.orphan_volume_indexes_deleted += 1;
        }
    }

    // Orphan packs: published by a killed backup before their index was written.
    let indexed: HashSet<PackId> = index.packs.iter().map(|p| p.id).collect();
    for path in backend.list("packs")? {
        let Some(id) = path.rsplit('/').next().and_then(|n| n.strip_suffix(".pack")).and_then(PackId::from_hex) else {
            continue;
        };
        if !indexed.contains(&id) && !untouchable.contains(&id.to_hex()) {
            let size = backend.open(&path).and_then(|r| r.size()).unwrap_or(0);
            backend.remove(&path)?;
            summary.orphan_packs_deleted += 1;
            summary.bytes_freed += size;
        }
    }

    progress.begin("prune", index.packs.len() as u64);
    for info in &index.packs {
        progress.advance(1);
        let entries = match backend.read(&index_path(&info.id)).and_then(|b| pack::decode_index(&b)) {
            Ok((_, entries)) => entries,
            Err(_) => continue,
        };
        let live: Vec<_> = entries.iter().filter(|e| referenced.contains(&e.id)).copied().collect();
        let dead_bytes: u64 = entries.iter().filter(|e| !referenced.contains(&e.id)).map(|e| e.stored_len as u64).sum();
        if live.is_empty() {
            backend.remove(&index_path(&info.id))?;
            backend.remove(&pack_path(&info.id))?;
            summary.packs_deleted += 1;
            summary.chunks_deleted += entries.len() as u64;
            summary.bytes_freed += info.size;
        } else if dead_bytes as f64 >= REPACK_GARBAGE_RATIO * info.size as f64 {
            let reader = backend.open(&pack_path(&info.id))?;
            let mut writer = PackWriter::create(backend)?;
            for e in &live {
                // Check each chunk: a prune never copies corruption forward silently.
                let mut payload = vec![0u8; e.stored_len as usize];
                reader.read_at(e.offset, &mut payload)?;
                pack::decode_blob(&payload, e.encoding, e.raw_len, &e.id)
                    .with_context(|| format!("repacking pack {}", info.id))?;
                writer.add(e.id, e.encoding, &payload, e.raw_len)?;
            }
            let new_pack = writer.finish(backend)?;
            backend.remove(&index_path(&info.id))?;
            backend.remove(&pack_path(&info.id))?;
            summary.packs_repacked += 1;
            summary.chunks_deleted += (entries.len() - live.len()) as u64;
            summary.bytes_freed += info.size.saturating_sub(new_pack.size);
        } else {
            summary.packs_kept += 1;
        }
    }
    progress.end();
    Ok(summary)
}
