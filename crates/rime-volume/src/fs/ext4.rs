//! ext2/3/4 used-block map from the block-group bitmaps.
//!
//! Handles 1–64 KiB blocks, 32- and 64-bit group descriptors, flex_bg (bitmaps and inode tables
//! of a group living in another group), meta_bg descriptor placement, sparse_super and
//! sparse_super2 backup placement, bigalloc (one bitmap bit per cluster) and uninitialised block
//! groups (`BLOCK_UNINIT`, honoured only when group descriptor checksums make the flag
//! trustworthy). Every number read from disk is range-checked before use.

use super::ext4_files::Ext4Files;
use crate::bytes::{le16, le32};
use crate::device::Region;
use crate::usedmap::{push_range, UsedMap};
use anyhow::{bail, ensure, Result};
use std::ops::Range;

const EXT_MAGIC: u16 = 0xEF53;
const SUPERBLOCK_OFFSET: u64 = 1024;

const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_BLOCK_UNINIT: u16 = 0x2;

/// One block group's descriptor, as stored: callers check the numbers before using them.
#[derive(Clone, Copy, Debug)]
pub struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub flags: u16,
}

/// Superblock facts the map needs.
#[derive(Clone, Debug)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks_count: u64,
    pub free_blocks: u64,
    pub first_data_block: u64,
    pub blocks_per_group: u64,
    pub clusters_per_group: u64,
    pub cluster_ratio: u64,
    pub inodes_per_group: u64,
    pub inode_size: u64,
    pub desc_size: u64,
    pub reserved_gdt_blocks: u64,
    pub first_meta_bg: u64,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub backup_bgs: [u64; 2],
    pub revision: u32,
}

impl Superblock {
    /// Reads and parses the primary superblock of `region`; `Ok(None)` when there is none.
    pub fn read(region: &Region) -> Result<Option<Superblock>> {
        if region.len < SUPERBLOCK_OFFSET + 1024 {
            return Ok(None);
        }
        let mut raw = vec![0u8; 1024];
        region.read_at(SUPERBLOCK_OFFSET, &mut raw)?;
        Superblock::parse(&raw)
    }

    /// Parses the superblock; `Ok(None)` when there is no ext magic.
    pub fn parse(sb: &[u8]) -> Result<Option<Superblock>> {
        if sb.len() < 1024 || le16(sb, 0x38) != EXT_MAGIC {
            return Ok(None);
        }
        let log_block = le32(sb, 0x18);
        let log_cluster = le32(sb, 0x1C);
        ensure!(log_block <= 6, "block size 2^(10+{log_block}) is out of range");
        let incompat = le32(sb, 0x60);
        let ro_compat = le32(sb, 0x64);
        let revision = le32(sb, 0x4C);
        let block_size = 1024u64 << log_block;
        let is_64 = incompat & INCOMPAT_64BIT != 0;
        let blocks_hi = if is_64 { le32(sb, 0x150) as u64 } else { 0 };
        let free_hi = if is_64 { le32(sb, 0x158) as u64 } else { 0 };
        let bigalloc = ro_compat & RO_COMPAT_BIGALLOC != 0;
        let cluster_ratio = if bigalloc {
            ensure!(log_cluster >= log_block && log_cluster - log_block <= 16, "cluster size is out of range");
            1u64 << (log_cluster - log_block)
        } else {
            1
        };
        let desc_size = if is_64 { le16(sb, 0xFE) as u64 } else { 32 };
        ensure!(
            desc_size >= 32 && desc_size.is_power_of_two() && desc_size <= block_size,
            "group descriptor size {desc_size} is invalid"
        );
        let inode_size = if revision == 0 { 128 } else { le16(sb, 0x58) as u64 };
        let s = Superblock {
            block_size,
            blocks_count: le32(sb, 0x4) as u64 | blocks_hi << 32,
            free_blocks: le32(sb, 0xC) as u64 | free_hi << 32,
            first_data_block: le32(sb, 0x14) as u64,
            blocks_per_group: le32(sb, 0x20) as u64,
            clusters_per_group: if bigalloc { le32(sb, 0x24) as u64 } else { le32(sb, 0x20) as u64 },
            cluster_ratio,
            inodes_per_group: le32(sb, 0x28) as u64,
            inode_size,
            desc_size,
            reserved_gdt_blocks: le16(sb, 0xCE) as u64,
            first_meta_bg: le32(sb, 0x104) as u64,
            compat: le32(sb, 0x5C),
            incompat,
            ro_compat,
            backup_bgs: [le32(sb, 0x24C) as u64, le32(sb, 0x250) as u64],
            revision,
        };
        ensure!(s.incompat & INCOMPAT_JOURNAL_DEV == 0, "this is an external journal device, not a filesystem");
        ensure!(s.blocks_count > s.first_data_block, "block count {} is invalid", s.blocks_count);
        ensure!(s.first_data_block <= 1, "first data block {} is invalid", s.first_data_block);
        ensure!(
            s.clusters_per_group >= 8 && s.clusters_per_group % 8 == 0 && s.clusters_per_group <= 8 * block_size,
            "clusters per group {} is invalid",
            s.clusters_per_group
        );
        ensure!(
            s.blocks_per_group == s.clusters_per_group * cluster_ratio,
            "blocks per group {} does not match clusters per group",
            s.blocks_per_group
        );
        ensure!(s.inode_size >= 128 && s.inode_size <= block_size, "inode size {} is invalid", s.inode_size);
        Ok(Some(s))
    }

