//! btrfs used-block map (single-device filesystems) from the chunk and extent trees.
//!
//! btrfs allocates in two steps: chunks map ranges of a logical address space onto stripes of
//! the devices (one stripe for `single`, two on the same device for `DUP`), and the extent tree
//! records which logical ranges inside the chunks hold data or tree blocks (`EXTENT_ITEM`, and
//! `METADATA_ITEM` for tree blocks with skinny metadata). The used physical bytes are therefore
//! the stripes of every allocated extent, plus the superblock copies (at 64 KiB, 64 MiB and
//! 256 GiB, which may lie inside chunks whose logical range there is never allocated) and the
//! first MiB of the device, which btrfs leaves to boot loaders.
//!
//! The chunk map (the superblock's `sys_chunk_array`, then the chunk tree) is held in memory:
//! one entry per chunk. The extent tree is not: `used_ranges` walks it with a cursor (one
//! root-to-leaf path) over the chunk whose stripe the requested range falls in, re-seeking by
//! key when the scan moves to another stripe. At probe time the chunk tree and the whole extent
//! tree are read once and checked — checksums (crc32c), fsid, bytenr, level, generation, key
//! order, parent keys, item bounds, extents inside chunks and not overlapping, and their total
//! against the superblock's `bytes_used` — so that a damaged filesystem is refused before the
//! backup starts.
//!
//! The file reader (`super::btrfs_files`, for the image explorer) shares the chunk map
//! (`Fs::load`), the checked tree-block reader (with an LRU cache of checked blocks there) and
//! the cursor; it reads data through `Fs::read_logical`.
//!
//! Multi-device filesystems are refused, as are zoned ones and features that move the
//! allocation records elsewhere (extent tree v2, raid stripe tree). While a log tree is present
//! (an fsync log not yet replayed) the extents it refers to are not yet in the extent tree: the
//! map then keeps every chunk whole.

use crate::bytes::{le16, le32, le64};
use crate::checksum::crc32c;
use crate::device::Region;
use crate::usedmap::{push_range, UsedMap};
use anyhow::{bail, ensure, Context, Result};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::{Arc, Mutex};

const SUPER_OFFSET: u64 = 0x10000;
const SUPER_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"_BHRfS_M";
/// Superblock copies: primary, then the mirrors.
const SUPER_COPIES: [u64; 3] = [SUPER_OFFSET, 64 << 20, 256 << 30];
/// btrfs never allocates the first MiB of a device: it is left to boot loaders.
const RESERVED: u64 = 1 << 20;
const HEADER: usize = 101;
const ITEM: usize = 25;
const KEY_PTR: usize = 33;
pub(crate) const MAX_LEVEL: u8 = 7;
const MAX_CHUNKS: usize = 1 << 20;

pub(crate) const ROOT_ITEM: u8 = 132;
const EXTENT_ITEM: u8 = 168;
const METADATA_ITEM: u8 = 169;
const DEV_ITEM: u8 = 216;
const CHUNK_ITEM: u8 = 228;
const EXTENT_TREE_OBJECTID: u64 = 2;
const DEV_ITEMS_OBJECTID: u64 = 1;
const FIRST_CHUNK_TREE_OBJECTID: u64 = 256;

const BG_DATA: u64 = 1;
const BG_SYSTEM: u64 = 2;
const BG_METADATA: u64 = 4;
const BG_RAID0: u64 = 8;
const BG_RAID1: u64 = 16;
const BG_DUP: u64 = 32;
const BG_RAID10: u64 = 64;
const BG_RAID5: u64 = 128;
const BG_RAID6: u64 = 256;
const BG_RAID1C3: u64 = 512;
const BG_RAID1C4: u64 = 1024;
const BG_PROFILES: u64 = BG_RAID0 | BG_RAID1 | BG_DUP | BG_RAID10 | BG_RAID5 | BG_RAID6 | BG_RAID1C3 | BG_RAID1C4;

const INCOMPAT_METADATA_UUID: u64 = 0x400;
/// Incompatible features that leave allocation in the chunk and extent trees as read here:
/// mixed backrefs, default subvolume, mixed groups, lzo, zstd, big metadata, extended iref,
/// raid56, skinny metadata, no holes, metadata uuid, raid1c34, simple quota.
const KNOWN_INCOMPAT: u64 = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x10000;

/// A btree key: (objectid, type, offset), ordered in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub objectid: u64,
    pub kind: u8,
    pub offset: u64,
}

impl Key {
    pub(crate) fn parse(b: &[u8], o: usize) -> Result<Key, crate::bytes::Truncated> {
        let kind = crate::bytes::field::<1>(b, o + 8)?[0];
        Ok(Key { objectid: le64(b, o)?, kind, offset: le64(b, o + 9)? })
    }
    pub(crate) const MIN: Key = Key { objectid: 0, kind: 0, offset: 0 };
}

