//! Online backups of protected volumes (`rime serve`): the snapshot is taken through the
//! server's control socket and the ordinary pipeline reads the snapshot view as a `Volume`.
//!
//! Order, per volume: take the snapshot (the server waits for its write-inactivity period) →
//! map the used blocks *through the snapshot view* and apply exclusions → materialise that map
//! (so nothing re-reads filesystem metadata after blocks start leaving the protection area) →
//! narrow the protection area to the used blocks, minus the chunks an incremental backup reuses
//! → archive, every read leaving the protection area → after the manifest is written, tell the
//! server, whose changed-block map then counts from this snapshot's instant.

use crate::archive::Prior;
use anyhow::{Context, Result};
use rime_repo::volume_index::VolumeIndexReader;
use rime_repo::{ChunkId, ChunkIndex, Repository};
use rime_serve::SnapshotSource;
use rime_snapshot::Bitmap;
use rime_volume::usedmap::{push_range, FileExtents, UsedMap};
use rime_volume::{Volume, VolumeKind};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::Range;
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

    let reuse = Reuse::find(repo, index, &source, volume, &used, &partial)?;
    let area = used_or_partial;
    if let Some(r) = &reuse {
        r.unprotect(&area);
    }
    source.protect(&area).context("narrowing the snapshot's protection area")?;
    source.start_archiving();
    Ok(OnlineVolume { source, used, partial, reuse })
}

impl OnlineVolume {
    /// For `ArchiveInput::prior`.
    pub fn prior_fn(&mut self) -> Option<impl FnMut(u64) -> Result<Option<Prior>> + Send + '_> {
        self.reuse.as_mut().map(|r| move |seq| r.get(seq))
    }

    pub fn describe(&self) -> String {
        match &self.reuse {
            Some(r) => format!(
                "online snapshot via rime serve; incremental from {}: {} chunks unchanged, {} with {} changed blocks read anew",
                r.base,
                r.same.count(),
                r.patch.count(),
                r.changed.count()
            ),
            None => "online snapshot via rime serve".to_string(),
        }
    }

    /// The backup `snapshot` was published.
    pub fn finish(&self, snapshot: &str) -> Result<()> {
        Ok(self.source.finish(snapshot, &self.used, &self.partial)?)
    }
}

/// What an incremental backup takes from the previous snapshot instead of the volume.
struct Reuse {
    base: String,
    /// Chunks unchanged since the base: their ids are reused.
    same: Bitmap,
    /// Chunks with a few changed blocks: the base's bytes with those blocks read anew.
    patch: Bitmap,
    /// Used blocks written since the base.
    changed: Bitmap,
    index: VolumeIndexReader,
    repo: Repository,
    chunks: Arc<ChunkIndex>,
    block: u64,
    chunk: u64,
    size: u64,
    cache_first: u64,
    cache: Vec<ChunkId>,
}

