//! Operations on open files and block devices that `std` does not offer.

use std::fs::File;

/// Makes `[offset, offset + len)` of a regular file a hole (reads as zeros; the size stays).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    Ok(fallocate(file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)?)
}

/// Zeroes `[offset, offset + len)` of a block device with `BLKZEROOUT` (the device may TRIM
/// instead). Offset and length must be multiples of 512.
#[allow(unsafe_code)]
pub fn zero_out_device(device: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    /// `_IO(0x12, 127)`.
    const BLKZEROOUT: libc::c_ulong = 0x127F;
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads a [u64; 2] from the pointer, which is valid for the call; the
    // descriptor is owned by `device`, borrowed for the call.
    let r = unsafe { libc::ioctl(device.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Tells the kernel reads of `file` will be scattered (no read-ahead).
pub fn advise_random(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random);
}

/// The filesystem magic number (`statfs(2)`'s `f_type`) of the filesystem holding `file`.
pub fn filesystem_magic(file: &File) -> std::io::Result<u64> {
    Ok(rustix::fs::fstatfs(file)?.f_type as u64)
}

/// Makes `dst` a copy of `src` that shares its blocks (FICLONE): instant, and a point-in-time
/// copy, on filesystems that support it (XFS with reflink, btrfs). Fails elsewhere.
pub fn reflink(src: &File, dst: &File) -> std::io::Result<()> {
    Ok(rustix::fs::ioctl_ficlone(dst, src)?)
}