/// Superblock facts the map needs, all range-checked.
#[derive(Clone, Debug)]
pub struct Superblock {
    pub generation: u64,
    pub root: u64,
    pub root_level: u8,
    pub chunk_root: u64,
    pub chunk_root_level: u8,
    pub chunk_root_generation: u64,
    pub log_root: u64,
    pub bytes_used: u64,
    pub num_devices: u64,
    pub sectorsize: u64,
    pub nodesize: u64,
    pub csum_type: u16,
    pub incompat: u64,
    pub devid: u64,
    pub dev_total_bytes: u64,
    /// The fsid stamped into tree blocks (the metadata uuid when that feature is on).
    pub meta_fsid: [u8; 16],
    sys_chunk_array: Vec<u8>,
}

impl Superblock {
    /// Parses the primary superblock; `Ok(None)` when there is no btrfs magic.
    pub fn parse(sb: &[u8]) -> Result<Option<Superblock>> {
        if sb.len() < SUPER_SIZE || &sb[0x40..0x48] != MAGIC {
            return Ok(None);
        }
        let csum_type = le16(sb, 0xC4)?;
        ensure!(csum_type <= 3, "checksum type {csum_type} is unknown");
        if csum_type == 0 {
            let computed = crc32c(&sb[0x20..SUPER_SIZE]);
            ensure!(le32(sb, 0)? == computed, "superblock checksum mismatch");
        }
        ensure!(
            le64(sb, 0x30)? == SUPER_OFFSET,
            "the superblock does not know where it lives ({:#x})",
            le64(sb, 0x30)?
        );
        let sectorsize = le32(sb, 0x90)? as u64;
        let nodesize = le32(sb, 0x94)? as u64;
        ensure!(
            sectorsize.is_power_of_two() && (512..=65536).contains(&sectorsize),
            "sector size {sectorsize} is invalid"
        );
        ensure!(
            nodesize.is_power_of_two() && (4096..=65536).contains(&nodesize) && nodesize >= sectorsize,
            "node size {nodesize} is invalid"
        );
        let incompat = le64(sb, 0xBC)?;
        ensure!(incompat & !KNOWN_INCOMPAT == 0, "unsupported incompatible features {:#x}", incompat & !KNOWN_INCOMPAT);
        let num_devices = le64(sb, 0x88)?;
        ensure!(num_devices == 1, "the filesystem spans {num_devices} devices; only single-device btrfs is mapped");
        let sys_len = le32(sb, 0xA0)? as usize;
        ensure!(sys_len <= 2048, "system chunk array size {sys_len} is invalid");
        let root_level = sb[0xC6];
        let chunk_root_level = sb[0xC7];
        ensure!(root_level <= MAX_LEVEL && chunk_root_level <= MAX_LEVEL, "tree root levels are invalid");
        let fsid: [u8; 16] = sb[0x20..0x30].try_into().unwrap();
        let meta_fsid: [u8; 16] =
            if incompat & INCOMPAT_METADATA_UUID != 0 { sb[0x23B..0x24B].try_into().unwrap() } else { fsid };
        ensure!(sb[0xC9 + 82..0xC9 + 98] == fsid, "the device item belongs to another filesystem");
        let s = Superblock {
            generation: le64(sb, 0x48)?,
            root: le64(sb, 0x50)?,
            root_level,
            chunk_root: le64(sb, 0x58)?,
            chunk_root_level,
            chunk_root_generation: le64(sb, 0xA4)?,
            log_root: le64(sb, 0x60)?,
            bytes_used: le64(sb, 0x78)?,
            num_devices,
            sectorsize,
            nodesize,
            csum_type,
            incompat,
            devid: le64(sb, 0xC9)?,
            dev_total_bytes: le64(sb, 0xC9 + 8)?,
            meta_fsid,
            sys_chunk_array: sb[0x32B..0x32B + sys_len].to_vec(),
        };
        ensure!(s.chunk_root_generation <= s.generation, "chunk root generation is in the future");
        ensure!(s.dev_total_bytes > RESERVED, "device size {} is too small", s.dev_total_bytes);
        Ok(Some(s))
    }
}

/// One chunk: a logical range and where its stripes live on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chunk {
    logical: u64,
    length: u64,
    flags: u64,
    stripe_len: u64,
    sub_stripes: u64,
    stripes: Vec<u64>,
}

