//! Reading ext2/3/4 files: inodes (with nanosecond timestamps), extent trees (unwritten extents
//! read as zeros) and ext2/3 block maps, linear and htree directories (htree index blocks look
//! like empty entries to a linear scan), inline data, fast and slow symlinks, and extended
//! attributes in the inode, in an attribute block and in EA inodes.
//!
//! The used-block map uses it to find where a named file's data lies (`--exclude-file`) and to
//! recognise swap files; the image explorer (`rime_explore::ext`) builds its file tree on it.
//!
//! Every block number is checked against the filesystem, extent trees are depth-limited, and
//! directory records and attribute entries are bounds-checked, so a hostile image yields an
//! error, never a wild read.

use super::ext4::Superblock;
pub use super::records::{DirEntry, InodeTime, Xattr};
use crate::bytes::{le16, le32, Truncated};
use crate::device::Region;
use crate::usedmap::{FileExtent, FileExtents};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::ops::{ControlFlow, Range};
use std::sync::{Arc, Mutex};

pub const ROOT_INODE: u64 = 2;
const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EA_INODE_FL: u32 = 0x20_0000;
const ENCRYPT_FL: u32 = 0x800;
const EXTENT_MAGIC: u16 = 0xF30A;
const XATTR_MAGIC: u32 = 0xEA02_0000;
pub const S_IFMT: u16 = 0xF000;
pub const S_IFDIR: u16 = 0x4000;
pub const S_IFREG: u16 = 0x8000;
pub const S_IFLNK: u16 = 0xA000;
/// The file types an inode may have: FIFO, character device, directory, block device, regular
/// file, symlink, socket.
const FILE_TYPES: [u16; 7] = [0x1000, 0x2000, S_IFDIR, 0x6000, S_IFREG, S_IFLNK, 0xC000];
const MAX_EXTENT_DEPTH: u32 = 5;
/// Directories larger than this are refused (a hostile size would otherwise make us scan
/// terabytes of holes).
const MAX_DIR_BYTES: u64 = 1 << 30;
/// Run lists kept per inode (cleared when full).
const RUN_CACHE: usize = 256;

/// One parsed inode.
#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: u64,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    pub flags: u32,
    /// 512-byte sectors allocated.
    pub blocks: u64,
    /// Extended attribute block (0: none).
    pub file_acl: u64,
    pub atime: InodeTime,
    pub mtime: InodeTime,
    pub ctime: InodeTime,
    pub crtime: Option<InodeTime>,
    /// `i_block`: extent tree root, block map, inline data, fast symlink target or device number.
    pub block: [u8; 60],
    /// Bytes after the fixed part and `i_extra_isize`: the in-inode xattr area.
    pub inline_xattrs: Vec<u8>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_regular(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    /// Whether the data lives in the inode (`i_block` and the `system.data` xattr).
    pub fn is_inline(&self) -> bool {
        self.flags & INLINE_DATA_FL != 0
    }

    /// The file type bits (`S_IFMT`) of the mode; an error for a type ext does not have.
    pub fn file_type(&self) -> Result<u16> {
        let t = self.mode & S_IFMT;
        ensure!(FILE_TYPES.contains(&t), "inode {} has an unknown type (mode {:o})", self.ino, self.mode);
        Ok(t)
    }

    /// A device node's number (major, minor): old 8:8 or new 12:20 encoding in `i_block`.
    pub fn device_number(&self) -> (u32, u32) {
        // `block` is a fixed 60-byte array: these offsets are always inside it.
        let word =
            |o: usize| u32::from_le_bytes([self.block[o], self.block[o + 1], self.block[o + 2], self.block[o + 3]]);
        let old = word(0);
        if old != 0 {
            ((old >> 8) & 0xff, old & 0xff)
        } else {
            let d = word(4);
            ((d >> 8) & 0xfff, (d & 0xff) | ((d >> 12) & 0xfff00))
        }
    }
}

/// A run of file data: `len` blocks from logical block `logical` at physical `physical`;
/// `unwritten` runs are allocated but read as zeros.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub unwritten: bool,
}

fn time(seconds: u32, extra: Option<u32>) -> InodeTime {
    let mut sec = seconds as i32 as i64;
    let mut nsec = 0;
    if let Some(x) = extra {
        sec += ((x & 3) as i64) << 32;
        nsec = (x >> 2).min(999_999_999);
    }
    InodeTime { sec, nsec }
}

