//! Repository locks. Backups, restores, verifies and the explorer share the lock; `forget` and
//! `prune` take it exclusively, so they never delete what a running backup is about to
//! reference.
//!
//! | holder \ wants | shared | exclusive |
//! |---|---|---|
//! | shared (backup, restore, verify, ls/extract/mount) | yes | waits, then refuses |
//! | exclusive (forget, prune) | waits, then refuses | waits, then refuses |
//!
//! Locks go through the [`Backend`](crate::backend::Backend), so each backend implements them
//! with what it can offer. Every holder is described by a lock object, `locks/<id>.json`
//! ([`LockInfo`]: mode, command, host, pid, time), so a refusal can say who holds the
//! repository. The local backend's lock itself is an `flock` on `<repo>/lock`: the kernel drops
//! it when its holder dies, so a killed process never leaves a stale lock, and its lock objects
//! are only descriptions (those of dead processes on this host are ignored and cleaned up). A
//! backend without such a kernel lock (object storage) makes the lock objects the lock, as
//! restic does: write one's own object, list the others, back off on a conflict, refresh while
//! held, and treat objects not refreshed for a long time as stale (docs/FORMAT.md, "Locks").

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// Who holds (or wants) a lock: the contents of a lock object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub mode: LockMode,
    /// The command, for messages (`backup`, `prune`, ...).
    pub command: String,
    pub host: String,
    pub pid: u32,
    pub time: chrono::DateTime<chrono::Utc>,
}

impl LockInfo {
    /// A lock of `mode` for `command` by this process.
    pub fn new(mode: LockMode, command: &str) -> LockInfo {
        LockInfo {
            mode,
            command: command.to_string(),
            host: host_name(),
            pid: std::process::id(),
            time: chrono::Utc::now(),
        }
    }

    pub fn describe(&self) -> String {
        let mode = match self.mode {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        };
        format!(
            "rime {} ({mode}) pid {} on {} since {}",
            self.command,
            self.pid,
            self.host,
            self.time.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }

    /// Whether the holder is a process on this host that no longer runs.
    pub fn is_dead_here(&self) -> bool {
        self.host == host_name() && !rime_os::process::is_alive(self.pid)
    }
}

/// This machine's name (for lock objects).
pub fn host_name() -> String {
    rime_os::process::host_name()
}

/// A held lock; dropping it releases the lock and removes its lock object.
pub struct RepoLock {
    pub info: LockInfo,
    _held: Box<dyn Send + Sync>,
}

impl RepoLock {
    /// Made by a backend: `held` releases the lock when dropped.
    pub fn new(info: LockInfo, held: Box<dyn Send + Sync>) -> RepoLock {
        RepoLock { info, _held: held }
    }
}

impl std::fmt::Debug for RepoLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoLock").field("info", &self.info).finish()
    }
}
