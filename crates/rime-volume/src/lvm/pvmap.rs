//! Used-block maps of physical volumes: each LV's filesystem map, carried down to the PV.
//!
//! For every PV of an assembly the map keeps:
//! - everything outside the extent area: the label, the metadata areas at the start and end
//!   (so a restored disk's VG activates as it was) and any gap LVM left;
//! - for each data LV with a filesystem Rime maps, the blocks that filesystem uses, translated
//!   through the LV's pieces (so a thin snapshot's blocks shared with its origin are one range
//!   and are imaged once); a swap LV keeps its header page;
//! - whole: LUKS LVs, LVs with no known filesystem, pool metadata and its spare, and every LV
//!   Rime cannot map (RAID, cache, VDO, ...) or cannot read (a PV missing, pool metadata
//!   damaged; a thin volume then keeps its whole pool), each with a warning saying what was not
//!   understood;
//! - nothing else: unallocated extents, and pool blocks no thin volume's filesystem uses, are
//!   not read.
//!
//! The maps are computed at once, walking each LV's filesystem map in order, and held as sorted
//! range lists (one entry per used run: memory grows with fragmentation, not with size). A PV
//! whose metadata cannot be read is kept whole.

use super::assemble::{AssembledLv, AssembledVg, Assembly, Role};
use super::extents::LvExtents;
use super::vg::SegmentKind;
use crate::fs::{self, MapOptions};
use crate::luks::LuksInfo;
use crate::usedmap::{push_range, swap_files_of, union_ranges, FileExtent, FileExtents, SwapFile, UsedMap};
use anyhow::Result;
use std::ops::Range;
use std::sync::Arc;

/// How much of an LV's filesystem map is asked for at a time.
const WINDOW: u64 = 1 << 30;

/// What the snapshot records about a PV.
#[derive(Clone, Debug)]
pub struct PvInfo {
    pub uuid: Option<String>,
    pub vg: Option<VgInfo>,
    /// LVs with bytes on this PV (thin volumes and pools: whose pool data is here).
    pub lvs: Vec<LvInfo>,
    /// Why the PV could not be mapped, if it could not.
    pub problem: Option<String>,
}

#[derive(Clone, Debug)]
pub struct VgInfo {
    pub name: String,
    pub uuid: String,
    pub seqno: u64,
    pub extent_size: u64,
    pub pe_start: u64,
    pub pe_count: u64,
}

#[derive(Clone, Debug)]
pub struct LvInfo {
    pub name: String,
    pub uuid: String,
    /// "linear", "striped (2 stripes of 64 KiB)", "thin", "thin-pool", "raid1", ...
    pub layout: String,
    pub role: String,
    pub size: u64,
    pub visible: bool,
    /// Thin volumes: their pool, and the origin of a thin snapshot.
    pub pool: Option<String>,
    pub origin: Option<String>,
    pub filesystem: Option<String>,
    pub map: String,
    pub encrypted: Option<LuksInfo>,
}

pub struct PvMap {
    ranges: Vec<Range<u64>>,
    description: String,
    warnings: Vec<String>,
    /// Filesystems of LVs whose first piece is on this PV, for file exclusions.
    filesystems: Vec<LvFilesystem>,
    index: usize,
}

struct LvFilesystem {
    extents: Arc<LvExtents>,
    map: Box<dyn UsedMap>,
}