pub struct Ext4Files {
    region: Region,
    sb: Superblock,
    /// Inode table block of each block group.
    inode_tables: Vec<u64>,
    runs: Mutex<HashMap<u64, Arc<Vec<Run>>>>,
}

impl Ext4Files {
    /// A reader over `region`, given each group's inode table block (unchecked: every read is).
    pub fn new(region: Region, sb: Superblock, inode_tables: Vec<u64>) -> Self {
        Ext4Files { region, sb, inode_tables, runs: Mutex::new(HashMap::new()) }
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    fn block(&self, n: u64) -> Result<Vec<u8>> {
        ensure!(n < self.sb.blocks_count, "block {n} lies outside the filesystem");
        let mut buf = vec![0u8; self.sb.block_size as usize];
        self.region.read_at(n * self.sb.block_size, &mut buf)?;
        Ok(buf)
    }

    pub fn inode(&self, ino: u64) -> Result<Inode> {
        let ipg = self.sb.inodes_per_group;
        ensure!(ino >= 1 && ino <= ipg * self.inode_tables.len() as u64, "inode {ino} does not exist");
        let (group, index) = ((ino - 1) / ipg, (ino - 1) % ipg);
        let table = self.inode_tables[group as usize];
        let byte = table
            .checked_mul(self.sb.block_size)
            .and_then(|b| b.checked_add(index * self.sb.inode_size))
            .context("inode table position overflows")?;
        let mut raw = vec![0u8; self.sb.inode_size as usize];
        ensure!(
            byte + raw.len() as u64 <= self.sb.blocks_count * self.sb.block_size,
            "inode {ino} lies outside the filesystem"
        );
        self.region.read_at(byte, &mut raw)?;
        Ok(parse_inode(ino, &raw)?)
    }

    /// The region the filesystem is read from.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Inode table block of group `g`.
    pub fn inode_table(&self, g: usize) -> Option<u64> {
        self.inode_tables.get(g).copied()
    }

    /// The data runs of an inode, sorted by logical block, non-overlapping (sparse holes are
    /// absent). Inline-data inodes have none: that is an error.
    pub fn runs(&self, inode: &Inode) -> Result<Arc<Vec<Run>>> {
        ensure!(!inode.is_inline(), "inode {} keeps its data inline, in no data blocks", inode.ino);
        if let Some(r) = self.runs.lock().unwrap().get(&inode.ino) {
            return Ok(r.clone());
        }
        let runs = self.block_map(inode, &mut |_| {})?;
        let runs = Arc::new(runs);
        let mut cache = self.runs.lock().unwrap();
        if cache.len() >= RUN_CACHE {
            cache.clear();
        }
        cache.insert(inode.ino, runs.clone());
        Ok(runs)
    }

    /// The data runs of a block-mapped or extent-mapped inode, checked (inside the filesystem,
    /// sorted by logical block, not overlapping) and uncached; `tree` is told every block of
    /// the mapping itself (extent tree nodes, indirect blocks) as it is read.
    pub fn block_map(&self, inode: &Inode, tree: &mut dyn FnMut(u64)) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        if inode.flags & EXTENTS_FL != 0 {
            self.extent_node(&inode.block, MAX_EXTENT_DEPTH, &mut runs, tree)?;
        } else {
            let per = self.sb.block_size / 4;
            for (i, slot) in inode.block.chunks_exact(4).enumerate() {
                let b = le32(slot, 0)? as u64;
                if b == 0 {
                    continue;
                }
                match i {
                    0..=11 => runs.push(Run { logical: i as u64, physical: b, len: 1, unwritten: false }),
                    12 => self.indirect(b, 1, 12, &mut runs, tree)?,
                    13 => self.indirect(b, 2, 12 + per, &mut runs, tree)?,
                    _ => self.indirect(b, 3, 12 + per + per * per, &mut runs, tree)?,
                }
            }
        }
        for r in &runs {
            ensure!(
                r.physical.checked_add(r.len).is_some_and(|e| e <= self.sb.blocks_count),
                "inode {}: a data run lies outside the filesystem",
                inode.ino
            );
        }
        runs.sort_by_key(|r| r.logical);
        for w in runs.windows(2) {
            ensure!(w[0].logical + w[0].len <= w[1].logical, "inode {}: overlapping data runs", inode.ino);
        }
        Ok(runs)
    }

