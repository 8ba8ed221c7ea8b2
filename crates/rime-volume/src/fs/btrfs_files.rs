//! Reading btrfs files (single-device filesystems): the root tree, the subvolume (fs) trees,
//! inodes, directories, file extents — inline, regular, preallocated, holes, reflinked ranges
//! of larger extents, zlib/LZO/zstd compressed — and extended attributes.
//!
//! The chunk map and the tree-block reader are the used-block map's (`super::btrfs`): every
//! tree block read is checked there (crc32c checksum, fsid, bytenr, level, generation, key
//! order, item bounds, the parent's key), and a cursor's keys must rise strictly, so a damaged
//! or looping tree is an error, never a hang. Blocks are found by key search from the tree's
//! root (never a full scan per read) and the last checked blocks are kept in an LRU cache.
//!
//! Invariants:
//! - Every item is parsed with bounds-checked field reads inside its own data; an item that is
//!   too short, a name longer than its item, an extent reaching past its disk extent or
//!   overlapping its neighbour is an error for that node.
//! - Trees are addressed by id: 5 (the top-level subvolume) or 256 and up. A directory entry
//!   whose location is a `ROOT_ITEM` is a subvolume: it resolves to that tree's root directory,
//!   or — when the root tree has no matching `ROOT_REF` (a subvolume nested in the original,
//!   seen inside a snapshot of it) — to an empty directory, as the kernel shows it.
//! - A compressed extent decompresses to at most its `ram_bytes`, never more than 128 KiB
//!   (inline: one node), read from at most 128 KiB of disk: the decompressors stop there.
//!   Memory is bounded: a file's extents are read in windows of at most [`WINDOW`] items,
//!   the last few decompressed extents are cached ([`DECOMPRESSED_CACHE`]).
//! - A log tree (fsync'd changes the kernel replays at mount) is refused at open: what the
//!   trees show without it may differ from a mount. Data checksums (the csum tree) are not
//!   verified; metadata checksums are, for crc32c (the default; other checksum types are read
//!   unchecked, as by the used-block map).

use super::btrfs::{Cursor, Fs, Key, MAX_LEVEL, ROOT_ITEM};
pub use super::records::{InodeTime as Timespec, Xattr};
use crate::bytes::{le16, le32, le64};
use crate::device::Region;
use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::ops::Range;
use std::sync::{Arc, Mutex};

pub const FS_TREE: u64 = 5;
/// The root directory of every subvolume tree.
pub const FIRST_FREE_OBJECTID: u64 = 256;
const LAST_FREE_OBJECTID: u64 = u64::MAX - 255;
const ROOT_TREE_DIR_OBJECTID: u64 = 6;

const INODE_ITEM: u8 = 1;
const XATTR_ITEM: u8 = 24;
const DIR_ITEM: u8 = 84;
const DIR_INDEX: u8 = 96;
const EXTENT_DATA: u8 = 108;
const ROOT_REF: u8 = 156;

const FILE_EXTENT_INLINE: u8 = 0;
const FILE_EXTENT_REG: u8 = 1;
const FILE_EXTENT_PREALLOC: u8 = 2;
pub const COMPRESS_NONE: u8 = 0;
pub const COMPRESS_ZLIB: u8 = 1;
pub const COMPRESS_LZO: u8 = 2;
pub const COMPRESS_ZSTD: u8 = 3;
/// btrfs never compresses more than this into one extent, nor stores more on disk for one.
const MAX_COMPRESSED: u64 = 128 * 1024;
/// Extent items read into memory at once for one file.
pub const WINDOW: usize = 1024;
/// Decompressed extents kept (at most 128 KiB each).
pub const DECOMPRESSED_CACHE: usize = 8;
/// File extent windows kept (one per file being read).
const WINDOW_CACHE: usize = 8;
/// Checked tree blocks kept.
const BLOCK_CACHE: usize = 2048;
/// Entries of one directory, names of one inode's xattrs: more is damage.
const MAX_DIR_ENTRIES: usize = 1 << 24;
const MAX_XATTRS: usize = 1 << 16;
const INODE_ITEM_SIZE: usize = 160;
const FILE_EXTENT_HEADER: usize = 21;
const FILE_EXTENT_REG_SIZE: usize = 53;
const DIR_ITEM_HEADER: usize = 30;
const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;
/// A symlink target longer than this is damage (PATH_MAX).
const MAX_SYMLINK: u64 = 4096;