    pub fn group_count(&self) -> u64 {
        (self.blocks_count - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    fn has_group_desc_csum(&self) -> bool {
        self.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0
    }

    /// Whether group `g` holds a superblock backup (and, without meta_bg, a descriptor copy).
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if self.ro_compat & RO_COMPAT_SPARSE_SUPER == 0 {
            return true;
        }
        g == 1 || [3u64, 5, 7].iter().any(|&p| is_power_of(g, p))
    }

    /// Block holding the descriptor of group `g`.
    fn desc_block(&self, g: u64) -> u64 {
        let dpb = self.descs_per_block();
        let meta_bg = self.incompat & INCOMPAT_META_BG != 0;
        if !meta_bg || g / dpb < self.first_meta_bg {
            // The table follows the primary superblock's block. With 1 KiB blocks and bigalloc
            // the first data block is 0 but the superblock still sits in block 1.
            let sb_block =
                if self.first_data_block == 0 && self.block_size == 1024 { 1 } else { self.first_data_block };
            sb_block + 1 + g / dpb
        } else {
            let first_of_meta = (g / dpb) * dpb;
            self.group_first_block(first_of_meta) + u64::from(self.has_super(first_of_meta))
        }
    }

    /// Blocks at the start of a group with a superblock copy that hold the superblock and the
    /// (old-style) descriptor table with its reserved growth blocks. With meta_bg the old-style
    /// table has `first_meta_bg` blocks, and only in the first meta groups (as libext2fs lays it out).
    fn super_overhead(&self, g: u64) -> u64 {
        let dpb = self.descs_per_block();
        if self.incompat & INCOMPAT_META_BG != 0 {
            return 1 + if g / dpb < self.first_meta_bg { self.first_meta_bg } else { 0 };
        }
        1 + self.group_count().div_ceil(dpb) + self.reserved_gdt_blocks
    }

    fn inode_table_blocks(&self) -> u64 {
        (self.inodes_per_group * self.inode_size).div_ceil(self.block_size)
    }

    /// Every group's descriptor (32- or 64-bit, with or without meta_bg). Only the descriptor
    /// blocks are checked here; the numbers they hold are the caller's to check.
    pub fn group_descs(&self, region: &Region) -> Result<Vec<GroupDesc>> {
        let groups_n = self.group_count();
        let dpb = self.descs_per_block();
        let mut descs = Vec::with_capacity(groups_n as usize);
        let mut block = vec![0u8; self.block_size as usize];
        let mut loaded_block = u64::MAX;
        for g in 0..groups_n {
            let db = self.desc_block(g);
            ensure!(db < self.blocks_count, "descriptor block {db} of group {g} is outside the filesystem");
            if db != loaded_block {
                region.read_at(db * self.block_size, &mut block)?;
                loaded_block = db;
            }
            let off = ((g % dpb) * self.desc_size) as usize;
            let d = &block[off..off + self.desc_size as usize];
            let hi = |o: usize| if self.desc_size >= 64 { (le32(d, o) as u64) << 32 } else { 0 };
            descs.push(GroupDesc {
                block_bitmap: le32(d, 0x0) as u64 | hi(0x20),
                inode_bitmap: le32(d, 0x4) as u64 | hi(0x24),
                inode_table: le32(d, 0x8) as u64 | hi(0x28),
                flags: le16(d, 0x12),
            });
        }
        Ok(descs)
    }
}

fn is_power_of(mut n: u64, p: u64) -> bool {
    while n > 1 && n % p == 0 {
        n /= p;
    }
    n == 1
}

pub struct Ext4Map {
    region: Region,
    sb: Superblock,
    name: &'static str,
    groups: Vec<GroupDesc>,
    /// Block ranges of every group's bitmaps and inode table, sorted: used even where the
    /// owning group's bitmap is uninitialised (flex_bg puts them in other groups).
    metadata: Vec<Range<u64>>,
    honour_uninit: bool,
    cached: Option<(u64, Vec<u8>)>,
    files: Ext4Files,
}

impl Ext4Map {
    /// Recognises an ext2/3/4 filesystem. `Ok(None)`: not ext; `Err`: ext but unusable.
    pub fn probe(region: &Region) -> Result<Option<Ext4Map>> {
        let Some(sb) = Superblock::read(region)? else { return Ok(None) };
        let fs_bytes = sb.blocks_count.checked_mul(sb.block_size).unwrap_or(u64::MAX);
        ensure!(
            fs_bytes <= region.len,
            "the filesystem ({fs_bytes} bytes) is larger than the volume ({} bytes)",
            region.len
        );
        // ext2/ext3 know only these features; anything else (extents, flex_bg, 64bit,
        // checksums, ...) makes it ext4.
        const EXT3_INCOMPAT: u32 = 0x2 | 0x4 | INCOMPAT_META_BG; // filetype, recover, meta_bg
        const EXT3_RO_COMPAT: u32 = RO_COMPAT_SPARSE_SUPER | 0x2 | 0x4; // large_file, btree_dir
        let name = if sb.incompat & !EXT3_INCOMPAT != 0 || sb.ro_compat & !EXT3_RO_COMPAT != 0 {
            "ext4"
        } else if sb.compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        let region = region.clone();
        let groups = sb.group_descs(&region)?;
        let mut metadata = Vec::with_capacity(groups.len() * 3);
        let itb = sb.inode_table_blocks();
        let in_fs = |start: u64, len: u64| start.checked_add(len).is_some_and(|e| e <= sb.blocks_count);
        for (g, d) in groups.iter().enumerate() {
            let GroupDesc { block_bitmap, inode_bitmap, inode_table, .. } = *d;
            ensure!(in_fs(block_bitmap, 1), "block bitmap of group {g} ({block_bitmap}) is outside the filesystem");
            ensure!(in_fs(inode_bitmap, 1), "inode bitmap of group {g} ({inode_bitmap}) is outside the filesystem");
            ensure!(in_fs(inode_table, itb), "inode table of group {g} ({inode_table}) is outside the filesystem");
            metadata.push(block_bitmap..block_bitmap + 1);
            metadata.push(inode_bitmap..inode_bitmap + 1);
            metadata.push(inode_table..inode_table + itb);
        }
        metadata.sort_by_key(|r| r.start);
        let honour_uninit = sb.has_group_desc_csum();
        let files = Ext4Files::new(region.clone(), sb.clone(), groups.iter().map(|d| d.inode_table).collect());
        Ok(Some(Ext4Map { region, sb, name, groups, metadata, honour_uninit, cached: None, files }))
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// A reader for files and directories of this filesystem.
    pub fn files(&self) -> &Ext4Files {
        &self.files
    }

    /// Loads group `g`'s block bitmap into the one-group cache.
    fn load_bitmap(&mut self, g: u64) -> Result<()> {
        if self.cached.as_ref().map(|(cg, _)| *cg) != Some(g) {
            let mut buf = vec![0u8; self.sb.block_size as usize];
            self.region.read_at(self.groups[g as usize].block_bitmap * self.sb.block_size, &mut buf)?;
            self.cached = Some((g, buf));
        }
        Ok(())
    }

    /// Used blocks of group `g` within `[b0, b1)`, appended as block ranges.
    fn group_used(&mut self, g: u64, b0: u64, b1: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let first = self.sb.group_first_block(g);
        if self.honour_uninit && self.groups[g as usize].flags & BG_BLOCK_UNINIT != 0 {
            // Only the group's own superblock/descriptor copies and metadata placed here.
            let mut ranges = Vec::new();
            if self.sb.has_super(g) {
                ranges.push(first..first + self.sb.super_overhead(g));
            }
            if self.sb.incompat & INCOMPAT_META_BG != 0 {
                let dpb = self.sb.descs_per_block();
                if matches!(g % dpb, 0 | 1) || g % dpb == dpb - 1 {
                    let db = first + u64::from(self.sb.has_super(g));
                    ranges.push(db..db + 1);
                }
            }
            let lo = self.metadata.partition_point(|r| r.end <= b0);
            ranges.extend(self.metadata[lo..].iter().take_while(|r| r.start < b1).cloned());
            ranges.sort_by_key(|r| r.start);
            for r in ranges {
                // Ranges may overlap (meta_bg: group 1's descriptor block lies inside its
                // superblock overhead); skip what an earlier range already covers.
                let done = out.last().map_or(0, |l| l.end);
                let (s, e) = (r.start.max(b0).max(done), r.end.min(b1));
                if s < e {
                    push_range(out, s..e);
                }
            }
            return Ok(());
        }
        let ratio = self.sb.cluster_ratio;
        let bits = self.sb.clusters_per_group;
        self.load_bitmap(g)?;
        let bitmap = &self.cached.as_ref().expect("bitmap just loaded").1;
        let c0 = (b0 - first) / ratio;
        let c1 = ((b1 - first).div_ceil(ratio)).min(bits);
        let mut c = c0;
        while c < c1 {
            let byte = bitmap[(c / 8) as usize];
            if byte == 0 && c % 8 == 0 && c + 8 <= c1 {
                c += 8;
                continue;
            }
            if byte & (1 << (c % 8)) != 0 {
                let s = (first + c * ratio).max(b0);
                let e = (first + (c + 1) * ratio).min(b1);
                push_range(out, s..e);
            }
            c += 1;
        }
        Ok(())
    }
}

impl UsedMap for Ext4Map {
    fn filesystem(&self) -> Option<&str> {
        Some(self.name)
    }

