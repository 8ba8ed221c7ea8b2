//! What is on a volume: one filesystem, an LVM physical volume, or a partitioned disk whose
//! partitions each carry their own map (a filesystem, LUKS, or PVs whose volume groups are
//! assembled across the disk's partitions). `map_volume` is the entry point the backup uses.

use crate::device::Region;
use crate::fs;
use crate::luks::LuksInfo;
use crate::lvm::{self, Assembly, PvInfo};
use crate::partition::{self, Partition, PartitionTable};
use crate::usedmap::{push_range, swap_files_of, AllBlocks, FallbackOnError, FileExtents, SwapFile, UsedMap};
use anyhow::Result;
use std::ops::Range;

/// One partition as mapped, for the snapshot manifest.
#[derive(Clone, Debug)]
pub struct MappedPartition {
    pub partition: Partition,
    pub filesystem: Option<String>,
    pub map: String,
    /// Set when the partition is an LVM physical volume.
    pub lvm: Option<PvInfo>,
    pub encrypted: Option<LuksInfo>,
}

pub struct Layout {
    pub map: Box<dyn UsedMap>,
    pub table: Option<String>,
    pub partitions: Vec<MappedPartition>,
    pub warnings: Vec<String>,
    /// Set when the volume itself is an LVM physical volume.
    pub lvm: Option<PvInfo>,
    pub encrypted: Option<LuksInfo>,
}

/// Finds the layout of a volume: a GPT disk, else an LVM physical volume, else a filesystem,
/// else an MBR disk, else raw data (all non-zero chunks). GPT comes first because its checksums
/// make it unambiguous; an MBR signature is shared with FAT and NTFS boot sectors, so
/// filesystems are tried before it.
pub fn map_volume(volume: &Region, options: &fs::MapOptions) -> Result<Layout> {
    map_volumes(std::slice::from_ref(volume), options).pop().expect("one layout per volume")
}

/// The layouts of several volumes backed up together. Their LVM physical volumes (whole
/// volumes and partitions) are assembled as one set, so a volume group spanning disks is mapped
/// as LVM maps it, each PV's part in its own volume's map.
pub fn map_volumes(volumes: &[Region], options: &fs::MapOptions) -> Vec<Result<Layout>> {
    let shapes: Vec<Result<Shape>> = volumes.iter().map(|v| shape(v, options)).collect();
    // Every PV, wherever it lies: (volume, partition number or None for the volume itself).
    let mut places: Vec<(usize, Option<u32>)> = Vec::new();
    let mut candidates = Vec::new();
    for (i, (volume, shape)) in volumes.iter().zip(&shapes).enumerate() {
        match shape {
            Ok(Shape::Pv) => {
                places.push((i, None));
                candidates.push((volume.clone(), volume.path.display().to_string()));
            }
            Ok(Shape::Disk(table)) => {
                for p in &table.partitions {
                    let region = volume.sub(p.start, p.len).expect("partition table checked against the disk");
                    if !matches!(lvm::label::probe(&region), Ok(None)) {
                        places.push((i, Some(p.number)));
                        candidates.push((region, format!("{} partition {}", volume.path.display(), p.number)));
                    }
                }
            }
            _ => {}
        }
    }
    let assembly = Assembly::new(candidates);
    let mut pv_maps: Vec<Option<(lvm::PvMap, PvInfo)>> =
        lvm::map_pvs(&assembly, options).into_iter().map(Some).collect();
    let mut take = |volume: usize, partition: Option<u32>| {
        let i = places.iter().position(|p| *p == (volume, partition))?;
        pv_maps[i].take()
    };
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, shape)| {
            Ok(match shape? {
                Shape::Disk(table) => disk_layout(&volumes[i], &table, options, &mut |n| take(i, Some(n))),
                Shape::Pv => {
                    let (mut map, info) = take(i, None).expect("every PV was assembled");
                    Layout {
                        warnings: map.take_warnings(),
                        map: Box::new(map),
                        table: None,
                        partitions: Vec::new(),
                        lvm: Some(info),
                        encrypted: None,
                    }
                }
                Shape::Single(detected) => Layout {
                    map: Box::new(FallbackOnError::new(detected.map)),
                    table: None,
                    partitions: Vec::new(),
                    warnings: detected.warning.into_iter().collect(),
                    lvm: None,
                    encrypted: detected.encrypted,
                },
            })
        })
        .collect()
}

/// What a volume is at its top level.
enum Shape {
    Disk(PartitionTable),
    /// A PV given directly: its label lies in the first sectors, where no filesystem looks.
    Pv,
    Single(fs::Detected),
}

fn shape(volume: &Region, options: &fs::MapOptions) -> Result<Shape> {
    let table = partition::read(volume)?;
    if let Some(t) = table.as_ref().filter(|t| t.kind == partition::TableKind::Gpt) {
        return Ok(Shape::Disk(t.clone()));
    }
    // A PV label under a partition table is left over from before the disk was partitioned
    // (LVM itself ignores partitioned devices): the table wins.
    if !matches!(lvm::label::probe(volume), Ok(None)) {
        return Ok(match table {
            Some(t) if !t.partitions.is_empty() => Shape::Disk(t),
            _ => Shape::Pv,
        });
    }
    let detected = fs::detect_with(volume, options);
    let plain = detected.map.filesystem().is_none_or(|f| f == "swap") && detected.warning.is_none();
    if plain {
        if let Some(t) = table {
            return Ok(Shape::Disk(t));
        }
    }
    Ok(Shape::Single(detected))
}

