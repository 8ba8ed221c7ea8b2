//! FAT12/16/32 file trees, read with rime-volume's own FAT parser (the one the used-block map
//! and its cross-check use: `fs::fat` for the boot sector and the FAT, `fs::fat_dir` for
//! directories and chains), so a FAT image is parsed one way only.
//!
//! FAT has no inode numbers, so this reader gives each directory entry it has listed an id and
//! remembers the entry itself (first cluster, size, times); duplicate or hostile names cannot
//! confuse it. FAT keeps no owner or permission bits: files read as 0644 (0444 when marked
//! read-only), directories as 0755, owned by root. Times are stored as local time without a
//! zone and are read as UTC.
//!
//! Bounded: one file's cluster chain is cached (at most one entry per cluster of the volume);
//! a directory is read once per listing, each of its clusters at most once; listings stop at
//! 2^20 entries.

use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time};
use anyhow::{anyhow, bail, ensure, Result};
use rime_volume::fs::fat::{FatKind, FatMap};
use rime_volume::fs::fat_dir::{self, DirRecord, FatTime, ATTR_READ_ONLY};
use rime_volume::fs::{CrossCheck, MapOptions};
use rime_volume::Region;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

const ROOT: NodeId = 1;

#[derive(Clone)]
struct Node {
    /// `None` for the FAT12/16 root, which lives in a fixed area.
    first_cluster: Option<u64>,
    is_dir: bool,
    size: u64,
    read_only: bool,
    mtime: Time,
    atime: Time,
    crtime: Time,
}

struct Inner {
    map: FatMap,
    nodes: Vec<Node>,
    /// (parent, index in its listing) → id, so ids stay stable across listings.
    by_place: HashMap<(NodeId, usize), NodeId>,
    /// The last file read: its id and cluster chain.
    chain: Option<(NodeId, Vec<u64>)>,
}

pub struct FatTree {
    inner: Mutex<Inner>,
    name: &'static str,
}

fn time(t: FatTime) -> Time {
    t.unix().map(|(sec, nsec)| Time { sec, nsec }).unwrap_or_default()
}

impl FatTree {
    pub fn open(region: Region) -> Result<Option<FatTree>> {
        let options = MapOptions { cross_check: CrossCheck::Never };
        let Some(map) = FatMap::probe_with(&region, &options)? else {
            return Ok(None);
        };
        let geo = map.geometry().clone();
        let name = match geo.kind {
            FatKind::Fat12 => "fat12",
            FatKind::Fat16 => "fat16",
            FatKind::Fat32 => "fat32",
        };
        let root = Node {
            first_cluster: geo.root_cluster,
            is_dir: true,
            size: 0,
            read_only: false,
            mtime: Time::default(),
            atime: Time::default(),
            crtime: Time::default(),
        };
        let inner = Inner { map, nodes: vec![root], by_place: HashMap::new(), chain: None };
        Ok(Some(FatTree { inner: Mutex::new(inner), name }))
    }

    fn node(inner: &Inner, id: NodeId) -> Result<Node> {
        id.checked_sub(1)
            .and_then(|i| inner.nodes.get(i as usize))
            .cloned()
            .ok_or_else(|| anyhow!("no FAT node {id} (list its directory first)"))
    }
}

fn node_of(r: &DirRecord) -> Node {
    Node {
        first_cluster: Some(r.first_cluster),
        is_dir: r.is_dir(),
        size: if r.is_dir() { 0 } else { r.size as u64 },
        read_only: r.attr & ATTR_READ_ONLY != 0,
        mtime: time(r.modified),
        atime: time(r.accessed),
        crtime: time(r.created),
    }
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
        let kind = inner.map.geometry().kind;
        let bytes = fat_dir::read_dir_bytes(&mut inner.map, me.first_cluster, &mut HashSet::new())?;
        let records = fat_dir::parse_dir(&bytes, kind)?;
        if records.len() > 1 << 20 {
            bail!("FAT directory has too many entries");
        }
        let mut out = Vec::with_capacity(records.len());
        for (index, r) in records.iter().enumerate() {
            let node = node_of(r);
            let nid = match inner.by_place.get(&(id, index)) {
                Some(&nid) => {
                    inner.nodes[(nid - 1) as usize] = node;
                    nid
                }
                None => {
                    inner.nodes.push(node);
                    let nid = inner.nodes.len() as NodeId;
                    inner.by_place.insert((id, index), nid);
                    nid
                }
            };
            out.push(DirEntry { name: r.name.clone().into_bytes(), id: nid });
        }
        Ok(out)
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *guard;
        let n = Self::node(inner, id)?;
        ensure!(!n.is_dir, "is a directory");
        if offset >= n.size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(n.size - offset) as usize;
        if inner.chain.as_ref().is_none_or(|(cached, _)| *cached != id) {
            let chain = fat_dir::chain(&mut inner.map, n.first_cluster.unwrap_or(0))?;
            inner.chain = Some((id, chain));
        }
        let (_, chain) = inner.chain.as_ref().expect("just cached");
        let geo = inner.map.geometry();
        let cb = geo.cluster_bytes;
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let within = pos % cb;
            let take = (want - done).min((cb - within) as usize);
            // A chain shorter than the recorded size reads as zeros past its end.
            match chain.get((pos / cb) as usize) {
                Some(&c) => {
                    let start = geo.cluster_range(c).start + within;
                    inner.map.read_bytes(start, &mut buf[done..done + take])?;
                }
                None => buf[done..done + take].fill(0),
            }
            done += take;
        }
        Ok(want)
    }

    fn read_link(&self, _id: NodeId) -> Result<Vec<u8>> {
        bail!("FAT has no symlinks")
    }
}
