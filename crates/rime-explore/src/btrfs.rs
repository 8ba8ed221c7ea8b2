//! btrfs file trees (single-device), read by `rime_volume::fs::btrfs_files` on the chunk map
//! and checked tree-block reader the used-block map uses. This module only maps it onto
//! [`FileTree`].
//!
//! The tree shown is what a mount without `subvol=` shows: the default subvolume as `/`, other
//! subvolumes and snapshots as directories at their paths (a subvolume nested in the original
//! of a snapshot shows as an empty directory there, as the kernel shows it).
//!
//! Invariants: a [`NodeId`] is `(tree index << 48) | inode number`, where the tree index is the
//! subvolume's position in this tree's table of subvolume ids (the default subvolume is 0;
//! others are added as directory listings meet them, at most 65535). Inode numbers at or past
//! 2^48 are refused. So hard links within a subvolume share an id, and the same inode number in
//! a snapshot and its original are different nodes. The node `(index, 2)` is the empty
//! directory shown for a subvolume that is not linked where it is found (btrfs inode numbers
//! of files start at 256). `crtime` is btrfs's `otime`. A log tree awaiting replay is refused
//! at open (see `btrfs_files`).

use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time, Xattr};
use anyhow::{bail, ensure, Context, Result};
use rime_volume::fs::btrfs_files::{BtrfsFiles, Inode, Target, Timespec};
use rime_volume::Region;
use std::ops::Range;
use std::sync::Mutex;

const INO_BITS: u32 = 48;
const INO_MASK: u64 = (1 << INO_BITS) - 1;
const MAX_TREES: usize = 1 << 16;
/// The inode number of the empty directory shown for an unlinked nested subvolume.
const EMPTY_SUBVOL_INO: u64 = 2;

pub struct BtrfsTree {
    files: BtrfsFiles,
    /// Subvolume ids by tree index.
    trees: Mutex<Vec<u64>>,
}

fn time(t: Timespec) -> Time {
    Time { sec: t.sec, nsec: t.nsec }
}

impl BtrfsTree {
    /// Opens the btrfs filesystem on `region`; `Ok(None)` when there is none.
    pub fn open(region: Region) -> Result<Option<BtrfsTree>> {
        let Some(files) = BtrfsFiles::open(&region)? else {
            return Ok(None);
        };
        let default = files.default_subvolume();
        Ok(Some(BtrfsTree { files, trees: Mutex::new(vec![default]) }))
    }

    fn node(&self, tree: u64, ino: u64) -> Result<NodeId> {
        ensure!(ino <= INO_MASK, "inode number {ino} of subvolume {tree} is too large");
        let mut trees = self.trees.lock().unwrap();
        let idx = match trees.iter().position(|&t| t == tree) {
            Some(i) => i,
            None => {
                ensure!(trees.len() < MAX_TREES, "more than {MAX_TREES} subvolumes");
                trees.push(tree);
                trees.len() - 1
            }
        };
        Ok(((idx as u64) << INO_BITS) | ino)
    }

    /// (subvolume id, inode number) of a node.
    fn split(&self, id: NodeId) -> Result<(u64, u64)> {
        let idx = (id >> INO_BITS) as usize;
        let trees = self.trees.lock().unwrap();
        let tree = *trees.get(idx).with_context(|| format!("node {id} belongs to no known subvolume"))?;
        Ok((tree, id & INO_MASK))
    }

    fn inode(&self, id: NodeId) -> Result<Option<Inode>> {
        let (tree, ino) = self.split(id)?;
        if ino == EMPTY_SUBVOL_INO {
            return Ok(None);
        }
        self.files.inode(tree, ino).map(Some)
    }
}

fn kind(inode: &Inode) -> Result<Kind> {
    Kind::from_mode(inode.mode).with_context(|| format!("inode {} has unknown file type {:o}", inode.ino, inode.mode))
}

impl FileTree for BtrfsTree {
    fn fs_type(&self) -> &str {
        "btrfs"
    }

    fn root(&self) -> NodeId {
        // The default subvolume's root directory (checked at open) is inode 256, tree index 0.
        rime_volume::fs::btrfs_files::FIRST_FREE_OBJECTID
    }

    fn stat(&self, id: NodeId) -> Result<Stat> {
        let Some(inode) = self.inode(id)? else {
            // An unlinked nested subvolume: an empty directory with its root's times.
            let (tree, _) = self.split(id)?;
            let root = self.files.root_dir(tree).and_then(|ino| self.files.inode(tree, ino)).ok();
            let t = root.map(|r| time(r.mtime)).unwrap_or_default();
            return Ok(Stat {
                id,
                kind: Kind::Dir,
                size: 0,
                mode: 0o755,
                uid: 0,
                gid: 0,
                nlink: 1,
                atime: t,
                mtime: t,
                ctime: t,
                crtime: Some(t),
                rdev: None,
                allocated: 0,
            });
        };
        let kind = kind(&inode)?;
        Ok(Stat {
            id,
            kind,
            size: inode.size,
            mode: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            atime: time(inode.atime),
            mtime: time(inode.mtime),
            ctime: time(inode.ctime),
            crtime: Some(time(inode.otime)),
            rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| inode.device_number()),
            allocated: inode.nbytes,
        })
    }

    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        let Some(inode) = self.inode(id)? else {
            return Ok(Vec::new());
        };
        ensure!(kind(&inode)? == Kind::Dir, "not a directory");
        let mut out = Vec::new();
        for e in self.files.dir_entries(inode.tree, inode.ino)? {
            let id = match e.target {
                Target::Inode { tree, ino } => self.node(tree, ino)?,
                Target::EmptySubvolume { tree } => self.node(tree, EMPTY_SUBVOL_INO)?,
            };
            out.push(DirEntry { name: e.name, id });
        }
        Ok(out)
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let Some(inode) = self.inode(id)? else { bail!("is a directory") };
        match kind(&inode)? {
            Kind::File | Kind::Symlink => self.files.read(&inode, offset, buf),
            Kind::Dir => bail!("is a directory"),
            _ => Ok(0),
        }
    }

    fn read_link(&self, id: NodeId) -> Result<Vec<u8>> {
        let Some(inode) = self.inode(id)? else { bail!("not a symlink") };
        self.files.symlink_target(&inode)
    }

    fn xattrs(&self, id: NodeId) -> Result<Vec<Xattr>> {
        let (tree, ino) = self.split(id)?;
        if ino == EMPTY_SUBVOL_INO {
            return Ok(Vec::new());
        }
        self.files.xattrs(tree, ino)
    }

    fn data_ranges(&self, id: NodeId) -> Result<Vec<Range<u64>>> {
        match self.inode(id)? {
            Some(inode) if inode.is_regular() => self.files.data_ranges(&inode),
            _ => Ok(Vec::new()),
        }
    }
}
