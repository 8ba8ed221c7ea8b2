//! Rime's image explorer: the file trees inside backed-up volumes.
//!
//! Every filesystem Rime can read implements [`FileTree`] over a `rime_volume::Region` (a whole
//! volume or one partition, read from a device, an image file or — for the explorer — straight
//! from the repository through `rime_core::snapshot_reader::SnapshotReader`). One module per
//! filesystem:
//!
//! | module | filesystems | how |
//! |---|---|---|
//! | [`ext`] | ext2, ext3, ext4 | Rime's own reader: inodes, extent trees and block maps, linear and htree directories, inline data, extended attributes (in-inode, block and EA-inode values, POSIX ACLs converted to the xattr format) |
//! | [`fat`] | FAT12/16/32 | rime-volume's FAT parser (`fs::fat`, `fs::fat_dir`), the one its map uses |
//! | [`xfs`] | XFS v4 and v5 | rime-volume's XFS reader (`fs::xfs_files`) on the superblock its map parses: inodes, extent lists and bmbt trees (unwritten extents read as zeros), short-form, block, leaf, node and B-tree directories, local and remote symlinks, extended attributes |
//! | [`ntfs`] | NTFS | rime-volume's NTFS parser (`fs::ntfs::files`), the one its map uses, plus reparse-point and Interix symlinks |
//! | [`btrfs`] | btrfs (single device) | rime-volume's btrfs reader (`fs::btrfs_files`) on the chunk map and checked tree-block reader its map uses: subvolumes and snapshots, inline/regular/preallocated extents, zlib/LZO/zstd, xattrs |
//!
//! Readers never trust the image: every block number, length and offset is checked, recursion
//! is bounded, and a damaged structure is an error for that node, never a wild read or a crash.
//! Names are returned as raw bytes exactly as stored: a hostile image may hold names containing
//! `/`, NUL, `.` or `..`, which callers that create files (extract) must refuse.

// A file's data ranges are a list; one range covering the whole file is a list of one.
#![forbid(unsafe_code)]
#![allow(clippy::single_range_in_vec_init)]

pub mod btrfs;
pub mod ext;
pub mod fat;
pub mod ntfs;
pub mod xfs;

use anyhow::{bail, Result};
use rime_volume::Region;
use std::ops::Range;

/// A node (inode) of a file tree: ext or XFS inode number, NTFS file record number, btrfs
/// (subvolume index, inode number), or an id the FAT reader assigns.
pub type NodeId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl Kind {
    /// The letter `ls -l` shows.
    pub fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::CharDev => 'c',
            Kind::BlockDev => 'b',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::CharDev => "char-device",
            Kind::BlockDev => "block-device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }

    /// From the `S_IFMT` bits of a POSIX mode.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDev,
            0o060000 => Kind::BlockDev,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            _ => return None,
        })
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub id: NodeId,
    pub kind: Kind,
    /// Bytes of data (for a symlink, the target's length).
    pub size: u64,
    /// Permission bits, with set-uid, set-gid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Hard links to the node.
    pub nlink: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Option<Time>,
    /// Device number (major, minor) of a device node.
    pub rdev: Option<(u32, u32)>,
    /// Bytes allocated on disk (0 when unknown).
    pub allocated: u64,
}

/// One name in a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name exactly as stored (may be hostile: check before using it as a path).
    pub name: Vec<u8>,
    pub id: NodeId,
}