/// A disk: each partition through its own map; `pv_map(n)` gives partition n's PV map when it
/// is an LVM physical volume.
fn disk_layout(
    disk: &Region,
    table: &PartitionTable,
    options: &fs::MapOptions,
    pv_map: &mut dyn FnMut(u32) -> Option<(lvm::PvMap, PvInfo)>,
) -> Layout {
    let mut segments = Vec::new();
    let mut partitions = Vec::new();
    let mut warnings = Vec::new();
    for p in &table.partitions {
        let label = format!("partition {}", p.number);
        if let Some((mut map, info)) = pv_map(p.number) {
            warnings.extend(map.take_warnings().into_iter().map(|w| format!("{label}: {w}")));
            partitions.push(MappedPartition {
                partition: p.clone(),
                filesystem: None,
                map: map.describe(),
                lvm: Some(info),
                encrypted: None,
            });
            segments.push(Segment { start: p.start, len: p.len, map: Box::new(map) });
            continue;
        }
        let region = disk.sub(p.start, p.len).expect("partition table checked against the disk");
        let detected = fs::detect_with(&region, options);
        if let Some(w) = detected.warning {
            warnings.push(format!("{label}: {w}"));
        }
        partitions.push(MappedPartition {
            partition: p.clone(),
            filesystem: detected.map.filesystem().map(str::to_string),
            map: detected.map.describe(),
            lvm: None,
            encrypted: detected.encrypted,
        });
        segments.push(Segment { start: p.start, len: p.len, map: Box::new(FallbackOnError::new(detected.map)) });
    }
    let summary = partitions
        .iter()
        .map(|p| {
            let what = match (&p.filesystem, &p.lvm, &p.encrypted) {
                (Some(fs), _, _) => fs.clone(),
                (None, Some(pv), _) => format!("LVM2 PV of {}", pv.vg.as_ref().map_or("?", |v| v.name.as_str())),
                (None, None, Some(_)) => "LUKS".into(),
                (None, None, None) => "?".into(),
            };
            format!("{}:{what}", p.partition.number)
        })
        .collect::<Vec<_>>()
        .join(" ");
    let map = DiskMap { segments, description: format!("{} partition table ({summary})", table.kind.as_str()) };
    Layout {
        map: Box::new(map),
        table: Some(table.kind.as_str().to_string()),
        partitions,
        warnings,
        lvm: None,
        encrypted: None,
    }
}

struct Segment {
    start: u64,
    len: u64,
    map: Box<dyn UsedMap>,
}

/// A whole disk: each partition through its own map; everything outside partitions (the
/// partition table, boot loader gaps, the GPT backup) is kept, so a restored disk boots as the
/// original did. All-zero chunks there are still stored as markers.
struct DiskMap {
    segments: Vec<Segment>,
    description: String,
}

impl UsedMap for DiskMap {
    fn filesystem(&self) -> Option<&str> {
        None
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn reported_used_bytes(&self) -> Option<u64> {
        None
    }

    /// A path names a file in whichever partitions hold one; their data is all excluded.
    fn file_extents(&mut self, path: &str) -> Result<Option<FileExtents>> {
        let mut found: Option<FileExtents> = None;
        for seg in self.segments.iter_mut() {
            // Maps without files (no filesystem, swap) answer None or an error.
            if let Ok(Some(mut fe)) = seg.map.file_extents(path) {
                for e in fe.extents.iter_mut() {
                    e.range = e.range.start + seg.start..e.range.end + seg.start;
                }
                match found.as_mut() {
                    Some(f) => f.extents.extend(fe.extents),
                    None => found = Some(fe),
                }
            }
        }
        Ok(found)
    }

    fn take_warnings(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        for seg in self.segments.iter_mut() {
            all.extend(seg.map.take_warnings().into_iter().map(|w| format!("partition at byte {}: {w}", seg.start)));
        }
        all
    }

    fn swap_files(&mut self) -> Result<Vec<SwapFile>> {
        Ok(swap_files_of(self.segments.iter_mut().map(|s| &mut s.map)))
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let end = start + len;
        let mut pos = start;
        let mut inner = Vec::new();
        for seg in self.segments.iter_mut() {
            let (s, e) = (seg.start, seg.start + seg.len);
            if e <= pos || s >= end {
                continue;
            }
            // The gap before this partition is kept whole.
            if s > pos {
                push_range(out, pos..s);
            }
            let (from, to) = (pos.max(s), end.min(e));
            inner.clear();
            seg.map.used_ranges(from - s, to - from, &mut inner)?;
            for r in &inner {
                push_range(out, r.start + s..r.end + s);
            }
            pos = to;
        }
        if pos < end {
            push_range(out, pos..end);
        }
        Ok(())
    }
}

/// Keeps the no-filesystem fallback available for callers that force it.
pub fn all_blocks(reason: &str) -> Layout {
    Layout {
        map: Box::new(AllBlocks { reason: reason.into() }),
        table: None,
        partitions: Vec::new(),
        warnings: Vec::new(),
        lvm: None,
        encrypted: None,
    }
}
