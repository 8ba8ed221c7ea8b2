//! Assembling volume groups from the physical volumes found on one volume (a PV given directly,
//! or the PV partitions of a disk), and working out where each logical volume's bytes lie.
//!
//! Each PV's newest valid metadata copy names its VG; of several PVs of one VG, the text with
//! the highest `seqno` describes it. Every LV gets a role that says how the map treats it:
//! data LVs (linear, striped, thin) are read through their [`LvExtents`]; pool metadata, the
//! metadata spare and every LV a segment type Rime does not map refers to (RAID images, cache
//! pools, old-style snapshot stores, ...) are kept whole. An LV whose extents lie on a PV that is
//! not here, or whose pool metadata cannot be read, gets the reason instead of extents; the
//! caller keeps what of it is here whole.

use super::extents::{LvExtents, Piece, Place};
use super::label::{self, PvLabel};
use super::text;
use super::thin::ThinMetadata;
use super::vg::{LvDesc, SegmentKind, VolumeGroup};
use crate::device::Region;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

/// A region that carries an LVM label (valid or not).
pub struct FoundPv {
    pub region: Region,
    /// For messages: "partition 2", or the volume's name.
    pub label: String,
    pub uuid: Option<String>,
    /// Index of its VG in [`Assembly::vgs`], or why it has none.
    pub vg: Result<usize, String>,
    /// Metadata copies that were damaged or older.
    pub notes: Vec<String>,
    /// The label's metadata areas, kept whole whatever the VG text says.
    pub metadata_areas: Vec<Range<u64>>,
}

/// What a PV says about its volume group.
enum Described {
    Here(VolumeGroup),
    /// The PV keeps no metadata copy: its VG is described on other PVs.
    Elsewhere,
    Damaged(anyhow::Error),
}

pub struct Assembly {
    pub pvs: Vec<FoundPv>,
    pub vgs: Vec<AssembledVg>,
}

pub struct AssembledVg {
    pub vg: VolumeGroup,
    /// Why the VG cannot be mapped LV by LV (a pvmove in progress); its PVs are kept whole.
    pub unmappable: Option<String>,
    /// For each of `vg.pvs`, its index in [`Assembly::pvs`] when it is here.
    pub found: Vec<Option<usize>>,
    pub lvs: Vec<AssembledLv>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds data a filesystem may use: linear, striped or thin.
    Data,
    ThinPool,
    PoolMetadata,
    PoolData,
    /// The spare metadata area LVM keeps for pool repairs.
    Spare,
    /// A segment type Rime does not map, or an LV such a segment is built from.
    Unmapped(String),
}

impl Role {
    pub fn as_str(&self) -> String {
        match self {
            Role::Data => "data".into(),
            Role::ThinPool => "thin-pool".into(),
            Role::PoolMetadata => "thin-pool metadata".into(),
            Role::PoolData => "thin-pool data".into(),
            Role::Spare => "pool metadata spare".into(),
            Role::Unmapped(kind) => format!("part of a {kind} LV (not mapped)"),
        }
    }
}

pub struct AssembledLv {
    pub desc: LvDesc,
    pub role: Role,
    /// Where the LV's bytes lie, or why that cannot be known.
    pub extents: Result<Arc<LvExtents>, String>,
    /// The PV ranges its linear and striped segments occupy, known even when `extents` is not:
    /// what "keep it whole" keeps. `(index in Assembly::pvs, byte range)`.
    pub occupied: Vec<(usize, Range<u64>)>,
}

