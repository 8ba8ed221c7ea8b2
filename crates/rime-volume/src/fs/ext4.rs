//! ext2/3/4: the superblock and group descriptors, and the used-block map from the block-group
//! bitmaps.
//!
//! Handles 1–64 KiB blocks, 32- and 64-bit group descriptors, flex_bg (bitmaps and inode tables
//! of a group living in another group), meta_bg descriptor placement, sparse_super and
//! sparse_super2 backup placement, bigalloc (one bitmap bit per cluster) and uninitialised block
//! groups. Every number read from disk is range-checked before use.
//!
//! The map keeps its promise that nothing will read a block it leaves out:
//! - A journal with committed transactions (a mounted or crashed filesystem) is followed: the
//!   bitmaps are read as they will be after replay and united with the on-disk ones, and every
//!   home block a committed transaction writes is imaged (see `ext4_journal`). A journal that
//!   must be replayed but cannot be read makes the whole filesystem imaged as non-zero blocks.
//! - Checksums are checked where the filesystem keeps them, on the reading a mount uses: a group
//!   whose descriptor fails its checksum (`metadata_csum` or `uninit_bg`) or whose block bitmap
//!   fails its `metadata_csum` checksum is imaged whole, with a warning. `BLOCK_UNINIT` is
//!   believed only from a descriptor whose checksum holds.
//! - Where nothing checksums the bitmaps (ext2, ext3, ext4 without `metadata_csum`), the blocks
//!   every in-use inode references are checked against them first (`ext4_audit`), and any the
//!   bitmaps leave out are imaged too, with a warning.

use super::ext4_files::Ext4Files;
use super::ext4_journal::{ExtVolume, JournalState};
use super::MapOptions;
use crate::bytes::{le16, le32};
use crate::checksum::{crc16, crc32c_raw};
use crate::device::Region;
use crate::usedmap::{push_range, union_ranges, UsedMap};
use anyhow::{bail, ensure, Result};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Arc;

const EXT_MAGIC: u16 = 0xEF53;
const SUPERBLOCK_OFFSET: u64 = 1024;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const COMPAT_FAST_COMMIT: u32 = 0x400;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_INODE_UNINIT: u16 = 0x1;
const BG_BLOCK_UNINIT: u16 = 0x2;
/// Where the block bitmap checksum's high half ends in a group descriptor.
const BLOCK_BITMAP_CSUM_HI_END: u64 = 0x3A;
/// Offset of a group descriptor's own checksum.
const DESC_CSUM_OFF: usize = 0x1E;

/// One block group's descriptor, as stored: callers check the numbers before using them.
#[derive(Clone, Copy, Debug)]
pub struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub flags: u16,
    /// Inodes at the end of the group's table never used (with group descriptor checksums).
    pub itable_unused: u64,
    /// The block bitmap's `metadata_csum` checksum (the high half only with 64-byte descriptors).
    pub block_bitmap_csum: u32,
    /// Whether the descriptor passes its own checksum (`metadata_csum` or `uninit_bg`); true
    /// where the filesystem keeps none.
    pub checksum_ok: bool,
}