/// One `INODE_ITEM`.
#[derive(Clone, Debug)]
pub struct Inode {
    pub tree: u64,
    pub ino: u64,
    pub size: u64,
    /// Bytes of extents the inode references (its allocation).
    pub nbytes: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u64,
    pub flags: u64,
    pub atime: Timespec,
    pub ctime: Timespec,
    pub mtime: Timespec,
    /// Creation time.
    pub otime: Timespec,
}

impl Inode {
    /// (major, minor) of a device node: the kernel's `dev_t`, as the kernel stores it.
    pub fn device_number(&self) -> (u32, u32) {
        ((self.rdev >> 20) as u32 & 0xFFF, self.rdev as u32 & 0xF_FFFF)
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    pub fn is_regular(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
}

/// Where a directory entry leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// An inode of a subvolume tree (for a subvolume: its root directory).
    Inode { tree: u64, ino: u64 },
    /// A subvolume that is not a child of this tree (nested in the original of a snapshot):
    /// the kernel shows an empty directory there.
    EmptySubvolume { tree: u64 },
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub target: Target,
}

/// A subvolume tree's root: where its root block is, and its root directory.
#[derive(Clone, Copy, Debug)]
struct TreeRoot {
    bytenr: u64,
    level: u8,
    generation: u64,
    root_dirid: u64,
}

impl TreeRoot {
    fn at(&self) -> (u64, u8, u64) {
        (self.bytenr, self.level, self.generation)
    }
}

/// One `EXTENT_DATA` item of a file.
#[derive(Clone, Debug)]
enum ExtentKind {
    /// Explicit hole (`disk_bytenr` 0), or a preallocated extent: reads as zeros.
    Zeros,
    /// Inline data, decompressed.
    Inline(Arc<Vec<u8>>),
    /// `[offset, offset + len)` of the (decompressed) disk extent.
    Regular { disk_bytenr: u64, disk_num_bytes: u64, offset: u64, ram_bytes: u64, compression: u8 },
}

#[derive(Clone, Debug)]
struct FileExtent {
    /// File offset.
    start: u64,
    len: u64,
    kind: ExtentKind,
}

impl FileExtent {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Consecutive extents of one file, covering file offsets `[from, to)`: between them, holes.
struct ExtentWindow {
    tree: u64,
    ino: u64,
    from: u64,
    to: u64,
    extents: Vec<FileExtent>,
}

/// A cached decompressed extent: (disk_bytenr, disk_num_bytes, compression, ram_bytes).
type DecompressedKey = (u64, u64, u8, u64);

pub struct BtrfsFiles {
    fs: Fs,
    default_subvolume: u64,
    roots: Mutex<HashMap<u64, TreeRoot>>,
    windows: Mutex<VecDeque<Arc<ExtentWindow>>>,
    decompressed: Mutex<VecDeque<(DecompressedKey, Arc<Vec<u8>>)>>,
}

fn timespec(b: &[u8], o: usize) -> Result<Timespec> {
    let sec = le64(b, o)? as i64;
    let nsec = le32(b, o + 8)?;
    ensure!(nsec < 1_000_000_000, "timestamp has {nsec} nanoseconds");
    Ok(Timespec { sec, nsec })
}

fn is_fs_tree(id: u64) -> bool {
    id == FS_TREE || (FIRST_FREE_OBJECTID..=LAST_FREE_OBJECTID).contains(&id)
}

/// One `btrfs_dir_item` at `o` of an item: (location, name, data, end offset).
fn dir_item(b: &[u8], o: usize) -> Result<(Key, &[u8], &[u8], usize)> {
    let location = Key::parse(b, o)?;
    let data_len = le16(b, o + 25)? as usize;
    let name_len = le16(b, o + 27)? as usize;
    let name_at = o + DIR_ITEM_HEADER;
    let end = name_at + name_len + data_len;
    ensure!(end <= b.len(), "directory item of {} bytes claims a {name_len}-byte name and {data_len} bytes", b.len());
    Ok((location, &b[name_at..name_at + name_len], &b[name_at + name_len..end], end))
}

impl BtrfsFiles {
    /// Opens the btrfs filesystem on `region`: `Ok(None)` when there is none.
    pub fn open(region: &Region) -> Result<Option<BtrfsFiles>> {
        let Some(fs) = Fs::load(region)? else {
            return Ok(None);
        };
        let fs = fs.with_block_cache(BLOCK_CACHE);
        ensure!(
            fs.sb.log_root == 0,
            "the btrfs log tree holds fsync'd changes not yet replayed (the filesystem was not unmounted cleanly); \
             the kernel replays them on a read-write mount and Rime does not, so its files are not shown: \
             restore the volume (or `rime mount` it and mount a writable copy of the image) and let the kernel replay it"
        );
        let mut files = BtrfsFiles {
            fs,
            default_subvolume: FS_TREE,
            roots: Mutex::new(HashMap::new()),
            windows: Mutex::new(VecDeque::new()),
            decompressed: Mutex::new(VecDeque::new()),
        };
        files.default_subvolume = files.find_default_subvolume()?;
        files.root(files.default_subvolume).context("the default subvolume")?;
        Ok(Some(files))
    }

