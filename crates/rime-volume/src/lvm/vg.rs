//! A volume group as its metadata text describes it: physical volumes, logical volumes and
//! their segments.
//!
//! Sizes are converted from LVM's 512-byte sectors and extents to bytes here, once, with
//! overflow checks. Segments are kept in the order of their logical extents; a segment type
//! Rime does not map (RAID, mirror, cache, VDO, integrity, old-style snapshots, ...) is kept as
//! [`SegmentKind::Unmapped`] with the names of the sub-LVs it refers to, so the caller can keep
//! all of their extents whole.

use super::text::{Section, Value};
use anyhow::{bail, ensure, Context, Result};

const SECTOR: u64 = 512;
/// Byte offsets and sizes past this are damage (no disk is 4 EiB).
const LIMIT: u64 = 1 << 62;

#[derive(Clone, Debug)]
pub struct VolumeGroup {
    pub name: String,
    pub uuid: String,
    pub seqno: u64,
    /// Bytes per physical extent.
    pub extent_size: u64,
    pub pvs: Vec<PvDesc>,
    pub lvs: Vec<LvDesc>,
}

#[derive(Clone, Debug)]
pub struct PvDesc {
    /// The key the segments use (`pv0`).
    pub key: String,
    pub uuid: String,
    /// Byte offset of the first extent within the PV.
    pub pe_start: u64,
    pub pe_count: u64,
}

#[derive(Clone, Debug)]
pub struct LvDesc {
    pub name: String,
    pub uuid: String,
    pub visible: bool,
    pub segments: Vec<Segment>,
}

#[derive(Clone, Debug)]
pub struct Segment {
    pub start_extent: u64,
    pub extent_count: u64,
    pub kind: SegmentKind,
}

#[derive(Clone, Debug)]
pub enum SegmentKind {
    /// `striped` (linear is one stripe): `(pv key, first extent)` per stripe.
    Striped {
        stripe_size: u64,
        stripes: Vec<(String, u64)>,
    },
    ThinPool {
        metadata: String,
        data: String,
        chunk_size: u64,
    },
    Thin {
        pool: String,
        device_id: u64,
        origin: Option<String>,
    },
    /// `zero` and `error`: no data on any PV.
    Virtual(String),
    /// A type Rime does not map; the LVs it refers to.
    Unmapped {
        kind: String,
        refers_to: Vec<String>,
    },
}

impl LvDesc {
    /// Size in extents.
    pub fn extents(&self) -> u64 {
        self.segments.iter().map(|s| s.extent_count).sum()
    }

    /// "linear", "striped", "thin-pool", "thin", or the unmapped segment type.
    pub fn layout(&self) -> String {
        let mut kinds: Vec<String> = Vec::new();
        for s in &self.segments {
            let k = match &s.kind {
                SegmentKind::Striped { stripes, .. } if stripes.len() == 1 => "linear".to_string(),
                SegmentKind::Striped { stripes, stripe_size } => {
                    format!("striped ({} stripes of {} KiB)", stripes.len(), stripe_size / 1024)
                }
                SegmentKind::ThinPool { .. } => "thin-pool".into(),
                SegmentKind::Thin { .. } => "thin".into(),
                SegmentKind::Virtual(k) | SegmentKind::Unmapped { kind: k, .. } => k.clone(),
            };
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        kinds.join("+")
    }
}

impl VolumeGroup {
    /// Reads the volume group section (the one section of a metadata text's top level).
    pub fn from_text(top: &Section) -> Result<VolumeGroup> {
        let vg = top.sections().next().context("the metadata text holds no volume group")?;
        let extent_size = vg.uint("extent_size")?.checked_mul(SECTOR).context("extent size overflows")?;
        ensure!(extent_size >= 4096 && extent_size.is_power_of_two(), "extent size {extent_size} is invalid");
        let mut pvs = Vec::new();
        if let Some(list) = vg.section("physical_volumes") {
            for pv in list.sections() {
                pvs.push(PvDesc {
                    key: pv.name.clone(),
                    uuid: pv.str("id")?.to_string(),
                    pe_start: pv.uint("pe_start")?.checked_mul(SECTOR).context("pe_start overflows")?,
                    pe_count: pv.uint("pe_count")?,
                });
            }
        }
        ensure!(!pvs.is_empty(), "volume group {} lists no physical volume", vg.name);
        for pv in &pvs {
            let end = pv.pe_count.checked_mul(extent_size).and_then(|a| a.checked_add(pv.pe_start));
            ensure!(end.is_some_and(|e| e < LIMIT), "PV {} has an extent area past any disk", pv.key);
            ensure!(
                pvs.iter().filter(|p| p.key == pv.key || p.uuid == pv.uuid).count() == 1,
                "PV {} is listed twice",
                pv.key
            );
        }
        let mut lvs: Vec<LvDesc> = Vec::new();
        if let Some(list) = vg.section("logical_volumes") {
            for lv in list.sections() {
                let parsed = parse_lv(lv, extent_size).with_context(|| format!("logical volume {}", lv.name))?;
                ensure!(lvs.iter().all(|l| l.name != parsed.name), "logical volume {} is listed twice", parsed.name);
                lvs.push(parsed);
            }
        }
        let group = VolumeGroup {
            name: vg.name.clone(),
            uuid: vg.str("id")?.to_string(),
            seqno: vg.uint("seqno")?,
            extent_size,
            pvs,
            lvs,
        };
        group.check_stripes()?;
        Ok(group)
    }