impl GroupDesc {
    /// Whether the block bitmap is not written yet (`BLOCK_UNINIT`): its contents are implied.
    pub fn block_uninit(&self) -> bool {
        self.flags & BG_BLOCK_UNINIT != 0
    }
    /// Whether the inode bitmap and table are not written yet (`INODE_UNINIT`): no inode used.
    pub fn inode_uninit(&self) -> bool {
        self.flags & BG_INODE_UNINIT != 0
    }
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
    pub uuid: [u8; 16],
    /// Seed of every `metadata_csum` checksum: `s_checksum_seed`, or CRC-32C of the UUID.
    pub csum_seed: u32,
    /// Inode of the internal journal (0: none, or an external journal).
    pub journal_inum: u64,
    /// First inode not reserved by the filesystem.
    pub first_ino: u64,
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
        if sb.len() < 1024 || le16(sb, 0x38)? != EXT_MAGIC {
            return Ok(None);
        }
        let log_block = le32(sb, 0x18)?;
        let log_cluster = le32(sb, 0x1C)?;
        ensure!(log_block <= 6, "block size 2^(10+{log_block}) is out of range");
        let incompat = le32(sb, 0x60)?;
        let ro_compat = le32(sb, 0x64)?;
        let revision = le32(sb, 0x4C)?;
        let block_size = 1024u64 << log_block;
        let is_64 = incompat & INCOMPAT_64BIT != 0;
        let blocks_hi = if is_64 { le32(sb, 0x150)? as u64 } else { 0 };
        let free_hi = if is_64 { le32(sb, 0x158)? as u64 } else { 0 };
        let bigalloc = ro_compat & RO_COMPAT_BIGALLOC != 0;
        let cluster_ratio = if bigalloc {
            ensure!(log_cluster >= log_block && log_cluster - log_block <= 16, "cluster size is out of range");
            1u64 << (log_cluster - log_block)
        } else {
            1
        };
        let desc_size = if is_64 { le16(sb, 0xFE)? as u64 } else { 32 };
        ensure!(
            desc_size >= 32 && desc_size.is_power_of_two() && desc_size <= block_size,
            "group descriptor size {desc_size} is invalid"
        );
        let inode_size = if revision == 0 { 128 } else { le16(sb, 0x58)? as u64 };
        let s = Superblock {
            block_size,
            blocks_count: le32(sb, 0x4)? as u64 | blocks_hi << 32,
            free_blocks: le32(sb, 0xC)? as u64 | free_hi << 32,
            first_data_block: le32(sb, 0x14)? as u64,
            blocks_per_group: le32(sb, 0x20)? as u64,
            clusters_per_group: if bigalloc { le32(sb, 0x24)? as u64 } else { le32(sb, 0x20)? as u64 },
            cluster_ratio,
            inodes_per_group: le32(sb, 0x28)? as u64,
            inode_size,
            desc_size,
            reserved_gdt_blocks: le16(sb, 0xCE)? as u64,
            first_meta_bg: le32(sb, 0x104)? as u64,
            compat: le32(sb, 0x5C)?,
            incompat,
            ro_compat,
            backup_bgs: [le32(sb, 0x24C)? as u64, le32(sb, 0x250)? as u64],
            revision,
            uuid: sb[0x68..0x78].try_into().unwrap(),
            csum_seed: if incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(sb, 0x270)?
            } else {
                crc32c_raw(!0, &sb[0x68..0x78])
            },
            journal_inum: if le32(sb, 0x5C)? & COMPAT_HAS_JOURNAL != 0 { le32(sb, 0xE0)? as u64 } else { 0 },
            first_ino: if revision == 0 { 11 } else { le32(sb, 0x54)? as u64 },
        };
        ensure!(s.incompat & INCOMPAT_JOURNAL_DEV == 0, "this is an external journal device, not a filesystem");
        ensure!(s.blocks_count > s.first_data_block, "block count {} is invalid", s.blocks_count);
        ensure!(s.first_data_block <= 1, "first data block {} is invalid", s.first_data_block);
        ensure!(
            s.clusters_per_group >= 8
                && s.clusters_per_group.is_multiple_of(8)
                && s.clusters_per_group <= 8 * block_size,
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

    /// "ext2", "ext3" or "ext4": ext2/ext3 know only a few features; anything else (extents,
    /// flex_bg, 64bit, checksums, ...) makes it ext4.
    pub fn kind_name(&self) -> &'static str {
        const EXT3_INCOMPAT: u32 = 0x2 | INCOMPAT_RECOVER | INCOMPAT_META_BG; // filetype, recover, meta_bg
        const EXT3_RO_COMPAT: u32 = RO_COMPAT_SPARSE_SUPER | 0x2 | 0x4; // large_file, btree_dir
        if self.incompat & !EXT3_INCOMPAT != 0 || self.ro_compat & !EXT3_RO_COMPAT != 0 {
            "ext4"
        } else if self.has_journal() {
            "ext3"
        } else {
            "ext2"
        }
    }

    pub fn has_journal(&self) -> bool {
        self.compat & COMPAT_HAS_JOURNAL != 0
    }

    /// The filesystem says its journal must be replayed before use (`needs_recovery`).
    pub fn needs_recovery(&self) -> bool {
        self.incompat & INCOMPAT_RECOVER != 0
    }

    pub fn has_metadata_csum(&self) -> bool {
        self.ro_compat & RO_COMPAT_METADATA_CSUM != 0
    }

    /// Whether the filesystem uses fast commits (which only ext4 itself can replay).
    pub fn has_fast_commit(&self) -> bool {
        self.compat & COMPAT_FAST_COMMIT != 0
    }

    /// Whether `other` (the same superblock after journal replay) describes the same layout:
    /// block and group sizes, counts and descriptor placement.
    pub fn same_layout(&self, other: &Superblock) -> bool {
        const LAYOUT_INCOMPAT: u32 = INCOMPAT_META_BG | INCOMPAT_64BIT | 0x200; // meta_bg, 64bit, flex_bg
        const LAYOUT_RO_COMPAT: u32 = RO_COMPAT_BIGALLOC | RO_COMPAT_METADATA_CSUM | RO_COMPAT_GDT_CSUM;
        (self.block_size, self.blocks_count, self.first_data_block, self.blocks_per_group, self.clusters_per_group)
            == (
                other.block_size,
                other.blocks_count,
                other.first_data_block,
                other.blocks_per_group,
                other.clusters_per_group,
            )
            && (self.inodes_per_group, self.inode_size, self.desc_size, self.reserved_gdt_blocks, self.first_meta_bg)
                == (
                    other.inodes_per_group,
                    other.inode_size,
                    other.desc_size,
                    other.reserved_gdt_blocks,
                    other.first_meta_bg,
                )
            && self.incompat & LAYOUT_INCOMPAT == other.incompat & LAYOUT_INCOMPAT
            && self.ro_compat & LAYOUT_RO_COMPAT == other.ro_compat & LAYOUT_RO_COMPAT
    }

    pub fn group_count(&self) -> u64 {
        (self.blocks_count - self.first_data_block).div_ceil(self.blocks_per_group)
    }

    pub fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    fn descs_per_block(&self) -> u64 {
        self.block_size / self.desc_size
    }

    pub fn has_group_desc_csum(&self) -> bool {
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

    pub fn inode_table_blocks(&self) -> u64 {
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
            let wide = self.desc_size >= 64;
            let hi = |o: usize| -> Result<u64> { Ok(if wide { (le32(d, o)? as u64) << 32 } else { 0 }) };
            let hi16 = |o: usize| -> Result<u64> { Ok(if wide { le16(d, o)? as u64 } else { 0 }) };
            let csum_hi = if self.desc_size >= BLOCK_BITMAP_CSUM_HI_END { (le16(d, 0x38)? as u32) << 16 } else { 0 };
            let stored_csum = le16(d, DESC_CSUM_OFF)?;
            descs.push(GroupDesc {
                block_bitmap: le32(d, 0x0)? as u64 | hi(0x20)?,
                inode_bitmap: le32(d, 0x4)? as u64 | hi(0x24)?,
                inode_table: le32(d, 0x8)? as u64 | hi(0x28)?,
                flags: le16(d, 0x12)?,
                itable_unused: le16(d, 0x1C)? as u64 | hi16(0x32)? << 16,
                block_bitmap_csum: le16(d, 0x18)? as u32 | csum_hi,
                checksum_ok: self.desc_checksum(g, d).is_none_or(|c| c == stored_csum),
            });
        }
        Ok(descs)
    }
}