impl Chunk {
    /// Parses a chunk item (`b` holds the item); checks it against the superblock.
    fn parse(sb: &Superblock, logical: u64, b: &[u8]) -> Result<Chunk> {
        ensure!(b.len() >= 48, "chunk item at {logical} is truncated");
        let length = le64(b, 0)?;
        let stripe_len = le64(b, 16)?;
        let flags = le64(b, 24)?;
        let num = le16(b, 44)? as usize;
        let sub_stripes = le16(b, 46)? as u64;
        ensure!(
            num >= 1 && b.len() >= 48 + 32 * num,
            "chunk at {logical} has {num} stripes in a {} byte item",
            b.len()
        );
        ensure!(
            length > 0 && length.is_multiple_of(sb.sectorsize) && logical.is_multiple_of(sb.sectorsize),
            "chunk at {logical} has invalid length {length}"
        );
        ensure!(logical.checked_add(length).is_some(), "chunk at {logical} wraps around");
        ensure!(
            stripe_len.is_power_of_two() && stripe_len >= 4096,
            "chunk at {logical} has stripe length {stripe_len}"
        );
        ensure!(flags & (BG_DATA | BG_SYSTEM | BG_METADATA) != 0, "chunk at {logical} has no type ({flags:#x})");
        let profile = flags & BG_PROFILES;
        ensure!(profile.count_ones() <= 1, "chunk at {logical} has several profiles ({flags:#x})");
        let ok = match profile {
            0 => num == 1,
            BG_DUP | BG_RAID1 => num == 2,
            BG_RAID1C3 => num == 3,
            BG_RAID1C4 => num == 4,
            BG_RAID0 => true,
            BG_RAID10 => sub_stripes >= 1 && (num as u64).is_multiple_of(sub_stripes),
            BG_RAID5 => num >= 2,
            BG_RAID6 => num >= 3,
            _ => false,
        };
        ensure!(ok, "chunk at {logical} has {num} stripes for profile {flags:#x}");
        let mut stripes = Vec::with_capacity(num);
        for i in 0..num {
            let devid = le64(b, 48 + 32 * i)?;
            ensure!(
                devid == sb.devid,
                "chunk at {logical} has a stripe on device {devid}: not a single-device filesystem"
            );
            stripes.push(le64(b, 48 + 32 * i + 8)?);
        }
        let c = Chunk { logical, length, flags, stripe_len, sub_stripes, stripes };
        let per_dev = c.per_device_len();
        for &s in &c.stripes {
            ensure!(
                s.checked_add(per_dev).is_some_and(|e| e <= sb.dev_total_bytes),
                "chunk at {logical} has a stripe at {s} past the end of the device"
            );
        }
        Ok(c)
    }

    fn profile(&self) -> u64 {
        self.flags & BG_PROFILES
    }

    /// Bytes each stripe takes on the device.
    fn per_device_len(&self) -> u64 {
        let n = self.stripes.len() as u64;
        match self.profile() {
            BG_RAID0 => self.length.div_ceil(n),
            BG_RAID10 => self.length.div_ceil(n / self.sub_stripes.max(1)),
            BG_RAID5 => self.length.div_ceil(n - 1),
            BG_RAID6 => self.length.div_ceil(n - 2),
            _ => self.length,
        }
    }

    /// Whether a stripe is a plain copy of the chunk (`single`, `DUP`, the mirrored profiles):
    /// then physical = stripe start + (logical - chunk start).
    fn is_copy(&self) -> bool {
        matches!(self.profile(), 0 | BG_DUP | BG_RAID1 | BG_RAID1C3 | BG_RAID1C4)
            || (self.profile() == BG_RAID0 && self.stripes.len() == 1)
    }

    /// Physical addresses of the copies of `[logical, logical + len)`, which must lie in this
    /// chunk (and within one stripe unit for the striped profiles).
    fn copies(&self, logical: u64, len: u64) -> Result<Vec<u64>> {
        let off = logical - self.logical;
        ensure!(off + len <= self.length, "block at {logical} crosses the end of its chunk");
        if self.is_copy() {
            return Ok(self.stripes.iter().map(|s| s + off).collect());
        }
        let unit_off = off % self.stripe_len;
        ensure!(unit_off + len <= self.stripe_len, "block at {logical} crosses a stripe boundary");
        let nr = off / self.stripe_len;
        match self.profile() {
            BG_RAID0 => {
                let n = self.stripes.len() as u64;
                Ok(vec![self.stripes[(nr % n) as usize] + (nr / n) * self.stripe_len + unit_off])
            }
            BG_RAID10 => {
                let sub = self.sub_stripes.max(1);
                let factor = self.stripes.len() as u64 / sub;
                let first = (nr % factor) * sub;
                Ok((0..sub)
                    .map(|j| self.stripes[(first + j) as usize] + (nr / factor) * self.stripe_len + unit_off)
                    .collect())
            }
            _ => bail!("reading metadata from a RAID5/6 chunk is not supported"),
        }
    }
}

