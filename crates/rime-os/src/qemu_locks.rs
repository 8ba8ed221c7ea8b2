//! QEMU's image locks: how a running QEMU (and qemu-img, qemu-io, qemu-nbd) says it uses an
//! image file, and how Rime keeps it from starting to write while a backup reads.
//!
//! QEMU's file driver takes open-file-description (OFD) read locks on single bytes of the image:
//! byte 100 + *n* while it holds permission *n*, byte 200 + *n* while it refuses to share
//! permission *n* with others. Permission 1 is "write". Before taking a permission, QEMU checks
//! that nobody holds the matching "unshare" byte. So a write lock test on byte 101 finds a QEMU
//! that may write, and holding a read lock on byte 201 keeps any QEMU from getting write access
//! (it fails with `Failed to get "write" lock`) until that lock is released.

use nix::fcntl::{fcntl, FcntlArg};
use std::fs::File;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_WRITE_BIT: i64 = 1;

fn lock(kind: libc::c_int, start: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether some process holds QEMU's "write" permission lock on `image` (the pid, when the
/// kernel reports it; OFD locks report -1).
pub fn qemu_writer(image: &File) -> std::io::Result<Option<i32>> {
    let mut probe = lock(libc::F_WRLCK, PERM_BASE + PERM_WRITE_BIT);
    fcntl(image, FcntlArg::F_OFD_GETLK(&mut probe))?;
    Ok((probe.l_type != libc::F_UNLCK as libc::c_short).then_some(probe.l_pid))
}

/// Keeps QEMU from opening `image` for writing while this open file description lives (and
/// while nobody writes through QEMU already: then it fails, and the caller should not go on).
pub fn refuse_qemu_writers(image: &File) -> std::io::Result<()> {
    fcntl(image, FcntlArg::F_OFD_SETLK(&lock(libc::F_RDLCK, SHARED_BASE + PERM_WRITE_BIT)))?;
    Ok(())
}