impl Superblock {
    /// What group `g`'s descriptor `d` must hold as its checksum; `None` where the filesystem
    /// keeps no descriptor checksums. As `ext4_group_desc_csum` computes it.
    fn desc_checksum(&self, g: u64, d: &[u8]) -> Option<u16> {
        let group = (g as u32).to_le_bytes();
        let rest = &d[DESC_CSUM_OFF + 2..];
        if self.has_metadata_csum() {
            let c = crc32c_raw(self.csum_seed, &group);
            let c = crc32c_raw(c, &d[..DESC_CSUM_OFF]);
            let c = crc32c_raw(c, &[0, 0]);
            return Some(crc32c_raw(c, rest) as u16);
        }
        if self.ro_compat & RO_COMPAT_GDT_CSUM != 0 {
            let tail: &[u8] = if self.incompat & INCOMPAT_64BIT != 0 { rest } else { &[] };
            return Some(crc16(&[&self.uuid, &group, &d[..DESC_CSUM_OFF], tail]));
        }
        None
    }

    /// Whether a block bitmap's bytes match the checksum its descriptor keeps; `None` where the
    /// filesystem checksums no bitmaps (anything but `metadata_csum`).
    pub fn block_bitmap_ok(&self, d: &GroupDesc, bitmap: &[u8]) -> Option<bool> {
        if !self.has_metadata_csum() {
            return None;
        }
        let c = crc32c_raw(self.csum_seed, &bitmap[..(self.clusters_per_group / 8) as usize]);
        let mask = if self.desc_size >= BLOCK_BITMAP_CSUM_HI_END { u32::MAX } else { 0xFFFF };
        Some(c & mask == d.block_bitmap_csum)
    }
}