/// The chunk map and the means to read tree blocks through it.
pub(crate) struct Fs {
    region: Region,
    pub(crate) sb: Superblock,
    /// Sorted by logical address, not overlapping.
    chunks: Vec<Chunk>,
    /// Tree blocks already read and checked, by logical address (the file reader's; the map
    /// reads each block about once and keeps none).
    cache: Option<Mutex<lru::LruCache<u64, Arc<Vec<u8>>>>>,
}

impl Fs {
    /// Reads the superblock and the chunk map (the superblock's system chunks, then the whole
    /// chunk tree, checked): `Ok(None)` when `region` holds no btrfs.
    pub(crate) fn load(region: &Region) -> Result<Option<Fs>> {
        if region.len < SUPER_OFFSET + SUPER_SIZE as u64 {
            return Ok(None);
        }
        let mut raw = vec![0u8; SUPER_SIZE];
        region.read_at(SUPER_OFFSET, &mut raw)?;
        let Some(sb) = Superblock::parse(&raw)? else {
            return Ok(None);
        };
        ensure!(
            sb.dev_total_bytes <= region.len,
            "the device holds {} bytes of btrfs, the volume only {}",
            sb.dev_total_bytes,
            region.len
        );
        // Bootstrap chunks from the superblock.
        let mut boot = Vec::new();
        let a = &sb.sys_chunk_array;
        let mut o = 0;
        while o < a.len() {
            ensure!(o + 17 + 48 <= a.len(), "system chunk array is truncated");
            let key = Key::parse(a, o)?;
            ensure!(
                key.kind == CHUNK_ITEM && key.objectid == FIRST_CHUNK_TREE_OBJECTID,
                "system chunk array holds a {key:?}"
            );
            let num = le16(a, o + 17 + 44)? as usize;
            let len = 48 + 32 * num;
            ensure!(o + 17 + len <= a.len(), "system chunk array is truncated");
            boot.push(Chunk::parse(&sb, key.offset, &a[o + 17..o + 17 + len])?);
            o += 17 + len;
        }
        ensure!(!boot.is_empty(), "the system chunk array is empty");
        boot.sort_by_key(|c| c.logical);
        check_chunks(&boot)?;
        let mut fs = Fs { region: region.clone(), sb, chunks: boot, cache: None };

        // The chunk tree: every chunk, and the device items (exactly this one device).
        let mut chunks = Vec::new();
        let mut devices = 0;
        let mut cur =
            Cursor::seek(&fs, (fs.sb.chunk_root, fs.sb.chunk_root_level, fs.sb.chunk_root_generation), Key::MIN)?;
        while let Some((key, data)) = cur.next(&fs, true)? {
            match key.kind {
                CHUNK_ITEM if key.objectid == FIRST_CHUNK_TREE_OBJECTID => {
                    ensure!(chunks.len() < MAX_CHUNKS, "more than {MAX_CHUNKS} chunks");
                    chunks.push(Chunk::parse(&fs.sb, key.offset, &data)?);
                }
                DEV_ITEM if key.objectid == DEV_ITEMS_OBJECTID => {
                    devices += 1;
                    ensure!(
                        key.offset == fs.sb.devid,
                        "the chunk tree lists device {}: not a single-device filesystem",
                        key.offset
                    );
                }
                _ => {}
            }
        }
        ensure!(devices == 1, "the chunk tree lists {devices} devices");
        check_chunks(&chunks)?;
        for c in &fs.chunks {
            ensure!(chunks.contains(c), "system chunk at {} is missing from the chunk tree", c.logical);
        }
        fs.chunks = chunks;
        Ok(Some(fs))
    }

    /// Keeps up to `blocks` checked tree blocks in memory from now on.
    pub(crate) fn with_block_cache(mut self, blocks: usize) -> Fs {
        self.cache = NonZeroUsize::new(blocks).map(|n| Mutex::new(lru::LruCache::new(n)));
        self
    }

    /// Reads `buf.len()` bytes of the logical address space at `logical` (file data), split
    /// at chunk and stripe boundaries, from the first copy that reads.
    pub(crate) fn read_logical(&self, mut logical: u64, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            let Some(ci) = self.chunk_of(logical) else { bail!("data at logical {logical} lies in no chunk") };
            let c = &self.chunks[ci];
            let mut n = (c.logical + c.length - logical).min(buf.len() as u64);
            if !c.is_copy() {
                n = n.min(c.stripe_len - (logical - c.logical) % c.stripe_len);
            }
            let (now, rest) = std::mem::take(&mut buf).split_at_mut(n as usize);
            let mut last = None;
            for phys in c.copies(logical, n)? {
                match self.region.read_at(phys, now) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
            logical += n;
            buf = rest;
        }
        Ok(())
    }