    fn root_tree(&self) -> (u64, u8, u64) {
        (self.fs.sb.root, self.fs.sb.root_level, self.fs.sb.generation)
    }

    /// The subvolume a mount shows without `subvol=`: the root tree directory's "default"
    /// entry, or the top-level subvolume.
    fn find_default_subvolume(&self) -> Result<u64> {
        let mut cur = Cursor::seek(
            &self.fs,
            self.root_tree(),
            Key { objectid: ROOT_TREE_DIR_OBJECTID, kind: DIR_ITEM, offset: 0 },
        )?;
        while let Some((key, data)) = cur.next(&self.fs, true)? {
            if key.objectid != ROOT_TREE_DIR_OBJECTID || key.kind != DIR_ITEM {
                break;
            }
            let mut o = 0;
            while o < data.len() {
                let (location, name, _, end) = dir_item(&data, o)?;
                if name == b"default" {
                    ensure!(
                        location.kind == ROOT_ITEM && is_fs_tree(location.objectid),
                        "the default subvolume entry points at {location:?}"
                    );
                    return Ok(location.objectid);
                }
                o = end;
            }
        }
        Ok(FS_TREE)
    }

    pub fn default_subvolume(&self) -> u64 {
        self.default_subvolume
    }

    pub fn sectorsize(&self) -> u64 {
        self.fs.sb.sectorsize
    }

    /// A subvolume tree's root item, read once.
    fn root(&self, tree: u64) -> Result<TreeRoot> {
        if let Some(r) = self.roots.lock().unwrap().get(&tree) {
            return Ok(*r);
        }
        ensure!(is_fs_tree(tree), "tree {tree} is not a subvolume");
        let mut cur = Cursor::seek(&self.fs, self.root_tree(), Key { objectid: tree, kind: ROOT_ITEM, offset: 0 })?;
        let Some((key, d)) = cur.next(&self.fs, true)?.filter(|(k, _)| k.objectid == tree && k.kind == ROOT_ITEM)
        else {
            bail!("subvolume {tree} has no root item")
        };
        ensure!(d.len() >= 239, "root item {key:?} is truncated ({} bytes)", d.len());
        let refs = le32(&d, 216)?;
        ensure!(refs > 0, "subvolume {tree} has been deleted");
        let r =
            TreeRoot { generation: le64(&d, 160)?, root_dirid: le64(&d, 168)?, bytenr: le64(&d, 176)?, level: d[238] };
        ensure!(r.level <= MAX_LEVEL, "subvolume {tree} has root level {}", r.level);
        ensure!(r.generation <= self.fs.sb.generation, "subvolume {tree} has a root from the future");
        ensure!(r.root_dirid == FIRST_FREE_OBJECTID, "subvolume {tree} has root directory {}", r.root_dirid);
        let mut roots = self.roots.lock().unwrap();
        if roots.len() >= 1 << 16 {
            roots.clear();
        }
        roots.insert(tree, r);
        Ok(r)
    }

