//! The local backend's lock: an `flock` on `<repo>/lock` (shared or exclusive), which the
//! kernel drops when its holder dies, plus a lock object in `locks/` that describes the holder
//! for others' messages. The object is a description only: writing it may fail (a read-only
//! repository) without failing the lock, and objects of dead processes on this host are
//! removed by the next locker.

use super::{Backend, LocalBackend};
use crate::error::RepoError;
use crate::lock::{LockInfo, LockMode, RepoLock};
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const LOCKS_DIR: &str = "locks";

struct Held {
    /// Removed before the flock is released (the file closes after it).
    object: Option<PathBuf>,
    _file: File,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(p) = self.object.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn lock(backend: &LocalBackend, info: &LockInfo, wait: Duration) -> Result<RepoLock, RepoError> {
    let path = backend.root().join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| RepoError::Backend(anyhow::anyhow!("open lock file {}: {e}", path.display())))?;
    let exclusive = info.mode == LockMode::Exclusive;
    let start = Instant::now();
    loop {
        match rime_os::flock::try_lock(&file, exclusive) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(RepoError::Backend(anyhow::anyhow!("lock repository: {e}"))),
        }
        if start.elapsed() >= wait {
            return Err(RepoError::Locked { wanted: info.mode, holders: holders(backend) });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    remove_dead(backend);
    let name = format!("{LOCKS_DIR}/{}.json", hex::encode(crate::id::random_bytes::<8>()));
    let object = match serde_json::to_vec_pretty(info)
        .map_err(anyhow::Error::from)
        .and_then(|b| backend.write_atomic(&name, &b))
    {
        Ok(()) => Some(backend.root().join(&name)),
        Err(e) => {
            tracing::debug!("lock object {name} not written: {e:#}");
            None
        }
    };
    Ok(RepoLock::new(info.clone(), Box::new(Held { object, _file: file })))
}

/// The lock objects of holders that may still run.
fn holders(backend: &LocalBackend) -> Vec<LockInfo> {
    objects(backend).into_iter().map(|(_, i)| i).filter(|i| !i.is_dead_here()).collect()
}

fn remove_dead(backend: &LocalBackend) {
    for (path, info) in objects(backend) {
        if info.is_dead_here() {
            let _ = backend.remove(&path);
        }
    }
}

fn objects(backend: &LocalBackend) -> Vec<(String, LockInfo)> {
    let Ok(paths) = backend.list(LOCKS_DIR) else { return Vec::new() };
    paths
        .into_iter()
        .filter(|p| p.ends_with(".json"))
        .filter_map(|p| {
            let info = serde_json::from_slice::<LockInfo>(&backend.read(&p).ok()?).ok()?;
            Some((p, info))
        })
        .collect()
}