    fn chunk_of(&self, logical: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.logical <= logical);
        (i > 0 && logical < self.chunks[i - 1].logical + self.chunks[i - 1].length).then(|| i - 1)
    }

    /// Reads and checks the tree block at `logical`, trying each copy until one is sound.
    fn read_block(
        &self,
        logical: u64,
        level: u8,
        generation: u64,
        first_key: Option<Key>,
        is_root: bool,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some(cache) = &self.cache {
            if let Some(b) = cache.lock().unwrap().get(&logical).cloned() {
                // Checked in full when read; what the pointer to it claims is checked again.
                ensure!(b[0x64] == level, "tree block {logical} is at level {}, expected {level}", b[0x64]);
                let gen = le64(&b, 0x50)?;
                ensure!(gen == generation, "tree block {logical} has generation {gen}, expected {generation}");
                let n = le32(&b, 0x60)? as usize;
                ensure!(n > 0 || is_root, "tree block {logical} is empty");
                if let Some(k) = first_key {
                    ensure!(
                        n > 0 && Key::parse(&b, HEADER)? == k,
                        "tree block {logical} does not start with its parent's key"
                    );
                }
                return Ok(b);
            }
        }
        let b = Arc::new(self.read_block_uncached(logical, level, generation, first_key, is_root)?);
        if let Some(cache) = &self.cache {
            cache.lock().unwrap().put(logical, b.clone());
        }
        Ok(b)
    }

    fn read_block_uncached(
        &self,
        logical: u64,
        level: u8,
        generation: u64,
        first_key: Option<Key>,
        is_root: bool,
    ) -> Result<Vec<u8>> {
        let Some(ci) = self.chunk_of(logical) else { bail!("tree block {logical} lies in no chunk") };
        let ns = self.sb.nodesize;
        ensure!(logical.is_multiple_of(self.sb.sectorsize), "tree block {logical} is misaligned");
        let copies = self.chunks[ci].copies(logical, ns)?;
        let mut first_err = None;
        for phys in copies {
            let mut buf = vec![0u8; ns as usize];
            let r = self
                .region
                .read_at(phys, &mut buf)
                .and_then(|_| self.check_block(&buf, logical, level, generation, first_key, is_root));
            match r {
                Ok(()) => return Ok(buf),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.expect("a chunk has at least one stripe"))
    }

    fn check_block(
        &self,
        b: &[u8],
        logical: u64,
        level: u8,
        generation: u64,
        first_key: Option<Key>,
        is_root: bool,
    ) -> Result<()> {
        if self.sb.csum_type == 0 {
            ensure!(le32(b, 0)? == crc32c(&b[0x20..]), "tree block {logical} has a bad checksum");
        }
        ensure!(b[0x20..0x30] == self.sb.meta_fsid, "tree block {logical} belongs to another filesystem");
        ensure!(le64(b, 0x30)? == logical, "tree block {logical} claims to be block {}", le64(b, 0x30)?);
        let blevel = b[0x64];
        ensure!(blevel == level, "tree block {logical} is at level {blevel}, expected {level}");
        let gen = le64(b, 0x50)?;
        ensure!(gen == generation, "tree block {logical} has generation {gen}, expected {generation}");
        let n = le32(b, 0x60)? as usize;
        let room = b.len() - HEADER;
        if level == 0 {
            ensure!(n * ITEM <= room, "leaf {logical} claims {n} items");
            ensure!(n > 0 || is_root, "leaf {logical} is empty");
            let mut prev: Option<Key> = None;
            for i in 0..n {
                let o = HEADER + i * ITEM;
                let k = Key::parse(b, o)?;
                ensure!(prev.is_none_or(|p| p < k), "leaf {logical} has keys out of order");
                prev = Some(k);
                let (doff, dlen) = (le32(b, o + 17)? as usize, le32(b, o + 21)? as usize);
                ensure!(
                    doff >= n * ITEM && doff.checked_add(dlen).is_some_and(|e| e <= room),
                    "leaf {logical} item {i} data lies outside the leaf"
                );
            }
        } else {
            ensure!(n > 0 && n * KEY_PTR <= room, "node {logical} claims {n} pointers");
            for i in 1..n {
                ensure!(
                    Key::parse(b, HEADER + (i - 1) * KEY_PTR)? < Key::parse(b, HEADER + i * KEY_PTR)?,
                    "node {logical} has keys out of order"
                );
            }
        }
        if let Some(k) = first_key {
            ensure!(n > 0 && Key::parse(b, HEADER)? == k, "tree block {logical} does not start with its parent's key");
        }
        Ok(())
    }
}