/// Maps every PV of `assembly`, in its order.
pub fn map_pvs(assembly: &Assembly, options: &MapOptions) -> Vec<(PvMap, PvInfo)> {
    let n = assembly.pvs.len();
    let mut ranges: Vec<Vec<Range<u64>>> = vec![Vec::new(); n];
    let mut warnings: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut infos: Vec<PvInfo> = assembly
        .pvs
        .iter()
        .map(|p| PvInfo { uuid: p.uuid.clone(), vg: None, lvs: Vec::new(), problem: None })
        .collect();
    let mut filesystems: Vec<Vec<LvFilesystem>> = (0..n).map(|_| Vec::new()).collect();
    let regions = assembly.regions();

    for (i, pv) in assembly.pvs.iter().enumerate() {
        for note in &pv.notes {
            warnings[i].push(format!("LVM PV: {note}"));
        }
        match &pv.vg {
            Err(why) => {
                let what = pv.uuid.as_deref().map(|u| format!("LVM PV {u}")).unwrap_or("LVM PV".into());
                warnings[i].push(format!("{what}: {why}; imaging all non-zero blocks"));
                infos[i].problem = Some(why.clone());
                ranges[i].push(0..pv.region.len);
            }
            Ok(v) => {
                let avg = &assembly.vgs[*v];
                let Some(n) = avg.found.iter().position(|f| *f == Some(i)) else {
                    // Its VG's newest text does not list it (it was removed from the VG).
                    let why = format!("not a PV of volume group {} as its newest metadata says", avg.vg.name);
                    warnings[i].push(format!("LVM PV: {why}; imaging all non-zero blocks"));
                    infos[i].problem = Some(why);
                    ranges[i].push(0..pv.region.len);
                    continue;
                };
                let d = &avg.vg.pvs[n];
                // Checked in VolumeGroup::from_text: no overflow.
                let area_end = (d.pe_start + d.pe_count * avg.vg.extent_size).min(pv.region.len);
                ranges[i].push(0..d.pe_start.min(pv.region.len));
                ranges[i].push(area_end..pv.region.len);
                ranges[i]
                    .extend(pv.metadata_areas.iter().map(|a| a.start.min(pv.region.len)..a.end.min(pv.region.len)));
                if let Some(why) = &avg.unmappable {
                    warnings[i].push(format!("VG {}: {why}; imaging all its non-zero blocks", avg.vg.name));
                    ranges[i].push(0..pv.region.len);
                }
                infos[i].vg = Some(VgInfo {
                    name: avg.vg.name.clone(),
                    uuid: avg.vg.uuid.clone(),
                    seqno: avg.vg.seqno,
                    extent_size: avg.vg.extent_size,
                    pe_start: d.pe_start,
                    pe_count: d.pe_count,
                });
            }
        }
    }

    for avg in &assembly.vgs {
        let whole_vg = avg.unmappable.is_some();
        for lv in &avg.lvs {
            let mut info = LvInfo {
                name: lv.desc.name.clone(),
                uuid: lv.desc.uuid.clone(),
                layout: lv.desc.layout(),
                role: lv.role.as_str(),
                size: lv.desc.extents() * avg.vg.extent_size,
                visible: lv.desc.visible,
                pool: None,
                origin: None,
                filesystem: None,
                map: String::new(),
                encrypted: None,
            };
            if let Some(SegmentKind::Thin { pool, origin, .. }) = lv.desc.segments.first().map(|s| &s.kind) {
                info.pool = Some(pool.clone());
                info.origin = origin.clone();
            }
            let name = format!("{}/{}", avg.vg.name, lv.desc.name);
            let at = home(avg, lv);
            let keep = |ranges: &mut [Vec<Range<u64>>]| {
                for (pv, r) in whole(avg, lv) {
                    ranges[pv].push(r);
                }
            };
            info.map = match (&lv.role, &lv.extents) {
                _ if whole_vg => "non-zero chunks (its volume group is kept whole)".into(),
                (Role::ThinPool, _) => "thin pool (its thin volumes are mapped)".into(),
                (Role::PoolData, _) => "thin-pool data: the blocks its thin volumes' filesystems use".into(),
                (Role::PoolMetadata, _) | (Role::Spare, _) => {
                    keep(&mut ranges);
                    "kept whole (LVM metadata)".into()
                }
                (Role::Unmapped(kind), _) => {
                    keep(&mut ranges);
                    warnings[at].push(format!(
                        "LV {name}: segment type '{kind}' is not mapped by Rime; its extents are imaged whole"
                    ));
                    "non-zero chunks (a segment type Rime does not map)".into()
                }
                (Role::Data, Err(why)) => {
                    keep(&mut ranges);
                    warnings[at].push(format!("LV {name}: {why}; imaging what of it is here whole"));
                    "non-zero chunks (its extents cannot be read)".into()
                }
                (Role::Data, Ok(extents)) => {
                    let region = extents.region(&regions, &name);
                    let detected = fs::detect_with(&region, options);
                    info.encrypted = detected.encrypted.clone();
                    info.filesystem = detected.map.filesystem().map(str::to_string);
                    if let Some(w) = detected.warning {
                        warnings[at].push(format!("LV {name}: {w}"));
                    }
                    let mut map = detected.map;
                    match map.filesystem().is_some().then(|| lv_ranges(map.as_mut(), extents, &mut ranges)) {
                        Some(Ok(())) => {
                            let description = map.describe();
                            // A thin volume's blocks may be shared with its snapshots, which may
                            // use them under other names: its files are never excluded.
                            if !extents.is_thin() {
                                filesystems[at].push(LvFilesystem { extents: extents.clone(), map });
                            }
                            description
                        }
                        Some(Err(e)) => {
                            info.filesystem = None;
                            keep(&mut ranges);
                            warnings[at].push(format!("LV {name}: {e:#}; imaging all its non-zero blocks"));
                            "non-zero chunks (its filesystem map failed)".into()
                        }
                        None => {
                            keep(&mut ranges);
                            map.describe()
                        }
                    }
                }
            };
            for pv in pvs_of(avg, lv) {
                infos[pv].lvs.push(info.clone());
            }
        }
    }

    let mut out = Vec::new();
    for (i, ((r, w), fs)) in ranges.into_iter().zip(warnings).zip(filesystems).enumerate() {
        let info = infos[i].clone();
        let description = match &info.vg {
            Some(vg) => {
                let lvs: Vec<String> = info
                    .lvs
                    .iter()
                    .filter(|l| l.visible)
                    .map(|l| format!("{}: {}", l.name, l.filesystem.as_deref().unwrap_or(&l.layout)))
                    .collect();
                format!("LVM2 PV of VG {} ({})", vg.name, lvs.join(", "))
            }
            None => "non-zero chunks (damaged LVM PV)".into(),
        };
        out.push((PvMap { ranges: union_ranges(r), description, warnings: w, filesystems: fs, index: i }, info));
    }
    out
}

