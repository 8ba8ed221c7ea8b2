//! Advisory whole-file locks (`flock`), which the kernel drops when the holder dies.

use std::fs::File;

/// Tries to take a shared or exclusive lock on `file` without waiting; false if another holder
/// conflicts.
pub fn try_lock(file: &File, exclusive: bool) -> std::io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    let op = if exclusive { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
    match flock(file, op) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
