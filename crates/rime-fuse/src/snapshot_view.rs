//! A snapshot as a read-only FUSE tree: image files (one per volume, read straight from the
//! repository) and the browsable file trees of the filesystems on them. The layout and the
//! command around it are `rime mount`'s (rime-core); this module is only the FUSE adapter.
//!
//! Invariants: nothing is writable (the mount is `ro`, every entry read-only); inode numbers
//! are handed out on first lookup and stay stable for the life of the mount; a failing read of
//! the repository becomes EIO with a warning, never a panic.

use anyhow::Result;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use rime_explore::{FileTree, Kind, NodeId, Stat};
use rime_os::signals::{BlockedSignals, Signal};
use rime_volume::Region;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the view shows.
pub struct SnapshotView {
    /// Image files at the root: name and contents.
    pub images: Vec<(String, Region)>,
    /// Browsable trees at the root: directory name and tree.
    pub trees: Vec<(String, Box<dyn FileTree>)>,
    /// Times of the synthetic entries (the snapshot's time).
    pub time: SystemTime,
    /// Shown as the mount's source (`rime:<snapshot id>`).
    pub fs_name: String,
    /// Let other users read the view (FUSE `allow_other`).
    pub allow_other: bool,
}

/// Mounts `view` at `mountpoint` and serves it in the foreground until it is unmounted (from
/// outside, by `fusermount -u` or `umount`) or SIGINT, SIGTERM or SIGHUP arrives (then it
/// unmounts itself). `ready` is called once the view is mounted.
pub fn serve(view: SnapshotView, mountpoint: &Path, ready: &mut dyn FnMut()) -> Result<()> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(view.fs_name.clone()),
        MountOption::Subtype("rime".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if view.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    let (uid, gid) = rime_os::process::real_ids();
    let fs = SnapshotFs {
        images: view.images,
        trees: view.trees.into_iter().map(|(dir_name, fs)| Tree { dir_name, fs }).collect(),
        inodes: Mutex::new(Inodes { nodes: vec![Node::Root], by_node: HashMap::from([(Node::Root, ROOT)]) }),
        time: view.time,
        uid,
        gid,
    };
    // Taken synchronously by this thread: blocked before the FUSE threads start, so they
    // inherit the mask.
    let signals = BlockedSignals::block(&[Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGUSR1])?;
    let session = fuser::spawn_mount(fs, mountpoint, &config)
        .map_err(|e| anyhow::anyhow!("cannot mount {}: {e}", mountpoint.display()))?;
    ready();

    // The session ends when the file system is unmounted (by us or from outside); a watcher
    // turns that into SIGUSR1 for the waiting thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(session.join());
        rime_os::signals::raise_in_process(Signal::SIGUSR1);
    });
    while signals.wait() != Signal::SIGUSR1 {
        // Ctrl-C / SIGTERM / SIGHUP: unmount; the session then ends and the watcher wakes us.
        rime_os::mounts::unmount(mountpoint);
    }
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => tracing::debug!("FUSE session ended: {e}"),
    }
    Ok(())
}

/// Attributes never change (the snapshot is immutable): let the kernel cache them.
const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Node {
    Root,
    Image(usize),
    Tree(usize, NodeId),
}

struct Tree {
    dir_name: String,
    fs: Box<dyn FileTree>,
}

struct Inodes {
    nodes: Vec<Node>,
    by_node: HashMap<Node, u64>,
}

impl Inodes {
    fn ino(&mut self, node: Node) -> u64 {
        if let Some(&i) = self.by_node.get(&node) {
            return i;
        }
        self.nodes.push(node);
        let i = self.nodes.len() as u64;
        self.by_node.insert(node, i);
        i
    }

    fn node(&self, ino: u64) -> Option<Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize)).copied()
    }
}

struct SnapshotFs {
    /// Image files: name and contents.
    images: Vec<(String, Region)>,
    trees: Vec<Tree>,
    inodes: Mutex<Inodes>,
    time: SystemTime,
    uid: u32,
    gid: u32,
}

fn system_time(t: rime_explore::Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

fn io_err(e: anyhow::Error) -> Errno {
    tracing::warn!("{e:#}");
    Errno::EIO
}

impl SnapshotFs {
    fn synthetic(&self, ino: u64, kind: FileType, size: u64, perm: u16, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 65536,
        }
    }

    fn tree_attr(ino: u64, st: &Stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: st.size,
            blocks: st.allocated.div_ceil(512),
            atime: system_time(st.atime),
            mtime: system_time(st.mtime),
            ctime: system_time(st.ctime),
            crtime: st.crtime.map(system_time).unwrap_or(UNIX_EPOCH),
            kind: file_type(st.kind),
            perm: (st.mode & 0o7777) as u16,
            nlink: st.nlink.max(1),
            uid: st.uid,
            gid: st.gid,
            rdev: st.rdev.map(|(ma, mi)| rustix::fs::makedev(ma, mi) as u32).unwrap_or(0),
            flags: 0,
            blksize: 4096,
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.inodes.lock().unwrap().node(ino).ok_or(Errno::ENOENT)?;
        match node {
            Node::Root => Ok(self.synthetic(ino, FileType::Directory, 0, 0o555, 2 + self.trees.len() as u32)),
            Node::Image(i) => Ok(self.synthetic(ino, FileType::RegularFile, self.images[i].1.len, 0o444, 1)),
            Node::Tree(t, id) => {
                let st = self.trees[t].fs.stat(id).map_err(io_err)?;
                Ok(Self::tree_attr(ino, &st))
            }
        }
    }

    /// The root's entries: (name, node).
    fn root_entries(&self) -> Vec<(String, Node)> {
        let mut out: Vec<(String, Node)> =
            self.images.iter().enumerate().map(|(i, (n, _))| (n.clone(), Node::Image(i))).collect();
        for (t, tree) in self.trees.iter().enumerate() {
            out.push((tree.dir_name.clone(), Node::Tree(t, tree.fs.root())));
        }
        out
    }

    fn lookup_node(&self, parent: Node, name: &[u8]) -> Result<Option<Node>, Errno> {
        match parent {
            Node::Root => Ok(self.root_entries().into_iter().find(|(n, _)| n.as_bytes() == name).map(|(_, n)| n)),
            Node::Image(_) => Err(Errno::ENOTDIR),
            Node::Tree(t, id) => {
                let entries = self.trees[t].fs.read_dir(id).map_err(io_err)?;
                Ok(entries.into_iter().find(|e| e.name == name).map(|e| Node::Tree(t, e.id)))
            }
        }
    }
}