impl Assembly {
    /// Finds the PVs among `candidates` (region, label for messages) and assembles their VGs.
    pub fn new(candidates: Vec<(Region, String)>) -> Assembly {
        let mut pvs = Vec::new();
        let mut texts: Vec<(usize, Described)> = Vec::new();
        for (region, name) in candidates {
            // One entry per candidate, so callers' indices line up even if a label vanished
            // between their probe and this one.
            let (uuid, parsed, notes, metadata_areas) = match label::probe(&region) {
                Ok(None) => {
                    (None, Described::Damaged(anyhow::anyhow!("its LVM label is gone")), Vec::new(), Vec::new())
                }
                Err(e) => (None, Described::Damaged(e), Vec::new(), Vec::new()),
                Ok(Some(l)) => {
                    let (vg, notes) = read_vg(&region, &l);
                    (Some(l.uuid.clone()), vg, notes, l.metadata_areas.clone())
                }
            };
            texts.push((pvs.len(), parsed));
            pvs.push(FoundPv { region, label: name, uuid, vg: Err(String::new()), notes, metadata_areas });
        }
        // The same PV UUID on several regions (cloned disks, a dd copy): none of the copies can
        // be told apart, so each is kept whole.
        let copies: Vec<usize> = pvs
            .iter()
            .map(|p| p.uuid.as_ref().map_or(0, |u| pvs.iter().filter(|q| q.uuid.as_ref() == Some(u)).count()))
            .collect();
        for (i, &n) in copies.iter().enumerate() {
            if n > 1 {
                let uuid = pvs[i].uuid.take().unwrap_or_default();
                texts[i].1 = Described::Damaged(anyhow::anyhow!(
                    "PV {uuid} appears on {n} volumes or partitions (cloned disks?), so none of them is mapped"
                ));
                pvs[i].notes.clear();
            }
        }
        // One VG per UUID, described by its newest text.
        let mut vgs: Vec<VolumeGroup> = Vec::new();
        for (_, parsed) in &texts {
            if let Described::Here(vg) = parsed {
                match vgs.iter_mut().find(|v| v.uuid == vg.uuid) {
                    Some(v) if vg.seqno > v.seqno => *v = vg.clone(),
                    Some(_) => {}
                    None => vgs.push(vg.clone()),
                }
            }
        }
        for (i, parsed) in texts {
            let uuid = pvs[i].uuid.clone();
            pvs[i].vg = match parsed {
                Described::Elsewhere => {
                    vgs.iter().position(|v| v.pvs.iter().any(|p| Some(&p.uuid) == uuid.as_ref())).ok_or_else(|| {
                        "it keeps no metadata copy and its volume group is described only on PVs not being read"
                            .to_string()
                    })
                }
                Described::Damaged(e) => Err(format!("{e:#}")),
                Described::Here(vg) => Ok(vgs.iter().position(|v| v.uuid == vg.uuid).expect("collected above")),
            };
        }
        let vgs = vgs
            .into_iter()
            .enumerate()
            .map(|(n, vg)| {
                let found = vg
                    .pvs
                    .iter()
                    .map(|d| {
                        pvs.iter().position(|p| p.vg.as_ref().ok() == Some(&n) && p.uuid.as_deref() == Some(&d.uuid))
                    })
                    .collect();
                assemble_vg(vg, found, &pvs)
            })
            .collect();
        Assembly { pvs, vgs }
    }

    /// The regions of every PV, indexed as pieces refer to them.
    pub fn regions(&self) -> Vec<Region> {
        self.pvs.iter().map(|p| p.region.clone()).collect()
    }

    /// A logical volume as a region, for the explorer. The VG is found by its UUID (two VGs
    /// may share a name), or by name when no UUID is given.
    pub fn open_lv(&self, vg: &str, vg_uuid: Option<&str>, lv: &str) -> Result<Region> {
        let avg = self
            .vgs
            .iter()
            .find(|v| vg_uuid.map_or(v.vg.name == vg, |u| v.vg.uuid == u))
            .with_context(|| format!("no volume group '{vg}' here"))?;
        let alv = avg.lvs.iter().find(|l| l.desc.name == lv).with_context(|| {
            let names: Vec<&str> = avg.lvs.iter().filter(|l| l.desc.visible).map(|l| l.desc.name.as_str()).collect();
            format!("volume group {vg} has no logical volume '{lv}' (it has: {})", names.join(", "))
        })?;
        match &alv.extents {
            Ok(e) => Ok(e.region(&self.regions(), &format!("{vg}/{lv}"))),
            Err(why) => bail!("logical volume {vg}/{lv} cannot be read: {why}"),
        }
    }
}

fn read_vg(region: &Region, l: &PvLabel) -> (Described, Vec<String>) {
    match label::read_metadata(region, l) {
        Ok(Some(m)) => match text::parse(&m.text).and_then(|t| VolumeGroup::from_text(&t)) {
            Ok(vg) => (Described::Here(vg), m.notes),
            Err(e) => (Described::Damaged(e), m.notes),
        },
        Ok(None) => (Described::Elsewhere, Vec::new()),
        Err(e) => (Described::Damaged(e), Vec::new()),
    }
}

