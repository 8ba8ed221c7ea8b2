//! ext2/3/4 file trees: Rime's own reader.
//!
//! The `ext4-view` crate reads files by path but exposes no inode numbers, link counts,
//! extended attributes, device numbers or hole maps, all of which extract and mount need, so
//! this module reads the on-disk structures itself (in the style of
//! `rime_volume::fs::ext4_files`, whose superblock parser it reuses): group descriptors (32- and
//! 64-bit, meta_bg), inodes with nanosecond timestamps, extent trees (unwritten extents read as
//! zeros) and ext2/3 block maps, linear and htree directories (htree index blocks look like
//! empty entries to a linear scan), inline data, fast and slow symlinks, and extended
//! attributes in the inode, in an attribute block and in EA inodes.
//!
//! Every block number is checked against the filesystem, extent trees are depth-limited, and
//! directory records are bounds-checked: a hostile image yields errors, never wild reads.

use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time, Xattr};
use anyhow::{bail, ensure, Context, Result};
use rime_volume::fs::ext4::Superblock;
use rime_volume::Region;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

const ROOT_INODE: u64 = 2;
const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EA_INODE_FL: u32 = 0x20_0000;
const ENCRYPT_FL: u32 = 0x800;
const EXTENT_MAGIC: u16 = 0xF30A;
const XATTR_MAGIC: u32 = 0xEA02_0000;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_64BIT: u32 = 0x80;
const MAX_EXTENT_DEPTH: u32 = 5;
/// Directories larger than this are refused (a hostile size would otherwise make us scan
/// terabytes of holes).
const MAX_DIR_BYTES: u64 = 1 << 30;
/// Run lists kept per inode (cleared when full).
const RUN_CACHE: usize = 256;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

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
    pub blocks: u64,
    pub file_acl: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Option<Time>,
    pub block: [u8; 60],
    /// Bytes after the fixed part and `i_extra_isize`: the in-inode xattr area.
    pub inline_xattrs: Vec<u8>,
}

/// A run of file data: `len` blocks from logical block `logical` at physical `physical`;
/// `unwritten` runs are allocated but read as zeros.
#[derive(Clone, Copy, Debug)]
struct Run {
    logical: u64,
    physical: u64,
    len: u64,
    unwritten: bool,
}

pub struct ExtTree {
    region: Region,
    sb: Superblock,
    name: &'static str,
    filetype: bool,
    inode_tables: Vec<u64>,
    runs: Mutex<HashMap<u64, Arc<Vec<Run>>>>,
}

fn time(seconds: u32, extra: Option<u32>) -> Time {
    let mut sec = seconds as i32 as i64;
    let mut nsec = 0;
    if let Some(x) = extra {
        sec += ((x & 3) as i64) << 32;
        nsec = (x >> 2).min(999_999_999);
    }
    Time { sec, nsec }
}

impl ExtTree {
    /// Opens the ext filesystem on `region`; `Ok(None)` when there is none.
    pub fn open(region: Region) -> Result<Option<ExtTree>> {
        let Some(sb) = Superblock::read(&region)? else { return Ok(None) };
        ensure!(sb.inodes_per_group > 0, "ext superblock has no inodes per group");
        let journal = sb.compat & 0x4 != 0;
        let extents = sb.incompat & 0x40 != 0;
        let name = if extents || sb.incompat & INCOMPAT_64BIT != 0 {
            "ext4"
        } else if journal {
            "ext3"
        } else {
            "ext2"
        };
        let groups = sb.group_count();
        ensure!(groups <= 1 << 24, "ext filesystem has too many block groups ({groups})");
        ensure!(
            sb.blocks_count.checked_mul(sb.block_size).is_some_and(|b| b <= region.len),
            "ext filesystem ({} blocks of {}) is larger than its volume ({} bytes)",
            sb.blocks_count,
            sb.block_size,
            region.len
        );
        let filetype = sb.incompat & INCOMPAT_FILETYPE != 0;
        let inode_tables = sb.group_descs(&region)?.iter().map(|d| d.inode_table).collect();
        let fs = ExtTree { region, sb, name, filetype, inode_tables, runs: Mutex::new(HashMap::new()) };
        Ok(Some(fs))
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
        let big = raw.len() > 128;
        let extra_isize = if big { le16(&raw, 0x80) as usize } else { 0 };
        // Fields past the 128-byte core exist when i_extra_isize covers them.
        let extra = |off: usize| -> Option<u32> {
            if big && 128 + extra_isize >= off + 4 && off + 4 <= raw.len() {
                Some(le32(&raw, off))
            } else {
                None
            }
        };
        let inline_xattrs = if big && 128 + extra_isize + 4 <= raw.len() { raw[128 + extra_isize..].to_vec() } else { Vec::new() };
        let blocks_lo = le32(&raw, 0x1C) as u64;
        let blocks_hi = le16(&raw, 0x74) as u64;
        Ok(Inode {
            ino,
            mode: le16(&raw, 0),
            uid: le16(&raw, 2) as u32 | (le16(&raw, 0x78) as u32) << 16,
            gid: le16(&raw, 0x18) as u32 | (le16(&raw, 0x7A) as u32) << 16,
            size: le32(&raw, 4) as u64 | (le32(&raw, 0x6C) as u64) << 32,
            links: le16(&raw, 0x1A),
            flags: le32(&raw, 0x20),
            blocks: blocks_lo | blocks_hi << 32,
            file_acl: le32(&raw, 0x68) as u64 | (le16(&raw, 0x76) as u64) << 32,
            atime: time(le32(&raw, 0x08), extra(0x8C)),
            ctime: time(le32(&raw, 0x0C), extra(0x84)),
            mtime: time(le32(&raw, 0x10), extra(0x88)),
            crtime: extra(0x90).map(|s| time(s, extra(0x94))),
            block: raw[0x28..0x28 + 60].try_into().unwrap(),
            inline_xattrs,
        })
    }