/// One block of a cursor's path.
struct PathNode {
    buf: Arc<Vec<u8>>,
    level: u8,
    n: usize,
    slot: usize,
}

/// A position in a btree: one root-to-leaf path. Keys come out strictly increasing; since
/// levels strictly decrease downwards, a loop or a block reachable twice is caught at once.
pub(crate) struct Cursor {
    path: Vec<PathNode>,
    last: Option<Key>,
}

impl Cursor {
    /// Positions the cursor at the first item with a key >= `key` in the tree rooted at `root`.
    pub(crate) fn seek(fs: &Fs, root: (u64, u8, u64), key: Key) -> Result<Cursor> {
        let (bytenr, level, generation) = root;
        let mut c = Cursor { path: Vec::with_capacity(level as usize + 1), last: None };
        let mut buf = fs.read_block(bytenr, level, generation, None, true)?;
        loop {
            let level = buf[0x64];
            let n = le32(&buf, 0x60)? as usize;
            if level == 0 {
                // Every key was read when the block was checked; a failure here is impossible, and
                // would end the search.
                let slot = (0..n).find(|&i| Key::parse(&buf, HEADER + i * ITEM).is_ok_and(|k| k >= key)).unwrap_or(n);
                c.path.push(PathNode { buf, level, n, slot });
                return Ok(c);
            }
            let slot =
                (0..n).rev().find(|&i| Key::parse(&buf, HEADER + i * KEY_PTR).is_ok_and(|k| k <= key)).unwrap_or(0);
            let child = Self::child(fs, &buf, level, slot)?;
            c.path.push(PathNode { buf, level, n, slot });
            buf = child;
        }
    }

    /// Positions the cursor at the last item with a key <= `key` (or at the first item when
    /// every key is greater). Internal nodes lead to the last child whose first key is <= `key`,
    /// so that item, when there is one, is in the leaf reached.
    pub(crate) fn seek_le(fs: &Fs, root: (u64, u8, u64), key: Key) -> Result<Cursor> {
        let mut c = Cursor::seek(fs, root, key)?;
        if let Some(leaf) = c.path.last_mut() {
            let exact = leaf.slot < leaf.n && Key::parse(&leaf.buf, HEADER + leaf.slot * ITEM)? == key;
            if !exact && leaf.slot > 0 {
                leaf.slot -= 1;
            }
        }
        Ok(c)
    }

    fn child(fs: &Fs, node: &[u8], level: u8, slot: usize) -> Result<Arc<Vec<u8>>> {
        let o = HEADER + slot * KEY_PTR;
        let key = Key::parse(node, o)?;
        fs.read_block(le64(node, o + 17)?, level - 1, le64(node, o + 25)?, Some(key), false)
    }

    /// The next item: its key and (when `want_data`) a copy of its data.
    pub(crate) fn next(&mut self, fs: &Fs, want_data: bool) -> Result<Option<(Key, Vec<u8>)>> {
        loop {
            let Some(leaf) = self.path.last_mut() else {
                return Ok(None);
            };
            if leaf.slot < leaf.n {
                let o = HEADER + leaf.slot * ITEM;
                let key = Key::parse(&leaf.buf, o)?;
                leaf.slot += 1;
                ensure!(
                    self.last.is_none_or(|l| l < key),
                    "btree keys out of order at {key:?} (a loop or a misplaced block)"
                );
                self.last = Some(key);
                let data = if want_data {
                    let (doff, dlen) = (le32(&leaf.buf, o + 17)? as usize, le32(&leaf.buf, o + 21)? as usize);
                    leaf.buf[HEADER + doff..HEADER + doff + dlen].to_vec()
                } else {
                    Vec::new()
                };
                return Ok(Some((key, data)));
            }
            // Leaf exhausted: climb to the first ancestor with a next slot, then descend leftmost.
            self.path.pop();
            loop {
                let Some(node) = self.path.last_mut() else {
                    return Ok(None);
                };
                node.slot += 1;
                if node.slot < node.n {
                    break;
                }
                self.path.pop();
            }
            while let Some(node) = self.path.last() {
                if node.level == 0 {
                    break;
                }
                let child = Self::child(fs, &node.buf, node.level, node.slot)?;
                let level = child[0x64];
                let n = le32(&child, 0x60)? as usize;
                self.path.push(PathNode { buf: child, level, n, slot: 0 });
            }
        }
    }
}

/// One stripe of one chunk on the device.
#[derive(Clone, Debug)]
struct Stripe {
    phys: Range<u64>,
    chunk: usize,
}

/// Where `used_ranges` is in the extent tree: walking the chunk of stripe `stripe`.
struct ExtentCursor {
    stripe: usize,
    cursor: Cursor,
    /// The next allocated extent (logical range) of the chunk not yet passed.
    pending: Option<Range<u64>>,
    /// End of the last extent passed: any logical range from here on can be answered.
    floor: u64,
    prev_end: u64,
}

