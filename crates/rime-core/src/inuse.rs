//! Is a volume in use? Decides between an offline read and the need for a snapshot.
//!
//! A block device is in use when the kernel refuses an exclusive open (mounted, a loop or
//! device-mapper holder, a RAID member). An image file is in use when a QEMU holds its write
//! lock (QEMU's own image locks, which work across containers), when a loop device backed by it
//! is claimed, or when any process holds it open for writing (a running VM, say).

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    Idle,
    InUse(String),
}

pub fn check(path: &Path) -> Usage {
    let Ok(meta) = std::fs::metadata(path) else {
        return Usage::Idle;
    };
    if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        return match device_claimed(path) {
            true => Usage::InUse(format!("{} is mounted or claimed", path.display())),
            false => Usage::Idle,
        };
    }
    if meta.is_file() {
        if let Ok(Some(pid)) = std::fs::File::open(path).and_then(|f| rime_os::qemu_locks::qemu_writer(&f)) {
            let who = if pid > 0 { format!(" (process {pid})") } else { String::new() };
            return Usage::InUse(format!(
                "{} is open for writing by QEMU{who}: it holds the image's write lock",
                path.display()
            ));
        }
    }
    for loopdev in rime_os::mounts::loop_devices_backed_by(path) {
        if device_claimed(&loopdev) {
            let dev = loopdev.display();
            return Usage::InUse(format!("{} is attached to {dev}, which is mounted or claimed", path.display()));
        }
    }
    if let Some(pid) = writer_of(meta.dev(), meta.ino()) {
        return Usage::InUse(format!("{} is open for writing by process {pid}", path.display()));
    }
    Usage::Idle
}

fn device_claimed(dev: &Path) -> bool {
    match OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// The first process (other than this one) holding the file open with write access.
fn writer_of(dev: u64, ino: u64) -> Option<u32> {
    let me = std::process::id();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(m) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if m.dev() != dev || m.ino() != ino {
                continue;
            }
            let info = proc_entry.path().join("fdinfo").join(fd.file_name());
            let flags = std::fs::read_to_string(info).ok().and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("flags:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            });
            if flags.is_some_and(|f| f & (libc::O_WRONLY | libc::O_RDWR) as u32 != 0) {
                return Some(pid);
            }
        }
    }
    None
}
