//! Where a logical volume's bytes lie on its physical volumes, and reading them through that
//! map.
//!
//! An [`LvExtents`] is a sorted list of non-overlapping pieces, each a run of the LV's bytes
//! at one place of one PV (an index into the caller's list of PV regions). Linear segments give
//! one piece each, striped segments one per stripe chunk, thin volumes one per run of
//! consecutive pool blocks. Bytes of the LV covered by no piece read as zeros (`zero` segments,
//! unprovisioned thin blocks). [`LvSource`] reads an LV through its pieces, so every filesystem
//! reader and map in Rime works on an LV as on a partition.

use crate::device::{BlockSource, Region};
use anyhow::{ensure, Result};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub lv_start: u64,
    pub len: u64,
    /// Index of the PV in the assembly's list.
    pub pv: usize,
    pub pv_start: u64,
}

#[derive(Clone, Debug, Default)]
pub struct LvExtents {
    pub size: u64,
    pieces: Vec<Piece>,
}

impl LvExtents {
    /// Pieces must come in LV order without overlapping, and lie within `size`.
    pub fn new(size: u64, pieces: Vec<Piece>) -> Result<LvExtents> {
        let mut end = 0;
        for p in &pieces {
            ensure!(p.len > 0 && p.lv_start >= end, "LV pieces overlap or are out of order at byte {}", p.lv_start);
            end =
                p.lv_start.checked_add(p.len).filter(|&e| e <= size).ok_or_else(|| {
                    anyhow::anyhow!("an LV piece at byte {} runs past the LV's {size} bytes", p.lv_start)
                })?;
        }
        Ok(LvExtents { size, pieces })
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Calls `f(pv, pv_range, lv_offset)` for each part of the LV range `r` that lies on a PV, in
    /// LV order; `lv_offset` is where the part starts in the LV.
    pub fn translate(&self, r: Range<u64>, f: &mut dyn FnMut(usize, Range<u64>, u64)) {
        let first = self.pieces.partition_point(|p| p.lv_start + p.len <= r.start);
        for p in &self.pieces[first..] {
            if p.lv_start >= r.end {
                break;
            }
            let from = r.start.max(p.lv_start);
            let to = r.end.min(p.lv_start + p.len);
            f(p.pv, p.pv_start + (from - p.lv_start)..p.pv_start + (to - p.lv_start), from);
        }
    }

    /// The LV as a region read through its pieces.
    pub fn region(self: &Arc<Self>, pvs: &[Region], name: &str) -> Region {
        let source = LvSource { extents: self.clone(), pvs: pvs.to_vec() };
        Region::from_source(Arc::new(source), name, self.size)
    }
}

/// Reads an LV: each piece from its PV, gaps as zeros.
struct LvSource {
    extents: Arc<LvExtents>,
    pvs: Vec<Region>,
}

impl BlockSource for LvSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.extents.size {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of the LV"));
        }
        buf.fill(0);
        let mut result = Ok(());
        self.extents.translate(offset..end, &mut |pv, range, lv_at| {
            if result.is_err() {
                return;
            }
            let at = (lv_at - offset) as usize;
            let len = (range.end - range.start) as usize;
            if let Err(e) = self.pvs[pv].read_at(range.start, &mut buf[at..at + len]) {
                result = Err(std::io::Error::other(format!("{e:#}")));
            }
        });
        result
    }
}