fn is_power_of(mut n: u64, p: u64) -> bool {
    while n > 1 && n.is_multiple_of(p) {
        n /= p;
    }
    n == 1
}

/// One reading of the group descriptors and block bitmaps: the one a mount uses (after journal
/// replay, when there is one) or the on-disk one beside it.
struct Reading {
    region: Region,
    groups: Vec<GroupDesc>,
    /// Checksums are checked on this reading: the one a mount uses. The on-disk reading of a
    /// filesystem with a journal to replay is stale by nature, so it only adds blocks.
    authoritative: bool,
    /// Recently read block bitmaps, by group.
    cache: HashMap<u64, Arc<Vec<u8>>>,
}

/// Block bitmaps kept per reading (cleared when full): 16 MiB of 4 KiB bitmaps.
const BITMAP_CACHE: usize = 4096;
/// Group numbers named in one warning.
const GROUPS_NAMED: usize = 8;

impl Reading {
    fn new(region: &Region, sb: &Superblock, authoritative: bool) -> Result<Reading> {
        let groups = sb.group_descs(region)?;
        let itb = sb.inode_table_blocks();
        let in_fs = |start: u64, len: u64| start.checked_add(len).is_some_and(|e| e <= sb.blocks_count);
        for (g, d) in groups.iter().enumerate() {
            let GroupDesc { block_bitmap, inode_bitmap, inode_table, .. } = *d;
            ensure!(in_fs(block_bitmap, 1), "block bitmap of group {g} ({block_bitmap}) is outside the filesystem");
            ensure!(in_fs(inode_bitmap, 1), "inode bitmap of group {g} ({inode_bitmap}) is outside the filesystem");
            ensure!(in_fs(inode_table, itb), "inode table of group {g} ({inode_table}) is outside the filesystem");
        }
        Ok(Reading { region: region.clone(), groups, authoritative, cache: HashMap::new() })
    }

    fn bitmap(&mut self, sb: &Superblock, g: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self.cache.get(&g) {
            return Ok(b.clone());
        }
        let mut buf = vec![0u8; sb.block_size as usize];
        self.region.read_at(self.groups[g as usize].block_bitmap * sb.block_size, &mut buf)?;
        if self.cache.len() >= BITMAP_CACHE {
            self.cache.clear();
        }
        let buf = Arc::new(buf);
        self.cache.insert(g, buf.clone());
        Ok(buf)
    }
}

/// Why a group's bitmap was not trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Distrust {
    DescriptorChecksum,
    BitmapChecksum,
}

pub struct Ext4Map {
    vol: ExtVolume,
    name: &'static str,
    /// The mount's reading first; the on-disk one second where a journal replay changes any
    /// group's descriptor or bitmap.
    readings: Vec<Reading>,
    /// Per group: whether the on-disk reading differs from the mount's and must be united.
    differs: Vec<bool>,
    /// Block ranges of every group's bitmaps and inode table in every reading, sorted: used
    /// even where the owning group's bitmap is uninitialised (flex_bg puts them in other groups).
    metadata: Vec<Range<u64>>,
    /// Blocks imaged beyond what the bitmaps say, sorted and merged: every home block a
    /// committed journal transaction writes, and blocks in-use inodes reference that the
    /// bitmaps leave out.
    extra: Vec<Range<u64>>,
    /// The journal must be replayed but cannot be read: every block counts as used.
    unreadable: Option<String>,
    unreadable_told: bool,
    /// Groups imaged whole because their bitmap could not be trusted.
    distrusted: BTreeMap<u64, Distrust>,
    audit: Audit,
    warnings: Vec<String>,
    files: Ext4Files,
}

