//! What an NBD export of a disk says about its blocks: which ranges read as zeros
//! (`base:allocation`), and which changed since a checkpoint (`qemu:dirty-bitmap:*`).
//!
//! Invariant: a range is left out of a used-block map only where the export itself reports
//! that it reads as zeros, so the image restored from the map holds the same bytes.

use anyhow::{Context, Result};
use rime_nbd::proto::{STATE_DIRTY, STATE_ZERO};
use rime_nbd::NbdClient;
use rime_snapshot::Bitmap;
use rime_volume::usedmap::{push_range, FileExtents, SwapFile, UsedMap};
use std::ops::Range;
use std::sync::Arc;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// Largest range asked about in one go (servers answer in pieces anyway).
const STATUS_WINDOW: u64 = 1 << 30;

/// A disk's used-block map without the ranges its export reports as reading zeros: they are
/// neither read nor stored (a restore writes zeros there, or leaves a hole in a new file).
pub struct SkipZeros {
    inner: Box<dyn UsedMap>,
    client: Arc<NbdClient>,
    skipped: u64,
}

impl SkipZeros {
    pub fn new(inner: Box<dyn UsedMap>, client: Arc<NbdClient>) -> SkipZeros {
        SkipZeros { inner, client, skipped: 0 }
    }
}

impl UsedMap for SkipZeros {
    fn filesystem(&self) -> Option<&str> {
        self.inner.filesystem()
    }
    fn describe(&self) -> String {
        format!("{}, less the ranges the export reports as zeros", self.inner.describe())
    }
    fn reported_used_bytes(&self) -> Option<u64> {
        self.inner.reported_used_bytes()
    }
    fn file_extents(&mut self, path: &str) -> Result<Option<FileExtents>> {
        self.inner.file_extents(path)
    }
    fn swap_files(&mut self) -> Result<Vec<SwapFile>> {
        self.inner.swap_files()
    }
    fn take_warnings(&mut self) -> Vec<String> {
        self.inner.take_warnings()
    }
    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let mut used = Vec::new();
        self.inner.used_ranges(start, len, &mut used)?;
        let (Some(first), Some(last)) = (used.first(), used.last()) else { return Ok(()) };
        let zeros: Vec<Range<u64>> = self
            .client
            .block_status(BASE_ALLOCATION, first.start, last.end - first.start)
            .context("asking the export which ranges read as zeros")?
            .into_iter()
            .filter(|e| e.flags & STATE_ZERO != 0)
            .map(|e| e.offset..e.offset + e.len)
            .collect();
        let mut z = zeros.iter().peekable();
        for r in used {
            let mut pos = r.start;
            while pos < r.end {
                while z.peek().is_some_and(|zr| zr.end <= pos) {
                    z.next();
                }
                match z.peek() {
                    Some(zr) if zr.start <= pos => {
                        let skip_to = zr.end.min(r.end);
                        self.skipped += skip_to - pos;
                        pos = skip_to;
                    }
                    Some(zr) if zr.start < r.end => {
                        push_range(out, pos..zr.start);
                        pos = zr.start;
                    }
                    _ => {
                        push_range(out, pos..r.end);
                        pos = r.end;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The blocks of `block` bytes that the export's dirty bitmap `context` marks as changed.
pub fn dirty_blocks(client: &NbdClient, context: &str, block: u64) -> Result<Bitmap> {
    let size = client.size();
    let dirty = Bitmap::new(size.div_ceil(block));
    let mut pos = 0;
    while pos < size {
        let len = STATUS_WINDOW.min(size - pos);
        for e in
            client.block_status(context, pos, len).with_context(|| format!("reading the dirty bitmap {context}"))?
        {
            if e.flags & STATE_DIRTY != 0 && e.len > 0 {
                dirty.set_range(e.offset / block, (e.offset + e.len).div_ceil(block));
            }
        }
        pos += len;
    }
    Ok(dirty)
}
