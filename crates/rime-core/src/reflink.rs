//! The storage-native snapshot provider for image files: a reflink copy (FICLONE) next to the
//! image, on XFS (reflink) or btrfs. The clone is taken in one system call, shares the image's
//! blocks, and is a point-in-time copy even while a VM writes the image; the backup reads the
//! clone and names the volume after the image.
//!
//! Invariants: a clone is named `.<image name>.rime-clone-<pid>-<random>` in the image's own
//! folder (the same filesystem, or FICLONE cannot work); it is removed when the backup ends,
//! failed or not ([`Clone`]'s `Drop`); a clone left by a process that was killed (its pid no
//! longer runs) is removed by the next backup of that image.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

const MARK: &str = ".rime-clone-";

/// A reflink clone of an image file, removed on drop.
pub struct Clone {
    pub path: PathBuf,
}

impl Drop for Clone {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Clones `image`; `Ok(None)` when its filesystem cannot (not XFS/btrfs, or reflink off).
pub fn clone(image: &Path) -> Result<Option<Clone>> {
    let dir = image.parent().unwrap_or(Path::new("."));
    let name = image.file_name().context("an image file has a name")?.to_string_lossy().into_owned();
    remove_leftovers(dir, &name);
    let rand = hex::encode(rime_repo::id::random_bytes::<4>());
    let path = dir.join(format!(".{name}{MARK}{}-{rand}", std::process::id()));
    let src = std::fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("create the clone {}", path.display()))?;
    let clone = Clone { path };
    match rime_os::files::reflink(&src, &dst) {
        Ok(()) => Ok(Some(clone)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL)) => {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("reflink clone of {}", image.display())),
    }
}

/// Removes clones of `name` in `dir` left by processes that no longer run.
fn remove_leftovers(dir: &Path, name: &str) {
    let prefix = format!(".{name}{MARK}");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !rime_os::process::is_alive(p)) {
            tracing::info!("removing {}, left by a backup that was killed", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}
