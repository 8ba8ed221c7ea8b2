//! File operations relative to an open directory, none of which follows a symlink: what lets a
//! restore write a tree from an untrusted image without ever writing outside its target (a
//! symlink in the image, or planted in the target meanwhile, is never traversed).

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// An open directory.
pub struct Dir(OwnedFd);

/// What is at a name, without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Nothing,
    Directory,
    Other,
}

/// A special file to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    Fifo,
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
}

/// Seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

fn spec(t: Time) -> Timespec {
    Timespec { tv_sec: t.sec, tv_nsec: t.nsec.into() }
}

impl Dir {
    /// Opens the directory `path` (following symlinks: the target itself is the caller's).
    pub fn open(path: &Path) -> std::io::Result<Dir> {
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Dir(fd))
    }

    pub fn try_clone(&self) -> std::io::Result<Dir> {
        Ok(Dir(self.0.try_clone()?))
    }

    /// The subdirectory `name`; a symlink there fails (ELOOP or ENOTDIR).
    pub fn open_dir(&self, name: &CStr) -> std::io::Result<Dir> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(Dir(rustix::fs::openat(&self.0, name, flags, Mode::empty())?))
    }

    pub fn entry(&self, name: &CStr) -> Entry {
        match rustix::fs::statat(&self.0, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(_) => Entry::Nothing,
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Entry::Directory,
            Ok(_) => Entry::Other,
        }
    }

    /// Removes a non-directory entry (a symlink itself, never its target).
    pub fn unlink(&self, name: &CStr) -> std::io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.0, name, AtFlags::empty())?)
    }

    /// Creates a directory; false if something already had the name.
    pub fn mkdir(&self, name: &CStr, mode: u32) -> std::io::Result<bool> {
        match rustix::fs::mkdirat(&self.0, name, Mode::from_raw_mode(mode)) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a new regular file; fails if anything (a file or a symlink) has the name.
    pub fn create_file(&self, name: &CStr, mode: u32) -> std::io::Result<File> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(File::from(rustix::fs::openat(&self.0, name, flags, Mode::from_raw_mode(mode))?))
    }

    /// A hard link `name` here to `from_name` in `from` (a symlink is linked, not followed).
    pub fn link(&self, from: &Dir, from_name: &CStr, name: &CStr) -> std::io::Result<()> {
        Ok(rustix::fs::linkat(&from.0, from_name, &self.0, name, AtFlags::empty())?)
    }

    pub fn symlink(&self, target: &CStr, name: &CStr) -> std::io::Result<()> {
        Ok(rustix::fs::symlinkat(target, &self.0, name)?)
    }

    pub fn mknod(&self, name: &CStr, kind: Special, mode: u32) -> std::io::Result<()> {
        let (t, dev) = match kind {
            Special::Fifo => (FileType::Fifo, 0),
            Special::CharDevice { major, minor } => (FileType::CharacterDevice, rustix::fs::makedev(major, minor)),
            Special::BlockDevice { major, minor } => (FileType::BlockDevice, rustix::fs::makedev(major, minor)),
        };
        Ok(rustix::fs::mknodat(&self.0, name, t, Mode::from_raw_mode(mode), dev)?)
    }

    /// Owner of `name` itself (not a symlink's target).
    pub fn chown(&self, name: &CStr, uid: u32, gid: u32) -> std::io::Result<()> {
        let (uid, gid) = (rustix::fs::Uid::from_raw(uid), rustix::fs::Gid::from_raw(gid));
        Ok(rustix::fs::chownat(&self.0, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// Mode of a node that is not a symlink (Linux cannot change a symlink's mode).
    pub fn chmod(&self, name: &CStr, mode: u32) -> std::io::Result<()> {
        Ok(rustix::fs::chmodat(&self.0, name, Mode::from_raw_mode(mode), AtFlags::empty())?)
    }

    /// Access and modification times of `name` itself.
    pub fn set_times(&self, name: &CStr, atime: Time, mtime: Time) -> std::io::Result<()> {
        let times = Timestamps { last_access: spec(atime), last_modification: spec(mtime) };
        Ok(rustix::fs::utimensat(&self.0, name, &times, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// An extended attribute of `name` itself (reached through this directory's descriptor in
    /// `/proc/self/fd`, never by a path that could be redirected).
    pub fn set_xattr_nofollow(&self, name: &CStr, xattr: &CStr, value: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let mut path = format!("/proc/self/fd/{}/", self.0.as_raw_fd()).into_bytes();
        path.extend_from_slice(name.to_bytes());
        let path = std::ffi::OsStr::from_bytes(&path);
        Ok(rustix::fs::lsetxattr(path, xattr, value, XattrFlags::empty())?)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Mode of an open file or directory.
pub fn set_mode(fd: impl AsFd, mode: u32) -> std::io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

/// An extended attribute of an open file or directory.
pub fn set_xattr(fd: impl AsFd, xattr: &CStr, value: &[u8]) -> std::io::Result<()> {
    Ok(rustix::fs::fsetxattr(fd, xattr, value, XattrFlags::empty())?)
}
