//! Reading XFS files: inodes (v1/v2 on v4 filesystems, v3 on v5; nanosecond times, bigtime,
//! large extent counts), data fork mappings (extent lists and bmbt B+trees; unwritten extents
//! read as zeros), directories (short-form, block, leaf, node and B-tree: the data blocks of the
//! directory's first 32 GiB hold every entry, so all four block formats are read the same way),
//! local and remote symlinks, device numbers, and extended attributes (short-form and leaf/node
//! attribute forks, local and remote values).
//!
//! The image explorer (`rime_explore::xfs`) builds its file tree on it; the superblock is
//! `fs::xfs::Superblock`, the one the used-block map parses.
//!
//! Invariants:
//! - Nothing on disk is trusted. Every inode number, block number, length, offset and count is
//!   checked against the filesystem and the buffer it lies in before use; a damaged structure is
//!   an error for that node, never a panic or a read outside the filesystem.
//! - v5 metadata (inodes, bmbt blocks, directory data blocks, remote symlink and attribute blocks)
//!   must carry its magic, a good CRC, its own address, owner and the filesystem's UUID.
//! - B+tree walks are depth-bounded (a child is exactly one level below its parent, at most
//!   [`MAX_BMBT_LEVELS`] levels), never visit a block twice (loops are errors) and stop at the
//!   inode's own extent count (capped at [`MAX_EXTENTS`]); extents must be sorted and disjoint.
//! - Memory per call is bounded: one inode's extent list, one directory block (<= 64 KiB) at a
//!   time, a directory's entries, the caller's buffer. File data is read straight into the
//!   caller's buffer, one contiguous read per extent piece.
//!
//! On-disk numbers are big-endian; CRCs are CRC-32C stored little-endian.

pub use super::records::{DirEntry, InodeTime as XfsTime, Xattr};
use super::xfs::Superblock;
use crate::bytes::{be16, be32, be64};
use crate::checksum::crc32c_skipping;
use crate::device::Region;
use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

const INODE_MAGIC: u16 = 0x494E; // "IN"
const BMAP_MAGIC_V4: u32 = 0x424D_4150; // "BMAP"
const BMAP_MAGIC_V5: u32 = 0x424D_4133; // "BMA3"
const DIR_BLOCK_V4: u32 = 0x5844_3242; // "XD2B"
const DIR_DATA_V4: u32 = 0x5844_3244; // "XD2D"
const DIR_BLOCK_V5: u32 = 0x5844_4233; // "XDB3"
const DIR_DATA_V5: u32 = 0x5844_4433; // "XDD3"
const SYMLINK_MAGIC: u32 = 0x5853_4C4D; // "XSLM"
const ATTR_LEAF_V4: u16 = 0xFBEE;
const ATTR_LEAF_V5: u16 = 0x3BEE;
const DA_NODE_V4: u16 = 0xFEBE;
const DA_NODE_V5: u16 = 0x3EBE;
const ATTR_RMT_MAGIC: u32 = 0x5841_524D; // "XARM"
/// Fork formats.
const FMT_DEV: u8 = 0;
const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;
const DIFLAG_REALTIME: u16 = 0x1;
const DIFLAG2_BIGTIME: u64 = 1 << 3;
const DIFLAG2_NREXT64: u64 = 1 << 4;
const INCOMPAT_BIGTIME: u32 = 1 << 3;
const INCOMPAT_NREXT64: u32 = 1 << 5;
/// Deepest bmbt accepted (the kernel's limit for 2^48 extents is lower).
pub const MAX_BMBT_LEVELS: u16 = 9;
/// Most extents one fork may have here (each costs 32 bytes of memory while the inode is read).
pub const MAX_EXTENTS: u64 = 1 << 22;
/// Directory entries live in the first 32 GiB of a directory's address space.
const DIR_DATA_SPACE: u64 = 32 << 30;
/// Extent lists of at most `SMALL_LIST` extents kept (cleared when full); a longer list is kept
/// alone in its own slot (the file being read), so the cache holds at most
/// 64 x 4096 + `MAX_EXTENTS` extents.
const EXTENT_CACHE: usize = 64;
const SMALL_LIST: usize = 4096;
/// Longest symlink target (XFS_SYMLINK_MAXLEN).
const SYMLINK_MAXLEN: u64 = 1024;
/// Attribute fork blocks visited at most (the fork's B+tree and leaves).
const MAX_ATTR_BLOCKS: usize = 1 << 16;

/// One parsed inode.
#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Filesystem blocks allocated (data, attribute and bmbt blocks).
    pub nblocks: u64,
    pub atime: XfsTime,
    pub mtime: XfsTime,
    pub ctime: XfsTime,
    /// Creation time (v3 inodes only).
    pub crtime: Option<XfsTime>,
    pub flags: u16,
    format: u8,
    aformat: u8,
    nextents: u64,
    anextents: u64,
    /// The data fork and the attribute fork, as stored in the inode.
    data_fork: Vec<u8>,
    attr_fork: Option<Vec<u8>>,
}