fn assemble_vg(vg: VolumeGroup, found: Vec<Option<usize>>, pvs: &[FoundPv]) -> AssembledVg {
    let roles = roles(&vg);
    let mut lvs: Vec<AssembledLv> = vg
        .lvs
        .iter()
        .zip(roles)
        .map(|(desc, role)| {
            let occupied = occupied(&vg, &found, desc);
            let extents = striped_pieces(&vg, &found, desc)
                .and_then(|p| LvExtents::new(desc.extents() * vg.extent_size, p))
                .map(Arc::new)
                .map_err(|e| format!("{e:#}"));
            AssembledLv { desc: desc.clone(), role, extents, occupied }
        })
        .collect();
    // Thin volumes go through their pool, whose sub-LVs are now known.
    let regions: Vec<Region> = pvs.iter().map(|p| p.region.clone()).collect();
    for i in 0..lvs.len() {
        if let Some((pool, device_id)) = thin_of(&lvs[i].desc) {
            let size = lvs[i].desc.extents() * vg.extent_size;
            lvs[i].extents =
                thin_extents(&lvs, &regions, &pool, device_id, size).map(Arc::new).map_err(|e| format!("{e:#}"));
        }
    }
    AssembledVg { unmappable: vg.not_mappable(), vg, found, lvs }
}

fn thin_of(lv: &LvDesc) -> Option<(String, u64)> {
    match lv.segments.as_slice() {
        [s] => match &s.kind {
            SegmentKind::Thin { pool, device_id, .. } => Some((pool.clone(), *device_id)),
            _ => None,
        },
        _ => None,
    }
}

/// The role of each LV, in `vg.lvs` order.
fn roles(vg: &VolumeGroup) -> Vec<Role> {
    let mut roles = vec![Role::Data; vg.lvs.len()];
    let index = |name: &str| vg.lvs.iter().position(|l| l.name == name);
    // Thin pools and their parts first; whatever is unmapped then overrides, whatever the order
    // of the LVs in the text.
    for (i, lv) in vg.lvs.iter().enumerate() {
        if lv.name.ends_with("_pmspare") {
            roles[i] = Role::Spare;
        }
        for s in &lv.segments {
            if let SegmentKind::ThinPool { metadata, data, .. } = &s.kind {
                roles[i] = Role::ThinPool;
                if let Some(m) = index(metadata) {
                    roles[m] = Role::PoolMetadata;
                }
                if let Some(d) = index(data) {
                    roles[d] = Role::PoolData;
                }
            }
        }
    }
    let mut pending = Vec::new();
    for (i, lv) in vg.lvs.iter().enumerate() {
        if let Some(kind) = lv.segments.iter().find_map(|s| match &s.kind {
            SegmentKind::Unmapped { kind, .. } => Some(kind.clone()),
            _ => None,
        }) {
            roles[i] = Role::Unmapped(kind);
            pending.push(i);
        }
    }
    // Everything an unmapped LV is built from, transitively, is kept whole with it.
    let mut seen: BTreeSet<usize> = pending.iter().copied().collect();
    while let Some(i) = pending.pop() {
        let Role::Unmapped(kind) = roles[i].clone() else { continue };
        for s in &vg.lvs[i].segments {
            if let SegmentKind::Unmapped { refers_to, .. } = &s.kind {
                for name in refers_to {
                    if let Some(j) = index(name) {
                        if seen.insert(j) {
                            roles[j] = Role::Unmapped(kind.clone());
                            pending.push(j);
                        }
                    }
                }
            }
        }
    }
    // A hidden LV no structure Rime knows accounts for (a cache's or a VDO's part, say) is kept
    // whole: it holds no filesystem of its own to map.
    for (i, lv) in vg.lvs.iter().enumerate() {
        if !lv.visible && roles[i] == Role::Data && thin_of(lv).is_none() {
            roles[i] = Role::Unmapped("hidden".into());
        }
    }
    roles
}