impl DirEntry {
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// An extended attribute: full name (`user.comment`, `security.selinux`, ...) and value; the
/// record the filesystem readers already return.
pub use rime_volume::fs::records::Xattr;

/// Read access to one filesystem's tree.
pub trait FileTree: Send + Sync {
    /// "ext4", "vfat", "ntfs", ...
    fn fs_type(&self) -> &str;
    fn root(&self) -> NodeId;
    fn stat(&self, id: NodeId) -> Result<Stat>;
    /// The entries of a directory, without `.` and `..`.
    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>>;
    /// Reads file data at `offset`; returns the bytes read (short only at the end of the file).
    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// A symlink's target, as stored.
    fn read_link(&self, id: NodeId) -> Result<Vec<u8>>;
    /// Extended attributes, where the filesystem has them.
    fn xattrs(&self, _id: NodeId) -> Result<Vec<Xattr>> {
        Ok(Vec::new())
    }
    /// The byte ranges of a regular file that hold data; everything else is a hole that reads
    /// as zeros. Sorted, non-overlapping, within the file's size.
    fn data_ranges(&self, id: NodeId) -> Result<Vec<Range<u64>>> {
        let size = self.stat(id)?.size;
        Ok(if size == 0 { Vec::new() } else { vec![0..size] })
    }
}

/// Opens the filesystem on `region` with the first reader that recognises it; `Ok(None)` when
/// none does.
pub fn open(region: &Region) -> Result<Option<Box<dyn FileTree>>> {
    if let Some(fs) = ext::ExtTree::open(region.clone())? {
        return Ok(Some(Box::new(fs)));
    }
    if let Some(fs) = no_panic("XFS", || xfs::XfsTree::open(region.clone()))? {
        return Ok(Some(Box::new(Guarded(fs))));
    }
    if let Some(fs) = no_panic("btrfs", || btrfs::BtrfsTree::open(region.clone()))? {
        return Ok(Some(Box::new(Guarded(fs))));
    }
    if let Some(fs) = no_panic("NTFS", || ntfs::NtfsTree::open(region.clone()))? {
        return Ok(Some(Box::new(Guarded(fs))));
    }
    if let Some(fs) = no_panic("FAT", || fat::FatTree::open(region.clone()))? {
        return Ok(Some(Box::new(Guarded(fs))));
    }
    Ok(None)
}

/// Runs `f`, turning a panic inside a filesystem reader into an error for that one call: a
/// second line of defence (a hostile image should never reach
/// an assertion, but if it does, the explorer reports it instead of crashing).
fn no_panic<R>(what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            bail!("damaged {what} filesystem (the reader gave up: {msg})")
        }
    }
}

/// A `FileTree` whose every call is guarded by [`no_panic`].
struct Guarded<T>(T);

impl<T: FileTree> FileTree for Guarded<T> {
    fn fs_type(&self) -> &str {
        self.0.fs_type()
    }
    fn root(&self) -> NodeId {
        self.0.root()
    }
    fn stat(&self, id: NodeId) -> Result<Stat> {
        no_panic(self.0.fs_type(), || self.0.stat(id))
    }
    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        no_panic(self.0.fs_type(), || self.0.read_dir(id))
    }
    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        no_panic(self.0.fs_type(), || self.0.read_at(id, offset, buf))
    }
    fn read_link(&self, id: NodeId) -> Result<Vec<u8>> {
        no_panic(self.0.fs_type(), || self.0.read_link(id))
    }
    fn xattrs(&self, id: NodeId) -> Result<Vec<Xattr>> {
        no_panic(self.0.fs_type(), || self.0.xattrs(id))
    }
    fn data_ranges(&self, id: NodeId) -> Result<Vec<Range<u64>>> {
        no_panic(self.0.fs_type(), || self.0.data_ranges(id))
    }
}

/// Splits a path inside the image into its components; `.` and empty parts are dropped.
/// `..` is refused: paths given to the explorer name nodes from the root down.
pub fn path_components(path: &str) -> Result<Vec<&str>> {
    let mut parts = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => bail!("'..' is not allowed in a path inside an image ({path})"),
            p => parts.push(p),
        }
    }
    Ok(parts)
}

/// Resolves `path` from the root without following symlinks; `Ok(None)` when a component is
/// missing or a non-final component is not a directory.
pub fn resolve(fs: &dyn FileTree, path: &str) -> Result<Option<NodeId>> {
    let mut id = fs.root();
    for part in path_components(path)? {
        if fs.stat(id)?.kind != Kind::Dir {
            return Ok(None);
        }
        match fs.read_dir(id)?.into_iter().find(|e| e.name == part.as_bytes()) {
            Some(e) => id = e.id,
            None => return Ok(None),
        }
    }
    Ok(Some(id))
}

/// Reads a whole (small) file.
pub fn read_all(fs: &dyn FileTree, id: NodeId, limit: u64) -> Result<Vec<u8>> {
    let size = fs.stat(id)?.size;
    if size > limit {
        bail!("file of {size} bytes is larger than {limit}");
    }
    let mut buf = vec![0u8; size as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = fs.read_at(id, done as u64, &mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}
