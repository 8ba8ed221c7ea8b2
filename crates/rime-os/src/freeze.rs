//! Freezing a mounted filesystem (FIFREEZE: flush, then block new writes) and thawing it
//! (FITHAW), by ioctl on its mount point rather than by running `fsfreeze`: a process per
//! filesystem and stage cost milliseconds inside the freeze window.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// What a freeze found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frozen {
    /// Frozen by this call: the caller must thaw it.
    Now,
    /// Someone else froze it before (EBUSY): held still, but not the caller's to thaw.
    Already,
}

#[allow(unsafe_code)]
fn ioctl(mount_point: &Path, request: libc::c_ulong) -> std::io::Result<()> {
    let dir = File::open(mount_point)?;
    // SAFETY: FIFREEZE and FITHAW take no argument (the kernel ignores the third one); the
    // descriptor is owned by `dir`, which outlives the call.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Freezes the filesystem mounted at `mount_point` (it returns once the filesystem is flushed).
pub fn freeze(mount_point: &Path) -> std::io::Result<Frozen> {
    match ioctl(mount_point, FIFREEZE) {
        Ok(()) => Ok(Frozen::Now),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(Frozen::Already),
        Err(e) => Err(e),
    }
}

/// Thaws the filesystem mounted at `mount_point`.
pub fn thaw(mount_point: &Path) -> std::io::Result<()> {
    ioctl(mount_point, FITHAW)
}