impl Inode {
    pub fn file_type(&self) -> u16 {
        self.mode & 0xF000
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == 0x4000
    }
    /// Device number (major, minor) of a device node.
    pub fn device_number(&self) -> Option<(u32, u32)> {
        if self.format != FMT_DEV || self.data_fork.len() < 4 {
            return None;
        }
        let d = u32::from_be_bytes(self.data_fork[..4].try_into().ok()?);
        Some(((d >> 18) & 0x3FFF, d & 0x3FFFF))
    }
}

/// A mapping of file blocks: `len` blocks from file block `off` at linear filesystem block
/// `block` (AG x agblocks + AG block); `unwritten` extents are allocated but read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub off: u64,
    pub block: u64,
    pub len: u64,
    pub unwritten: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fork {
    Data,
    Attr,
}

pub struct XfsFiles {
    region: Region,
    sb: Superblock,
    extents: Mutex<ExtentCache>,
}

#[derive(Default)]
struct ExtentCache {
    small: HashMap<u64, Arc<Vec<Extent>>>,
    large: Option<(u64, Arc<Vec<Extent>>)>,
}

fn time(raw: &[u8], bigtime: bool) -> Result<XfsTime> {
    if bigtime {
        // Nanoseconds since 1901-12-13T20:45:52Z (-2^31 s).
        let v = be64(raw, 0)?;
        Ok(XfsTime { sec: (v / 1_000_000_000) as i64 - (1i64 << 31), nsec: (v % 1_000_000_000) as u32 })
    } else {
        let nsec = be32(raw, 4)?;
        ensure!(nsec < 1_000_000_000, "timestamp nanoseconds {nsec} out of range");
        Ok(XfsTime { sec: be32(raw, 0)? as i32 as i64, nsec })
    }
}

/// The linear block holding file block `fblock`, if mapped (`extents` sorted and disjoint).
fn block_at(extents: &[Extent], fblock: u64) -> Option<u64> {
    let i = extents.partition_point(|e| e.off + e.len <= fblock);
    extents.get(i).filter(|e| e.off <= fblock).map(|e| e.block + fblock - e.off)
}

/// Decodes one packed 16-byte extent record.
fn unpack_extent(r: &[u8]) -> Result<Extent> {
    let l0 = be64(r, 0)?;
    let l1 = be64(r, 8)?;
    Ok(Extent {
        unwritten: l0 >> 63 != 0,
        off: (l0 & ((1 << 63) - 1)) >> 9,
        block: ((l0 & 0x1FF) << 43) | (l1 >> 21),
        len: l1 & ((1 << 21) - 1),
    })
}

impl XfsFiles {
    pub fn new(region: Region, sb: Superblock) -> Result<XfsFiles> {
        let fs_bytes = sb.dblocks.checked_mul(sb.block_size).context("filesystem size overflows")?;
        ensure!(
            fs_bytes <= region.len,
            "the filesystem ({fs_bytes} bytes) is larger than the volume ({} bytes)",
            region.len
        );
        Ok(XfsFiles { region, sb, extents: Mutex::new(ExtentCache::default()) })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn root(&self) -> u64 {
        self.sb.root_ino
    }

    /// Linear block (AG x agblocks + AG block) of filesystem block number `fsbno`
    /// (AG << agblklog | AG block), checked to start a run of `len` blocks inside its AG.
    fn linear(&self, fsbno: u64, len: u64) -> Result<u64> {
        let ag = fsbno >> self.sb.agblklog;
        let agbno = fsbno & ((1u64 << self.sb.agblklog) - 1);
        ensure!(ag < self.sb.agcount, "block {fsbno:#x} lies in AG {ag}, past the last AG");
        ensure!(
            len > 0 && agbno.checked_add(len).is_some_and(|e| e <= self.sb.ag_len(ag)),
            "blocks {fsbno:#x}+{len} run outside AG {ag}"
        );
        Ok(ag * self.sb.agblocks + agbno)
    }

    /// Reads `buf.len()` bytes at linear block `block`.
    fn read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.sb.block_size;
        let end = block.checked_add((buf.len() as u64).div_ceil(bs)).context("block number overflows")?;
        ensure!(end <= self.sb.dblocks, "block {block} lies past the end of the filesystem");
        self.region.read_at(block * bs, buf)
    }

