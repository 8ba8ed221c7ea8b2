//! FAT12/16/32 file trees through the `fatfs` crate.
//!
//! FAT has no inode numbers, so this reader gives each directory entry it has listed an id and
//! remembers where the entry sits (its parent and its position in the parent's listing); reads
//! walk from the root by positions, never by names, so duplicate or hostile names cannot
//! confuse it. FAT keeps no owner or permission bits: files read as 0644 (0444 when marked
//! read-only), directories as 0755, owned by root. Times are stored as local time without a
//! zone and are read as UTC.

use crate::io::RegionIo;
use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time};
use anyhow::{anyhow, bail, ensure, Context, Result};
use fatfs::{Dir, FileSystem, FsOptions};
use rime_volume::Region;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;

const ROOT: NodeId = 1;

#[derive(Clone)]
struct Node {
    parent: NodeId,
    /// Position in the parent's iteration (counting every entry fatfs yields).
    position: usize,
    is_dir: bool,
    size: u64,
    read_only: bool,
    mtime: Time,
    atime: Time,
    crtime: Time,
}

struct Inner {
    fs: FileSystem<RegionIo>,
    nodes: Vec<Node>,
    by_place: HashMap<(NodeId, usize), NodeId>,
}

// SAFETY: `FileSystem` is not `Send` only because its `FsOptions` hold `&'static dyn` references
// to fatfs's default OEM code page converter and time provider, which are stateless unit
// structs (no interior mutability, nothing thread-bound). Everything else in `Inner` is
// owned data, and `Inner` is only ever reached through `FatTree`'s mutex.
unsafe impl Send for Inner {}

pub struct FatTree {
    inner: Mutex<Inner>,
    name: &'static str,
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn fat_time(d: fatfs::Date, t: fatfs::Time) -> Time {
    if d.month == 0 || d.day == 0 {
        return Time::default();
    }
    let days = days_from_civil(d.year as i64, d.month.min(12) as i64, d.day as i64);
    let sec = days * 86400 + t.hour as i64 * 3600 + t.min as i64 * 60 + t.sec as i64;
    Time { sec, nsec: t.millis.min(999) as u32 * 1_000_000 }
}

/// Whether the boot sector looks like FAT (a jump, 0x55AA, and a FAT signature or BPB).
fn looks_like_fat(region: &Region) -> Result<bool> {
    if region.len < 512 {
        return Ok(false);
    }
    let mut bs = [0u8; 512];
    region.read_at(0, &mut bs)?;
    if bs[510..512] != [0x55, 0xAA] || !(bs[0] == 0xEB || bs[0] == 0xE9) {
        return Ok(false);
    }
    if &bs[3..11] == b"NTFS    " || &bs[3..11] == b"EXFAT   " {
        return Ok(false);
    }
    Ok(&bs[0x36..0x39] == b"FAT" || &bs[0x52..0x57] == b"FAT32")
}

impl FatTree {
    pub fn open(region: Region) -> Result<Option<FatTree>> {
        if !looks_like_fat(&region)? {
            return Ok(None);
        }
        let fs = FileSystem::new(RegionIo::new(region), FsOptions::new()).context("damaged FAT filesystem")?;
        let name = match fs.fat_type() {
            fatfs::FatType::Fat12 => "fat12",
            fatfs::FatType::Fat16 => "fat16",
            fatfs::FatType::Fat32 => "fat32",
        };
        let root = Node {
            parent: ROOT,
            position: 0,
            is_dir: true,
            size: 0,
            read_only: false,
            mtime: Time::default(),
            atime: Time::default(),
            crtime: Time::default(),
        };
        Ok(Some(FatTree { inner: Mutex::new(Inner { fs, nodes: vec![root], by_place: HashMap::new() }), name }))
    }