    fn indirect(
        &self,
        block: u64,
        level: u32,
        first_logical: u64,
        runs: &mut Vec<Run>,
        tree: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let per = self.sb.block_size / 4;
        let data = self.block(block)?;
        tree(block);
        let span = per.pow(level - 1);
        for (i, slot) in data.chunks_exact(4).enumerate() {
            let b = le32(slot, 0)? as u64;
            if b == 0 {
                continue;
            }
            let logical = first_logical + i as u64 * span;
            if level == 1 {
                match runs.last_mut() {
                    Some(r) if !r.unwritten && r.logical + r.len == logical && r.physical + r.len == b => r.len += 1,
                    _ => runs.push(Run { logical, physical: b, len: 1, unwritten: false }),
                }
            } else {
                self.indirect(b, level - 1, logical, runs, tree)?;
            }
        }
        Ok(())
    }

    fn extent_node(
        &self,
        node: &[u8],
        depth_budget: u32,
        runs: &mut Vec<Run>,
        tree: &mut dyn FnMut(u64),
    ) -> Result<()> {
        ensure!(node.len() >= 12 && le16(node, 0)? == EXTENT_MAGIC, "bad extent header");
        let entries = le16(node, 2)? as usize;
        let depth = le16(node, 6)? as u32;
        ensure!(depth < depth_budget, "extent tree too deep (loop?)");
        ensure!(12 + entries * 12 <= node.len(), "extent node overflows its block");
        for i in 0..entries {
            let e = &node[12 + i * 12..24 + i * 12];
            if depth == 0 {
                let raw_len = le16(e, 4)? as u64;
                let (len, unwritten) = if raw_len > 32768 { (raw_len - 32768, true) } else { (raw_len, false) };
                let physical = (le16(e, 6)? as u64) << 32 | le32(e, 8)? as u64;
                if len > 0 {
                    runs.push(Run { logical: le32(e, 0)? as u64, physical, len, unwritten });
                }
            } else {
                let child = (le16(e, 8)? as u64) << 32 | le32(e, 4)? as u64;
                let block = self.block(child)?;
                tree(child);
                self.extent_node(&block, depth, runs, tree)?;
            }
        }
        Ok(())
    }

    /// Whether a symlink keeps its target in `i_block` (no data block).
    pub fn is_fast_symlink(&self, inode: &Inode) -> bool {
        if inode.flags & (EXTENTS_FL | INLINE_DATA_FL) != 0 {
            return false;
        }
        let ea_sectors = if inode.file_acl != 0 { self.sb.block_size / 512 } else { 0 };
        inode.size < 60 && inode.blocks.saturating_sub(ea_sectors) == 0
    }

