//! Incremental backups from a record of changed blocks: what a backup can take from an
//! earlier snapshot instead of reading the volume ([`Reuse`]), and the used-block map
//! materialised once into bitmaps at the change record's granularity ([`Materialized`]).
//!
//! Used by both sources of changed blocks: `rime serve`'s tracking (`online.rs`) and the dirty
//! bitmaps of libvirt checkpoints (`vms/live.rs`).
//!
//! Invariant: a chunk is reused only when the blocks it holds are exactly the base's used
//! blocks and none of them is partly used, so its bytes are what reading it would give; a
//! chunk the repository no longer holds is never reused.

use crate::archive::Prior;
use anyhow::{Context, Result};
use rime_repo::volume_index::VolumeIndexReader;
use rime_repo::{ChunkId, ChunkIndex, Repository, VolumeEntry};
use rime_snapshot::Bitmap;
use rime_volume::usedmap::{push_range, FileExtents, UsedMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::sync::Arc;

/// What an incremental backup takes from the previous snapshot instead of the volume.
pub struct Reuse {
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
    ///
    /// `base` is the earlier snapshot and `entry` its copy of this volume; `changed` holds the
    /// blocks (of `block` bytes) written since it, `prev_used` the blocks it imaged whole, and
    /// `used`/`partial` this backup's map at the same granularity. None: nothing can be reused
    /// (the base's volume has another size or chunk size).
    #[allow(clippy::too_many_arguments)]
    pub fn find(
        repo: &Repository,
        chunk_index: &Arc<ChunkIndex>,
        base: String,
        entry: &VolumeEntry,
        block: u64,
        changed: Bitmap,
        prev_used: &Bitmap,
        used: &Bitmap,
        partial: &Bitmap,
    ) -> Result<Option<Reuse>> {
        let chunk_size = repo.config.chunk_size;
        let bs = block;
        let blocks = used.len();
        if !(chunk_size as u64).is_multiple_of(bs)
            || entry.chunk_size != chunk_size
            || entry.size.div_ceil(bs) != blocks
            || changed.len() != blocks
            || prev_used.len() != blocks
        {
            return Ok(None);
        }
        let index = VolumeIndexReader::open(repo.backend.as_ref(), &entry.index)?;
        let per = chunk_size as u64 / bs;
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
            size: entry.size,
            cache_first: u64::MAX,
            cache: Vec::new(),
        }))
    }

    /// What it reuses, in words, for the manifest.
    pub fn describe(&self) -> String {
        format!(
            "incremental from {}: {} chunks unchanged, {} with {} changed blocks read anew",
            self.base,
            self.same.count(),
            self.patch.count(),
            self.changed.count()
        )
    }

    /// For `ArchiveInput::prior`.
    pub fn prior_fn(&mut self) -> impl FnMut(u64) -> Result<Option<Prior>> + Send + '_ {
        move |seq| self.get(seq)
    }

    /// Blocks that must stay protected: those of chunks neither reused nor patched, and the
    /// changed blocks of patched chunks.
    pub fn unprotect(&self, area: &Bitmap) {
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

    pub fn get(&mut self, seq: u64) -> Result<Option<Prior>> {
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
pub struct Materialized {
    filesystem: Option<String>,
    description: String,
    reported: Option<u64>,
    warnings: Vec<String>,
    reader: BufReader<File>,
    pending: Option<Range<u64>>,
    done: bool,
}

impl Materialized {
    /// Walks `map` once over `size` bytes, marking `used` (blocks of `bs` bytes wholly used)
    /// and `partial` (blocks partly used) on the way.
    pub fn build(map: &mut dyn UsedMap, size: u64, bs: u64, used: &Bitmap, partial: &Bitmap) -> Result<Materialized> {
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