/// The cross-check of the bitmaps against the blocks in-use inodes reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audit {
    /// Not done (the filesystem checksums its bitmaps, or it was turned off).
    Off,
    /// To be done before the first blocks are mapped.
    Pending,
    /// Done: how many blocks it added.
    Done { added_blocks: u64 },
}

impl Ext4Map {
    /// Recognises an ext2/3/4 filesystem. `Ok(None)`: not ext; `Err`: ext but unusable.
    pub fn probe(region: &Region) -> Result<Option<Ext4Map>> {
        Self::probe_with(region, &MapOptions::default())
    }

    /// [`Ext4Map::probe`], with the inode cross-check as `options` say.
    pub fn probe_with(region: &Region, options: &MapOptions) -> Result<Option<Ext4Map>> {
        let Some(vol) = ExtVolume::open(region)? else {
            return Ok(None);
        };
        let sb = vol.sb.clone();
        let name = sb.kind_name();
        let mut readings = Vec::new();
        let mut extra = Vec::new();
        let mut unreadable = None;
        let mut warnings = Vec::new();
        match &vol.journal {
            JournalState::Clean => readings.push(Reading::new(region, &sb, true)?),
            JournalState::Replay { replay, replayed, kernel_replays, .. } => {
                // A mount replays, so the replayed reading is the one checksums must hold for;
                // without needs_recovery the kernel drops the log and the disk's stands.
                let (first, second) = if *kernel_replays { (replayed, region) } else { (region, replayed) };
                readings.push(Reading::new(first, &sb, true)?);
                readings.push(Reading::new(second, &sb, false)?);
                extra = replay.written_ranges();
                if let Some(tid) = replay.failed_commit {
                    warnings.push(format!(
                        "journal transaction {tid} fails its checksum: the kernel will not mount this filesystem \
                         until e2fsck replays the journal up to it, as the map does"
                    ));
                }
            }
            JournalState::Unreadable(why) => {
                unreadable = Some(why.clone());
                readings.push(Reading::new(region, &sb, true)?);
            }
        }
        let differs = match readings.get(1) {
            None => vec![false; readings[0].groups.len()],
            Some(other) => {
                let replay = vol.replay().map(|(r, _)| r).expect("two readings only with a replay");
                (0..readings[0].groups.len() as u64)
                    .map(|g| {
                        let (a, b) = (&readings[0].groups[g as usize], &other.groups[g as usize]);
                        replay.replays(sb.desc_block(g))
                            || replay.replays(a.block_bitmap)
                            || replay.replays(b.block_bitmap)
                    })
                    .collect()
            }
        };
        let itb = sb.inode_table_blocks();
        let mut metadata = Vec::new();
        for reading in &readings {
            for d in &reading.groups {
                metadata.push(d.block_bitmap..d.block_bitmap + 1);
                metadata.push(d.inode_bitmap..d.inode_bitmap + 1);
                metadata.push(d.inode_table..d.inode_table + itb);
            }
        }
        let metadata = union_ranges(metadata);
        let view = vol.mounted_view().clone();
        let inode_tables = readings[0].groups.iter().map(|d| d.inode_table).collect();
        let files = Ext4Files::new(view, sb.clone(), inode_tables);
        // Without bitmap checksums nothing catches a bitmap that lies; the inodes can.
        let wanted = options.cross_check.wanted(!sb.has_metadata_csum());
        let audit = if wanted && unreadable.is_none() { Audit::Pending } else { Audit::Off };
        Ok(Some(Ext4Map {
            vol,
            name,
            readings,
            differs,
            metadata,
            extra,
            unreadable,
            unreadable_told: false,
            distrusted: BTreeMap::new(),
            audit,
            warnings,
            files,
        }))
    }

    pub fn superblock(&self) -> &Superblock {
        &self.vol.sb
    }

    /// A reader for files and directories of this filesystem, as a mount shows them.
    pub fn files(&self) -> &Ext4Files {
        &self.files
    }

    pub fn audit(&self) -> Audit {
        self.audit
    }

    /// The group descriptors a mount reads (after journal replay).
    pub fn mount_groups(&self) -> &[GroupDesc] {
        &self.readings[0].groups
    }

