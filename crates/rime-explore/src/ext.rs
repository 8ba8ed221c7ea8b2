//! ext2/3/4 file trees: Rime's own reader.
//!
//! The `ext4-view` crate reads files by path but exposes no inode numbers, link counts,
//! extended attributes, device numbers or hole maps, all of which extract and mount need, so
//! the tree is read by `rime_volume::fs::ext4_files` (the reader the block map also uses for
//! `--exclude-file`): inodes with nanosecond timestamps, extent trees (unwritten extents read as
//! zeros) and ext2/3 block maps, linear and htree directories, inline data, fast and slow
//! symlinks, and extended attributes in the inode, in an attribute block and in EA inodes. This
//! module only maps it onto [`FileTree`].
//!
//! Every block number is checked against the filesystem, extent trees are depth-limited, and
//! directory records are bounds-checked: a hostile image yields errors, never wild reads.

use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time, Xattr};
use anyhow::{bail, ensure, Context, Result};
use rime_volume::fs::ext4_files::{Ext4Files, Inode, InodeTime, ROOT_INODE};
use rime_volume::fs::ext4_journal::{ExtVolume, JournalState};
use rime_volume::Region;
use std::ops::Range;

pub struct ExtTree {
    files: Ext4Files,
    name: &'static str,
}

fn kind(inode: &Inode) -> Result<Kind> {
    let t = inode.file_type()?;
    Kind::from_mode(t as u32).context("file_type returns only known types")
}

fn time(t: InodeTime) -> Time {
    Time { sec: t.sec, nsec: t.nsec }
}

impl ExtTree {
    /// Opens the ext filesystem on `region`; `Ok(None)` when there is none.
    pub fn open(region: Region) -> Result<Option<ExtTree>> {
        let Some(vol) = ExtVolume::open(&region)? else {
            return Ok(None);
        };
        let sb = vol.sb.clone();
        ensure!(sb.inodes_per_group > 0, "ext superblock has no inodes per group");
        let groups = sb.group_count();
        ensure!(groups <= 1 << 24, "ext filesystem has too many block groups ({groups})");
        if let JournalState::Unreadable(why) = &vol.journal {
            bail!(
                "the {} journal must be replayed but cannot be read ({why}), so its files cannot be shown as a mount would",
                sb.kind_name()
            );
        }
        // What a mount shows: after journal replay when the filesystem asks for it.
        let view = vol.mounted_view().clone();
        let inode_tables = sb.group_descs(&view)?.iter().map(|d| d.inode_table).collect();
        Ok(Some(ExtTree { name: sb.kind_name(), files: Ext4Files::new(view, sb, inode_tables) }))
    }
}

impl FileTree for ExtTree {
    fn fs_type(&self) -> &str {
        self.name
    }

    fn root(&self) -> NodeId {
        ROOT_INODE
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
            nlink: inode.links as u32,
            atime: time(inode.atime),
            mtime: time(inode.mtime),
            ctime: time(inode.ctime),
            crtime: inode.crtime.map(time),
            rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| inode.device_number()),
            allocated: inode.blocks * 512,
        })
    }

    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        let entries = self.files.dir_entries(&self.files.inode(id)?)?;
        Ok(entries.into_iter().map(|e| DirEntry { name: e.name, id: e.ino }).collect())
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inode = self.files.inode(id)?;
        match kind(&inode)? {
            Kind::File | Kind::Symlink => self.files.read(&inode, offset, buf),
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