    /// The root directory inode of a subvolume tree.
    pub fn root_dir(&self, tree: u64) -> Result<u64> {
        Ok(self.root(tree)?.root_dirid)
    }

    /// The item with exactly `key` in `tree`, if any.
    fn item(&self, tree: u64, key: Key) -> Result<Option<Vec<u8>>> {
        let mut cur = Cursor::seek(&self.fs, self.root(tree)?.at(), key)?;
        Ok(cur.next(&self.fs, true)?.filter(|(k, _)| *k == key).map(|(_, d)| d))
    }

    pub fn inode(&self, tree: u64, ino: u64) -> Result<Inode> {
        let Some(d) = self.item(tree, Key { objectid: ino, kind: INODE_ITEM, offset: 0 })? else {
            bail!("inode {ino} of subvolume {tree} does not exist")
        };
        ensure!(d.len() >= INODE_ITEM_SIZE, "inode {ino} of subvolume {tree} is truncated ({} bytes)", d.len());
        let inode = Inode {
            tree,
            ino,
            size: le64(&d, 16)?,
            nbytes: le64(&d, 24)?,
            nlink: le32(&d, 40)?,
            uid: le32(&d, 44)?,
            gid: le32(&d, 48)?,
            mode: le32(&d, 52)?,
            rdev: le64(&d, 56)?,
            flags: le64(&d, 64)?,
            atime: timespec(&d, 112)?,
            ctime: timespec(&d, 124)?,
            mtime: timespec(&d, 136)?,
            otime: timespec(&d, 148)?,
        };
        ensure!(inode.size <= i64::MAX as u64, "inode {ino} of subvolume {tree} has size {}", inode.size);
        Ok(inode)
    }

    /// A directory's entries in index (creation) order, from its `DIR_INDEX` items.
    pub fn dir_entries(&self, tree: u64, dir: u64) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        let mut cur = Cursor::seek(&self.fs, self.root(tree)?.at(), Key { objectid: dir, kind: DIR_INDEX, offset: 0 })?;
        while let Some((key, d)) = cur.next(&self.fs, true)? {
            if key.objectid != dir || key.kind != DIR_INDEX {
                break;
            }
            ensure!(out.len() < MAX_DIR_ENTRIES, "directory {dir} of subvolume {tree} has too many entries");
            let (location, name, _, _) =
                dir_item(&d, 0).with_context(|| format!("directory {dir} index {}", key.offset))?;
            ensure!(
                !name.is_empty() && name.len() <= 255,
                "directory {dir} has an entry with a {}-byte name",
                name.len()
            );
            let target = match location.kind {
                INODE_ITEM => Target::Inode { tree, ino: location.objectid },
                ROOT_ITEM => self.subvolume_target(tree, dir, name, location.objectid)?,
                other => {
                    bail!("directory {dir} entry {} points at an item of type {other}", String::from_utf8_lossy(name))
                }
            };
            out.push(DirEntry { name: name.to_vec(), target });
        }
        Ok(out)
    }