    fn node(inner: &Inner, id: NodeId) -> Result<Node> {
        id.checked_sub(1)
            .and_then(|i| inner.nodes.get(i as usize))
            .cloned()
            .ok_or_else(|| anyhow!("no FAT node {id} (list its directory first)"))
    }
}

/// Positions from the root down to `id`.
fn chain(inner: &Inner, id: NodeId) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    let mut cur = id;
    while cur != ROOT {
        let n = FatTree::node(inner, cur)?;
        out.push(n.position);
        ensure!(out.len() < 4096, "FAT directory chain too deep");
        cur = n.parent;
    }
    out.reverse();
    Ok(out)
}

/// The directory at `positions` below the root.
fn walk_dir<'a>(fs: &'a FileSystem<RegionIo>, positions: &[usize]) -> Result<Dir<'a, RegionIo>> {
    let mut dir = fs.root_dir();
    for &p in positions {
        let e = dir.iter().nth(p).context("FAT directory changed")??;
        ensure!(e.is_dir(), "FAT entry is not a directory");
        dir = e.to_dir();
    }
    Ok(dir)
}

impl FileTree for FatTree {
    fn fs_type(&self) -> &str {
        self.name
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn stat(&self, id: NodeId) -> Result<Stat> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = Self::node(&inner, id)?;
        let mode = if n.is_dir {
            0o755
        } else if n.read_only {
            0o444
        } else {
            0o644
        };
        Ok(Stat {
            id,
            kind: if n.is_dir { Kind::Dir } else { Kind::File },
            size: n.size,
            mode,
            uid: 0,
            gid: 0,
            nlink: if n.is_dir { 2 } else { 1 },
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: Some(n.crtime),
            rdev: None,
            allocated: n.size,
        })
    }

    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *guard;
        let me = Self::node(inner, id)?;
        ensure!(me.is_dir, "not a directory");
        let positions = chain(inner, id)?;
        let mut found = Vec::new();
        {
            let dir = walk_dir(&inner.fs, &positions)?;
            for (pos, e) in dir.iter().enumerate() {
                let e = e.context("read FAT directory")?;
                let name = e.file_name();
                if name == "." || name == ".." {
                    continue;
                }
                let m = e.modified();
                let c = e.created();
                let node = Node {
                    parent: id,
                    position: pos,
                    is_dir: e.is_dir(),
                    size: if e.is_dir() { 0 } else { e.len() },
                    read_only: e.attributes().contains(fatfs::FileAttributes::READ_ONLY),
                    mtime: fat_time(m.date, m.time),
                    atime: fat_time(e.accessed(), fatfs::Time { hour: 0, min: 0, sec: 0, millis: 0 }),
                    crtime: fat_time(c.date, c.time),
                };
                found.push((name.into_bytes(), node));
                if found.len() > 1 << 20 {
                    bail!("FAT directory has too many entries");
                }
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (name, node) in found {
            let key = (id, node.position);
            let nid = match inner.by_place.get(&key) {
                Some(&nid) => {
                    inner.nodes[(nid - 1) as usize] = node;
                    nid
                }
                None => {
                    inner.nodes.push(node);
                    let nid = inner.nodes.len() as NodeId;
                    inner.by_place.insert(key, nid);
                    nid
                }
            };
            out.push(DirEntry { name, id: nid });
        }
        Ok(out)
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = Self::node(&inner, id)?;
        ensure!(!n.is_dir, "is a directory");
        if offset >= n.size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(n.size - offset) as usize;
        let positions = chain(&inner, n.parent)?;
        let dir = walk_dir(&inner.fs, &positions)?;
        let e = dir.iter().nth(n.position).context("FAT directory changed")??;
        ensure!(!e.is_dir(), "FAT entry changed");
        let mut file = e.to_file();
        file.seek(SeekFrom::Start(offset))?;
        let mut done = 0;
        while done < want {
            let got = file.read(&mut buf[done..want])?;
            if got == 0 {
                break;
            }
            done += got;
        }
        // A cluster chain shorter than the recorded size reads as zeros past its end.
        buf[done..want].fill(0);
        Ok(want)
    }

    fn read_link(&self, _id: NodeId) -> Result<Vec<u8>> {
        bail!("FAT has no symlinks")
    }
}
