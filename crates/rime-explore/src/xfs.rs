//! XFS file trees (v4 and v5), read by `rime_volume::fs::xfs_files` on the superblock the
//! used-block map parses (`fs::xfs::Superblock`). This module only maps it onto [`FileTree`].
//!
//! Invariants: node ids are XFS inode numbers, so hard links share an id. The tree is shown
//! only when the on-disk metadata is what a mount would show: a log holding changes still to be
//! replayed, or an external log that cannot be checked, is refused with an error at open. Files
//! on a realtime device cannot be read (an error for that file). Every structure read is
//! checked by the parser; a damaged one is an error for that node, never a wild read.

use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time, Xattr};
use anyhow::{bail, Context, Result};
use rime_volume::fs::xfs::{log_state, LogState, Superblock};
use rime_volume::fs::xfs_files::{Inode, XfsFiles, XfsTime};
use rime_volume::Region;
use std::ops::Range;

pub struct XfsTree {
    files: XfsFiles,
}

fn time(t: XfsTime) -> Time {
    Time { sec: t.sec, nsec: t.nsec }
}

fn kind(inode: &Inode) -> Result<Kind> {
    Kind::from_mode(inode.mode as u32).with_context(|| format!("inode {} has an unknown type", inode.ino))
}

impl XfsTree {
    /// Opens the XFS filesystem on `region`; `Ok(None)` when there is none.
    pub fn open(region: Region) -> Result<Option<XfsTree>> {
        let Some(sb) = Superblock::read(&region)? else {
            return Ok(None);
        };
        match log_state(&region, &sb) {
            Ok(LogState::Clean | LogState::Covered) => {}
            Ok(LogState::Dirty(why)) => bail!(
                "the XFS log holds metadata changes not yet written in place ({why}), so its files cannot be shown as a mount would (replay the log by mounting the filesystem)"
            ),
            Err(e) => bail!("the XFS log cannot be checked ({e:#}), so its files cannot be shown as a mount would"),
        }
        Ok(Some(XfsTree { files: XfsFiles::new(region, sb)? }))
    }
}

impl FileTree for XfsTree {
    fn fs_type(&self) -> &str {
        "xfs"
    }

    fn root(&self) -> NodeId {
        self.files.root()
    }

    fn stat(&self, id: NodeId) -> Result<Stat> {
        let inode = self.files.inode(id)?;
        let kind = kind(&inode)?;
        Ok(Stat {
            id,
            kind,
            size: inode.size,
            mode: inode.mode as u32 & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            atime: time(inode.atime),
            mtime: time(inode.mtime),
            ctime: time(inode.ctime),
            crtime: inode.crtime.map(time),
            rdev: if matches!(kind, Kind::CharDev | Kind::BlockDev) { inode.device_number() } else { None },
            allocated: inode.nblocks.saturating_mul(self.files.superblock().block_size),
        })
    }

    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        let entries = self.files.dir_entries(&self.files.inode(id)?)?;
        Ok(entries.into_iter().map(|e| DirEntry { name: e.name, id: e.ino }).collect())
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.files.inode(id)?;
        match kind(&inode)? {
            Kind::File => self.files.read(&inode, offset, buf),
            Kind::Symlink => {
                let t = self.files.symlink_target(&inode)?;
                let start = (offset as usize).min(t.len());
                let n = buf.len().min(t.len() - start);
                buf[..n].copy_from_slice(&t[start..start + n]);
                Ok(n)
            }
            Kind::Dir => bail!("is a directory"),
            _ => Ok(0),
        }
    }

    fn read_link(&self, id: NodeId) -> Result<Vec<u8>> {
        self.files.symlink_target(&self.files.inode(id)?)
    }

    fn xattrs(&self, id: NodeId) -> Result<Vec<Xattr>> {
        self.files.xattrs(&self.files.inode(id)?)
    }

    fn data_ranges(&self, id: NodeId) -> Result<Vec<Range<u64>>> {
        self.files.data_ranges(&self.files.inode(id)?)
    }
}