    fn file_extents(&mut self, path: &str) -> Result<Option<crate::usedmap::FileExtents>> {
        self.files().data_extents(path)
    }

    fn swap_files(&mut self) -> Result<Vec<crate::usedmap::SwapFile>> {
        let files = self.files();
        let mut found = Vec::new();
        for candidate in crate::usedmap::SWAP_FILE_CANDIDATES {
            if files.is_swap_file(candidate)? {
                found.push(crate::usedmap::SwapFile { path: candidate.to_string(), keep_header: 4096 });
            }
        }
        Ok(found)
    }

    fn describe(&self) -> String {
        format!("{} block bitmaps", self.name)
    }

    fn reported_used_bytes(&self) -> Option<u64> {
        Some(self.sb.blocks_count.saturating_sub(self.sb.free_blocks) * self.sb.block_size)
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let bs = self.sb.block_size;
        let end = start + len;
        let fs_end = self.sb.blocks_count * bs;
        // Work in blocks; a partial block at either end counts as the whole block.
        let b0 = start / bs;
        let b1 = end.min(fs_end).div_ceil(bs);
        let mut blocks = Vec::new();
        // Blocks before the first group (the boot block with 1 KiB blocks) are always kept.
        if b0 < self.sb.first_data_block.max(1) {
            push_range(&mut blocks, b0..self.sb.first_data_block.max(1).min(b1));
        }
        let mut b = b0.max(self.sb.first_data_block.max(1));
        while b < b1 {
            let g = (b - self.sb.first_data_block) / self.sb.blocks_per_group;
            if g >= self.groups.len() as u64 {
                bail!("block {b} lies past the last block group");
            }
            let group_end = self.sb.group_first_block(g + 1).min(b1);
            self.group_used(g, b, group_end, &mut blocks)?;
            b = group_end;
        }
        for r in blocks {
            push_range(out, (r.start * bs).max(start)..(r.end * bs).min(end));
        }
        // Bytes past the filesystem's end (a volume larger than its filesystem) are kept.
        if end > fs_end {
            push_range(out, fs_end.max(start)..end);
        }
        Ok(())
    }
}