/// Adds the PV ranges of the blocks `map` uses within the LV.
fn lv_ranges(map: &mut dyn UsedMap, extents: &LvExtents, out: &mut [Vec<Range<u64>>]) -> Result<()> {
    let mut used = Vec::new();
    let mut at = 0;
    while at < extents.size {
        let len = WINDOW.min(extents.size - at);
        used.clear();
        map.used_ranges(at, len, &mut used)?;
        for r in &used {
            // Consecutive parts on one PV (the rows of a striped LV) merge as they come, so a
            // fully used LV costs a few ranges, not one per stripe chunk.
            extents.translate(r.clone(), &mut |pv, range, _| match out[pv].last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => out[pv].push(range),
            })?;
        }
        at += len;
    }
    Ok(())
}

/// What "keep this LV whole" keeps: its pieces when known, else its linear and striped
/// extents; for a thin volume, its pool's data.
fn whole(avg: &AssembledVg, lv: &AssembledLv) -> Vec<(usize, Range<u64>)> {
    let mut out: Vec<(usize, Range<u64>)> = lv.occupied.clone();
    if let Ok(e) = &lv.extents {
        for p in e.pieces() {
            out.extend(p.pv_ranges());
        }
    }
    if let Some(SegmentKind::Thin { pool, .. }) = lv.desc.segments.first().map(|s| &s.kind) {
        let data = avg.lvs.iter().find(|l| l.desc.name == *pool).and_then(|p| match p.desc.segments.first() {
            Some(s) => match &s.kind {
                SegmentKind::ThinPool { data, .. } => avg.lvs.iter().find(|l| l.desc.name == *data),
                _ => None,
            },
            None => None,
        });
        if let Some(d) = data {
            out.extend(whole(avg, d));
        }
    }
    out
}

/// The PVs an LV has bytes on (for a thin volume or pool: its pool data's PVs).
fn pvs_of(avg: &AssembledVg, lv: &AssembledLv) -> Vec<usize> {
    let mut pvs: Vec<usize> = whole(avg, lv).into_iter().map(|(pv, _)| pv).collect();
    if lv.role == Role::ThinPool {
        for s in &lv.desc.segments {
            if let SegmentKind::ThinPool { data, .. } = &s.kind {
                if let Some(d) = avg.lvs.iter().find(|l| l.desc.name == *data) {
                    pvs.extend(pvs_of(avg, d));
                }
            }
        }
    }
    pvs.sort_unstable();
    pvs.dedup();
    pvs
}

/// The PV an LV's messages and file lookups belong to: where its first byte lies, else the
/// first PV of its VG that is here.
fn home(avg: &AssembledVg, lv: &AssembledLv) -> usize {
    pvs_of(avg, lv).first().copied().or_else(|| avg.found.iter().flatten().next().copied()).unwrap_or(0)
}

impl UsedMap for PvMap {
    fn filesystem(&self) -> Option<&str> {
        None
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let end = start + len;
        let first = self.ranges.partition_point(|r| r.end <= start);
        for r in &self.ranges[first..] {
            if r.start >= end {
                break;
            }
            push_range(out, r.start.max(start)..r.end.min(end));
        }
        Ok(())
    }

    /// A path names a file in whichever LVs hold one. Only the parts of the file on this PV are
    /// returned: parts elsewhere stay imaged, which is safe.
    fn file_extents(&mut self, path: &str) -> Result<Option<FileExtents>> {
        let mut found: Option<FileExtents> = None;
        for lv in self.filesystems.iter_mut() {
            let Ok(Some(fe)) = lv.map.file_extents(path) else { continue };
            let mut extents = Vec::new();
            for e in &fe.extents {
                // A part that cannot be translated stays imaged, which is safe.
                let _ = lv.extents.translate(e.range.clone(), &mut |pv, range, lv_at| {
                    if pv == self.index {
                        extents.push(FileExtent { file_offset: e.file_offset + (lv_at - e.range.start), range });
                    }
                });
            }
            match found.as_mut() {
                Some(f) => f.extents.extend(extents),
                None => found = Some(FileExtents { size: fe.size, extents }),
            }
        }
        Ok(found)
    }

    fn swap_files(&mut self) -> Result<Vec<SwapFile>> {
        Ok(swap_files_of(self.filesystems.iter_mut().map(|l| &mut l.map)))
    }

    fn take_warnings(&mut self) -> Vec<String> {
        let mut all = std::mem::take(&mut self.warnings);
        for lv in self.filesystems.iter_mut() {
            all.extend(lv.map.take_warnings());
        }
        all
    }
}