    /// Checks a v5 metadata block header: CRC at `crc_off`, UUID at `uuid_off`, disk address
    /// (512-byte units) at `blkno_off` and owner at `owner_off`.
    #[allow(clippy::too_many_arguments)]
    fn check_v5(
        &self,
        what: &str,
        buf: &[u8],
        block: u64,
        crc_off: usize,
        uuid_off: usize,
        blkno_off: usize,
        owner_off: usize,
        owner: u64,
    ) -> Result<()> {
        let stored = crate::bytes::le32(buf, crc_off)?;
        ensure!(stored == crc32c_skipping(buf, crc_off), "{what} at block {block} has a bad CRC");
        ensure!(
            buf.get(uuid_off..uuid_off + 16) == Some(&self.sb.meta_uuid[..]),
            "{what} at block {block} has a foreign UUID"
        );
        ensure!(
            be64(buf, blkno_off)? == block * (self.sb.block_size / 512),
            "{what} at block {block} claims to live elsewhere"
        );
        ensure!(be64(buf, owner_off)? == owner, "{what} at block {block} belongs to inode {}", be64(buf, owner_off)?);
        Ok(())
    }

    /// Reads and checks inode `ino`.
    pub fn inode(&self, ino: u64) -> Result<Inode> {
        let sb = &self.sb;
        let ino_bits = sb.agblklog + sb.inopblog;
        ensure!(ino_bits < 64, "inode numbers are invalid");
        let ag = ino >> ino_bits;
        let agino = ino & ((1u64 << ino_bits) - 1);
        let agbno = agino >> sb.inopblog;
        let slot = agino & ((1u64 << sb.inopblog) - 1);
        ensure!(
            ag < sb.agcount && agbno < sb.ag_len(ag) && agbno > 0,
            "inode number {ino} lies outside the filesystem"
        );
        let isz = sb.inode_size as usize;
        let mut raw = vec![0u8; isz];
        let at = (ag * sb.agblocks + agbno) * sb.block_size + slot * sb.inode_size;
        self.region.read_at(at, &mut raw)?;
        parse_inode(sb, ino, &raw).with_context(|| format!("inode {ino}"))
    }

    /// The mappings of one fork, sorted by file block, disjoint, inside the filesystem.
    fn fork_extents(&self, inode: &Inode, fork: Fork) -> Result<Vec<Extent>> {
        let (format, count, raw) = match fork {
            Fork::Data => (inode.format, inode.nextents, &inode.data_fork[..]),
            Fork::Attr => (inode.aformat, inode.anextents, inode.attr_fork.as_deref().unwrap_or(&[])),
        };
        ensure!(count <= MAX_EXTENTS, "inode {} has {count} extents, more than {MAX_EXTENTS}", inode.ino);
        let mut out = Vec::new();
        match format {
            FMT_EXTENTS => {
                ensure!(count as usize * 16 <= raw.len(), "inode {}: {count} extents do not fit the fork", inode.ino);
                for i in 0..count as usize {
                    out.push(unpack_extent(&raw[i * 16..])?);
                }
            }
            FMT_BTREE => self.bmbt_root(inode.ino, raw, count, &mut out)?,
            FMT_LOCAL => bail!("inode {}: the fork is stored in the inode, not in blocks", inode.ino),
            f => bail!("inode {}: fork format {f} is not supported", inode.ino),
        }
        // Checked: sorted, disjoint, inside the filesystem; converted to linear blocks.
        let mut next_off = 0u64;
        for e in out.iter_mut() {
            ensure!(e.len > 0, "inode {}: empty extent at file block {}", inode.ino, e.off);
            ensure!(
                e.off >= next_off,
                "inode {}: extents out of order or overlapping at file block {}",
                inode.ino,
                e.off
            );
            next_off = e.off + e.len;
            ensure!(
                next_off.checked_mul(self.sb.block_size).is_some_and(|end| end <= i64::MAX as u64),
                "inode {}: extent at file block {} lies past the largest file offset",
                inode.ino,
                e.off
            );
            e.block = self.linear(e.block, e.len).with_context(|| format!("inode {}", inode.ino))?;
        }
        Ok(out)
    }

    /// Walks a bmbt from its root in the inode fork.
    fn bmbt_root(&self, ino: u64, raw: &[u8], count: u64, out: &mut Vec<Extent>) -> Result<()> {
        let level = be16(raw, 0)?;
        let numrecs = be16(raw, 2)? as usize;
        ensure!((1..=MAX_BMBT_LEVELS).contains(&level), "inode {ino}: bmbt root level {level} is invalid");
        let maxrecs = (raw.len().saturating_sub(4)) / 16;
        ensure!(
            numrecs >= 1 && numrecs <= maxrecs,
            "inode {ino}: bmbt root holds {numrecs} records (at most {maxrecs})"
        );
        let mut seen = HashSet::new();
        for i in 0..numrecs {
            let ptr = be64(raw, 4 + maxrecs * 8 + i * 8)?;
            self.bmbt_block(ino, ptr, level - 1, count, &mut seen, out)?;
        }
        ensure!(out.len() as u64 == count, "inode {ino}: the bmbt holds {} extents, the inode says {count}", out.len());
        Ok(())
    }