    /// A subvolume entry `name` in directory `dir` of `parent`: the subvolume's root directory
    /// when the root tree records it there (`ROOT_REF`), an empty directory otherwise.
    fn subvolume_target(&self, parent: u64, dir: u64, name: &[u8], sub: u64) -> Result<Target> {
        ensure!(is_fs_tree(sub), "directory {dir} points at tree {sub}, not a subvolume");
        let key = Key { objectid: parent, kind: ROOT_REF, offset: sub };
        let mut cur = Cursor::seek(&self.fs, self.root_tree(), key)?;
        let linked = match cur.next(&self.fs, true)?.filter(|(k, _)| *k == key) {
            Some((_, d)) => {
                let name_len = le16(&d, 16)? as usize;
                ensure!(18 + name_len <= d.len(), "root ref {key:?} is truncated");
                le64(&d, 0)? == dir && &d[18..18 + name_len] == name
            }
            None => false,
        };
        if !linked {
            return Ok(Target::EmptySubvolume { tree: sub });
        }
        Ok(Target::Inode { tree: sub, ino: self.root_dir(sub)? })
    }

    /// Extended attributes (`XATTR_ITEM`s), sorted by name.
    pub fn xattrs(&self, tree: u64, ino: u64) -> Result<Vec<Xattr>> {
        let mut out = Vec::new();
        let mut cur =
            Cursor::seek(&self.fs, self.root(tree)?.at(), Key { objectid: ino, kind: XATTR_ITEM, offset: 0 })?;
        while let Some((key, d)) = cur.next(&self.fs, true)? {
            if key.objectid != ino || key.kind != XATTR_ITEM {
                break;
            }
            let mut o = 0;
            while o < d.len() {
                ensure!(out.len() < MAX_XATTRS, "inode {ino} has too many xattrs");
                let (_, name, value, end) = dir_item(&d, o).with_context(|| format!("xattr item of inode {ino}"))?;
                ensure!(!name.is_empty(), "inode {ino} has an xattr without a name");
                out.push(Xattr { name: name.to_vec(), value: value.to_vec() });
                o = end;
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Parses one `EXTENT_DATA` item at file offset `start`.
    fn file_extent(&self, ino: u64, start: u64, d: &[u8]) -> Result<FileExtent> {
        ensure!(d.len() >= FILE_EXTENT_HEADER, "extent item of inode {ino} at {start} is truncated");
        let ram_bytes = le64(d, 8)?;
        let compression = d[16];
        ensure!(d[17] == 0 && le16(d, 18)? == 0, "extent of inode {ino} at {start} is encrypted or encoded");
        ensure!(compression <= COMPRESS_ZSTD, "extent of inode {ino} at {start} has compression type {compression}");
        let what = || format!("extent of inode {ino} at file offset {start}");
        match d[20] {
            FILE_EXTENT_INLINE => {
                ensure!(start == 0, "{} is inline but not at the start", what());
                let raw = &d[FILE_EXTENT_HEADER..];
                let data = if compression == COMPRESS_NONE {
                    raw.to_vec()
                } else {
                    ensure!(ram_bytes <= self.fs.sb.nodesize, "{} is inline with {ram_bytes} bytes", what());
                    decompress(compression, raw, ram_bytes as usize, self.fs.sb.sectorsize).with_context(what)?
                };
                Ok(FileExtent { start, len: data.len() as u64, kind: ExtentKind::Inline(Arc::new(data)) })
            }
            t @ (FILE_EXTENT_REG | FILE_EXTENT_PREALLOC) => {
                ensure!(d.len() >= FILE_EXTENT_REG_SIZE, "{} is truncated", what());
                let disk_bytenr = le64(d, 21)?;
                let disk_num_bytes = le64(d, 29)?;
                let offset = le64(d, 37)?;
                let len = le64(d, 45)?;
                ensure!(len > 0 && start.checked_add(len).is_some(), "{} has length {len}", what());
                if disk_bytenr == 0 || t == FILE_EXTENT_PREALLOC {
                    return Ok(FileExtent { start, len, kind: ExtentKind::Zeros });
                }
                let (limit, raw_len) = if compression == COMPRESS_NONE {
                    (disk_num_bytes, disk_num_bytes)
                } else {
                    ensure!(
                        disk_num_bytes <= MAX_COMPRESSED && ram_bytes <= MAX_COMPRESSED,
                        "{} is compressed from {ram_bytes} to {disk_num_bytes} bytes (at most {MAX_COMPRESSED})",
                        what()
                    );
                    (ram_bytes, disk_num_bytes)
                };
                ensure!(
                    raw_len > 0
                        && disk_bytenr.checked_add(raw_len).is_some()
                        && offset.checked_add(len).is_some_and(|e| e <= limit),
                    "{} references bytes {offset}..+{len} of a {limit}-byte extent",
                    what()
                );
                Ok(FileExtent {
                    start,
                    len,
                    kind: ExtentKind::Regular { disk_bytenr, disk_num_bytes, offset, ram_bytes, compression },
                })
            }
            t => bail!("{} has type {t}", what()),
        }
    }

    /// Reads the extents of `inode` from the one covering `pos` (or the first after it) on, up
    /// to [`WINDOW`] of them.
    fn load_window(&self, inode: &Inode, pos: u64) -> Result<ExtentWindow> {
        let ino = inode.ino;
        let mut cur = Cursor::seek_le(
            &self.fs,
            self.root(inode.tree)?.at(),
            Key { objectid: ino, kind: EXTENT_DATA, offset: pos },
        )?;
        let mut extents: Vec<FileExtent> = Vec::new();
        let mut from = None;
        let mut to = u64::MAX;
        while let Some((key, d)) = cur.next(&self.fs, true)? {
            let ours = key.objectid == ino && key.kind == EXTENT_DATA;
            if from.is_none() {
                // The first item is the last one at or before `pos`: when it is not one of the
                // file's extents, no extent starts before `pos`.
                from = Some(if ours { key.offset } else { 0 });
            }
            if !ours {
                if key.objectid > ino || (key.objectid == ino && key.kind > EXTENT_DATA) {
                    break;
                }
                continue;
            }
            if extents.len() >= WINDOW {
                to = key.offset;
                break;
            }
            let e = self.file_extent(ino, key.offset, &d)?;
            if let Some(prev) = extents.last() {
                ensure!(prev.end() <= e.start, "extents of inode {ino} overlap at file offset {}", e.start);
            }
            extents.push(e);
        }
        Ok(ExtentWindow { tree: inode.tree, ino, from: from.unwrap_or(0), to, extents })
    }

    /// The window of `inode`'s extents that covers `pos`, from the cache or read.
    fn window(&self, inode: &Inode, pos: u64) -> Result<Arc<ExtentWindow>> {
        {
            let mut ws = self.windows.lock().unwrap();
            if let Some(i) =
                ws.iter().position(|w| w.tree == inode.tree && w.ino == inode.ino && w.from <= pos && pos < w.to)
            {
                let w = ws.remove(i).expect("index just found");
                ws.push_front(w.clone());
                return Ok(w);
            }
        }
        let w = Arc::new(self.load_window(inode, pos)?);
        ensure!(w.from <= pos && pos < w.to, "extent window of inode {} does not cover offset {pos}", inode.ino);
        let mut ws = self.windows.lock().unwrap();
        ws.push_front(w.clone());
        ws.truncate(WINDOW_CACHE);
        Ok(w)
    }

    /// The decompressed contents of a compressed disk extent, cached.
    fn decompressed(
        &self,
        disk_bytenr: u64,
        disk_num_bytes: u64,
        compression: u8,
        ram_bytes: u64,
    ) -> Result<Arc<Vec<u8>>> {
        let key = (disk_bytenr, disk_num_bytes, compression, ram_bytes);
        {
            let mut c = self.decompressed.lock().unwrap();
            if let Some(i) = c.iter().position(|(k, _)| *k == key) {
                let e = c.remove(i).expect("index just found");
                c.push_front(e.clone());
                return Ok(e.1);
            }
        }
        let mut raw = vec![0u8; disk_num_bytes as usize];
        self.fs.read_logical(disk_bytenr, &mut raw)?;
        let data = Arc::new(
            decompress(compression, &raw, ram_bytes as usize, self.fs.sb.sectorsize)
                .with_context(|| format!("compressed extent at logical {disk_bytenr}"))?,
        );
        let mut c = self.decompressed.lock().unwrap();
        c.push_front((key, data.clone()));
        c.truncate(DECOMPRESSED_CACHE);
        Ok(data)
    }

    /// Reads file (or symlink) data at `offset`; short only at the end of the file.
    pub fn read(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= inode.size {
            return Ok(0);
        }
        let want = (inode.size - offset).min(buf.len() as u64) as usize;
        let mut done = 0;
        while done < want {
            let pos = offset + done as u64;
            let w = self.window(inode, pos)?;
            let i = w.extents.partition_point(|e| e.end() <= pos);
            let room = want - done;
            let Some(e) = w.extents.get(i).filter(|e| e.start <= pos) else {
                // A hole up to the next extent (or the end of what the window knows).
                let next = w.extents.get(i).map_or(w.to, |e| e.start);
                let n = (next - pos).min(room as u64) as usize;
                buf[done..done + n].fill(0);
                done += n;
                continue;
            };
            let within = pos - e.start;
            let n = (e.len - within).min(room as u64) as usize;
            let dst = &mut buf[done..done + n];
            match &e.kind {
                ExtentKind::Zeros => dst.fill(0),
                ExtentKind::Inline(data) => {
                    // Inline data shorter than the extent reads as zeros past its end.
                    let have = data.len().saturating_sub(within as usize).min(n);
                    dst[..have].copy_from_slice(&data[within as usize..within as usize + have]);
                    dst[have..].fill(0);
                }
                &ExtentKind::Regular { disk_bytenr, disk_num_bytes, offset, ram_bytes, compression } => {
                    if compression == COMPRESS_NONE {
                        self.fs.read_logical(disk_bytenr + offset + within, dst)?;
                    } else {
                        let data = self.decompressed(disk_bytenr, disk_num_bytes, compression, ram_bytes)?;
                        let at = (offset + within) as usize;
                        dst.copy_from_slice(&data[at..at + n]);
                    }
                }
            }
            done += n;
        }
        Ok(done)
    }

    /// A symlink's target (its inline extent).
    pub fn symlink_target(&self, inode: &Inode) -> Result<Vec<u8>> {
        ensure!(inode.is_symlink(), "inode {} is not a symlink", inode.ino);
        ensure!(inode.size <= MAX_SYMLINK, "symlink {} is {} bytes long", inode.ino, inode.size);
        let mut buf = vec![0u8; inode.size as usize];
        let n = self.read(inode, 0, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// The byte ranges of a file that hold data (inline and written extents, compressed or
    /// not); holes and preallocated extents are left out. Sorted, merged, within the size.
    pub fn data_ranges(&self, inode: &Inode) -> Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut cur = Cursor::seek(
            &self.fs,
            self.root(inode.tree)?.at(),
            Key { objectid: inode.ino, kind: EXTENT_DATA, offset: 0 },
        )?;
        let mut prev_end = 0;
        while let Some((key, d)) = cur.next(&self.fs, true)? {
            if key.objectid != inode.ino || key.kind != EXTENT_DATA || key.offset >= inode.size {
                break;
            }
            let e = self.file_extent(inode.ino, key.offset, &d)?;
            ensure!(e.start >= prev_end, "extents of inode {} overlap at file offset {}", inode.ino, e.start);
            prev_end = e.end();
            if matches!(e.kind, ExtentKind::Zeros) || e.len == 0 {
                continue;
            }
            let r = e.start..e.end().min(inode.size);
            match out.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => out.push(r),
            }
        }
        Ok(out)
    }
}

/// Decompresses one btrfs compressed extent (or inline extent) to at most `ram_bytes` bytes;
/// a short result is padded with zeros, as the kernel does.
pub fn decompress(compression: u8, raw: &[u8], ram_bytes: usize, sectorsize: u64) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ram_bytes);
    match compression {
        COMPRESS_ZLIB => {
            let mut d = flate2::read::ZlibDecoder::new(raw).take(ram_bytes as u64);
            d.read_to_end(&mut out).context("zlib data is damaged")?;
        }
        COMPRESS_ZSTD => {
            let mut d = zstd::stream::read::Decoder::with_buffer(raw).context("zstd")?.single_frame();
            // btrfs compresses with windows of at most 128 KiB.
            d.window_log_max(17).context("zstd")?;
            d.take(ram_bytes as u64).read_to_end(&mut out).context("zstd data is damaged")?;
        }
        COMPRESS_LZO => lzo_btrfs(raw, &mut out, ram_bytes, sectorsize as usize)?,
        other => bail!("unknown compression type {other}"),
    }
    out.resize(ram_bytes, 0);
    Ok(out)
}

/// btrfs's LZO framing: a 4-byte little-endian total length (including itself), then segments,
/// each a 4-byte length and LZO1X data decompressing to one sector at most; a segment header
/// never crosses a sector boundary (the bytes left before it are padding).
fn lzo_btrfs(raw: &[u8], out: &mut Vec<u8>, limit: usize, sectorsize: usize) -> Result<()> {
    let total = le32(raw, 0).context("LZO header")? as usize;
    ensure!(total >= 4 && total <= raw.len(), "LZO extent claims {total} bytes in {}", raw.len());
    let mut at = 4;
    while at < total && out.len() < limit {
        let left = sectorsize - at % sectorsize;
        if left < 4 {
            at += left;
            continue;
        }
        ensure!(total - at >= 4, "LZO segment header at {at} overruns the extent ({total} bytes)");
        let seg = le32(raw, at)? as usize;
        at += 4;
        ensure!(seg > 0 && seg <= total - at, "LZO segment of {seg} bytes at {at} overruns the extent ({total} bytes)");
        let end = (out.len() + sectorsize).min(limit);
        crate::lzo::lzo1x_decompress(&raw[at..at + seg], out, end).with_context(|| format!("LZO segment at {at}"))?;
        at += seg;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompression_is_bounded_by_ram_bytes() {
        let data = vec![7u8; 100_000];
        let z = zstd::bulk::compress(&data, 3).unwrap();
        assert_eq!(decompress(COMPRESS_ZSTD, &z, 100_000, 4096).unwrap(), data);
        assert_eq!(decompress(COMPRESS_ZSTD, &z, 1000, 4096).unwrap(), data[..1000]);
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut e, &data).unwrap();
        let zl = e.finish().unwrap();
        assert_eq!(decompress(COMPRESS_ZLIB, &zl, 4096, 4096).unwrap(), data[..4096]);
        // Damaged: errors.
        assert!(decompress(COMPRESS_ZLIB, &zl[..10], 100_000, 4096).is_err());
        assert!(decompress(COMPRESS_LZO, &[255, 255, 0, 0, 1], 100, 4096).is_err());
        // A segment header reaching past the total length, and a segment past it.
        assert!(decompress(COMPRESS_LZO, &[6, 0, 0, 0, 1, 0, 0, 0], 100, 4096).is_err());
        assert!(decompress(COMPRESS_LZO, &[12, 0, 0, 0, 9, 0, 0, 0, 20, 1, 2, 3], 100, 4096).is_err());
        // A well-formed one: total 4 + 4 + 10, one segment (the LZO block of the unit test above).
        let seg = [20u8, b'a', b'b', b'c', 0x20 | 7, 2 << 2, 0, 0x11, 0, 0];
        let mut framed = vec![18, 0, 0, 0, 10, 0, 0, 0];
        framed.extend_from_slice(&seg);
        assert_eq!(decompress(COMPRESS_LZO, &framed, 12, 4096).unwrap(), b"abcabcabcabc");
        assert_eq!(decompress(COMPRESS_LZO, &framed, 16, 4096).unwrap(), b"abcabcabcabc\0\0\0\0");
    }
}
