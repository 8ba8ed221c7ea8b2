//! The storage-native snapshot provider for several image files in one btrfs subvolume: one
//! read-only subvolume snapshot takes all of them at one instant (reflink clones of each
//! would be taken one after another). The backup reads each image inside the snapshot and names
//! the volume after the image.
//!
//! Run through `btrfs subvolume snapshot -r` and `btrfs subvolume delete` (btrfs-progs, paths
//! as arguments, never through a shell): the ioctls' argument structures are btrfs-progs'
//! own business and the tool is installed wherever btrfs is used.
//!
//! Invariants: a snapshot is named `.rime-snapshot-<pid>-<random>` at the top of the subvolume
//! it snapshots (a nested subvolume is not part of the snapshots of its parent, so it never
//! appears inside a later one); it is deleted when the backup ends, failed or not
//! ([`SubvolumeSnapshot`]'s `Drop`); one left by a killed process (its pid no longer runs) is
//! deleted by the next backup of that subvolume.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `statfs` magic of btrfs.
const BTRFS_MAGIC: u64 = 0x9123_683e;
/// The inode number of every btrfs subvolume's top directory.
const SUBVOLUME_ROOT_INODE: u64 = 256;
const MARK: &str = ".rime-snapshot-";

/// The subvolume holding `file` (its top directory), if `file` is on btrfs.
pub fn subvolume_of(file: &Path) -> Option<PathBuf> {
    let f = std::fs::File::open(file).ok()?;
    if rime_os::files::filesystem_magic(&f).ok()? != BTRFS_MAGIC {
        return None;
    }
    let file = std::fs::canonicalize(file).ok()?;
    let dev = std::fs::metadata(&file).ok()?.dev();
    // Each subvolume has its own device number; its top directory is inode 256.
    let mut dir = file.parent()?;
    loop {
        let m = std::fs::metadata(dir).ok()?;
        if m.dev() != dev {
            return None;
        }
        if m.ino() == SUBVOLUME_ROOT_INODE {
            return Some(dir.to_path_buf());
        }
        dir = dir.parent()?;
    }
}

/// A read-only snapshot of a subvolume, deleted on drop.
pub struct SubvolumeSnapshot {
    pub subvolume: PathBuf,
    pub path: PathBuf,
}

impl SubvolumeSnapshot {
    /// Where `file` (inside the subvolume) is in the snapshot.
    pub fn image(&self, file: &Path) -> Result<PathBuf> {
        let file = std::fs::canonicalize(file).with_context(|| format!("{}", file.display()))?;
        let rel = file
            .strip_prefix(&self.subvolume)
            .with_context(|| format!("{} is not in subvolume {}", file.display(), self.subvolume.display()))?;
        Ok(self.path.join(rel))
    }
}

impl Drop for SubvolumeSnapshot {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.path) {
            tracing::warn!("could not delete the btrfs snapshot {}: {e:#}", self.path.display());
        }
    }
}

fn btrfs(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("btrfs").args(args).output().context("cannot run btrfs (install btrfs-progs)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("btrfs {}: {}", args[0].to_string_lossy(), err.lines().last().unwrap_or("failed").trim());
    }
    Ok(())
}

fn delete(path: &Path) -> Result<()> {
    btrfs(&["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()])
}

/// Takes a read-only snapshot of `subvolume` (after deleting leftovers of killed backups).
pub fn take(subvolume: &Path) -> Result<SubvolumeSnapshot> {
    remove_leftovers(subvolume);
    let rand = hex::encode(rime_repo::id::random_bytes::<4>());
    let path = subvolume.join(format!("{MARK}{}-{rand}", std::process::id()));
    btrfs(&["subvolume".as_ref(), "snapshot".as_ref(), "-r".as_ref(), subvolume.as_os_str(), path.as_os_str()])
        .with_context(|| format!("read-only snapshot of btrfs subvolume {}", subvolume.display()))?;
    Ok(SubvolumeSnapshot { subvolume: subvolume.to_path_buf(), path })
}

fn remove_leftovers(subvolume: &Path) {
    let Ok(entries) = std::fs::read_dir(subvolume) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(MARK) else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !rime_os::process::is_alive(p)) {
            tracing::info!("deleting {}, left by a backup that was killed", e.path().display());
            if let Err(err) = delete(&e.path()) {
                tracing::warn!("could not delete {}: {err:#}", e.path().display());
            }
        }
    }
}
