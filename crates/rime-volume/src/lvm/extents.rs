//! Where a logical volume's bytes lie on its physical volumes, and reading them through that
//! map.
//!
//! An [`LvExtents`] is a sorted list of non-overlapping pieces: a linear piece is a run of the
//! LV's bytes at one place of one PV (an index into the caller's list of PV regions); a striped
//! piece is a whole striped segment, kept as its formula (chunk `c` lies on stripe `c mod N`, row
//! `c div N`) so that its size in memory does not grow with the segment. A thin volume has no
//! pieces: it is translated through its pool's mapping (looked up in the pool's metadata for
//! each range asked for) and then through the pool's data LV. Bytes of the LV that no piece or
//! mapping covers read as zeros (`zero` segments, unprovisioned thin blocks). [`LvSource`] reads
//! an LV this way, so every filesystem reader and map in Rime works on an LV as on a partition.

use super::thin::ThinDevice;
use crate::device::{BlockSource, Region};
use anyhow::{ensure, Result};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub lv_start: u64,
    pub len: u64,
    pub place: Place,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// On PV `pv` (an index into the assembly's list) from `pv_start`.
    Linear { pv: usize, pv_start: u64 },
    /// Chunks of `stripe_size` dealt round-robin over `stripes` (PV index, start of that
    /// stripe's area).
    Striped { stripe_size: u64, stripes: Vec<(usize, u64)> },
}

impl Piece {
    pub fn linear(lv_start: u64, len: u64, pv: usize, pv_start: u64) -> Piece {
        Piece { lv_start, len, place: Place::Linear { pv, pv_start } }
    }

    /// The PV ranges the piece occupies.
    pub fn pv_ranges(&self) -> Vec<(usize, Range<u64>)> {
        match &self.place {
            Place::Linear { pv, pv_start } => vec![(*pv, *pv_start..pv_start + self.len)],
            Place::Striped { stripes, .. } => {
                let per = self.len / stripes.len() as u64;
                stripes.iter().map(|&(pv, start)| (pv, start..start + per)).collect()
            }
        }
    }

    /// Calls `f(pv, pv_range, lv_offset)` for the part `[from, to)` of the LV inside the piece.
    fn translate(&self, from: u64, to: u64, f: &mut dyn FnMut(usize, Range<u64>, u64)) {
        match &self.place {
            Place::Linear { pv, pv_start } => {
                f(*pv, pv_start + (from - self.lv_start)..pv_start + (to - self.lv_start), from)
            }
            Place::Striped { stripe_size, stripes } => {
                let n = stripes.len() as u64;
                let mut at = from;
                while at < to {
                    let rel = at - self.lv_start;
                    let (chunk, within) = (rel / stripe_size, rel % stripe_size);
                    let end = to.min(at + (stripe_size - within));
                    let (pv, base) = stripes[(chunk % n) as usize];
                    let start = base + (chunk / n) * stripe_size + within;
                    f(pv, start..start + (end - at), at);
                    at = end;
                }
            }
        }
    }
}

#[derive(Default)]
pub struct LvExtents {
    pub size: u64,
    pieces: Vec<Piece>,
    thin: Option<ThinMap>,
}

/// A thin volume: its device in the pool's metadata, and the pool's data LV.
struct ThinMap {
    device: ThinDevice,
    pool_data: Arc<LvExtents>,
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
        Ok(LvExtents { size, pieces, thin: None })
    }

    /// A thin volume of `size` bytes: `device` maps its blocks into `pool_data`.
    pub fn thin(size: u64, device: ThinDevice, pool_data: Arc<LvExtents>) -> LvExtents {
        LvExtents { size, pieces: Vec::new(), thin: Some(ThinMap { device, pool_data }) }
    }

    pub fn is_thin(&self) -> bool {
        self.thin.is_some()
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Calls `f(pv, pv_range, lv_offset)` for each part of the LV range `r` that lies on a PV, in
    /// LV order; `lv_offset` is where the part starts in the LV. Fails only when a thin pool's
    /// metadata cannot be read.
    pub fn translate(&self, r: Range<u64>, f: &mut dyn FnMut(usize, Range<u64>, u64)) -> Result<()> {
        if let Some(thin) = &self.thin {
            let bs = thin.device.block_size();
            for run in thin.device.runs_in(r.start / bs..r.end.div_ceil(bs))? {
                let (virt, data) = (run.virt * bs, run.data * bs);
                let (from, to) = (r.start.max(virt), r.end.min(virt + run.len * bs));
                if from >= to {
                    continue;
                }
                let pool_from = data + (from - virt);
                thin.pool_data.translate(pool_from..pool_from + (to - from), &mut |pv, pr, pool_at| {
                    f(pv, pr, from + (pool_at - pool_from))
                })?;
            }
            return Ok(());
        }
        let first = self.pieces.partition_point(|p| p.lv_start + p.len <= r.start);
        for p in &self.pieces[first..] {
            if p.lv_start >= r.end {
                break;
            }
            p.translate(r.start.max(p.lv_start), r.end.min(p.lv_start + p.len), f);
        }
        Ok(())
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
        let mapped = self.extents.translate(offset..end, &mut |pv, range, lv_at| {
            if result.is_err() {
                return;
            }
            let at = (lv_at - offset) as usize;
            let len = (range.end - range.start) as usize;
            if let Err(e) = self.pvs[pv].read_at(range.start, &mut buf[at..at + len]) {
                result = Err(std::io::Error::other(format!("{e:#}")));
            }
        });
        mapped.map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_chunks_go_round_robin_over_the_stripes() {
        let k = 64 * 1024;
        let striped = Piece {
            lv_start: 0,
            len: 8 * k,
            place: Place::Striped { stripe_size: k, stripes: vec![(0, 1000 * k), (1, 2000 * k)] },
        };
        let e = LvExtents::new(8 * k, vec![striped]).unwrap();
        let mut parts = Vec::new();
        // Half of chunk 2, chunk 3 and a quarter of chunk 4.
        e.translate(2 * k + k / 2..4 * k + k / 4, &mut |pv, r, at| parts.push((pv, r, at))).unwrap();
        assert_eq!(
            parts,
            vec![
                (0, 1001 * k + k / 2..1002 * k, 2 * k + k / 2),
                (1, 2001 * k..2002 * k, 3 * k),
                (0, 1002 * k..1002 * k + k / 4, 4 * k),
            ]
        );
        assert_eq!(e.pieces()[0].pv_ranges(), vec![(0, 1000 * k..1004 * k), (1, 2000 * k..2004 * k)]);
    }

    #[test]
    fn gaps_read_as_zeros_and_pieces_must_not_overlap() {
        assert!(LvExtents::new(10, vec![Piece::linear(0, 6, 0, 0), Piece::linear(5, 5, 0, 100)]).is_err());
        assert!(LvExtents::new(10, vec![Piece::linear(8, 6, 0, 0)]).is_err());
        let e = Arc::new(LvExtents::new(8192, vec![Piece::linear(4096, 4096, 0, 0)]).unwrap());
        let data: Arc<dyn BlockSource> = Arc::new(Ones);
        let region = e.region(&[Region::from_source(data, "ones", 1 << 20)], "lv");
        let mut buf = vec![9u8; 8192];
        region.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 1));
    }

    struct Ones;
    impl BlockSource for Ones {
        fn read_exact_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
            buf.fill(1);
            Ok(())
        }
    }
}
