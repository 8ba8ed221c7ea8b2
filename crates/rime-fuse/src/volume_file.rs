//! A block export (for `rime serve`, the protected volume) as a single file under a FUSE mount:
//! `DIR/<name>`. A loop device on that file can carry a mounted filesystem; every write reaches
//! the export (the copy-on-write engine). Offsets past the export's end are clamped or refused,
//! never passed on.
//!
//! Files are opened with direct I/O: the kernel keeps no page cache of the file, so writes that
//! arrive over NBD are never hidden behind stale cached pages (the loop device's own cache
//! above it is the filesystem's cache).

use anyhow::{Context, Result};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use rime_nbd::Export;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::from_secs(1);
const FILE_INO: INodeNo = INodeNo(2);

struct VolumeFs {
    engine: Arc<dyn Export>,
    uid: u32,
    gid: u32,
    name: String,
    started: SystemTime,
}

impl VolumeFs {
    fn dir_attr(&self) -> FileAttr {
        self.attr(INodeNo::ROOT, FileType::Directory, 0, 0o755, 2)
    }
    fn file_attr(&self) -> FileAttr {
        self.attr(FILE_INO, FileType::RegularFile, self.engine.size(), 0o600, 1)
    }
    fn attr(&self, ino: INodeNo, kind: FileType, size: u64, perm: u16, nlink: u32) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == OsStr::new(&self.name) {
            reply.entry(&TTL, &self.file_attr(), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&TTL, &self.dir_attr()),
            FILE_INO => reply.attr(&TTL, &self.file_attr()),
            _ => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EPERM);
        }
        // A volume has a fixed size; other attributes are accepted and ignored.
        if size.is_some_and(|s| s != self.engine.size()) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &self.file_attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
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
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = (offset + size as u64).min(self.engine.size());
        if offset >= end {
            return reply.data(&[]);
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        match self.engine.read(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno(e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if offset + data.len() as u64 > self.engine.size() {
            return reply.error(Errno::ENOSPC);
        }
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        match self.engine.write(offset, data, sync) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.engine.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, self.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.engine.size() / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = (offset + length).min(self.engine.size());
        let length = end.saturating_sub(offset);
        let result = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            self.engine.trim(offset, length)
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            self.engine.write_zeroes(offset, length, false, false)
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            Ok(()) // every byte of a volume is allocated already
        } else {
            Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// A mounted FUSE export; unmounted when dropped.
pub struct FuseExport {
    session: Option<fuser::BackgroundSession>,
    pub file: PathBuf,
}

impl FuseExport {
    /// Mounts `dir` with one file, `name`, that is the volume.
    pub fn mount(engine: Arc<dyn Export>, dir: &Path, name: &str) -> Result<FuseExport> {
        std::fs::create_dir_all(dir).with_context(|| format!("create mount point {}", dir.display()))?;
        let (uid, gid) = rime_os::process::real_ids();
        let fs = VolumeFs { engine, uid, gid, name: name.to_string(), started: SystemTime::now() };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("rime".into()), MountOption::Subtype("rime".into())];
        config.n_threads = Some(2);
        config.clone_fd = true;
        let session =
            fuser::spawn_mount(fs, dir, &config).with_context(|| format!("FUSE mount on {}", dir.display()))?;
        Ok(FuseExport { session: Some(session), file: dir.join(name) })
    }

    pub fn unmount(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        self.unmount();
    }
}