impl Reuse {
    /// A chunk can use the base's copy when none of its blocks is partly used and its used
    /// blocks are the base backup's: then its bytes (used blocks, zeros elsewhere) are the
    /// base's chunk with the blocks written since replaced. With no used block written it is
    /// the base's chunk itself.
    fn find(
        repo: &Repository,
        chunk_index: &Arc<ChunkIndex>,
        source: &SnapshotSource,
        volume: &Volume,
        used: &Bitmap,
        partial: &Bitmap,
    ) -> Result<Option<Reuse>> {
        let chunk_size = repo.config.chunk_size;
        let (base, changed, prev_used) = source.changes()?;
        let (Some(base), Some(prev_used)) = (base, prev_used) else {
            return Ok(None);
        };
        let bs = source.block_size as u64;
        if !(chunk_size as u64).is_multiple_of(bs) {
            return Ok(None);
        }
        let Ok(manifest) = repo.resolve(&base) else {
            return Ok(None);
        };
        if manifest.id != base {
            return Ok(None);
        }
        let source_name = volume.path.display().to_string();
        let Some(entry) = manifest
            .volumes
            .iter()
            .find(|v| v.source == source_name && v.size == volume.size && v.chunk_size == chunk_size)
        else {
            return Ok(None);
        };
        let index = VolumeIndexReader::open(repo.backend.as_ref(), &entry.index)?;
        let per = chunk_size as u64 / bs;
        let blocks = source.blocks();
        changed.and_with(used);
        let (same, patch) = (Bitmap::new(index.header.chunk_count), Bitmap::new(index.header.chunk_count));
        let mut ids = vec![ChunkId::ZERO; 4096];
        let mut first = 0;
        while first < index.header.chunk_count {
            let n = (index.header.chunk_count - first).min(4096) as usize;
            index.read_records(first, &mut ids[..n])?;
            for (k, id) in ids[..n].iter().enumerate() {
                let c = first + k as u64;
                let (b0, b1) = (c * per, ((c + 1) * per).min(blocks));
                if partial.any_in(b0, b1) || !(b0..b1).all(|b| used.get(b) == prev_used.get(b)) {
                    continue;
                }
                // Only chunks the repository still holds.
                if !id.is_zero_marker() && !chunk_index.contains(id) {
                    continue;
                }
                let n_changed = (b0..b1).filter(|&b| changed.get(b)).count() as u64;
                if n_changed == 0 {
                    same.set(c);
                } else if n_changed * 2 <= b1 - b0 {
                    patch.set(c);
                }
            }
            first += n as u64;
        }
        Ok(Some(Reuse {
            base,
            same,
            patch,
            changed,
            index,
            repo: repo.clone(),
            chunks: chunk_index.clone(),
            block: bs,
            chunk: chunk_size as u64,
            size: volume.size,
            cache_first: u64::MAX,
            cache: Vec::new(),
        }))
    }

    /// Blocks that must stay protected: those of chunks neither reused nor patched, and the
    /// changed blocks of patched chunks.
    fn unprotect(&self, area: &Bitmap) {
        let per = self.chunk / self.block;
        for c in self.same.ones_from(0, usize::MAX) {
            for b in c * per..(c + 1) * per {
                area.clear(b);
            }
        }
        for c in self.patch.ones_from(0, usize::MAX) {
            for b in c * per..(c + 1) * per {
                if !self.changed.get(b) {
                    area.clear(b);
                }
            }
        }
    }

    fn id(&mut self, seq: u64) -> Result<ChunkId> {
        const BATCH: u64 = 4096;
        if seq < self.cache_first || seq >= self.cache_first + self.cache.len() as u64 {
            let first = seq - seq % BATCH;
            let n = BATCH.min(self.index.header.chunk_count - first) as usize;
            self.cache = vec![ChunkId::ZERO; n];
            self.index.read_records(first, &mut self.cache)?;
            self.cache_first = first;
        }
        Ok(self.cache[(seq - self.cache_first) as usize])
    }

    fn get(&mut self, seq: u64) -> Result<Option<Prior>> {
        if self.same.get(seq) {
            return Ok(Some(Prior::Same(self.id(seq)?)));
        }
        if !self.patch.get(seq) {
            return Ok(None);
        }
        let start = seq * self.chunk;
        let len = self.chunk.min(self.size - start);
        let id = self.id(seq)?;
        let base = if id.is_zero_marker() {
            vec![0u8; len as usize]
        } else {
            self.repo
                .read_chunk(&self.chunks, &id)
                .with_context(|| format!("reading chunk {seq} of snapshot {}", self.base))?
        };
        anyhow::ensure!(
            base.len() as u64 == len,
            "chunk {seq} of snapshot {} holds {} bytes, not {len}",
            self.base,
            base.len()
        );
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let per = self.chunk / self.block;
        for b in seq * per..(seq + 1) * per {
            if self.changed.get(b) {
                let r = b * self.block..((b + 1) * self.block).min(start + len);
                push_range(&mut ranges, r);
            }
        }
        Ok(Some(Prior::Patch(base, ranges)))
    }
}

