//! FAT12/16/32 used-block map from the boot sector (BPB) and the file allocation table.
//!
//! Used: the reserved sectors (boot sector, FSInfo, backup boot sector), every FAT copy, the
//! FAT12/16 root directory area, every data cluster whose FAT entry is non-zero in any FAT copy
//! (allocated, end of chain, bad or reserved values all count as used: a map must never call a
//! used block unused), and every byte after the last cluster. FAT entries are read on demand for
//! the range asked, through one small window per FAT copy, so memory stays bounded whatever the
//! size of the FAT.
//!
//! FAT keeps no journal, and nothing checksums it. Two things make the FAT alone untrustworthy,
//! and both are handled: copies that disagree (a write torn between FAT #1 and FAT #2) are
//! united, with a warning; and a volume marked dirty (mounted when copied, or not unmounted
//! cleanly: Linux's boot-sector state bit, Windows' "clean shutdown" bit in FAT entry 1) is
//! cross-checked against its directories first (`fat_audit`), since a directory entry may point
//! at clusters the FAT does not show yet.
//!
//! The FAT type follows the cluster count, as the specification says (< 4085 clusters: FAT12,
//! < 65525: FAT16, else FAT32), with one exception taken from Linux and dosfstools: a BPB laid out
//! for FAT32 (16-bit FAT size and root entry count both zero) is FAT32 whatever its cluster count,
//! because reading its 32-bit entries as 16-bit ones would misplace every entry.

use super::MapOptions;
use crate::bytes::{le16, le32};
use crate::device::Region;
use crate::usedmap::{push_range, UsedMap};
use anyhow::{bail, ensure, Result};
use std::collections::BTreeSet;
use std::ops::Range;

/// Bytes of one FAT copy held in memory at a time (per copy).
const WINDOW: u64 = 64 * 1024;
/// More copies than this is nonsense (real filesystems have 1 or 2).
const MAX_FATS: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatKind {
    Fat12,
    Fat16,
    Fat32,
}

impl FatKind {
    pub fn name(self) -> &'static str {
        match self {
            FatKind::Fat12 => "fat12",
            FatKind::Fat16 => "fat16",
            FatKind::Fat32 => "fat32",
        }
    }
    /// Bits of one FAT entry (as stored: FAT32 entries occupy 32 bits).
    fn entry_bits(self) -> u64 {
        match self {
            FatKind::Fat12 => 12,
            FatKind::Fat16 => 16,
            FatKind::Fat32 => 32,
        }
    }
}

/// The geometry the map needs, all in bytes relative to the start of the region.
#[derive(Clone, Debug)]
pub struct FatGeometry {
    pub kind: FatKind,
    pub bytes_per_sector: u64,
    pub cluster_bytes: u64,
    /// Start of the first FAT copy (end of the reserved sectors).
    pub fat_start: u64,
    /// Size of one FAT copy.
    pub fat_bytes: u64,
    pub fat_count: u64,
    /// Start of the data area (cluster 2); everything before it is metadata.
    pub data_start: u64,
    /// Number of data clusters (clusters 2 ..= count + 1).
    pub cluster_count: u64,
    /// End of the last cluster.
    pub data_end: u64,
    /// Size of the filesystem (total sectors).
    pub fs_bytes: u64,
    /// FAT32: the root directory's first cluster.
    pub root_cluster: Option<u64>,
}

