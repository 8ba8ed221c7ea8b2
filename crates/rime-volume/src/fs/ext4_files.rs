//! Reading ext2/3/4 inodes, extent trees, block maps and directories: enough to find where a
//! named file's data lies (for `--exclude-file`) and to recognise swap files. Every block
//! number is checked against the filesystem, tree depth is capped, and directory records are
//! bounds-checked, so a hostile image yields an error, never a wild read.

use super::ext4::Superblock;
use crate::device::Region;
use crate::usedmap::{FileExtent, FileExtents};
use anyhow::{bail, ensure, Context, Result};
use crate::bytes::{le16, le32};

const ROOT_INODE: u32 = 2;
const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
const S_IFMT: u16 = 0xF000;
const S_IFDIR: u16 = 0x4000;
const S_IFREG: u16 = 0x8000;
const MAX_DEPTH: u32 = 5;


pub struct Inode {
    pub mode: u16,
    pub size: u64,
    pub flags: u32,
    /// `i_block`: extent tree root or block map.
    pub block: [u8; 60],
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_regular(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
}

/// A run of a file's data: `len` blocks from logical block `logical` at physical `physical`.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

pub struct Ext4Files<'a> {
    region: &'a Region,
    sb: &'a Superblock,
    /// Inode table block of a block group.
    inode_table: Box<dyn Fn(u64) -> Option<u64> + 'a>,
}

impl<'a> Ext4Files<'a> {
    pub fn new(region: &'a Region, sb: &'a Superblock, inode_table: impl Fn(u64) -> Option<u64> + 'a) -> Self {
        Ext4Files { region, sb, inode_table: Box::new(inode_table) }
    }

    fn block(&self, n: u64) -> Result<Vec<u8>> {
        ensure!(n < self.sb.blocks_count, "block {n} lies outside the filesystem");
        let mut buf = vec![0u8; self.sb.block_size as usize];
        self.region.read_at(n * self.sb.block_size, &mut buf)?;
        Ok(buf)
    }

    pub fn inode(&self, ino: u32) -> Result<Inode> {
        let ipg = self.sb.inodes_per_group;
        ensure!(ino >= 1 && (ino as u64) <= ipg * self.sb.group_count(), "inode {ino} does not exist");
        let (group, index) = ((ino as u64 - 1) / ipg, (ino as u64 - 1) % ipg);
        let table = (self.inode_table)(group).context("inode table missing")?;
        let byte = table * self.sb.block_size + index * self.sb.inode_size;
        let mut raw = vec![0u8; self.sb.inode_size as usize];
        ensure!(byte + raw.len() as u64 <= self.sb.blocks_count * self.sb.block_size, "inode {ino} lies outside the filesystem");
        self.region.read_at(byte, &mut raw)?;
        let size = le32(&raw, 4) as u64 | (le32(&raw, 0x6C) as u64) << 32;
        Ok(Inode { mode: le16(&raw, 0), size, flags: le32(&raw, 0x20), block: raw[0x28..0x28 + 60].try_into().unwrap() })
    }

    /// The data runs of an inode, in logical order (sparse holes are absent).
    pub fn runs(&self, inode: &Inode) -> Result<Vec<Run>> {
        ensure!(inode.flags & INLINE_DATA_FL == 0, "inline-data files have no data blocks to exclude");
        let mut runs = Vec::new();
        if inode.flags & EXTENTS_FL != 0 {
            self.extent_node(&inode.block, MAX_DEPTH, &mut runs)?;
        } else {
            for (i, slot) in inode.block.chunks_exact(4).enumerate() {
                let b = le32(slot, 0) as u64;
                if b == 0 {
                    continue;
                }
                match i {
                    0..=11 => runs.push(Run { logical: i as u64, physical: b, len: 1 }),
                    12 => self.indirect(b, 1, 12, &mut runs)?,
                    13 => {
                        let per = self.sb.block_size / 4;
                        self.indirect(b, 2, 12 + per, &mut runs)?
                    }
                    _ => {
                        let per = self.sb.block_size / 4;
                        self.indirect(b, 3, 12 + per + per * per, &mut runs)?
                    }
                }
            }
        }
        for r in &runs {
            ensure!(
                r.physical.checked_add(r.len).is_some_and(|e| e <= self.sb.blocks_count),
                "a file's data run lies outside the filesystem"
            );
        }
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
                runs.push(Run { logical, physical: b, len: 1 });
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
                let len = le16(e, 4) as u64;
                let len = if len > 32768 { len - 32768 } else { len };
                let physical = (le16(e, 6) as u64) << 32 | le32(e, 8) as u64;
                runs.push(Run { logical: le32(e, 0) as u64, physical, len });
            } else {
                let child = (le16(e, 8) as u64) << 32 | le32(e, 4) as u64;
                let block = self.block(child)?;
                self.extent_node(&block, depth, runs)?;
            }
        }
        Ok(())
    }

    /// Finds `name` in directory inode `dir`.
    fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<u32>> {
        ensure!(dir.is_dir(), "not a directory");
        let bs = self.sb.block_size as usize;
        for run in self.runs(dir)? {
            for k in 0..run.len {
                if (run.logical + k) * bs as u64 >= dir.size.max(bs as u64) {
                    break;
                }
                let block = self.block(run.physical + k)?;
                let mut off = 0;
                while off + 8 <= bs {
                    let ino = le32(&block, off);
                    let rec_len = le16(&block, off + 4) as usize;
                    let name_len = block[off + 6] as usize;
                    if rec_len < 8 || off + rec_len > bs || 8 + name_len > rec_len {
                        break; // damaged record: stop reading this block
                    }
                    if ino != 0 && &block[off + 8..off + 8 + name_len] == name {
                        return Ok(Some(ino));
                    }
                    off += rec_len;
                }
            }
        }
        Ok(None)
    }

    /// Resolves an absolute path (no symlinks followed) to an inode number.
    pub fn resolve(&self, path: &str) -> Result<Option<u32>> {
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
        let Some(ino) = self.resolve(path)? else { return Ok(None) };
        let inode = self.inode(ino)?;
        ensure!(inode.is_regular(), "{path} is not a regular file");
        let bs = self.sb.block_size;
        let mut runs = self.runs(&inode)?;
        runs.sort_by_key(|r| r.logical);
        let extents = runs
            .iter()
            .map(|r| FileExtent { file_offset: r.logical * bs, range: r.physical * bs..(r.physical + r.len) * bs })
            .collect();
        Ok(Some(FileExtents { size: inode.size, extents }))
    }

    /// Whether `path` is a regular file whose first page carries the Linux swap signature.
    pub fn is_swap_file(&self, path: &str) -> Result<bool> {
        let Ok(Some(ino)) = self.resolve(path) else { return Ok(false) };
        let inode = self.inode(ino)?;
        if !inode.is_regular() || inode.size < 4096 {
            return Ok(false);
        }
        // The signature ends the first 4 KiB page; with small blocks or a sparse header, find
        // the block holding it.
        let bs = self.sb.block_size;
        let logical = 4086 / bs;
        let Some(run) = self.runs(&inode)?.into_iter().find(|r| (r.logical..r.logical + r.len).contains(&logical)) else {
            return Ok(false);
        };
        let mut sig = [0u8; 10];
        self.region.read_at((run.physical + logical - run.logical) * bs + 4086 % bs, &mut sig)?;
        Ok(&sig == b"SWAPSPACE2" || &sig == b"SWAP-SPACE")
    }
}