    /// The data runs of an inode, sorted by logical block.
    fn runs(&self, inode: &Inode) -> Result<Arc<Vec<Run>>> {
        if let Some(r) = self.runs.lock().unwrap().get(&inode.ino) {
            return Ok(r.clone());
        }
        let mut runs = Vec::new();
        if inode.flags & EXTENTS_FL != 0 {
            self.extent_node(&inode.block, MAX_EXTENT_DEPTH, &mut runs)?;
        } else {
            let per = self.sb.block_size / 4;
            for (i, slot) in inode.block.chunks_exact(4).enumerate() {
                let b = le32(slot, 0) as u64;
                if b == 0 {
                    continue;
                }
                match i {
                    0..=11 => runs.push(Run { logical: i as u64, physical: b, len: 1, unwritten: false }),
                    12 => self.indirect(b, 1, 12, &mut runs)?,
                    13 => self.indirect(b, 2, 12 + per, &mut runs)?,
                    _ => self.indirect(b, 3, 12 + per + per * per, &mut runs)?,
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
        let runs = Arc::new(runs);
        let mut cache = self.runs.lock().unwrap();
        if cache.len() >= RUN_CACHE {
            cache.clear();
        }
        cache.insert(inode.ino, runs.clone());
        Ok(runs)
    }

    fn indirect(&self, block: u64, level: u32, first_logical: u64, runs: &mut Vec<Run>) -> Result<()> {
        let per = self.sb.block_size / 4;
        let data = self.block(block)?;
        let span = per.pow(level - 1);
        for (i, slot) in data.chunks_exact(4).enumerate() {
            let b = le32(slot, 0) as u64;
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
                self.indirect(b, level - 1, logical, runs)?;
            }
        }
        Ok(())
    }

    fn extent_node(&self, node: &[u8], depth_budget: u32, runs: &mut Vec<Run>) -> Result<()> {
        ensure!(node.len() >= 12 && le16(node, 0) == EXTENT_MAGIC, "bad extent header");
        let entries = le16(node, 2) as usize;
        let depth = le16(node, 6) as u32;
        ensure!(depth < depth_budget, "extent tree too deep (loop?)");
        ensure!(12 + entries * 12 <= node.len(), "extent node overflows its block");
        for i in 0..entries {
            let e = &node[12 + i * 12..24 + i * 12];
            if depth == 0 {
                let raw_len = le16(e, 4) as u64;
                let (len, unwritten) = if raw_len > 32768 { (raw_len - 32768, true) } else { (raw_len, false) };
                let physical = (le16(e, 6) as u64) << 32 | le32(e, 8) as u64;
                if len > 0 {
                    runs.push(Run { logical: le32(e, 0) as u64, physical, len, unwritten });
                }
            } else {
                let child = (le16(e, 8) as u64) << 32 | le32(e, 4) as u64;
                let block = self.block(child)?;
                self.extent_node(&block, depth, runs)?;
            }
        }
        Ok(())
    }

    fn kind_of(inode: &Inode) -> Result<Kind> {
        Kind::from_mode(inode.mode as u32).with_context(|| format!("inode {} has an unknown type (mode {:o})", inode.ino, inode.mode))
    }

    fn is_fast_symlink(&self, inode: &Inode) -> bool {
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

    /// Reads file bytes `[offset, offset + buf.len())`, clipped to the file size.
    fn read_inode(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= inode.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(inode.size - offset) as usize;
        let buf = &mut buf[..n];
        ensure!(inode.flags & ENCRYPT_FL == 0, "inode {} is encrypted", inode.ino);
        if inode.flags & INLINE_DATA_FL != 0 {
            let data = self.inline_data(inode)?;
            buf.fill(0);
            let start = (offset as usize).min(data.len());
            let end = (offset as usize + n).min(data.len());
            buf[..end - start].copy_from_slice(&data[start..end]);
            return Ok(n);
        }
        if Self::kind_of(inode)? == Kind::Symlink && self.is_fast_symlink(inode) {
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

    /// Parses one xattr entry table. `values` is the buffer value offsets are relative to.
    fn parse_xattr_entries(&self, entries: &[u8], values: &[u8], out: &mut Vec<Xattr>) -> Result<()> {
        let mut off = 0;
        while off + 16 <= entries.len() {
            if le32(entries, off) == 0 {
                break;
            }
            let name_len = entries[off] as usize;
            let index = entries[off + 1];
            let value_offs = le16(entries, off + 2) as usize;
            let value_inum = le32(entries, off + 4) as u64;
            let value_size = le32(entries, off + 8) as usize;
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
                let mut v = vec![0u8; value_size];
                let got = self.read_inode(&ea, 0, &mut v)?;
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
        if area.len() >= 4 && le32(area, 0) == XATTR_MAGIC {
            let entries = &area[4..];
            self.parse_xattr_entries(entries, entries, &mut out)?;
        }
        if inode.file_acl != 0 {
            let block = self.block(inode.file_acl)?;
            ensure!(le32(&block, 0) == XATTR_MAGIC, "inode {}: bad xattr block", inode.ino);
            self.parse_xattr_entries(&block[32..], &block, &mut out)?;
        }
        Ok(out)
    }

    fn dir_entries(&self, inode: &Inode) -> Result<Vec<DirEntry>> {
        ensure!(Self::kind_of(inode)? == Kind::Dir, "inode {} is not a directory", inode.ino);
        let mut out = Vec::new();
        if inode.flags & INLINE_DATA_FL != 0 {
            // i_block: 4-byte parent inode, then entries; the rest in system.data.
            let data = self.inline_data(inode)?;
            if data.len() > 4 {
                self.parse_dir_block(&data[4..60.min(data.len())], false, &mut out);
                if data.len() > 60 {
                    self.parse_dir_block(&data[60..], false, &mut out);
                }
            }
            return Ok(out);
        }
        ensure!(inode.size <= MAX_DIR_BYTES, "directory inode {} is implausibly large ({} bytes)", inode.ino, inode.size);
        let bs = self.sb.block_size;
        let runs = self.runs(inode)?;
        for r in runs.iter() {
            if r.unwritten {
                continue;
            }
            for k in 0..r.len {
                if (r.logical + k) * bs >= inode.size {
                    break;
                }
                let block = self.block(r.physical + k)?;
                self.parse_dir_block(&block, r.logical + k == 0, &mut out);
            }
        }
        Ok(out)
    }

    /// Parses one directory block. Only the real `.` and `..` (the first two records of the
    /// first block) are left out: any other entry with such a name is hostile and is returned,
    /// for callers to refuse.
    fn parse_dir_block(&self, block: &[u8], first_block: bool, out: &mut Vec<DirEntry>) {
        let mut off = 0;
        let mut record = 0;
        while off + 8 <= block.len() {
            let ino = le32(block, off) as u64;
            let mut rec_len = le16(block, off + 4) as usize;
            if rec_len == 0 || rec_len == 65535 {
                rec_len = 65536.min(block.len() - off);
            }
            let name_len = if self.filetype { block[off + 6] as usize } else { le16(block, off + 6) as usize & 0xff };
            if rec_len < 8 || off + rec_len > block.len() || 8 + name_len > rec_len {
                break; // damaged record: stop reading this block
            }
            let name = &block[off + 8..off + 8 + name_len];
            let special = first_block && ((record == 0 && name == b".") || (record == 1 && name == b".."));
            if ino != 0 && !special {
                out.push(DirEntry { name: name.to_vec(), id: ino });
            }
            record += 1;
            off += rec_len;
        }
    }
}

/// Converts an ext4 on-disk POSIX ACL (version 1, short entries for the owner/group/mask/other
/// tags) to the `system.posix_acl_*` xattr format (version 2, 8-byte entries).
fn acl_to_xattr(v: &[u8]) -> Result<Vec<u8>> {
    ensure!(v.len() >= 4 && le32(v, 0) == 1, "unknown ACL format");
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut off = 4;
    while off < v.len() {
        ensure!(off + 4 <= v.len(), "truncated ACL");
        let tag = le16(v, off);
        let perm = le16(v, off + 2);
        let (id, len) = match tag {
            0x02 | 0x08 => {
                ensure!(off + 8 <= v.len(), "truncated ACL");
                (le32(v, off + 4), 8)
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

impl FileTree for ExtTree {
    fn fs_type(&self) -> &str {
        self.name
    }

    fn root(&self) -> NodeId {
        ROOT_INODE
    }

    fn stat(&self, id: NodeId) -> Result<Stat> {
        let inode = self.inode(id)?;
        let kind = Self::kind_of(&inode)?;
        let rdev = if matches!(kind, Kind::CharDev | Kind::BlockDev) {
            let old = le32(&inode.block, 0);
            Some(if old != 0 {
                ((old >> 8) & 0xff, old & 0xff)
            } else {
                let d = le32(&inode.block, 4);
                ((d >> 8) & 0xfff, (d & 0xff) | ((d >> 12) & 0xfff00))
            })
        } else {
            None
        };
        Ok(Stat {
            id,
            kind,
            size: inode.size,
            mode: inode.mode as u32 & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.links as u32,
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            crtime: inode.crtime,
            rdev,
            allocated: inode.blocks * 512,
        })
    }

    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        let inode = self.inode(id)?;
        self.dir_entries(&inode)
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.inode(id)?;
        match Self::kind_of(&inode)? {
            Kind::File | Kind::Symlink => self.read_inode(&inode, offset, buf),
            Kind::Dir => bail!("is a directory"),
            _ => Ok(0),
        }
    }

    fn read_link(&self, id: NodeId) -> Result<Vec<u8>> {
        let inode = self.inode(id)?;
        ensure!(Self::kind_of(&inode)? == Kind::Symlink, "inode {id} is not a symlink");
        ensure!(inode.size <= 65536, "symlink target too long");
        let mut buf = vec![0u8; inode.size as usize];
        let n = self.read_inode(&inode, 0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn xattrs(&self, id: NodeId) -> Result<Vec<Xattr>> {
        let inode = self.inode(id)?;
        let mut x = self.raw_xattrs(&inode)?;
        x.retain(|x| x.name != b"system.data");
        Ok(x)
    }

    fn data_ranges(&self, id: NodeId) -> Result<Vec<Range<u64>>> {
        let inode = self.inode(id)?;
        if inode.size == 0 {
            return Ok(Vec::new());
        }
        if inode.flags & INLINE_DATA_FL != 0 || Self::kind_of(&inode)? != Kind::File {
            return Ok(vec![0..inode.size]);
        }
        let bs = self.sb.block_size;
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in self.runs(&inode)?.iter().filter(|r| !r.unwritten) {
            let a = (r.logical * bs).min(inode.size);
            let b = ((r.logical + r.len) * bs).min(inode.size);
            if a >= b {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == a => last.end = b,
                _ => out.push(a..b),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_converts_short_and_long_entries() {
        // ext4 ACL v1: USER_OBJ rw-, USER 1000 r--, GROUP_OBJ r--, MASK r--, OTHER ---.
        let mut v = 1u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [(0x01u16, 6u16, None), (0x02, 4, Some(1000u32)), (0x04, 4, None), (0x10, 4, None), (0x20, 0, None)] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            if let Some(id) = id {
                v.extend_from_slice(&id.to_le_bytes());
            }
        }
        let x = acl_to_xattr(&v).unwrap();
        assert_eq!(x.len(), 4 + 5 * 8);
        assert_eq!(le32(&x, 0), 2);
        assert_eq!((le16(&x, 12), le16(&x, 14), le32(&x, 16)), (0x02, 4, 1000));
        assert_eq!(le32(&x, 8), u32::MAX);
        assert!(acl_to_xattr(&[2, 0, 0, 0]).is_err());
        assert!(acl_to_xattr(&[1, 0, 0, 0, 2, 0, 4]).is_err());
    }

    #[test]
    fn times_carry_epoch_bits_and_nanoseconds() {
        assert_eq!(time(0xFFFF_FFFF, None), Time { sec: -1, nsec: 0 });
        assert_eq!(time(5, Some((7 << 2) | 1)), Time { sec: 5 + (1 << 32), nsec: 7 });
    }
}