impl FatGeometry {
    /// Parses and validates a boot sector (its first 512 bytes). `Ok(None)`: no FAT boot
    /// sector; `Err`: it claims to be FAT but its numbers make no sense.
    pub fn parse(b: &[u8], region_len: u64) -> Result<Option<FatGeometry>> {
        if b.len() < 512 {
            return Ok(None);
        }
        let oem = &b[3..11];
        if oem == b"NTFS    " || oem == b"EXFAT   " {
            return Ok(None);
        }
        let jump = b[0] == 0xEB || b[0] == 0xE9;
        let signature = b[510] == 0x55 && b[511] == 0xAA;
        let bps = le16(b, 0x0B)? as u64;
        let spc = b[0x0D] as u64;
        let media = b[0x15];
        let labelled = &b[0x36..0x39] == b"FAT" || &b[0x52..0x57] == b"FAT32";
        let looks_fat = jump
            && matches!(bps, 512 | 1024 | 2048 | 4096)
            && spc.is_power_of_two()
            && (media == 0xF0 || media >= 0xF8);
        if !(looks_fat && (signature || labelled)) && !(labelled && signature) {
            return Ok(None);
        }
        // From here on it claims to be FAT: nonsense is an error, not "unknown".
        ensure!(matches!(bps, 512 | 1024 | 2048 | 4096), "bytes per sector {bps} is invalid");
        ensure!(spc.is_power_of_two() && spc <= 128, "sectors per cluster {spc} is invalid");
        let reserved = le16(b, 0x0E)? as u64;
        let fat_count = b[0x10] as u64;
        let root_entries = le16(b, 0x11)? as u64;
        let tot16 = le16(b, 0x13)? as u64;
        let fatsz16 = le16(b, 0x16)? as u64;
        let tot32 = le32(b, 0x20)? as u64;
        ensure!(reserved >= 1, "reserved sector count is 0");
        ensure!((1..=MAX_FATS).contains(&fat_count), "number of FATs {fat_count} is invalid");
        let total_sectors = if tot16 != 0 { tot16 } else { tot32 };
        ensure!(total_sectors != 0, "total sector count is 0");
        let fs_bytes = total_sectors * bps;
        ensure!(
            fs_bytes <= region_len,
            "the filesystem ({fs_bytes} bytes) is larger than the volume ({region_len} bytes)"
        );
        let fat32_layout = fatsz16 == 0 && root_entries == 0;
        let fat_sectors = if fatsz16 != 0 { fatsz16 } else { le32(b, 0x24)? as u64 };
        ensure!(fat_sectors != 0, "FAT size is 0");
        let root_dir_sectors = (root_entries * 32).div_ceil(bps);
        let data_sector = reserved + fat_count * fat_sectors + root_dir_sectors;
        ensure!(
            data_sector < total_sectors,
            "reserved sectors, FATs and root directory ({data_sector} sectors) fill the whole filesystem ({total_sectors} sectors)"
        );
        let cluster_count = (total_sectors - data_sector) / spc;
        ensure!(cluster_count >= 1, "the filesystem has no data clusters");
        let by_count = if cluster_count < 4085 {
            FatKind::Fat12
        } else if cluster_count < 65525 {
            FatKind::Fat16
        } else {
            FatKind::Fat32
        };
        let kind = if fat32_layout { FatKind::Fat32 } else { by_count };
        if kind == FatKind::Fat32 {
            ensure!(fat32_layout, "{cluster_count} clusters need FAT32, but the boot sector has a FAT12/16 layout");
            ensure!(cluster_count <= 0x0FFF_FFF5, "{cluster_count} clusters is more than FAT32 can address");
        } else {
            ensure!(root_entries != 0, "a FAT12/16 boot sector with no root directory entries");
        }
        // Every cluster needs its entry inside each FAT copy.
        let fat_bytes = fat_sectors * bps;
        let needed = ((cluster_count + 2) * kind.entry_bits()).div_ceil(8);
        ensure!(
            needed <= fat_bytes,
            "the FAT ({fat_bytes} bytes) is too small for {cluster_count} clusters ({needed} bytes)"
        );
        let root_cluster = if kind == FatKind::Fat32 {
            let rc = le32(b, 0x2C)? as u64 & 0x0FFF_FFFF;
            ensure!(rc >= 2 && rc < cluster_count + 2, "root directory cluster {rc} is outside the data area");
            Some(rc)
        } else {
            None
        };
        let cluster_bytes = spc * bps;
        let data_start = data_sector * bps;
        Ok(Some(FatGeometry {
            kind,
            bytes_per_sector: bps,
            cluster_bytes,
            fat_start: reserved * bps,
            fat_bytes,
            fat_count,
            data_start,
            cluster_count,
            data_end: data_start + cluster_count * cluster_bytes,
            fs_bytes,
            root_cluster,
        }))
    }

    /// Byte range of cluster `n` (2 ..= count + 1) in the region.
    pub fn cluster_range(&self, n: u64) -> Range<u64> {
        let s = self.data_start + (n - 2) * self.cluster_bytes;
        s..s + self.cluster_bytes
    }
}

pub struct FatMap {
    region: Region,
    geo: FatGeometry,
    /// FAT32 FSInfo free cluster count, when present and plausible.
    free_hint: Option<u64>,
    /// Per FAT copy: (window start within the copy, bytes).
    windows: Vec<Option<(u64, Vec<u8>)>>,
    /// Why the volume counts as dirty (not unmounted cleanly), if it does.
    dirty: Option<&'static str>,
    /// Whether the directories are still to be checked against the FAT before mapping.
    audit_pending: bool,
    /// Clusters directory entries reach that no FAT copy marks used (found by the check).
    reached: BTreeSet<u64>,
    /// Clusters seen so far on which the FAT copies disagree (free in one, used in another).
    disagreements: u64,
    warnings: Vec<String>,
}

