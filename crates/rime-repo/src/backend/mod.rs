//! Where repository objects live. Objects are named by relative paths with `/` separators
//! (`packs/ab/<id>.pack`, `snapshots/<id>.json`, ...). Writes are all-or-nothing: an object is
//! either absent or complete, never partial, whatever happens to the writer.

mod local;
mod local_lock;

pub use local::LocalBackend;
pub use local_lock::LOCKS_DIR;

use crate::error::RepoError;
use crate::lock::{LockInfo, RepoLock};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Random access to one stored object.
pub trait ObjectReader: Send {
    fn size(&self) -> Result<u64>;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn location(&self) -> String;
    fn exists(&self, path: &str) -> Result<bool>;
    fn read(&self, path: &str) -> Result<Vec<u8>>;
    fn open(&self, path: &str) -> Result<Box<dyn ObjectReader>>;
    /// Relative paths of all objects below `dir`, in no particular order.
    fn list(&self, dir: &str) -> Result<Vec<String>>;
    /// Stores `data` at `path` atomically and durably.
    fn write_atomic(&self, path: &str, data: &[u8]) -> Result<()>;
    /// Moves a finished, fsynced local file (made in `scratch_dir`) to `path` atomically.
    fn put_file(&self, local: &Path, path: &str) -> Result<()>;
    fn remove(&self, path: &str) -> Result<()>;
    /// A local folder for building objects before `put_file`; on the same filesystem as the
    /// repository when the repository is local, so `put_file` is a rename.
    fn scratch_dir(&self) -> PathBuf;
    /// Removes leftovers of interrupted writers from the scratch folder; returns how many.
    /// Call only while holding the exclusive lock.
    fn clean_scratch(&self) -> Result<u64>;
    /// Removes the folder `dir` if it is empty (nothing on backends without folders).
    fn remove_empty_dir(&self, dir: &str);
    /// Takes the repository lock described by `info`, waiting up to `wait` for conflicting
    /// holders (see [`crate::lock`] for the rules).
    fn lock(&self, info: &LockInfo, wait: Duration) -> Result<RepoLock, RepoError>;
}