/// A used-block map computed once, up front, and replayed in order from a temporary file
/// (16 bytes per range; nothing grows in memory with the volume).
struct Materialized {
    filesystem: Option<String>,
    description: String,
    reported: Option<u64>,
    warnings: Vec<String>,
    reader: BufReader<File>,
    pending: Option<Range<u64>>,
    done: bool,
}

impl Materialized {
    fn build(map: &mut dyn UsedMap, size: u64, bs: u64, used: &Bitmap, partial: &Bitmap) -> Result<Materialized> {
        let file = tempfile::tempfile().context("temporary file for the used-block map")?;
        let mut w = BufWriter::new(file);
        let step = 64u64 << 20;
        let mut pos = 0;
        let mut ranges = Vec::new();
        let mut merged: Vec<Range<u64>> = Vec::new();
        while pos < size {
            let len = step.min(size - pos);
            ranges.clear();
            map.used_ranges(pos, len, &mut ranges)?;
            for r in ranges.drain(..) {
                push_range(&mut merged, r);
            }
            // Keep the last range open: the next step may extend it.
            let keep = merged.pop();
            for r in merged.drain(..) {
                record(&mut w, &r, bs, used, partial)?;
            }
            if let Some(k) = keep {
                merged.push(k);
            }
            pos += len;
        }
        for r in merged.drain(..) {
            record(&mut w, &r, bs, used, partial)?;
        }
        let mut file = w.into_inner().map_err(|e| e.into_error())?;
        std::io::Seek::rewind(&mut file)?;
        Ok(Materialized {
            filesystem: map.filesystem().map(str::to_string),
            description: map.describe(),
            reported: map.reported_used_bytes(),
            warnings: map.take_warnings(),
            reader: BufReader::new(file),
            pending: None,
            done: false,
        })
    }

    fn next(&mut self) -> Result<Option<Range<u64>>> {
        if let Some(r) = self.pending.take() {
            return Ok(Some(r));
        }
        if self.done {
            return Ok(None);
        }
        let mut rec = [0u8; 16];
        match self.reader.read_exact(&mut rec) {
            Ok(()) => Ok(Some(
                u64::from_le_bytes(rec[..8].try_into().unwrap())..u64::from_le_bytes(rec[8..].try_into().unwrap()),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.done = true;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn record(w: &mut impl Write, r: &Range<u64>, bs: u64, used: &Bitmap, partial: &Bitmap) -> Result<()> {
    w.write_all(&r.start.to_le_bytes())?;
    w.write_all(&r.end.to_le_bytes())?;
    let (first_full, end_full) = (r.start.div_ceil(bs), r.end / bs);
    if first_full < end_full {
        used.set_range(first_full, end_full);
    }
    if !r.start.is_multiple_of(bs) {
        partial.set(r.start / bs);
    }
    if !r.end.is_multiple_of(bs) {
        partial.set(r.end / bs);
    }
    if first_full > end_full {
        // Inside a single block.
        partial.set(r.start / bs);
    }
    Ok(())
}

impl UsedMap for Materialized {
    fn filesystem(&self) -> Option<&str> {
        self.filesystem.as_deref()
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
    fn reported_used_bytes(&self) -> Option<u64> {
        self.reported
    }
    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
    fn file_extents(&mut self, _path: &str) -> Result<Option<FileExtents>> {
        anyhow::bail!("exclusions are applied before the map is materialised")
    }
    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let end = start + len;
        while let Some(r) = self.next()? {
            if r.end <= start {
                continue;
            }
            if r.start >= end {
                self.pending = Some(r);
                break;
            }
            push_range(out, r.start.max(start)..r.end.min(end));
            if r.end > end {
                self.pending = Some(r);
                break;
            }
        }
        Ok(())
    }
}