impl FatMap {
    /// Recognises a FAT12/16/32 filesystem. `Ok(None)`: not FAT; `Err`: FAT but unusable.
    pub fn probe(region: &Region) -> Result<Option<FatMap>> {
        Self::probe_with(region, &MapOptions::default())
    }

    /// [`FatMap::probe`], with the directory cross-check as `options` say.
    pub fn probe_with(region: &Region, options: &MapOptions) -> Result<Option<FatMap>> {
        if region.len < 512 {
            return Ok(None);
        }
        let mut boot = vec![0u8; 512];
        region.read_at(0, &mut boot)?;
        let Some(geo) = FatGeometry::parse(&boot, region.len)? else {
            return Ok(None);
        };
        let free_hint = if geo.kind == FatKind::Fat32 { Self::fsinfo_free(region, &boot, &geo) } else { None };
        let windows = vec![None; geo.fat_count as usize];
        let mut map = FatMap {
            region: region.clone(),
            geo,
            free_hint,
            windows,
            dirty: None,
            audit_pending: false,
            reached: BTreeSet::new(),
            disagreements: 0,
            warnings: Vec::new(),
        };
        map.dirty = map.dirty_state(&boot)?;
        map.audit_pending = options.cross_check.wanted(map.dirty.is_some());
        Ok(Some(map))
    }