    fn bmbt_block(
        &self,
        ino: u64,
        fsbno: u64,
        level: u16,
        count: u64,
        seen: &mut HashSet<u64>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let block = self.linear(fsbno, 1).with_context(|| format!("inode {ino}: bmbt pointer"))?;
        ensure!(seen.insert(block), "inode {ino}: bmbt block {block} is reached twice (a loop)");
        ensure!(
            seen.len() as u64 <= count + MAX_BMBT_LEVELS as u64 * 2 + 16,
            "inode {ino}: the bmbt has more blocks than extents"
        );
        let bs = self.sb.block_size as usize;
        let mut buf = vec![0u8; bs];
        self.read_blocks(block, &mut buf)?;
        let (magic, hdr) = if self.sb.crc() { (BMAP_MAGIC_V5, 72) } else { (BMAP_MAGIC_V4, 24) };
        ensure!(be32(&buf, 0)? == magic, "inode {ino}: bmbt block {block} has bad magic {:#x}", be32(&buf, 0)?);
        if self.sb.crc() {
            self.check_v5("bmbt block", &buf, block, 64, 40, 24, 56, ino)?;
        }
        let blevel = be16(&buf, 4)?;
        ensure!(blevel == level, "inode {ino}: bmbt block {block} is at level {blevel}, expected {level}");
        let numrecs = be16(&buf, 6)? as usize;
        let maxrecs = (bs - hdr) / 16;
        ensure!(numrecs >= 1 && numrecs <= maxrecs, "inode {ino}: bmbt block {block} holds {numrecs} records");
        if level == 0 {
            ensure!(
                out.len() as u64 + numrecs as u64 <= count,
                "inode {ino}: the bmbt holds more extents than the inode's {count}"
            );
            for i in 0..numrecs {
                out.push(unpack_extent(&buf[hdr + i * 16..])?);
            }
            return Ok(());
        }
        for i in 0..numrecs {
            let ptr = be64(&buf, hdr + maxrecs * 8 + i * 8)?;
            self.bmbt_block(ino, ptr, level - 1, count, seen, out)?;
        }
        Ok(())
    }

    /// The data fork's extents, cached per inode.
    pub fn extents(&self, inode: &Inode) -> Result<Arc<Vec<Extent>>> {
        {
            let cache = self.extents.lock().unwrap();
            if let Some(e) = cache.small.get(&inode.ino) {
                return Ok(e.clone());
            }
            if let Some((ino, e)) = &cache.large {
                if *ino == inode.ino {
                    return Ok(e.clone());
                }
            }
        }
        let e = Arc::new(self.fork_extents(inode, Fork::Data)?);
        let mut cache = self.extents.lock().unwrap();
        if e.len() > SMALL_LIST {
            cache.large = Some((inode.ino, e.clone()));
        } else {
            if cache.small.len() >= EXTENT_CACHE {
                cache.small.clear();
            }
            cache.small.insert(inode.ino, e.clone());
        }
        Ok(e)
    }

    /// Reads bytes `[offset, offset + buf.len())` of a regular file, clipped to its size; holes
    /// and unwritten extents read as zeros.
    pub fn read(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        ensure!(inode.file_type() == 0x8000, "inode {} is not a regular file", inode.ino);
        ensure!(inode.flags & DIFLAG_REALTIME == 0, "inode {} keeps its data on the realtime device", inode.ino);
        if offset >= inode.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(inode.size - offset) as usize;
        let buf = &mut buf[..n];
        let extents = self.extents(inode)?;
        self.read_mapped(&extents, offset, buf, false)?;
        Ok(n)
    }

    /// Fills `buf` with fork bytes from `offset` through `extents`; holes and unwritten extents
    /// are zeros, or errors when `strict` (metadata must be mapped).
    fn read_mapped(&self, extents: &[Extent], offset: u64, buf: &mut [u8], strict: bool) -> Result<()> {
        let bs = self.sb.block_size;
        let end = offset + buf.len() as u64;
        let first = offset / bs;
        let mut covered = offset;
        let start_idx = extents.partition_point(|e| e.off + e.len <= first);
        if !strict {
            buf.fill(0);
        }
        for e in &extents[start_idx..] {
            let (e_start, e_end) = (e.off * bs, (e.off + e.len) * bs);
            if e_start >= end {
                break;
            }
            let a = offset.max(e_start);
            let b = end.min(e_end);
            if a >= b {
                continue;
            }
            if strict {
                ensure!(a == covered && !e.unwritten, "a hole or unwritten extent at fork byte {covered}");
                covered = b;
            }
            if e.unwritten {
                continue;
            }
            let disk = e.block * bs + (a - e_start);
            self.region.read_at(disk, &mut buf[(a - offset) as usize..(b - offset) as usize])?;
        }
        if strict {
            ensure!(covered == end, "a hole at fork byte {covered}");
        }
        Ok(())
    }

