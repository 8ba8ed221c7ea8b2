//! Writers: what holds data on a backup's volumes and can be held still for the snapshot.
//!
//! `fsfreeze`, for every filesystem mounted from the volumes (directly, or through a loop
//! device on the image file or on `rime serve`'s FUSE file). Freezing flushes the filesystem and
//! blocks new writes (FIFREEZE); thawing lets them go (FITHAW); both by ioctl
//! ([`rime_os::freeze`]). A frozen filesystem is always thawed: explicitly after the snapshot,
//! and by `Drop` on any other path (an error, a panic), so a backup never leaves one frozen.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a freeze (the filesystem's flush) may take.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// A mounted filesystem on one of the backup's volumes.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FsFreezeWriter {
    /// The volume (as named) whose data it holds.
    pub volume: String,
    /// The block device it is mounted from.
    pub device: PathBuf,
    pub mount_point: PathBuf,
    pub filesystem: String,
    #[serde(skip)]
    frozen: bool,
    /// Held still by the last freeze (by us, or by whoever froze it before).
    #[serde(skip)]
    held: bool,
}

impl FsFreezeWriter {
    pub fn name(&self) -> String {
        format!("fsfreeze {}", self.mount_point.display())
    }

    /// Freezes the filesystem, waiting at most [`FREEZE_TIMEOUT`] for its flush. One that is
    /// frozen already (by an administrator, or a hook) stays as it is: it is held still, but not
    /// ours to thaw. A freeze that finishes after the timeout is thawed at once by the thread
    /// that waited for it, so a slow flush never leaves the filesystem frozen.
    pub fn freeze(&mut self) -> Result<(), String> {
        use rime_os::freeze::Frozen;
        use std::sync::{Arc, Condvar, Mutex};
        /// The flush's outcome, or that the caller stopped waiting; one lock decides which
        /// side thaws a freeze that ends late.
        #[derive(Default)]
        struct Waiting {
            done: Option<std::io::Result<Frozen>>,
            abandoned: bool,
        }
        let shared = Arc::new((Mutex::new(Waiting::default()), Condvar::new()));
        let (mount_point, theirs) = (self.mount_point.clone(), shared.clone());
        std::thread::spawn(move || {
            let result = rime_os::freeze::freeze(&mount_point);
            let mut w = theirs.0.lock().unwrap();
            if w.abandoned {
                if matches!(result, Ok(Frozen::Now)) {
                    let _ = rime_os::freeze::thaw(&mount_point);
                }
            } else {
                w.done = Some(result);
                theirs.1.notify_all();
            }
        });
        let (lock, cv) = &*shared;
        let (mut w, _) = cv.wait_timeout_while(lock.lock().unwrap(), FREEZE_TIMEOUT, |w| w.done.is_none()).unwrap();
        let Some(result) = w.done.take() else {
            w.abandoned = true;
            return Err(format!(
                "{}: the filesystem did not flush within {} s (it is thawed when the flush ends)",
                self.name(),
                FREEZE_TIMEOUT.as_secs()
            ));
        };
        match result {
            Ok(Frozen::Now) => {
                self.frozen = true;
                self.held = true;
                Ok(())
            }
            Ok(Frozen::Already) => {
                self.held = true;
                tracing::info!("{} is frozen already; left for its owner to thaw", self.mount_point.display());
                Ok(())
            }
            Err(e) => Err(format!("{}: {e}", self.name())),
        }
    }

    /// Frozen by this writer and not thawed yet (one frozen by someone else is theirs).
    pub fn frozen_here(&self) -> bool {
        self.frozen
    }

    /// The last freeze held it still (its thaw does not change that record).
    pub fn was_held(&self) -> bool {
        self.held
    }

    pub fn thaw(&mut self) -> Result<(), String> {
        if !self.frozen {
            return Ok(());
        }
        self.frozen = false;
        rime_os::freeze::thaw(&self.mount_point).map_err(|e| format!("thawing {}: {e}", self.mount_point.display()))
    }
}

impl Drop for FsFreezeWriter {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            tracing::warn!("{e}");
        }
    }
}

/// The filesystems mounted from `devices` (each tagged with the volume it belongs to).
pub fn fsfreeze_writers(devices: &[(String, PathBuf)]) -> Vec<FsFreezeWriter> {
    let mut out = Vec::new();
    for (volume, device) in devices {
        for (mount_point, filesystem) in rime_os::mounts::mounts_of_device(device) {
            if out.iter().any(|w: &FsFreezeWriter| w.mount_point == mount_point) {
                continue;
            }
            out.push(FsFreezeWriter {
                volume: volume.clone(),
                device: device.clone(),
                mount_point,
                filesystem,
                frozen: false,
                held: false,
            });
        }
    }
    out
}

/// The block devices that carry `file`'s data: the file itself when it is a block device, and
/// every loop device backed by it.
pub fn devices_of(file: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = Vec::new();
    if std::fs::metadata(file).is_ok_and(|m| m.file_type().is_block_device()) {
        out.push(file.to_path_buf());
    }
    out.extend(rime_os::mounts::loop_devices_backed_by(file));
    out
}
