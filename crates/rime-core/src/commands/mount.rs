//! `rime mount`: a read-only FUSE view of a snapshot, served straight from the repository.
//!
//! ```text
//! MOUNTPOINT/
//!   <volume>               one file per backed-up volume, as large as the volume: `mount -o
//!                          loop,ro` it (any filesystem the kernel knows, XFS and btrfs
//!                          included), or `losetup -P -r` it for a whole disk
//!   <volume>.replayed      ext3/ext4 whose journal a mount would replay: the volume replayed
//!                          and marked clean, so that `mount -o loop,ro` shows what a
//!                          read-write mount would (a read-only mount cannot replay)
//!   <volume>.files/        the volume's file tree, for filesystems Rime reads (ext2/3/4, FAT,
//!                          NTFS), as a mount shows it (after journal replay)
//!   <volume>.part<N>.files/  the file tree of partition N of a whole-disk volume
//! ```
//!
//! The command runs in the foreground until the file system is unmounted: Ctrl-C (SIGINT),
//! SIGTERM or SIGHUP unmount it and exit 0, and so does `fusermount -u MOUNTPOINT` (or
//! `umount`) from outside. A mount point that does not exist, is not an empty directory, or is
//! already a mount point is refused with a one-line error.

use crate::explorer::{Explorer, Selection};
use crate::snapshot_reader::ReadStats;
use anyhow::{bail, Context, Result};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use rime_explore::{FileTree, Kind, NodeId, Stat};
use rime_repo::Repository;
use rime_volume::fs::ext4_journal::ExtVolume;
use rime_volume::Region;
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Attributes never change (the snapshot is immutable): let the kernel cache them.
const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub snapshot: String,
    pub mountpoint: PathBuf,
    pub cache_bytes: Option<u64>,
    /// Let other users read the view (FUSE `allow_other`).
    pub allow_other: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MountedVolume {
    /// File name under the mount point.
    pub image: String,
    /// ext whose journal awaits replay: a second image, replayed and marked clean.
    pub replayed_image: Option<String>,
    pub size: u64,
    /// Browsable trees: (directory name, filesystem).
    pub trees: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MountSummary {
    pub snapshot: String,
    pub mountpoint: String,
    pub volumes: Vec<MountedVolume>,
    pub seconds: f64,
    #[serde(flatten)]
    pub stats: ReadStats,
}

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
            rdev: st.rdev.map(|(ma, mi)| libc::makedev(ma, mi) as u32).unwrap_or(0),
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

/// Refuses mount points that do not exist, are not empty directories, or are mount points.
fn check_mountpoint(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("mount point {} does not exist", path.display())
        }
        _ => anyhow::anyhow!("mount point {}: {e}", path.display()),
    })?;
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", path.display());
    }
    let canonical = path.canonicalize().with_context(|| format!("mount point {}", path.display()))?;
    let parent = canonical.parent().unwrap_or(Path::new("/"));
    let busy = canonical == Path::new("/")
        || std::fs::metadata(parent).map(|p| p.dev() != meta.dev() || p.ino() == meta.ino()).unwrap_or(false)
        || std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| {
                m.lines().any(|l| {
                    l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(canonical.as_os_str().as_bytes())
                })
            })
            .unwrap_or(false);
    if busy {
        bail!("mount point {} is busy (something is already mounted there)", path.display());
    }
    if std::fs::read_dir(&canonical).with_context(|| format!("mount point {}", path.display()))?.next().is_some() {
        bail!("mount point {} is not empty", path.display());
    }
    Ok(())
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Mounts, serves until unmounted or signalled, and returns what was served. `ready` is
/// called once the view is mounted.
pub fn mount(repo: Repository, opts: &MountOptions, ready: &dyn Fn(&MountSummary)) -> Result<MountSummary> {
    let started = Instant::now();
    check_mountpoint(&opts.mountpoint)?;
    let explorer = Explorer::open(repo, &opts.snapshot, opts.cache_bytes)?;
    let manifest = explorer.manifest.clone();

    let mut images = Vec::new();
    let mut trees = Vec::new();
    let mut volumes = Vec::new();
    for v in &manifest.volumes {
        let reader = explorer.reader(v)?;
        let mut mounted =
            MountedVolume { image: v.name.clone(), replayed_image: None, size: v.size, trees: Vec::new() };
        let mut selections = vec![(format!("{}.files", v.name), Selection { volume: v.clone(), partition: None })];
        for p in &v.partitions {
            selections.push((
                format!("{}.part{}.files", v.name, p.number),
                Selection { volume: v.clone(), partition: Some(p.clone()) },
            ));
        }
        for (dir_name, sel) in selections {
            let label = sel.label();
            let opened = explorer.open_selection(sel)?;
            match rime_explore::open(&opened.region) {
                Ok(Some(fs)) => {
                    mounted.trees.push((dir_name.clone(), fs.fs_type().to_string()));
                    trees.push(Tree { dir_name, fs });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("volume {label}: its filesystem cannot be browsed: {e:#}"),
            }
        }
        let image = Region::from_source(reader, v.name.clone(), v.size);
        // An ext volume whose journal a mount would replay also appears replayed and marked
        // clean: a read-only loop mount cannot replay it, and `noload` would show it stale.
        if let Some(replayed) = ExtVolume::open(&image).ok().flatten().and_then(|e| e.replayed_image().ok().flatten()) {
            let name = format!("{}.replayed", v.name);
            mounted.replayed_image = Some(name.clone());
            images.push((name, replayed));
        }
        images.push((v.name.clone(), image));
        volumes.push(mounted);
    }

    let time = SystemTime::from(manifest.time);
    let fs = SnapshotFs {
        images,
        trees,
        inodes: Mutex::new(Inodes { nodes: vec![Node::Root], by_node: HashMap::from([(Node::Root, ROOT)]) }),
        time,
        // SAFETY: getuid/getgid have no preconditions.
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
    };

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("rime:{}", &manifest.id)),
        MountOption::Subtype("rime".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }

    // Signals are taken synchronously by this thread: block them before any thread starts so
    // the FUSE threads inherit the mask.
    // SAFETY: plain signal-set manipulation on a local sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let session = fuser::spawn_mount(fs, &opts.mountpoint, &config)
        .map_err(|e| anyhow::anyhow!("cannot mount {}: {e}", opts.mountpoint.display()))?;
    let summary = |stats| MountSummary {
        snapshot: manifest.id.clone(),
        mountpoint: opts.mountpoint.display().to_string(),
        volumes: volumes.clone(),
        seconds: started.elapsed().as_secs_f64(),
        stats,
    };
    ready(&summary(explorer.counter.stats()));

    // The session ends when the file system is unmounted (by us or by `fusermount -u`); a
    // watcher turns that into SIGUSR1 for the waiting thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = session.join();
        let _ = tx.send(r);
        // SAFETY: signals our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    });
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: valid set and out-pointer.
        let r = unsafe { libc::sigwait(&set, &mut sig) };
        if r != 0 {
            continue;
        }
        if sig == libc::SIGUSR1 {
            break;
        }
        // Ctrl-C / SIGTERM / SIGHUP: unmount; the session then ends and the watcher wakes us.
        unmount(&opts.mountpoint);
    }
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => tracing::debug!("FUSE session ended: {e}"),
    }
    Ok(summary(explorer.counter.stats()))
}

/// Unmounts the view: `umount2` as root, else `fusermount3 -u` / `fusermount -u`.
fn unmount(mountpoint: &Path) {
    if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return;
        }
        // Busy (a file is open): detach lazily, so the view disappears now and the session
        // ends when the last user lets go.
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    for tool in ["fusermount3", "fusermount"] {
        if std::process::Command::new(tool).arg("-u").arg("-z").arg(mountpoint).status().is_ok_and(|s| s.success()) {
            return;
        }
    }
}