/// The PV ranges an LV's linear and striped segments occupy, on the PVs that are here.
fn occupied(vg: &VolumeGroup, found: &[Option<usize>], lv: &LvDesc) -> Vec<(usize, Range<u64>)> {
    let mut out = Vec::new();
    for s in &lv.segments {
        if let SegmentKind::Striped { stripes, .. } = &s.kind {
            let per_stripe = s.extent_count / stripes.len() as u64 * vg.extent_size;
            for (key, pe) in stripes {
                let Some(n) = vg.pvs.iter().position(|p| &p.key == key) else { continue };
                if let (Some(idx), Some(start)) = (found[n], pv_offset(vg, n, *pe)) {
                    out.push((idx, start..start + per_stripe));
                }
            }
        }
    }
    out
}

/// Byte offset of extent `pe` of the VG's PV number `n`, if the extent exists.
fn pv_offset(vg: &VolumeGroup, n: usize, pe: u64) -> Option<u64> {
    let pv = &vg.pvs[n];
    (pe < pv.pe_count).then(|| pv.pe_start + pe * vg.extent_size)
}

/// The pieces of an LV made of linear and striped segments (and `zero`/`error` ones).
fn striped_pieces(vg: &VolumeGroup, found: &[Option<usize>], lv: &LvDesc) -> Result<Vec<Piece>> {
    let ext = vg.extent_size;
    let mut pieces = Vec::new();
    for s in &lv.segments {
        let seg_start = s.start_extent * ext;
        match &s.kind {
            SegmentKind::Striped { stripe_size, stripes } => {
                let mut places = Vec::new();
                for (key, pe) in stripes {
                    let n = vg.pvs.iter().position(|p| &p.key == key).with_context(|| format!("no PV '{key}'"))?;
                    let idx = found[n].with_context(|| {
                        format!("its extents on PV {} lie on a volume that is not being read", vg.pvs[n].uuid)
                    })?;
                    let start =
                        pv_offset(vg, n, *pe).with_context(|| format!("extent {pe} is past the end of PV {key}"))?;
                    let per_stripe = s.extent_count / stripes.len() as u64;
                    ensure!(pe + per_stripe <= vg.pvs[n].pe_count, "segment runs past the end of PV {key}");
                    places.push((idx, start));
                }
                let len = s.extent_count * ext;
                pieces.push(match places[..] {
                    [(pv, pv_start)] => Piece::linear(seg_start, len, pv, pv_start),
                    _ => Piece {
                        lv_start: seg_start,
                        len,
                        place: Place::Striped { stripe_size: *stripe_size, stripes: places },
                    },
                });
            }
            SegmentKind::Virtual(_) | SegmentKind::ThinPool { .. } | SegmentKind::Thin { .. } => {}
            SegmentKind::Unmapped { kind, .. } => bail!("segment type '{kind}' is not mapped by Rime"),
        }
    }
    Ok(pieces)
}

/// A thin volume's extents: its device in the pool's metadata (checked whole once here),
/// through the pool's data LV.
fn thin_extents(lvs: &[AssembledLv], regions: &[Region], pool: &str, device_id: u64, size: u64) -> Result<LvExtents> {
    let pool_lv = lvs.iter().find(|l| l.desc.name == pool).with_context(|| format!("no thin pool '{pool}'"))?;
    let Some(SegmentKind::ThinPool { metadata, data, chunk_size }) = pool_lv.desc.segments.first().map(|s| &s.kind)
    else {
        bail!("'{pool}' is not a thin pool");
    };
    let extents_of = |name: &str| -> Result<Arc<LvExtents>> {
        let lv = lvs.iter().find(|l| l.desc.name == name).with_context(|| format!("no LV '{name}'"))?;
        lv.extents.clone().map_err(|e| anyhow::anyhow!("pool LV {name}: {e}"))
    };
    let (meta, data) = (extents_of(metadata)?, extents_of(data)?);
    let md = ThinMetadata::open(meta.region(regions, metadata)).with_context(|| format!("thin pool {pool}"))?;
    ensure!(
        md.data_block_size == *chunk_size,
        "thin pool {pool}: its metadata says {}-byte blocks, the VG {chunk_size}",
        md.data_block_size
    );
    let bs = md.data_block_size;
    let device = md.device(device_id, data.size / bs).with_context(|| format!("thin pool {pool}"))?;
    device.check(size.div_ceil(bs)).with_context(|| format!("thin pool {pool}"))?;
    Ok(LvExtents::thin(size, device, data))
}