    /// The byte ranges of a regular file that hold written data, sorted, disjoint, within its
    /// size.
    pub fn data_ranges(&self, inode: &Inode) -> Result<Vec<Range<u64>>> {
        if inode.size == 0 || inode.file_type() != 0x8000 {
            return Ok(Vec::new());
        }
        ensure!(inode.flags & DIFLAG_REALTIME == 0, "inode {} keeps its data on the realtime device", inode.ino);
        let extents = self.extents(inode)?;
        let written = extents.iter().filter(|e| !e.unwritten).map(|e| (e.off, e.len));
        Ok(super::records::data_ranges_of(written, self.sb.block_size, inode.size))
    }

    /// A symlink's target: in the inode (local) or in remote blocks.
    pub fn symlink_target(&self, inode: &Inode) -> Result<Vec<u8>> {
        let ino = inode.ino;
        ensure!(inode.file_type() == 0xA000, "inode {ino} is not a symlink");
        ensure!(
            inode.size > 0 && inode.size <= SYMLINK_MAXLEN,
            "inode {ino}: symlink length {} is invalid",
            inode.size
        );
        let len = inode.size as usize;
        if inode.format == FMT_LOCAL {
            let t =
                inode.data_fork.get(..len).with_context(|| format!("inode {ino}: local symlink runs past its fork"))?;
            return Ok(t.to_vec());
        }
        let extents = self.fork_extents(inode, Fork::Data)?;
        let bs = self.sb.block_size as usize;
        let mut out = Vec::with_capacity(len);
        let mut blk = vec![0u8; bs];
        let mut fblock = 0u64;
        while out.len() < len {
            ensure!(fblock < 8, "inode {ino}: remote symlink spans too many blocks");
            self.read_mapped(&extents, fblock * bs as u64, &mut blk, true)
                .with_context(|| format!("inode {ino}: remote symlink block {fblock}"))?;
            let block = block_at(&extents, fblock);
            let payload = if self.sb.crc() {
                let block = block.context("symlink block is unmapped")?;
                ensure!(be32(&blk, 0)? == SYMLINK_MAGIC, "inode {ino}: remote symlink block {block} has bad magic");
                self.check_v5("remote symlink block", &blk, block, 12, 16, 40, 32, ino)?;
                let (off, bytes) = (be32(&blk, 4)? as usize, be32(&blk, 8)? as usize);
                ensure!(
                    off == out.len() && bytes > 0 && 56 + bytes <= bs,
                    "inode {ino}: remote symlink block header is invalid"
                );
                &blk[56..56 + bytes.min(len - out.len())]
            } else {
                &blk[..bs.min(len - out.len())]
            };
            out.extend_from_slice(payload);
            fblock += 1;
        }
        Ok(out)
    }

    /// The entries of a directory, without `.` and `..`.
    pub fn dir_entries(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let ino = dir.ino;
        ensure!(dir.is_dir(), "inode {ino} is not a directory");
        if dir.format == FMT_LOCAL {
            return self.shortform_dir(dir);
        }
        let sb = &self.sb;
        let bs = sb.block_size;
        let dbs = bs << sb.dir_block_log;
        ensure!(
            dir.size <= DIR_DATA_SPACE && dir.size.is_multiple_of(dbs),
            "inode {ino}: directory size {} is invalid",
            dir.size
        );
        let extents = self.extents(dir)?;
        // Directory blocks holding entries, in order, each once (a directory block may span
        // several extents).
        let data_end = dir.size / bs;
        let mut out = Vec::new();
        let mut buf = vec![0u8; dbs as usize];
        let mut last: Option<u64> = None;
        for e in extents.iter() {
            if e.off >= data_end {
                break;
            }
            let mut f = e.off;
            while f < (e.off + e.len).min(data_end) {
                let d = f >> sb.dir_block_log;
                f = (d + 1) << sb.dir_block_log;
                if last.is_some_and(|l| l >= d) {
                    continue;
                }
                last = Some(d);
                self.read_mapped(&extents, d * dbs, &mut buf, true)
                    .with_context(|| format!("inode {ino}: directory block {d}"))?;
                let first = d << sb.dir_block_log;
                let block = block_at(&extents, first);
                self.parse_dir_block(ino, block.context("unmapped directory block")?, &buf, &mut out)
                    .with_context(|| format!("inode {ino}: directory block {d}"))?;
            }
        }
        Ok(out)
    }

