//! Writers: what holds data on a backup's volumes and can be held still for the snapshot.
//!
//! Built in so far: `fsfreeze`, for every filesystem mounted from the volumes (directly, or
//! through a loop device on the image file or on `rime serve`'s FUSE file). Freezing flushes
//! the filesystem and blocks new writes (FIFREEZE); thawing lets them go (FITHAW). A frozen
//! filesystem is always thawed: explicitly after the snapshot, and by `Drop` on any other path
//! (an error, a panic), so a backup never leaves one frozen.

use crate::hooks::{run_hook, Hook, HookCommand, HookContext, HookError, Stage};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a freeze or thaw may take.
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
}

impl FsFreezeWriter {
    pub fn name(&self) -> String {
        format!("fsfreeze {}", self.mount_point.display())
    }

    fn fsfreeze(&self, flag: &str) -> Result<(), HookError> {
        // The C locale keeps fsfreeze's messages (read below) stable.
        let mut argv: Vec<String> = ["env", "LC_ALL=C", "fsfreeze", flag].into_iter().map(String::from).collect();
        argv.push(self.mount_point.display().to_string());
        let hook = Hook { command: HookCommand::Argv(argv), timeout: FREEZE_TIMEOUT };
        let stage = if flag == "--freeze" { Stage::BeforeSnapshot } else { Stage::AfterSnapshot };
        run_hook(&hook, stage, &HookContext::default())
    }

    /// Freezes the filesystem. One that is frozen already (by an administrator, or a hook) stays
    /// as it is: it is held still, but not ours to thaw.
    pub fn freeze(&mut self) -> Result<(), HookError> {
        match self.fsfreeze("--freeze") {
            Ok(()) => {
                self.frozen = true;
                Ok(())
            }
            Err(HookError::Failed { tail, .. }) if tail.iter().any(|l| l.contains("Device or resource busy")) => {
                tracing::info!("{} is frozen already; left for its owner to thaw", self.mount_point.display());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub fn thaw(&mut self) -> Result<(), HookError> {
        if !self.frozen {
            return Ok(());
        }
        self.frozen = false;
        self.fsfreeze("--unfreeze")
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
