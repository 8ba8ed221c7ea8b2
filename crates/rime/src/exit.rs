//! Exit codes: one per kind of failure a script may act on differently (README, "Exit codes").
//! The kind is read from the typed errors in the failure's chain.

use rime_core::CommandError;
use rime_repo::RepoError;
use rime_serve::ControlError;
use rime_volume::VolumeError;

/// Anything not listed below; also `verify` finding damage.
pub const FAILURE: i32 = 1;
/// Bad arguments (clap's own code).
pub const USAGE: i32 = 2;
/// The repository is locked by another rime process: retry later.
pub const LOCKED: i32 = 3;
/// No repository, snapshot or path by that name.
pub const NOT_FOUND: i32 = 4;
/// The snapshot needed is damaged (chunks missing or corrupt).
pub const DAMAGED: i32 = 5;
/// A volume is in use and no snapshot provider can image it consistently.
pub const IN_USE: i32 = 6;
/// The snapshot provider (`rime serve`) refused or could not be reached.
pub const SNAPSHOT_FAILED: i32 = 7;

pub fn code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<RepoError>() {
            return match r {
                RepoError::Locked { .. } => LOCKED,
                RepoError::NotFound(_)
                | RepoError::NoSnapshots
                | RepoError::SnapshotNotFound(_)
                | RepoError::AmbiguousSnapshot { .. } => NOT_FOUND,
                RepoError::BadSnapshotId(_) | RepoError::NoLocation => USAGE,
                RepoError::ChunkDamaged { .. } => DAMAGED,
                _ => FAILURE,
            };
        }
        if let Some(v) = cause.downcast_ref::<VolumeError>() {
            return match v {
                VolumeError::NotFound(_) => NOT_FOUND,
                VolumeError::InUse(_) => IN_USE,
                VolumeError::NotAVolume(_) => USAGE,
                VolumeError::Unreadable { .. } => FAILURE,
            };
        }
        if let Some(c) = cause.downcast_ref::<CommandError>() {
            return match c {
                CommandError::VolumeInUse(_) => IN_USE,
                CommandError::Damaged(_) => DAMAGED,
                CommandError::PathNotFound(_) => NOT_FOUND,
            };
        }
        // A snapshot view's read failure reaches here wrapped in an I/O error.
        let io_inner = cause.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if cause.downcast_ref::<ControlError>().is_some() || io_inner.is_some_and(|e| e.is::<ControlError>()) {
            return SNAPSHOT_FAILED;
        }
    }
    FAILURE
}
