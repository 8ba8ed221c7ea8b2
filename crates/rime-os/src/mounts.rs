//! Mount points: refusing ones a FUSE view must not cover, and unmounting.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountPointError {
    #[error("mount point {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("mount point {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("mount point {} is busy (something is already mounted there)", .0.display())]
    Busy(PathBuf),
    #[error("mount point {} is not empty", .0.display())]
    NotEmpty(PathBuf),
    #[error("mount point {}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Refuses mount points that do not exist, are not empty directories, or are mount points.
pub fn check_mountpoint(path: &Path) -> Result<(), MountPointError> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => MountPointError::Missing(path.to_path_buf()),
        _ => MountPointError::Io { path: path.to_path_buf(), source: e },
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        return Err(MountPointError::NotADirectory(path.to_path_buf()));
    }
    let canonical = path.canonicalize().map_err(io)?;
    let parent = canonical.parent().unwrap_or(Path::new("/"));
    let busy = canonical == Path::new("/")
        || std::fs::metadata(parent).map(|p| p.dev() != meta.dev() || p.ino() == meta.ino()).unwrap_or(false)
        || is_mount_point(&canonical);
    if busy {
        return Err(MountPointError::Busy(path.to_path_buf()));
    }
    if std::fs::read_dir(&canonical).map_err(io)?.next().is_some() {
        return Err(MountPointError::NotEmpty(path.to_path_buf()));
    }
    Ok(())
}

/// `canonical` is listed in `/proc/self/mountinfo`.
fn is_mount_point(canonical: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines().any(|l| {
                l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(canonical.as_os_str().as_bytes())
            })
        })
        .unwrap_or(false)
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

/// One line of `/proc/self/mountinfo`, unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// The directory of the filesystem that is mounted there (`/` unless a bind mount).
    pub root: PathBuf,
    pub fstype: String,
    /// The mounted device (`/dev/loop3`), or the filesystem's own word (`tmpfs`, `server:/x`).
    pub source: String,
}

impl MountEntry {
    /// `path` (under this mount point) as a path inside the mounted filesystem.
    pub fn path_inside(&self, path: &Path) -> Option<PathBuf> {
        let rest = path.strip_prefix(&self.mount_point).ok()?;
        Some(if rest.as_os_str().is_empty() { self.root.clone() } else { self.root.join(rest) })
    }
}

/// Every mount, in the order the kernel lists them.
pub fn mount_table() -> Vec<MountEntry> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let path = |s: &str| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(s)));
    info.lines()
        .filter_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
            let mut fields = line.split(' ');
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            let mut rest = line.split(" - ").nth(1)?.split(' ');
            let (fstype, source) = (rest.next()?, rest.next()?);
            Some(MountEntry {
                mount_point: path(mount_point),
                root: path(root),
                fstype: fstype.to_string(),
                source: String::from_utf8_lossy(&unescape_mountinfo(source)).into_owned(),
            })
        })
        .collect()
}

/// The filesystem type (`ext4`, `nfs4`, `fuse.sshfs`, ...) of the mount that holds `path`.
pub fn filesystem_type_of(path: &Path) -> Option<String> {
    mount_entry_of(path).map(|m| m.fstype)
}

/// The mount point of the mount that holds `path`.
pub fn mount_point_of(path: &Path) -> Option<PathBuf> {
    mount_entry_of(path).map(|m| m.mount_point)
}

/// The mount that holds `path`: the longest mount point that is a prefix of its canonical path
/// (the last one listed when a mount point is mounted over).
pub fn mount_entry_of(path: &Path) -> Option<MountEntry> {
    let canonical = path.canonicalize().ok()?;
    let mut best: Option<MountEntry> = None;
    for m in mount_table() {
        let longer = best.as_ref().is_none_or(|b| m.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len());
        if canonical.starts_with(&m.mount_point) && longer {
            best = Some(m);
        }
    }
    best
}

/// The mounts of block device `device`: (mount point, filesystem type), from
/// `/proc/self/mountinfo`.
pub fn mounts_of_device(device: &Path) -> Vec<(PathBuf, String)> {
    let Ok(canonical) = device.canonicalize() else { return Vec::new() };
    mount_table()
        .into_iter()
        .filter(|m| Path::new(&m.source).canonicalize().is_ok_and(|s| s == canonical))
        .map(|m| (m.mount_point, m.fstype))
        .collect()
}

/// The loop devices whose backing file is `file`.
pub fn loop_devices_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(canonical) = file.canonicalize() else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file")).is_ok_and(|b| Path::new(b.trim()) == canonical)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}

/// Unmounts a FUSE view: `umount2` as root (lazily if it is busy, so the view disappears now and
/// its session ends when the last user lets go), else `fusermount3 -u -z` / `fusermount -u -z`.
pub fn unmount(mountpoint: &Path) {
    use rustix::mount::{unmount, UnmountFlags};
    if unmount(mountpoint, UnmountFlags::empty()).is_ok() || unmount(mountpoint, UnmountFlags::DETACH).is_ok() {
        return;
    }
    for tool in ["fusermount3", "fusermount"] {
        if std::process::Command::new(tool).arg("-u").arg("-z").arg(mountpoint).status().is_ok_and(|s| s.success()) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(super::unescape_mountinfo(r"/mnt/a\040b\134c"), b"/mnt/a b\\c");
        assert_eq!(super::unescape_mountinfo(r"/x\04"), b"/x\\04");
    }
}