pub struct BtrfsMap {
    fs: Fs,
    /// Every chunk stripe, sorted by physical start, not overlapping.
    stripes: Vec<Stripe>,
    /// Always-used physical ranges: the reserved first MiB, the superblock mirrors, anything
    /// past the device's end. Sorted, merged.
    fixed: Vec<Range<u64>>,
    extent_root: (u64, u8, u64),
    /// A log tree awaits replay: keep whole chunks.
    whole_chunks: bool,
    cursor: Option<ExtentCursor>,
}

impl BtrfsMap {
    /// Recognises a btrfs filesystem. `Ok(None)`: not btrfs; `Err`: btrfs but unusable here.
    pub fn probe(region: &Region) -> Result<Option<BtrfsMap>> {
        let Some(fs) = Fs::load(region)? else {
            return Ok(None);
        };

        // Stripes on the device, in physical order, not overlapping.
        let mut stripes = Vec::new();
        for (i, c) in fs.chunks.iter().enumerate() {
            let len = c.per_device_len();
            for &s in &c.stripes {
                stripes.push(Stripe { phys: s..s + len, chunk: i });
            }
        }
        stripes.sort_by_key(|s| s.phys.start);
        for w in stripes.windows(2) {
            ensure!(w[0].phys.end <= w[1].phys.start, "chunk stripes overlap on the device at {}", w[1].phys.start);
        }

        // The extent tree's root, from the root tree.
        let mut cur = Cursor::seek(
            &fs,
            (fs.sb.root, fs.sb.root_level, fs.sb.generation),
            Key { objectid: EXTENT_TREE_OBJECTID, kind: ROOT_ITEM, offset: 0 },
        )?;
        let item = cur.next(&fs, true)?;
        let Some((key, data)) = item.filter(|(k, _)| k.objectid == EXTENT_TREE_OBJECTID && k.kind == ROOT_ITEM) else {
            bail!("the root tree has no extent tree")
        };
        ensure!(data.len() >= 239, "extent tree root item {key:?} is truncated");
        let extent_root = (le64(&data, 176)?, data[238], le64(&data, 160)?);
        ensure!(extent_root.1 <= MAX_LEVEL, "extent tree level {} is invalid", extent_root.1);
        ensure!(extent_root.2 <= fs.sb.generation, "extent tree generation is in the future");

        let mut fixed = Vec::new();
        fixed.push(0..RESERVED.min(region.len));
        for m in SUPER_COPIES {
            if m < region.len {
                fixed.push(m..(m + SUPER_SIZE as u64).min(region.len));
            }
        }
        if fs.sb.dev_total_bytes < region.len {
            fixed.push(fs.sb.dev_total_bytes..region.len);
        }
        fixed.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in fixed {
            match merged.last_mut() {
                Some(l) if l.end >= r.start => l.end = l.end.max(r.end),
                _ => merged.push(r),
            }
        }

        let whole_chunks = fs.sb.log_root != 0;
        let map = BtrfsMap { fs, stripes, fixed: merged, extent_root, whole_chunks, cursor: None };
        map.check_extent_tree()?;
        Ok(Some(map))
    }

    pub fn superblock(&self) -> &Superblock {
        &self.fs.sb
    }

    /// Walks the whole extent tree once: every extent inside a chunk, none overlapping, and
    /// their total equal to the superblock's count.
    fn check_extent_tree(&self) -> Result<()> {
        let fs = &self.fs;
        let mut cur = Cursor::seek(fs, self.extent_root, Key::MIN)?;
        let (mut prev_end, mut total) = (0u64, 0u64);
        while let Some((key, _)) = cur.next(fs, false)? {
            let Some(ext) = extent_of(&fs.sb, &key)? else {
                continue;
            };
            let Some(ci) = fs.chunk_of(ext.start) else { bail!("extent {ext:?} lies in no chunk") };
            let c = &fs.chunks[ci];
            ensure!(ext.end <= c.logical + c.length, "extent {ext:?} crosses the end of its chunk");
            ensure!(ext.start >= prev_end, "extents overlap at {}", ext.start);
            prev_end = ext.end;
            total += ext.end - ext.start;
        }
        ensure!(
            total == fs.sb.bytes_used,
            "the extent tree holds {total} bytes of extents, the superblock says {}",
            fs.sb.bytes_used
        );
        Ok(())
    }