    /// Used blocks of group `g` within `[b0, b1)` in reading `r`, appended as block ranges.
    fn group_used(&mut self, r: usize, g: u64, b0: u64, b1: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let sb = &self.vol.sb;
        let first = sb.group_first_block(g);
        let reading = &mut self.readings[r];
        let desc = reading.groups[g as usize];
        if reading.authoritative && !desc.checksum_ok {
            self.distrusted.entry(g).or_insert(Distrust::DescriptorChecksum);
            out.push(b0..b1);
            return Ok(());
        }
        // BLOCK_UNINIT is believed only where descriptor checksums vouch for the flag.
        if desc.block_uninit() && sb.has_group_desc_csum() && desc.checksum_ok {
            // Only the group's own superblock/descriptor copies; its metadata comes with
            // `self.metadata`.
            let clip = |r: Range<u64>| r.start.max(b0)..r.end.min(b1);
            if sb.has_super(g) {
                out.push(clip(first..first + sb.super_overhead(g)));
            }
            if sb.incompat & INCOMPAT_META_BG != 0 {
                let dpb = sb.descs_per_block();
                if matches!(g % dpb, 0 | 1) || g % dpb == dpb - 1 {
                    let db = first + u64::from(sb.has_super(g));
                    out.push(clip(db..db + 1));
                }
            }
            return Ok(());
        }
        let bitmap = reading.bitmap(sb, g)?;
        if reading.authoritative && sb.block_bitmap_ok(&desc, &bitmap) == Some(false) {
            self.distrusted.entry(g).or_insert(Distrust::BitmapChecksum);
            out.push(b0..b1);
            return Ok(());
        }
        let ratio = sb.cluster_ratio;
        let bits = sb.clusters_per_group;
        let c0 = (b0 - first) / ratio;
        let c1 = ((b1 - first).div_ceil(ratio)).min(bits);
        let mut c = c0;
        while c < c1 {
            let byte = bitmap[(c / 8) as usize];
            if byte == 0 && c.is_multiple_of(8) && c + 8 <= c1 {
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

    /// Used blocks within `[b0, b1)` (inside one group), from every reading, the metadata and
    /// the extra blocks: sorted and merged.
    fn blocks_used(&mut self, g: u64, b0: u64, b1: u64) -> Result<Vec<Range<u64>>> {
        let mut all = Vec::new();
        self.group_used(0, g, b0, b1, &mut all)?;
        if self.readings.len() > 1 && self.differs[g as usize] {
            let mut on_disk = Vec::new();
            self.group_used(1, g, b0, b1, &mut on_disk)?;
            all.extend(on_disk);
        }
        for list in [&self.metadata, &self.extra] {
            let lo = list.partition_point(|r| r.end <= b0);
            all.extend(list[lo..].iter().take_while(|r| r.start < b1).map(|r| r.start.max(b0)..r.end.min(b1)));
        }
        Ok(union_ranges(all))
    }

    /// Runs the inode cross-check if it is pending.
    fn run_audit(&mut self) -> Result<()> {
        if self.audit != Audit::Pending {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let missing = super::ext4_audit::missing_blocks(self)?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), missing = missing.ranges.len(), "inode cross-check");
        let added: u64 = missing.ranges.iter().map(|r| r.end - r.start).sum();
        if added > 0 {
            let named: Vec<String> = missing.inodes.iter().take(GROUPS_NAMED).map(|i| i.to_string()).collect();
            self.warnings.push(format!(
                "the block bitmaps leave out {added} block{} that in-use inodes reference (inode{} {}{}); they were imaged too",
                if added == 1 { "" } else { "s" },
                if missing.inodes.len() == 1 { "" } else { "s" },
                named.join(", "),
                if missing.inodes.len() > GROUPS_NAMED { ", ..." } else { "" }
            ));
            let mut extra = std::mem::take(&mut self.extra);
            extra.extend(missing.ranges);
            self.extra = union_ranges(extra);
        }
        self.audit = Audit::Done { added_blocks: added };
        Ok(())
    }

    /// Whether block range `[b0, b1)` is used, as the ranges of it that are not: for the audit.
    pub(super) fn unmapped_part(&mut self, b0: u64, b1: u64) -> Result<Vec<Range<u64>>> {
        let sb = self.vol.sb.clone();
        let mut missing = Vec::new();
        let mut b = b0.max(sb.first_data_block);
        while b < b1 {
            let g = (b - sb.first_data_block) / sb.blocks_per_group;
            ensure!(g < self.readings[0].groups.len() as u64, "block {b} lies past the last block group");
            let group_end = sb.group_first_block(g + 1).min(b1);
            let used = self.blocks_used(g, b, group_end)?;
            let mut pos = b;
            for r in used {
                if r.start > pos {
                    missing.push(pos..r.start);
                }
                pos = pos.max(r.end);
            }
            if pos < group_end {
                missing.push(pos..group_end);
            }
            b = group_end;
        }
        Ok(missing)
    }
}

impl UsedMap for Ext4Map {
    fn filesystem(&self) -> Option<&str> {
        Some(self.name)
    }

    fn file_extents(&mut self, path: &str) -> Result<Option<crate::usedmap::FileExtents>> {
        if let Some(why) = &self.unreadable {
            bail!("no file is left out while the journal cannot be followed ({why})");
        }
        self.files().data_extents(path)
    }

    fn swap_files(&mut self) -> Result<Vec<crate::usedmap::SwapFile>> {
        if self.unreadable.is_some() {
            return Ok(Vec::new());
        }
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
        let mut d = match &self.unreadable {
            Some(_) => format!("non-zero chunks ({} whose journal cannot be replayed)", self.name),
            None => format!("{} block bitmaps", self.name),
        };
        if let Some(j) = self.vol.describe_journal() {
            d = format!("{d}; {j}");
        }
        if self.audit != Audit::Off {
            d.push_str("; checked against in-use inodes");
        }
        d
    }

    fn reported_used_bytes(&self) -> Option<u64> {
        let sb = &self.vol.sb;
        Some(sb.blocks_count.saturating_sub(sb.free_blocks) * sb.block_size)
    }

    fn take_warnings(&mut self) -> Vec<String> {
        let mut w = std::mem::take(&mut self.warnings);
        if let (Some(why), false) = (&self.unreadable, self.unreadable_told) {
            w.push(format!(
                "the {} journal must be replayed but cannot be read ({why}); imaged all non-zero blocks",
                self.name
            ));
            self.unreadable_told = true;
        }
        for kind in [Distrust::DescriptorChecksum, Distrust::BitmapChecksum] {
            let groups: Vec<u64> = self.distrusted.iter().filter(|(_, k)| **k == kind).map(|(g, _)| *g).collect();
            if groups.is_empty() {
                continue;
            }
            let named: Vec<String> = groups.iter().take(GROUPS_NAMED).map(|g| g.to_string()).collect();
            let what = match kind {
                Distrust::DescriptorChecksum => "descriptor",
                Distrust::BitmapChecksum => "block bitmap",
            };
            w.push(format!(
                "the {what} of {} block group{} ({}{}) fails its checksum; imaged {} as all non-zero blocks",
                groups.len(),
                if groups.len() == 1 { "" } else { "s" },
                named.join(", "),
                if groups.len() > GROUPS_NAMED { ", ..." } else { "" },
                if groups.len() == 1 { "that group" } else { "those groups" }
            ));
        }
        self.distrusted.clear();
        w
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        if self.unreadable.is_some() {
            push_range(out, start..start + len);
            return Ok(());
        }
        self.run_audit()?;
        let sb = self.vol.sb.clone();
        let bs = sb.block_size;
        let end = start + len;
        let fs_end = sb.blocks_count * bs;
        // Work in blocks; a partial block at either end counts as the whole block.
        let b0 = start / bs;
        let b1 = end.min(fs_end).div_ceil(bs);
        let mut blocks = Vec::new();
        // Blocks before the first group (the boot block with 1 KiB blocks) are always kept.
        let first_group_block = sb.first_data_block.max(1);
        if b0 < first_group_block {
            push_range(&mut blocks, b0..first_group_block.min(b1));
        }
        let mut b = b0.max(first_group_block);
        while b < b1 {
            let g = (b - sb.first_data_block) / sb.blocks_per_group;
            if g >= self.readings[0].groups.len() as u64 {
                bail!("block {b} lies past the last block group");
            }
            let group_end = sb.group_first_block(g + 1).min(b1);
            for r in self.blocks_used(g, b, group_end)? {
                push_range(&mut blocks, r);
            }
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
