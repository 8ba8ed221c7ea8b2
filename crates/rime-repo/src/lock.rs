//! Repository locks. Backups, restores and verifies share the lock; `forget` and `prune` take it
//! exclusively, so they never delete what a running backup is about to reference. The lock is an
//! `flock` on `<repo>/lock`: the kernel drops it when its holder dies, so a killed process never
//! leaves a stale lock behind.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

#[derive(Debug)]
pub struct RepoLock {
    _file: File,
}

impl RepoLock {
    /// Takes the lock, waiting up to `wait` for a conflicting holder to finish.
    pub fn acquire(path: &Path, mode: LockMode, wait: Duration) -> Result<RepoLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("open lock file {}", path.display()))?;
        let op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        } | libc::LOCK_NB;
        let start = Instant::now();
        loop {
            // SAFETY: flock on a valid, owned file descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(RepoLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).context("lock repository");
            }
            if start.elapsed() >= wait {
                let what = match mode {
                    LockMode::Shared => "a forget or prune is running",
                    LockMode::Exclusive => "another rime process is using it",
                };
                bail!("repository is locked: {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
