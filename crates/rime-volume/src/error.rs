//! Why a volume cannot be opened, in kinds a caller can tell apart (the CLI gives "not found"
//! and "in use" their own exit codes). Filesystems that cannot be trusted as they stand are
//! [`crate::fs::Untrusted`]; damage inside a filesystem stays a plain error with its context.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("{} is neither a block device nor a regular file", .0.display())]
    NotAVolume(PathBuf),
    #[error("volume {} is in use (mounted or claimed by another program)", .0.display())]
    InUse(PathBuf),
    #[error(
        "{} is on a network filesystem ({fs}): its writers may be on other hosts, which no lock or snapshot here can see; back it up on the host that serves it",
        .path.display()
    )]
    RemoteFilesystem { path: PathBuf, fs: String },
    #[error("cannot open volume {}: {source}", .path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
}