    /// Inline data: the first 60 bytes live in `i_block`, the rest in the `system.data` xattr.
    fn inline_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut data = inode.block.to_vec();
        if let Some(x) = self.raw_xattrs(inode)?.into_iter().find(|x| x.name == b"system.data") {
            data.extend_from_slice(&x.value);
        }
        Ok(data)
    }

    /// Reads file bytes `[offset, offset + buf.len())`, clipped to the file size; holes and
    /// unwritten extents read as zeros.
    pub fn read(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= inode.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(inode.size - offset) as usize;
        let buf = &mut buf[..n];
        ensure!(inode.flags & ENCRYPT_FL == 0, "inode {} is encrypted", inode.ino);
        if inode.is_inline() {
            let data = self.inline_data(inode)?;
            buf.fill(0);
            let start = (offset as usize).min(data.len());
            let end = (offset as usize + n).min(data.len());
            buf[..end - start].copy_from_slice(&data[start..end]);
            return Ok(n);
        }
        if inode.file_type()? == S_IFLNK && self.is_fast_symlink(inode) {
            let start = offset as usize;
            buf.copy_from_slice(&inode.block[start..start + n]);
            return Ok(n);
        }
        buf.fill(0);
        let bs = self.sb.block_size;
        let runs = self.runs(inode)?;
        let (first, last) = (offset / bs, (offset + n as u64 - 1) / bs);
        // First run that may overlap the range.
        let start_idx = runs.partition_point(|r| r.logical + r.len <= first);
        for r in &runs[start_idx..] {
            if r.logical > last {
                break;
            }
            if r.unwritten {
                continue;
            }
            let run_start = r.logical * bs;
            let run_end = (r.logical + r.len) * bs;
            let a = offset.max(run_start);
            let b = (offset + n as u64).min(run_end);
            if a >= b {
                continue;
            }
            let disk = r.physical * bs + (a - run_start);
            self.region.read_at(disk, &mut buf[(a - offset) as usize..(b - offset) as usize])?;
        }
        Ok(n)
    }

    /// A symlink's target, as stored (fast symlinks in `i_block`, others in data blocks or
    /// inline data).
    pub fn symlink_target(&self, inode: &Inode) -> Result<Vec<u8>> {
        ensure!(inode.file_type()? == S_IFLNK, "inode {} is not a symlink", inode.ino);
        ensure!(inode.size <= 65536, "symlink target too long");
        let mut buf = vec![0u8; inode.size as usize];
        let n = self.read(inode, 0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// The byte ranges of a file that hold data; everything else is a hole that reads as zeros.
    /// Sorted, non-overlapping, within the file's size. Inline files and non-regular files are
    /// one range.
    #[allow(clippy::single_range_in_vec_init)] // a list of ranges, here of one
    pub fn data_ranges(&self, inode: &Inode) -> Result<Vec<Range<u64>>> {
        if inode.size == 0 {
            return Ok(Vec::new());
        }
        if inode.is_inline() || inode.file_type()? != S_IFREG {
            return Ok(vec![0..inode.size]);
        }
        let runs = self.runs(inode)?;
        let written = runs.iter().filter(|r| !r.unwritten).map(|r| (r.logical, r.len));
        Ok(super::records::data_ranges_of(written, self.sb.block_size, inode.size))
    }

    /// Parses one xattr entry table. `values` is the buffer value offsets are relative to.
    fn parse_xattr_entries(&self, entries: &[u8], values: &[u8], out: &mut Vec<Xattr>) -> Result<()> {
        let mut off = 0;
        while off + 16 <= entries.len() {
            if le32(entries, off)? == 0 {
                break;
            }
            let name_len = entries[off] as usize;
            let index = entries[off + 1];
            let value_offs = le16(entries, off + 2)? as usize;
            let value_inum = le32(entries, off + 4)? as u64;
            let value_size = le32(entries, off + 8)? as usize;
            ensure!(off + 16 + name_len <= entries.len(), "xattr entry overflows its area");
            let suffix = &entries[off + 16..off + 16 + name_len];
            let prefix: &[u8] = match index {
                1 => b"user.",
                2 => b"system.posix_acl_access",
                3 => b"system.posix_acl_default",
                4 => b"trusted.",
                6 => b"security.",
                7 => b"system.",
                8 => b"system.richacl",
                _ => {
                    off += (16 + name_len + 3) & !3;
                    continue;
                }
            };
            let mut name = prefix.to_vec();
            name.extend_from_slice(suffix);
            let value = if value_inum != 0 {
                ensure!(value_size <= 64 << 20, "xattr value too large");
                let ea = self.inode(value_inum)?;
                ensure!(ea.flags & EA_INODE_FL != 0, "xattr points at inode {value_inum}, which is no EA inode");
                // Inline data is itself read from xattrs: an inline EA inode could hold its own
                // value (a loop). The kernel writes EA inodes to blocks only.
                ensure!(!ea.is_inline(), "EA inode {value_inum} claims inline data");
                let mut v = vec![0u8; value_size];
                let got = self.read(&ea, 0, &mut v)?;
                v.truncate(got);
                v
            } else {
                ensure!(value_offs + value_size <= values.len(), "xattr value lies outside its area");
                values[value_offs..value_offs + value_size].to_vec()
            };
            let value = if index == 2 || index == 3 { acl_to_xattr(&value)? } else { value };
            out.push(Xattr { name, value });
            off += (16 + name_len + 3) & !3;
        }
        Ok(())
    }

    /// All xattrs, including `system.data` (inline data).
    fn raw_xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        let mut out = Vec::new();
        let area = &inode.inline_xattrs;
        if area.len() >= 4 && le32(area, 0)? == XATTR_MAGIC {
            let entries = &area[4..];
            self.parse_xattr_entries(entries, entries, &mut out)?;
        }
        if inode.file_acl != 0 {
            let block = self.block(inode.file_acl)?;
            ensure!(le32(&block, 0)? == XATTR_MAGIC, "inode {}: bad xattr block", inode.ino);
            self.parse_xattr_entries(&block[32..], &block, &mut out)?;
        }
        Ok(out)
    }

    /// Extended attributes in the inode, its attribute block and EA inodes (not `system.data`,
    /// which holds inline data). POSIX ACLs come in the `system.posix_acl_*` xattr format.
    pub fn xattrs(&self, inode: &Inode) -> Result<Vec<Xattr>> {
        let mut x = self.raw_xattrs(inode)?;
        x.retain(|x| x.name != b"system.data");
        Ok(x)
    }

    /// The entries of a directory, without the real `.` and `..`.
    pub fn dir_entries(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        self.walk_dir(dir, &mut |ino, name| {
            out.push(DirEntry { name: name.to_vec(), ino });
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// Calls `visit` with each entry of a directory (not the real `.` and `..`) until it breaks.
    fn walk_dir(&self, dir: &Inode, visit: &mut dyn FnMut(u64, &[u8]) -> ControlFlow<()>) -> Result<()> {
        ensure!(dir.file_type()? == S_IFDIR, "inode {} is not a directory", dir.ino);
        if dir.is_inline() {
            // i_block (the first 60 bytes): 4-byte parent inode, then entries; the rest in
            // system.data.
            let data = self.inline_data(dir)?;
            if parse_dir_block(&data[4..60], false, visit).is_continue() {
                let _ = parse_dir_block(&data[60..], false, visit);
            }
            return Ok(());
        }
        ensure!(dir.size <= MAX_DIR_BYTES, "directory inode {} is implausibly large ({} bytes)", dir.ino, dir.size);
        let bs = self.sb.block_size;
        let runs = self.runs(dir)?;
        for r in runs.iter() {
            if r.unwritten {
                continue;
            }
            for k in 0..r.len {
                if (r.logical + k) * bs >= dir.size {
                    break;
                }
                let block = self.block(r.physical + k)?;
                if parse_dir_block(&block, r.logical + k == 0, visit).is_break() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Finds `name` in directory `dir`.
    fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<u64>> {
        let mut found = None;
        self.walk_dir(dir, &mut |ino, entry| {
            if entry == name {
                found = Some(ino);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        Ok(found)
    }

    /// Resolves an absolute path (no symlinks followed) to an inode number.
    pub fn resolve(&self, path: &str) -> Result<Option<u64>> {
        let mut ino = ROOT_INODE;
        for (depth, part) in path.split('/').filter(|p| !p.is_empty() && *p != ".").enumerate() {
            ensure!(depth < 256, "path too deep");
            if part == ".." {
                bail!("'..' is not allowed in an excluded path");
            }
            let dir = self.inode(ino)?;
            if !dir.is_dir() {
                return Ok(None);
            }
            match self.lookup(&dir, part.as_bytes())? {
                Some(next) => ino = next,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    /// The byte ranges (of the region) holding a regular file's data.
    pub fn data_extents(&self, path: &str) -> Result<Option<FileExtents>> {
        let Some(ino) = self.resolve(path)? else {
            return Ok(None);
        };
        let inode = self.inode(ino)?;
        ensure!(inode.is_regular(), "{path} is not a regular file");
        ensure!(!inode.is_inline(), "inline-data files have no data blocks to exclude");
        let bs = self.sb.block_size;
        let extents = self
            .runs(&inode)?
            .iter()
            .map(|r| FileExtent { file_offset: r.logical * bs, range: r.physical * bs..(r.physical + r.len) * bs })
            .collect();
        Ok(Some(FileExtents { size: inode.size, extents }))
    }

    /// Whether `path` is a regular file whose first page carries the Linux swap signature.
    pub fn is_swap_file(&self, path: &str) -> Result<bool> {
        let Ok(Some(ino)) = self.resolve(path) else {
            return Ok(false);
        };
        let inode = self.inode(ino)?;
        if !inode.is_regular() || inode.size < 4096 {
            return Ok(false);
        }
        // The signature ends the first 4 KiB page; with small blocks or a sparse header, find
        // the block holding it.
        let bs = self.sb.block_size;
        let logical = 4086 / bs;
        let Some(run) = self.runs(&inode)?.iter().copied().find(|r| (r.logical..r.logical + r.len).contains(&logical))
        else {
            return Ok(false);
        };
        let mut sig = [0u8; 10];
        self.region.read_at((run.physical + logical - run.logical) * bs + 4086 % bs, &mut sig)?;
        Ok(&sig == b"SWAPSPACE2" || &sig == b"SWAP-SPACE")
    }
}

/// Parses an inode from its on-disk bytes (`raw` is one inode-table slot, at least 128 bytes).
pub fn parse_inode(ino: u64, raw: &[u8]) -> Result<Inode, Truncated> {
    let big = raw.len() > 128;
    let extra_isize = if big { le16(raw, 0x80)? as usize } else { 0 };
    // Fields past the 128-byte core exist when i_extra_isize covers them.
    let extra = |off: usize| -> Option<u32> {
        if big && 128 + extra_isize >= off + 4 {
            le32(raw, off).ok()
        } else {
            None
        }
    };
    let inline_xattrs =
        if big && 128 + extra_isize + 4 <= raw.len() { raw[128 + extra_isize..].to_vec() } else { Vec::new() };
    let blocks_lo = le32(raw, 0x1C)? as u64;
    let blocks_hi = le16(raw, 0x74)? as u64;
    Ok(Inode {
        ino,
        mode: le16(raw, 0)?,
        uid: le16(raw, 2)? as u32 | (le16(raw, 0x78)? as u32) << 16,
        gid: le16(raw, 0x18)? as u32 | (le16(raw, 0x7A)? as u32) << 16,
        size: le32(raw, 4)? as u64 | (le32(raw, 0x6C)? as u64) << 32,
        links: le16(raw, 0x1A)?,
        flags: le32(raw, 0x20)?,
        blocks: blocks_lo | blocks_hi << 32,
        file_acl: le32(raw, 0x68)? as u64 | (le16(raw, 0x76)? as u64) << 32,
        atime: time(le32(raw, 0x08)?, extra(0x8C)),
        ctime: time(le32(raw, 0x0C)?, extra(0x84)),
        mtime: time(le32(raw, 0x10)?, extra(0x88)),
        crtime: extra(0x90).map(|s| time(s, extra(0x94))),
        block: crate::bytes::field(raw, 0x28)?,
        inline_xattrs,
    })
}

/// Parses one directory block, calling `visit` for each live entry until it breaks. Only the
/// real `.` and `..` (the first two records of the first block) are left out: any other entry
/// with such a name is hostile and is passed on, for callers to refuse.
fn parse_dir_block(
    block: &[u8],
    first_block: bool,
    visit: &mut dyn FnMut(u64, &[u8]) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let mut off = 0;
    let mut record = 0;
    while off + 8 <= block.len() {
        // Inside the block: the loop condition leaves 8 bytes at `off`.
        let (Ok(ino), Ok(rec_len)) = (le32(block, off), le16(block, off + 4)) else { break };
        let ino = ino as u64;
        let mut rec_len = rec_len as usize;
        if rec_len == 0 || rec_len == 65535 {
            rec_len = 65536.min(block.len() - off);
        }
        // The name length is one byte (without the filetype feature, the low byte of 16 bits).
        let name_len = block[off + 6] as usize;
        if rec_len < 8 || off + rec_len > block.len() || 8 + name_len > rec_len {
            break; // damaged record: stop reading this block
        }
        let name = &block[off + 8..off + 8 + name_len];
        let special = first_block && ((record == 0 && name == b".") || (record == 1 && name == b".."));
        if ino != 0 && !special {
            visit(ino, name)?;
        }
        record += 1;
        off += rec_len;
    }
    ControlFlow::Continue(())
}

/// Converts an ext4 on-disk POSIX ACL (version 1, short entries for the owner/group/mask/other
/// tags) to the `system.posix_acl_*` xattr format (version 2, 8-byte entries).
fn acl_to_xattr(v: &[u8]) -> Result<Vec<u8>> {
    ensure!(v.len() >= 4 && le32(v, 0)? == 1, "unknown ACL format");
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut off = 4;
    while off < v.len() {
        ensure!(off + 4 <= v.len(), "truncated ACL");
        let tag = le16(v, off)?;
        let perm = le16(v, off + 2)?;
        let (id, len) = match tag {
            0x02 | 0x08 => {
                ensure!(off + 8 <= v.len(), "truncated ACL");
                (le32(v, off + 4)?, 8)
            }
            _ => (u32::MAX, 4),
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        off += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_converts_short_and_long_entries() {
        // ext4 ACL v1: USER_OBJ rw-, USER 1000 r--, GROUP_OBJ r--, MASK r--, OTHER ---.
        let mut v = 1u32.to_le_bytes().to_vec();
        for (tag, perm, id) in
            [(0x01u16, 6u16, None), (0x02, 4, Some(1000u32)), (0x04, 4, None), (0x10, 4, None), (0x20, 0, None)]
        {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            if let Some(id) = id {
                v.extend_from_slice(&id.to_le_bytes());
            }
        }
        let x = acl_to_xattr(&v).unwrap();
        assert_eq!(x.len(), 4 + 5 * 8);
        assert_eq!(le32(&x, 0), Ok(2));
        assert_eq!((le16(&x, 12), le16(&x, 14), le32(&x, 16)), (Ok(0x02), Ok(4), Ok(1000)));
        assert_eq!(le32(&x, 8), Ok(u32::MAX));
        assert!(acl_to_xattr(&[2, 0, 0, 0]).is_err());
        assert!(acl_to_xattr(&[1, 0, 0, 0, 2, 0, 4]).is_err());
    }

    /// An image in memory.
    struct Mem(Vec<u8>);

    impl crate::device::BlockSource for Mem {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let src = usize::try_from(offset).ok().and_then(|o| self.0.get(o..o.checked_add(buf.len())?));
            buf.copy_from_slice(src.ok_or(std::io::ErrorKind::UnexpectedEof)?);
            Ok(())
        }
    }

    #[test]
    fn an_inline_ea_inode_holding_its_own_value_is_refused() {
        // 64 blocks of 1 KiB, one group, 256-byte inodes, the inode table at block 10.
        let (bs, isz, table) = (1024usize, 256usize, 10usize);
        let mut img = vec![0u8; 64 * bs];
        let ino = 12u32;
        let i = table * bs + (ino as usize - 1) * isz;
        img[i..i + 2].copy_from_slice(&(S_IFREG | 0o644).to_le_bytes());
        img[i + 4..i + 8].copy_from_slice(&100u32.to_le_bytes());
        img[i + 0x20..i + 0x24].copy_from_slice(&(EA_INODE_FL | INLINE_DATA_FL).to_le_bytes());
        img[i + 0x80..i + 0x82].copy_from_slice(&32u16.to_le_bytes());
        // In-inode xattrs: system.data, its value in EA inode 12, itself.
        let x = i + 128 + 32;
        img[x..x + 4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
        let e = x + 4;
        img[e] = 4;
        img[e + 1] = 7;
        img[e + 4..e + 8].copy_from_slice(&ino.to_le_bytes());
        img[e + 8..e + 12].copy_from_slice(&40u32.to_le_bytes());
        img[e + 16..e + 20].copy_from_slice(b"data");
        let mut raw_sb = vec![0u8; 1024];
        raw_sb[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        raw_sb[0x4..0x8].copy_from_slice(&64u32.to_le_bytes());
        raw_sb[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        raw_sb[0x20..0x24].copy_from_slice(&8192u32.to_le_bytes());
        raw_sb[0x28..0x2C].copy_from_slice(&16u32.to_le_bytes());
        raw_sb[0x4C..0x50].copy_from_slice(&1u32.to_le_bytes());
        raw_sb[0x58..0x5A].copy_from_slice(&(isz as u16).to_le_bytes());
        let sb = Superblock::parse(&raw_sb).unwrap().unwrap();
        let len = img.len() as u64;
        let files = Ext4Files::new(Region::from_source(Arc::new(Mem(img)), "mem", len), sb, vec![table as u64]);
        let inode = files.inode(ino as u64).unwrap();
        assert!(files.read(&inode, 0, &mut [0u8; 100]).is_err());
        assert!(files.xattrs(&inode).is_err());
    }

    #[test]
    fn times_carry_epoch_bits_and_nanoseconds() {
        assert_eq!(time(0xFFFF_FFFF, None), InodeTime { sec: -1, nsec: 0 });
        assert_eq!(time(5, Some((7 << 2) | 1)), InodeTime { sec: 5 + (1 << 32), nsec: 7 });
    }
}
