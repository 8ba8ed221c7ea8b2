//! Failures of commands that callers tell apart (the CLI gives each its own exit code).
//! Repository failures are `rime_repo::RepoError`; these are the commands' own.

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A volume is in use (mounted, claimed, open for writing) and cannot be imaged
    /// consistently without a snapshot provider.
    #[error("{0}")]
    VolumeInUse(String),
    /// A snapshot is damaged: chunks missing from the repository or corrupt.
    #[error("{0}")]
    Damaged(String),
    /// A path named inside a snapshot does not exist.
    #[error("{0}")]
    PathNotFound(String),
    /// A before-snapshot hook failed or timed out: the backup was aborted (after-snapshot and
    /// after-backup hooks still ran).
    #[error("{0}; the backup was aborted before the snapshot")]
    HookFailed(String),
    /// Writes reached a protected volume while its writers were frozen.
    #[error("{0}")]
    WritesNotSuspended(String),
    /// A snapshot provider failed, or the volumes could not be held at one instant.
    #[error("{0}")]
    SnapshotFailed(String),
    /// A writer's data is only partly on the backup's volumes (a database's data directory
    /// without its WAL volume): nothing was frozen or read.
    #[error("{0}")]
    WriterSplit(String),
    /// libvirt could not be reached, or a VM could not be stopped, started, defined or
    /// restored; every VM Rime stopped was started again.
    #[error("{0}")]
    Vm(String),
    /// A VM restore was refused before anything was written (files missing from the
    /// snapshot, a domain or file in the way).
    #[error("{0}")]
    VmRefused(String),
}

/// Exit codes: one per kind of failure a script (or a hook's `RIME_ERROR`) may act on.
pub mod codes {
    /// Anything not listed below; also `verify` finding damage.
    pub const FAILURE: i32 = 1;
    /// Bad arguments.
    pub const USAGE: i32 = 2;
    /// The repository is locked by another rime process.
    pub const LOCKED: i32 = 3;
    /// No repository, snapshot, volume or path by that name.
    pub const NOT_FOUND: i32 = 4;
    /// The snapshot needed is damaged.
    pub const DAMAGED: i32 = 5;
    /// A volume is in use and no snapshot provider can image it consistently.
    pub const IN_USE: i32 = 6;
    /// The snapshot provider refused, failed or could not be reached.
    pub const SNAPSHOT_FAILED: i32 = 7;
    /// A before-snapshot hook or a writer's freeze failed or timed out.
    pub const HOOK_FAILED: i32 = 8;
    /// A writer's data is only partly on the backup's volumes.
    pub const WRITER_SPLIT: i32 = 9;
    /// libvirt could not be reached, or a VM could not be stopped or started again in time.
    pub const VM_FAILED: i32 = 10;
    /// A VM restore was refused before anything was written.
    pub const VM_REFUSED: i32 = 11;
}

/// The exit code for `e`, read from the typed errors in its chain.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    use codes::*;
    use rime_repo::RepoError;
    use rime_serve::ControlError;
    use rime_volume::VolumeError;
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
                VolumeError::InUse(_) | VolumeError::RemoteFilesystem { .. } => IN_USE,
                VolumeError::NotAVolume(_) => USAGE,
                VolumeError::Unreadable { .. } => FAILURE,
            };
        }
        if let Some(c) = cause.downcast_ref::<CommandError>() {
            return match c {
                CommandError::VolumeInUse(_) => IN_USE,
                CommandError::Damaged(_) => DAMAGED,
                CommandError::PathNotFound(_) => NOT_FOUND,
                CommandError::HookFailed(_) => HOOK_FAILED,
                CommandError::WriterSplit(_) => WRITER_SPLIT,
                CommandError::WritesNotSuspended(_) | CommandError::SnapshotFailed(_) => SNAPSHOT_FAILED,
                CommandError::Vm(_) => VM_FAILED,
                CommandError::VmRefused(_) => VM_REFUSED,
            };
        }
        if let Some(v) = cause.downcast_ref::<rime_virt::VirtError>() {
            return match v {
                rime_virt::VirtError::NoDomain(_) => NOT_FOUND,
                _ => VM_FAILED,
            };
        }
        if let Some(n) = cause.downcast_ref::<crate::places::NameError>() {
            return match n {
                crate::places::NameError::NotAMountPoint(_) | crate::places::NameError::NotOnAVolume { .. } => USAGE,
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