    /// Why the volume is dirty: Linux sets a bit in the boot sector while mounted, Windows
    /// clears the "clean shutdown" bit of FAT entry 1 (FAT16/32 only).
    fn dirty_state(&mut self, boot: &[u8]) -> Result<Option<&'static str>> {
        let state = boot[if self.geo.kind == FatKind::Fat32 { 0x41 } else { 0x25 }];
        if state & 0x01 != 0 {
            return Ok(Some("its boot sector says it is mounted or was not unmounted cleanly"));
        }
        let clean_bit = match self.geo.kind {
            FatKind::Fat12 => return Ok(None),
            FatKind::Fat16 => 0x8000,
            FatKind::Fat32 => 0x0800_0000,
        };
        Ok((self.entry(0, 1)? & clean_bit == 0).then_some("its FAT says it was not shut down cleanly"))
    }

    /// The FAT12/16 root directory area.
    pub fn read_root_area(&self) -> Result<Vec<u8>> {
        let start = self.geo.fat_start + self.geo.fat_count * self.geo.fat_bytes;
        let mut buf = vec![0u8; (self.geo.data_start - start) as usize];
        self.region.read_at(start, &mut buf)?;
        Ok(buf)
    }

    /// Bytes of the filesystem at `offset` (the explorer reads file data through this).
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        ensure!(
            offset.checked_add(buf.len() as u64).is_some_and(|e| e <= self.geo.data_end),
            "read past the FAT data area"
        );
        self.region.read_at(offset, buf)
    }

    /// Cluster `n`'s bytes.
    pub fn read_cluster(&self, n: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.geo.cluster_bytes as usize];
        self.region.read_at(self.geo.cluster_range(n).start, &mut buf)?;
        Ok(buf)
    }

    /// Runs the directory cross-check if it is pending.
    fn run_audit(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.audit_pending) {
            return Ok(());
        }
        self.reached = super::fat_audit::missing_clusters(self)?;
        if !self.reached.is_empty() {
            let n = self.reached.len();
            self.warnings.push(format!(
                "{n} cluster{} that directory entries point at {} marked free in the FAT{}; imaged too",
                if n == 1 { "" } else { "s" },
                if n == 1 { "is" } else { "are" },
                self.dirty.map(|d| format!(" (the volume is dirty: {d})")).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// The FSInfo sector's free cluster count, if the sector is there and the count plausible.
    fn fsinfo_free(region: &Region, boot: &[u8], geo: &FatGeometry) -> Option<u64> {
        let sector = le16(boot, 0x30).ok()? as u64;
        if sector == 0 || sector * geo.bytes_per_sector + 512 > geo.fat_start {
            return None;
        }
        let mut s = vec![0u8; 512];
        region.read_at(sector * geo.bytes_per_sector, &mut s).ok()?;
        if le32(&s, 0).ok()? != 0x4161_5252 || le32(&s, 0x1E4).ok()? != 0x6141_7272 {
            return None;
        }
        let free = le32(&s, 0x1E8).ok()? as u64;
        (free <= geo.cluster_count).then_some(free)
    }

    pub fn geometry(&self) -> &FatGeometry {
        &self.geo
    }

    /// FAT entry of cluster `n` in copy `copy`, read through that copy's window.
    pub fn entry(&mut self, copy: usize, n: u64) -> Result<u32> {
        let geo = &self.geo;
        if copy >= self.windows.len() || n >= geo.cluster_count + 2 {
            bail!("FAT entry {n} of copy {copy} does not exist");
        }
        let off = match geo.kind {
            FatKind::Fat12 => n + n / 2,
            FatKind::Fat16 => n * 2,
            FatKind::Fat32 => n * 4,
        };
        let width = if geo.kind == FatKind::Fat32 { 4 } else { 2 };
        let wstart = off - off % WINDOW;
        let cached = matches!(&self.windows[copy], Some((s, _)) if *s == wstart);
        if !cached {
            // A few bytes of overlap so that an entry starting in the window is whole in it.
            let len = (WINDOW + 4).min(geo.fat_bytes - wstart);
            let mut buf = vec![0u8; len as usize];
            self.region.read_at(geo.fat_start + copy as u64 * geo.fat_bytes + wstart, &mut buf)?;
            self.windows[copy] = Some((wstart, buf));
        }
        let buf = &self.windows[copy].as_ref().expect("window just loaded").1;
        let i = (off - wstart) as usize;
        let Some(bytes) = buf.get(i..i + width) else { bail!("FAT entry {n} lies past the end of the FAT") };
        Ok(match geo.kind {
            FatKind::Fat12 => {
                let v = le16(bytes, 0)? as u32;
                if n % 2 == 1 {
                    v >> 4
                } else {
                    v & 0xFFF
                }
            }
            FatKind::Fat16 => le16(bytes, 0)? as u32,
            FatKind::Fat32 => le32(bytes, 0)? & 0x0FFF_FFFF,
        })
    }

    /// How many FAT copies mark cluster `n` in use.
    fn copies_marking(&mut self, n: u64) -> Result<usize> {
        let mut used = 0;
        for copy in 0..self.windows.len() {
            used += usize::from(self.entry(copy, n)? != 0);
        }
        Ok(used)
    }

    /// Whether cluster `n` is in use according to any FAT copy.
    pub(super) fn marked_used(&mut self, n: u64) -> Result<bool> {
        Ok(self.copies_marking(n)? > 0)
    }

    /// Whether cluster `n` is used: marked so in any FAT copy, or reached from a directory.
    /// Counts the clusters whose copies disagree.
    fn cluster_used(&mut self, n: u64) -> Result<bool> {
        let used = self.copies_marking(n)?;
        if used > 0 && used < self.windows.len() {
            self.disagreements += 1;
        }
        Ok(used > 0 || self.reached.contains(&n))
    }
}

impl UsedMap for FatMap {
    fn filesystem(&self) -> Option<&str> {
        Some(self.geo.kind.name())
    }

    fn describe(&self) -> String {
        let mut d = format!("{} file allocation table", self.geo.kind.name());
        if self.geo.fat_count > 1 {
            d.push_str(&format!(" (all {} copies)", self.geo.fat_count));
        }
        if self.dirty.is_some() {
            d.push_str("; dirty");
        }
        if self.audit_pending || !self.reached.is_empty() {
            d.push_str("; checked against its directories");
        }
        d
    }

    fn take_warnings(&mut self) -> Vec<String> {
        let mut w = std::mem::take(&mut self.warnings);
        if self.disagreements > 0 {
            w.push(format!(
                "the {} FAT copies disagree on {} cluster{}; every cluster any copy marks used was imaged",
                self.geo.fat_count,
                self.disagreements,
                if self.disagreements == 1 { "" } else { "s" }
            ));
            self.disagreements = 0;
        }
        w
    }

    fn reported_used_bytes(&self) -> Option<u64> {
        self.free_hint.map(|free| self.geo.data_start + (self.geo.cluster_count - free) * self.geo.cluster_bytes)
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let end = start.checked_add(len).filter(|&e| e <= self.region.len);
        let Some(end) = end else { bail!("range {start}+{len} lies outside the volume ({} bytes)", self.region.len) };
        self.run_audit()?;
        let (data_start, data_end, cb) = (self.geo.data_start, self.geo.data_end, self.geo.cluster_bytes);
        // Reserved sectors, FATs and the FAT12/16 root directory.
        if start < data_start {
            push_range(out, start..end.min(data_start));
        }
        // Data clusters, on the FAT's word.
        let (lo, hi) = (start.max(data_start), end.min(data_end));
        if lo < hi {
            let first = (lo - data_start) / cb + 2;
            let last = (hi - data_start).div_ceil(cb) + 2;
            for n in first..last {
                if self.cluster_used(n)? {
                    let r = self.geo.cluster_range(n);
                    push_range(out, r.start.max(start)..r.end.min(end));
                }
            }
        }
        // Sectors after the last whole cluster and bytes past the filesystem are kept.
        if end > data_end {
            push_range(out, data_end.max(start)..end);
        }
        Ok(())
    }
}