    fn parse_dir_block(&self, ino: u64, block: u64, buf: &[u8], out: &mut Vec<DirEntry>) -> Result<()> {
        let magic = be32(buf, 0)?;
        let (is_block, hdr) = match (self.sb.crc(), magic) {
            (false, DIR_BLOCK_V4) => (true, 16),
            (false, DIR_DATA_V4) => (false, 16),
            (true, DIR_BLOCK_V5) => (true, 64),
            (true, DIR_DATA_V5) => (false, 64),
            _ => bail!("bad magic {magic:#x}"),
        };
        if self.sb.crc() {
            self.check_v5("directory block", buf, block, 4, 24, 8, 40, ino)?;
        }
        let end = if is_block {
            // Block form: leaf entries and a tail (count, stale) at the end.
            let count = be32(buf, buf.len() - 8)? as usize;
            let leaf = count.checked_mul(8).and_then(|l| l.checked_add(8)).context("leaf count overflows")?;
            ensure!(leaf <= buf.len() - hdr, "block directory leaf count {count} is invalid");
            buf.len() - leaf
        } else {
            buf.len()
        };
        let ftype = self.sb.ftype as usize;
        let mut p = hdr;
        while p < end {
            ensure!(p + 8 <= end, "directory entry at {p} runs past the data");
            if be16(buf, p)? == 0xFFFF {
                let len = be16(buf, p + 2)? as usize;
                ensure!(
                    len >= 8 && len.is_multiple_of(8) && p + len <= end,
                    "free directory space at {p} has invalid length {len}"
                );
                p += len;
                continue;
            }
            let inum = be64(buf, p)?;
            let namelen = *buf.get(p + 8).context("truncated entry")? as usize;
            ensure!(namelen > 0, "directory entry at {p} has an empty name");
            let len = (8 + 1 + namelen + ftype + 2).div_ceil(8) * 8;
            ensure!(p + len <= end, "directory entry at {p} runs past the data");
            ensure!(be16(buf, p + len - 2)? as usize == p, "directory entry at {p} has a bad tag");
            let name = &buf[p + 9..p + 9 + namelen];
            if name != b"." && name != b".." {
                out.push(DirEntry { name: name.to_vec(), ino: inum });
            }
            p += len;
        }
        Ok(())
    }