    /// Logical ranges of allocated extents of stripe `si`'s chunk within `[l0, l1)`, appended.
    fn extents_in(&mut self, si: usize, l0: u64, l1: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let chunk = &self.fs.chunks[self.stripes[si].chunk];
        let chunk_end = chunk.logical + chunk.length;
        let restart = match &self.cursor {
            Some(c) => c.stripe != si || l0 < c.floor,
            None => true,
        };
        if restart {
            let cursor = Cursor::seek(&self.fs, self.extent_root, Key { objectid: chunk.logical, kind: 0, offset: 0 })?;
            let mut ec =
                ExtentCursor { stripe: si, cursor, pending: None, floor: chunk.logical, prev_end: chunk.logical };
            ec.pending = next_extent(&self.fs, &mut ec, chunk_end)?;
            self.cursor = Some(ec);
        }
        let ec = self.cursor.as_mut().expect("cursor just set");
        while let Some(ext) = ec.pending.clone() {
            if ext.end <= l0 {
                ec.floor = ext.end;
                ec.pending = next_extent(&self.fs, ec, chunk_end)?;
                continue;
            }
            if ext.start >= l1 {
                break;
            }
            out.push(ext.start.max(l0)..ext.end.min(l1));
            if ext.end > l1 {
                break;
            }
            ec.floor = ext.end;
            ec.pending = next_extent(&self.fs, ec, chunk_end)?;
        }
        Ok(())
    }
}

/// The logical range an extent-tree key allocates, if it is an extent item.
fn extent_of(sb: &Superblock, key: &Key) -> Result<Option<Range<u64>>> {
    let len = match key.kind {
        EXTENT_ITEM => key.offset,
        METADATA_ITEM => {
            ensure!(key.offset <= MAX_LEVEL as u64, "metadata item at {} has level {}", key.objectid, key.offset);
            sb.nodesize
        }
        _ => return Ok(None),
    };
    ensure!(len > 0 && key.objectid.is_multiple_of(sb.sectorsize), "extent item {key:?} is invalid");
    let end = key.objectid.checked_add(len).context("extent wraps around")?;
    Ok(Some(key.objectid..end))
}

/// The next allocated extent of the chunk ending at `chunk_end`, or None past it.
fn next_extent(fs: &Fs, ec: &mut ExtentCursor, chunk_end: u64) -> Result<Option<Range<u64>>> {
    while let Some((key, _)) = ec.cursor.next(fs, false)? {
        if key.objectid >= chunk_end {
            return Ok(None);
        }
        let Some(ext) = extent_of(&fs.sb, &key)? else {
            continue;
        };
        ensure!(ext.end <= chunk_end, "extent {ext:?} crosses the end of its chunk");
        ensure!(ext.start >= ec.prev_end, "extents overlap at {}", ext.start);
        ec.prev_end = ext.end;
        return Ok(Some(ext));
    }
    Ok(None)
}

/// Chunks sorted by logical address must not overlap.
fn check_chunks(chunks: &[Chunk]) -> Result<()> {
    for w in chunks.windows(2) {
        ensure!(w[0].logical + w[0].length <= w[1].logical, "chunks overlap at logical {}", w[1].logical);
    }
    Ok(())
}

impl UsedMap for BtrfsMap {
    fn filesystem(&self) -> Option<&str> {
        Some("btrfs")
    }

    fn describe(&self) -> String {
        if self.whole_chunks {
            "btrfs chunk tree (whole chunks: a log tree awaits replay)".into()
        } else {
            "btrfs chunk and extent trees".into()
        }
    }

    fn reported_used_bytes(&self) -> Option<u64> {
        Some(self.fs.sb.bytes_used)
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let end = start + len;
        let mut found: Vec<Range<u64>> = Vec::new();
        for f in &self.fixed {
            if f.start < end && f.end > start {
                found.push(f.start.max(start)..f.end.min(end));
            }
        }
        let mut si = self.stripes.partition_point(|s| s.phys.end <= start);
        let mut logical = Vec::new();
        while si < self.stripes.len() && self.stripes[si].phys.start < end {
            let s = self.stripes[si].clone();
            let (p0, p1) = (start.max(s.phys.start), end.min(s.phys.end));
            let chunk = &self.fs.chunks[s.chunk];
            if self.whole_chunks || !chunk.is_copy() {
                found.push(p0..p1);
            } else {
                let base = chunk.logical;
                logical.clear();
                self.extents_in(si, base + (p0 - s.phys.start), base + (p1 - s.phys.start), &mut logical)?;
                for l in &logical {
                    found.push(s.phys.start + (l.start - base)..s.phys.start + (l.end - base));
                }
            }
            si += 1;
        }
        found.sort_by_key(|r| r.start);
        let mut pos = start;
        for r in found {
            let s = r.start.max(pos);
            if s < r.end {
                push_range(out, s..r.end);
                pos = r.end;
            }
        }
        Ok(())
    }
}