    /// Every stripe of a striped segment must name a PV of the VG and lie inside it.
    fn check_stripes(&self) -> Result<()> {
        for lv in &self.lvs {
            for s in &lv.segments {
                let SegmentKind::Striped { stripes, .. } = &s.kind else { continue };
                let per_stripe = s.extent_count / stripes.len() as u64;
                for (key, pe) in stripes {
                    // A stripe naming an LV (a pvmove in progress) is left for the caller.
                    let Some(pv) = self.pv(key) else { continue };
                    ensure!(
                        pe.checked_add(per_stripe).is_some_and(|end| end <= pv.pe_count),
                        "LV {}: a segment runs past the end of PV {key}",
                        lv.name
                    );
                }
            }
        }
        Ok(())
    }

    /// Why the VG's layout cannot be mapped LV by LV, if it cannot: a stripe that names an LV
    /// (`pvmove0` while a pvmove runs) or a segment Rime does not map that uses PVs directly
    /// (the pvmove mirror). Its PVs are then kept whole.
    pub fn not_mappable(&self) -> Option<String> {
        for lv in &self.lvs {
            for s in &lv.segments {
                match &s.kind {
                    SegmentKind::Striped { stripes, .. } => {
                        if let Some((key, _)) = stripes.iter().find(|(key, _)| self.pv(key).is_none()) {
                            return Some(format!(
                                "LV {} has extents on '{key}', which is no PV (a pvmove in progress?)",
                                lv.name
                            ));
                        }
                    }
                    SegmentKind::Unmapped { kind, refers_to } => {
                        if let Some(key) = refers_to.iter().find(|n| self.pv(n).is_some()) {
                            return Some(format!(
                                "LV {} ({kind}) uses PV {key} directly (a pvmove in progress?)",
                                lv.name
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }

    pub fn lv(&self, name: &str) -> Option<&LvDesc> {
        self.lvs.iter().find(|l| l.name == name)
    }

    pub fn pv(&self, key: &str) -> Option<&PvDesc> {
        self.pvs.iter().find(|p| p.key == key)
    }
}

fn parse_lv(lv: &Section, extent_size: u64) -> Result<LvDesc> {
    let mut segments: Vec<Segment> = Vec::new();
    for seg in lv.sections().filter(|s| s.name.starts_with("segment")) {
        segments.push(parse_segment(seg, extent_size).with_context(|| format!("segment {}", seg.name))?);
    }
    segments.sort_by_key(|s| s.start_extent);
    let mut next = 0u64;
    for s in &segments {
        ensure!(s.start_extent == next, "segments leave a gap or overlap at extent {next}");
        next = s.start_extent.checked_add(s.extent_count).context("extent count overflows")?;
        ensure!(next.checked_mul(extent_size).is_some_and(|b| b < LIMIT), "the LV is larger than any disk");
    }
    // A thin LV is one thin segment; anything else with thin segments is not mapped.
    if segments.len() > 1
        && segments.iter().any(|s| matches!(s.kind, SegmentKind::Thin { .. } | SegmentKind::ThinPool { .. }))
    {
        for s in segments.iter_mut() {
            s.kind = SegmentKind::Unmapped { kind: "multi-segment thin".into(), refers_to: Vec::new() };
        }
    }
    Ok(LvDesc {
        name: lv.name.clone(),
        uuid: lv.str("id").unwrap_or_default().to_string(),
        visible: lv.flags("status").contains(&"VISIBLE"),
        segments,
    })
}

fn parse_segment(seg: &Section, extent_size: u64) -> Result<Segment> {
    let start_extent = seg.uint("start_extent")?;
    let extent_count = seg.uint("extent_count")?;
    ensure!(extent_count > 0, "segment of no extents");
    let kind = match seg.str("type")? {
        "striped" => {
            let list = seg.list("stripes")?;
            let count = seg.uint("stripe_count")?;
            ensure!(count > 0 && list.len() as u64 == 2 * count, "stripe list does not match stripe_count {count}");
            let mut stripes = Vec::new();
            for pair in list.chunks(2) {
                match pair {
                    [Value::Str(pv), Value::Int(pe)] if *pe >= 0 => stripes.push((pv.clone(), *pe as u64)),
                    _ => bail!("malformed stripe list"),
                }
            }
            let stripe_size = if count > 1 {
                let s = seg.uint("stripe_size")?.checked_mul(SECTOR).context("stripe size overflows")?;
                ensure!(s >= 4096 && s.is_power_of_two() && s <= extent_size, "stripe size {s} is invalid");
                ensure!(extent_count.is_multiple_of(count), "striped segment not divisible into its stripes");
                s
            } else {
                0
            };
            SegmentKind::Striped { stripe_size, stripes }
        }
        "thin-pool" => {
            let chunk_size = seg.uint("chunk_size")?.checked_mul(SECTOR).context("chunk size overflows")?;
            ensure!(
                chunk_size >= 64 * 1024 && chunk_size.is_multiple_of(64 * 1024),
                "thin chunk size {chunk_size} is invalid"
            );
            SegmentKind::ThinPool { metadata: seg.str("metadata")?.into(), data: seg.str("pool")?.into(), chunk_size }
        }
        // A thin volume reading through to an external origin, or one being merged into its
        // origin, does not read as its own mapping alone.
        "thin" if seg.value("external_origin").is_some() || seg.value("merge").is_some() => SegmentKind::Unmapped {
            kind: "thin with an external origin or a merge".into(),
            refers_to: referenced_names(seg),
        },
        "thin" => {
            let device_id = seg.uint("device_id")?;
            ensure!(device_id < 1 << 24, "thin device id {device_id} does not fit its 24 bits");
            SegmentKind::Thin {
                pool: seg.str("thin_pool")?.into(),
                device_id,
                origin: seg.str("origin").ok().map(str::to_string),
            }
        }
        "zero" | "error" => SegmentKind::Virtual(seg.str("type")?.into()),
        other => SegmentKind::Unmapped { kind: other.to_string(), refers_to: referenced_names(seg) },
    };
    Ok(Segment { start_extent, extent_count, kind })
}

/// Every string value of a segment: the sub-LVs an unmapped segment type is built from
/// (`raids = ["lv_rmeta_0", "lv_rimage_0", ...]`, `cache_pool = "..."`, `cow_store = ...`).
fn referenced_names(seg: &Section) -> Vec<String> {
    let mut out = Vec::new();
    for (key, item) in &seg.items {
        if key == "type" || key == "tags" {
            continue;
        }
        if let super::text::Item::Value(v) = item {
            match v {
                Value::Str(s) => out.push(s.clone()),
                Value::List(l) => out.extend(l.iter().filter_map(|v| match v {
                    Value::Str(s) => Some(s.clone()),
                    _ => None,
                })),
                Value::Int(_) => {}
            }
        }
    }
    out
}