impl Filesystem for SnapshotFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.inodes.lock().unwrap().node(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        match self.lookup_node(p, name.as_bytes()) {
            Ok(Some(node)) => {
                let ino = self.inodes.lock().unwrap().ino(node);
                match self.attr(ino) {
                    Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                    Err(e) => reply.error(e),
                }
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inodes.lock().unwrap().node(ino.0) {
            Some(Node::Tree(t, id)) => match self.trees[t].fs.read_link(id) {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(io_err(e)),
            },
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let node = self.inodes.lock().unwrap().node(ino.0);
        match node {
            Some(Node::Image(i)) => {
                let reader = &self.images[i].1;
                let len = (size as u64).min(reader.len.saturating_sub(offset)) as usize;
                let mut buf = vec![0u8; len];
                match reader.read_at(offset, &mut buf) {
                    Ok(()) => reply.data(&buf),
                    Err(e) => reply.error(io_err(e)),
                }
            }
            Some(Node::Tree(t, id)) => {
                let mut buf = vec![0u8; size as usize];
                match self.trees[t].fs.read_at(id, offset, &mut buf) {
                    Ok(n) => reply.data(&buf[..n]),
                    Err(e) => reply.error(io_err(e)),
                }
            }
            Some(Node::Root) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(node) = self.inodes.lock().unwrap().node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // (ino, kind, name) with "." and "..".
        let mut entries: Vec<(u64, FileType, Vec<u8>)> =
            vec![(ino.0, FileType::Directory, b".".to_vec()), (ROOT, FileType::Directory, b"..".to_vec())];
        match node {
            Node::Root => {
                for (name, n) in self.root_entries() {
                    let kind = if matches!(n, Node::Image(_)) { FileType::RegularFile } else { FileType::Directory };
                    let i = self.inodes.lock().unwrap().ino(n);
                    entries.push((i, kind, name.into_bytes()));
                }
            }
            Node::Image(_) => return reply.error(Errno::ENOTDIR),
            Node::Tree(t, id) => {
                let fs = &self.trees[t].fs;
                let list = match fs.read_dir(id) {
                    Ok(l) => l,
                    Err(e) => return reply.error(io_err(e)),
                };
                for e in list {
                    // Names the kernel cannot carry are left out.
                    if e.name.contains(&b'/')
                        || e.name.contains(&0)
                        || e.name.is_empty()
                        || e.name == b"."
                        || e.name == b".."
                    {
                        continue;
                    }
                    let kind = fs.stat(e.id).map(|s| file_type(s.kind)).unwrap_or(FileType::RegularFile);
                    let i = self.inodes.lock().unwrap().ino(Node::Tree(t, e.id));
                    entries.push((i, kind, e.name));
                }
            }
        }
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), (k + 1) as u64, kind, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self.images.iter().map(|(_, r)| r.len).sum();
        reply.statfs(total / 4096, 0, 0, self.inodes.lock().unwrap().nodes.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(Node::Tree(t, id)) = self.inodes.lock().unwrap().node(ino.0) else {
            return reply.error(Errno::NO_XATTR);
        };
        match self.trees[t].fs.xattrs(id) {
            Ok(x) => match x.into_iter().find(|x| x.name == name.as_bytes()) {
                Some(x) if size == 0 => reply.size(x.value.len() as u32),
                Some(x) if x.value.len() <= size as usize => reply.data(&x.value),
                Some(_) => reply.error(Errno::ERANGE),
                None => reply.error(Errno::NO_XATTR),
            },
            Err(e) => reply.error(io_err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let list = match self.inodes.lock().unwrap().node(ino.0) {
            Some(Node::Tree(t, id)) => match self.trees[t].fs.xattrs(id) {
                Ok(x) => x,
                Err(e) => return reply.error(io_err(e)),
            },
            _ => Vec::new(),
        };
        let mut buf = Vec::new();
        for x in list {
            buf.extend_from_slice(&x.name);
            buf.push(0);
        }
        if size == 0 {
            reply.size(buf.len() as u32)
        } else if buf.len() <= size as usize {
            reply.data(&buf)
        } else {
            reply.error(Errno::ERANGE)
        }
    }
}