    /// A short-form directory: entries in the inode's data fork.
    fn shortform_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let ino = dir.ino;
        let raw = &dir.data_fork;
        ensure!(
            dir.size as usize <= raw.len() && dir.size >= 6,
            "inode {ino}: short-form directory size {} is invalid",
            dir.size
        );
        let raw = &raw[..dir.size as usize];
        let count = raw[0] as usize;
        let i8count = raw[1] as usize;
        let isz = if i8count > 0 { 8 } else { 4 };
        ensure!(i8count <= count, "inode {ino}: short-form directory inode counts are inconsistent");
        let mut p = 2 + isz;
        let ftype = self.sb.ftype as usize;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let namelen =
                *raw.get(p).with_context(|| format!("inode {ino}: short-form entry {i} runs past the fork"))? as usize;
            ensure!(namelen > 0, "inode {ino}: short-form entry {i} has an empty name");
            let len = 3 + namelen + ftype + isz;
            ensure!(p + len <= raw.len(), "inode {ino}: short-form entry {i} runs past the fork");
            let name = raw[p + 3..p + 3 + namelen].to_vec();
            let n = p + 3 + namelen + ftype;
            let inum = if isz == 8 { be64(raw, n)? } else { be32(raw, n)? as u64 };
            out.push(DirEntry { name, ino: inum });
            p += len;
        }
        Ok(out)
    }

    /// Extended attributes (short-form, leaf and node attribute forks; local and remote values).
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        let Some(fork) = &inode.attr_fork else {
            return Ok(Vec::new());
        };
        let ino = inode.ino;
        let mut out = Vec::new();
        match inode.aformat {
            FMT_LOCAL => {
                ensure!(fork.len() >= 4, "inode {ino}: attribute fork too small");
                let total = (be16(fork, 0)? as usize).min(fork.len());
                let count = fork[2] as usize;
                let mut p = 4;
                for i in 0..count {
                    ensure!(p + 3 <= total, "inode {ino}: short-form attribute {i} runs past the fork");
                    let (nl, vl, flags) = (fork[p] as usize, fork[p + 1] as usize, fork[p + 2]);
                    ensure!(p + 3 + nl + vl <= total, "inode {ino}: short-form attribute {i} runs past the fork");
                    let name = &fork[p + 3..p + 3 + nl];
                    if let Some(full) = attr_name(flags, name) {
                        out.push(Xattr { name: full, value: fork[p + 3 + nl..p + 3 + nl + vl].to_vec() });
                    }
                    p += 3 + nl + vl;
                }
            }
            FMT_EXTENTS | FMT_BTREE => {
                if inode.anextents == 0 {
                    return Ok(out);
                }
                let extents = self.fork_extents(inode, Fork::Attr)?;
                self.attr_tree(inode, &extents, &mut out)?;
            }
            f => bail!("inode {ino}: attribute fork format {f} is not supported"),
        }
        Ok(out)
    }

    /// Reads attribute fork block `fblock` (attribute blocks are one filesystem block), with its
    /// linear address.
    fn attr_block(&self, extents: &[Extent], fblock: u64) -> Result<(Vec<u8>, u64)> {
        let bs = self.sb.block_size;
        let mut buf = vec![0u8; bs as usize];
        self.read_mapped(extents, fblock * bs, &mut buf, true)?;
        let block = block_at(extents, fblock).context("unmapped attribute block")?;
        Ok((buf, block))
    }

    fn attr_tree(&self, inode: &Inode, extents: &[Extent], out: &mut Vec<Xattr>) -> Result<()> {
        let ino = inode.ino;
        let crc = self.sb.crc();
        // Down the leftmost path to the first leaf, then along the sibling links.
        let mut fblock = 0u64;
        let mut seen = HashSet::new();
        let mut depth = 0;
        loop {
            ensure!(seen.insert(fblock) && seen.len() <= MAX_ATTR_BLOCKS, "inode {ino}: attribute tree loops");
            let (buf, block) = self.attr_block(extents, fblock)?;
            let magic = be16(&buf, 8)?;
            if crc {
                self.check_v5("attribute block", &buf, block, 12, 32, 16, 48, ino)?;
            }
            if magic == DA_NODE_V4 || magic == DA_NODE_V5 {
                ensure!(
                    magic == if crc { DA_NODE_V5 } else { DA_NODE_V4 },
                    "inode {ino}: attribute node has the wrong magic"
                );
                depth += 1;
                ensure!(depth <= 8, "inode {ino}: attribute tree too deep");
                let hdr = if crc { 64 } else { 16 };
                ensure!(be16(&buf, if crc { 56 } else { 12 })? >= 1, "inode {ino}: empty attribute node");
                fblock = be32(&buf, hdr + 4)? as u64; // first entry: hashval, before
                continue;
            }
            ensure!(
                magic == if crc { ATTR_LEAF_V5 } else { ATTR_LEAF_V4 },
                "inode {ino}: attribute block has bad magic {magic:#x}"
            );
            self.attr_leaf(inode, extents, &buf, out)?;
            let forw = be32(&buf, 0)?;
            if forw == 0 {
                return Ok(());
            }
            fblock = forw as u64;
        }
    }

    fn attr_leaf(&self, inode: &Inode, extents: &[Extent], buf: &[u8], out: &mut Vec<Xattr>) -> Result<()> {
        let ino = inode.ino;
        let crc = self.sb.crc();
        let hdr = if crc { 80 } else { 32 };
        let count = be16(buf, if crc { 56 } else { 12 })? as usize;
        ensure!(hdr + count * 8 <= buf.len(), "inode {ino}: attribute leaf count {count} is invalid");
        for i in 0..count {
            let e = hdr + i * 8;
            let nameidx = be16(buf, e + 4)? as usize;
            let flags = buf[e + 6];
            ensure!(nameidx < buf.len(), "inode {ino}: attribute name offset {nameidx} is invalid");
            if flags & 0x80 != 0 {
                continue; // incomplete
            }
            if flags & 0x01 != 0 {
                // Local: valuelen u16, namelen u8, name, value.
                let vl = be16(buf, nameidx)? as usize;
                let nl = *buf.get(nameidx + 2).context("truncated attribute")? as usize;
                let v0 = nameidx + 3 + nl;
                ensure!(v0 + vl <= buf.len(), "inode {ino}: local attribute runs past its block");
                if let Some(name) = attr_name(flags, &buf[nameidx + 3..v0]) {
                    out.push(Xattr { name, value: buf[v0..v0 + vl].to_vec() });
                }
            } else {
                // Remote: valueblk u32, valuelen u32, namelen u8, name.
                let vblk = be32(buf, nameidx)? as u64;
                let vl = be32(buf, nameidx + 4)? as usize;
                let nl = *buf.get(nameidx + 8).context("truncated attribute")? as usize;
                ensure!(nameidx + 9 + nl <= buf.len(), "inode {ino}: remote attribute name runs past its block");
                ensure!(vl <= 1 << 16, "inode {ino}: attribute value of {vl} bytes is too large");
                let Some(name) = attr_name(flags, &buf[nameidx + 9..nameidx + 9 + nl]) else {
                    continue;
                };
                let value = self.remote_value(ino, extents, vblk, vl)?;
                out.push(Xattr { name, value });
            }
        }
        Ok(())
    }

    fn remote_value(&self, ino: u64, extents: &[Extent], first: u64, len: usize) -> Result<Vec<u8>> {
        let bs = self.sb.block_size as usize;
        let mut value = Vec::with_capacity(len);
        let mut fblock = first;
        while value.len() < len {
            let (buf, block) = self.attr_block(extents, fblock)?;
            if self.sb.crc() {
                ensure!(be32(&buf, 0)? == ATTR_RMT_MAGIC, "inode {ino}: remote attribute block has bad magic");
                self.check_v5("remote attribute block", &buf, block, 12, 16, 40, 32, ino)?;
                let (off, bytes) = (be32(&buf, 4)? as usize, be32(&buf, 8)? as usize);
                ensure!(
                    off == value.len() && bytes > 0 && 56 + bytes <= bs,
                    "inode {ino}: remote attribute header is invalid"
                );
                value.extend_from_slice(&buf[56..56 + bytes.min(len - value.len())]);
            } else {
                value.extend_from_slice(&buf[..bs.min(len - value.len())]);
            }
            fblock += 1;
        }
        Ok(value)
    }
}

/// The full name of an attribute from its namespace flags; `None` for internal ones (parent
/// pointers).
fn attr_name(flags: u8, name: &[u8]) -> Option<Vec<u8>> {
    let prefix: &[u8] = match flags & 0x0E {
        0 => b"user.",
        0x02 => b"trusted.",
        0x04 => b"security.",
        _ => return None,
    };
    let mut full = prefix.to_vec();
    full.extend_from_slice(name);
    Some(full)
}

/// Parses and checks one raw inode.
pub fn parse_inode(sb: &Superblock, ino: u64, raw: &[u8]) -> Result<Inode> {
    ensure!(raw.len() as u64 == sb.inode_size, "inode buffer has the wrong size");
    ensure!(be16(raw, 0)? == INODE_MAGIC, "bad inode magic {:#x}", be16(raw, 0)?);
    let version = raw[4];
    let core = if sb.crc() {
        ensure!(version == 3, "inode version {version} on a v5 filesystem");
        let stored = crate::bytes::le32(raw, 100)?;
        ensure!(stored == crc32c_skipping(raw, 100), "inode CRC mismatch");
        ensure!(be64(raw, 152)? == ino, "the inode claims to be inode {}", be64(raw, 152)?);
        ensure!(raw[160..176] == sb.meta_uuid, "the inode belongs to another filesystem (UUID mismatch)");
        176
    } else {
        ensure!(version == 1 || version == 2, "inode version {version} on a v4 filesystem");
        100
    };
    let mode = be16(raw, 2)?;
    let format = raw[5];
    let nlink = if version == 1 { be16(raw, 6)? as u32 } else { be32(raw, 16)? };
    let flags2 = if version == 3 { be64(raw, 120)? } else { 0 };
    let bigtime = flags2 & DIFLAG2_BIGTIME != 0;
    ensure!(!bigtime || sb.incompat & INCOMPAT_BIGTIME != 0, "bigtime inode without the bigtime feature");
    let nrext64 = flags2 & DIFLAG2_NREXT64 != 0;
    ensure!(!nrext64 || sb.incompat & INCOMPAT_NREXT64 != 0, "large-extent-count inode without the feature");
    let (nextents, anextents) =
        if nrext64 { (be64(raw, 24)?, be32(raw, 76)? as u64) } else { (be32(raw, 76)? as u64, be16(raw, 80)? as u64) };
    let forkoff = raw[82] as usize * 8;
    let aformat = raw[83];
    let literal = raw.len() - core;
    ensure!(forkoff <= literal, "attribute fork offset {forkoff} lies past the inode");
    let (data_fork, attr_fork) = if forkoff == 0 {
        (raw[core..].to_vec(), None)
    } else {
        (raw[core..core + forkoff].to_vec(), Some(raw[core + forkoff..].to_vec()))
    };
    ensure!(valid_type(mode), "inode has an unknown file type (mode {mode:#o})");
    let size = be64(raw, 56)?;
    ensure!(size < 1 << 63, "inode size {size} is invalid");
    Ok(Inode {
        ino,
        mode,
        uid: be32(raw, 8)?,
        gid: be32(raw, 12)?,
        nlink,
        size,
        nblocks: be64(raw, 64)?,
        atime: time(&raw[32..40], bigtime)?,
        mtime: time(&raw[40..48], bigtime)?,
        ctime: time(&raw[48..56], bigtime)?,
        crtime: if version == 3 { Some(time(&raw[144..152], bigtime)?) } else { None },
        flags: be16(raw, 90)?,
        format,
        aformat,
        nextents,
        anextents,
        data_fork,
        attr_fork,
    })
}

fn valid_type(mode: u16) -> bool {
    matches!(mode & 0xF000, 0x1000 | 0x2000 | 0x4000 | 0x6000 | 0x8000 | 0xA000 | 0xC000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_records_unpack() {
        // unwritten, startoff 5, startblock 0x123456789, blockcount 77
        let (flag, off, blk, cnt) = (1u128, 5u128, 0x1_2345_6789u128, 77u128);
        let v = flag << 127 | off << 73 | blk << 21 | cnt;
        let e = unpack_extent(&v.to_be_bytes()).unwrap();
        assert_eq!(e, Extent { off: 5, block: 0x1_2345_6789, len: 77, unwritten: true });
    }

    #[test]
    fn bigtime_and_legacy_times() {
        let t = time(&((1u64 << 31) * 1_000_000_000 + 5).to_be_bytes(), true).unwrap();
        assert_eq!(t, XfsTime { sec: 0, nsec: 5 });
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&(-1i32).to_be_bytes());
        raw[4..].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(time(&raw, false).unwrap(), XfsTime { sec: -1, nsec: 7 });
        raw[4..].copy_from_slice(&1_000_000_000u32.to_be_bytes());
        assert!(time(&raw, false).is_err());
    }
}
