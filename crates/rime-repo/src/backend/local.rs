//! A repository in a local directory.

use super::{Backend, ObjectReader};
use crate::error::RepoError;
use crate::lock::{LockInfo, RepoLock};
use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> LocalBackend {
        LocalBackend { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn full(&self, path: &str) -> PathBuf {
        debug_assert!(!path.starts_with('/') && !path.contains(".."), "object path {path}");
        self.root.join(path)
    }
}

/// fsyncs a directory so that a rename or unlink inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync directory {}", dir.display()))
}

struct LocalReader {
    file: File,
    path: PathBuf,
}

impl ObjectReader for LocalReader {
    fn size(&self) -> Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .with_context(|| format!("read {} bytes at {offset} from {}", buf.len(), self.path.display()))
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.full(path).exists())
    }

    fn read(&self, path: &str) -> Result<Vec<u8>> {
        let p = self.full(path);
        fs::read(&p).with_context(|| format!("read {}", p.display()))
    }

    fn open(&self, path: &str) -> Result<Box<dyn ObjectReader>> {
        let p = self.full(path);
        let file = File::open(&p).with_context(|| format!("open {}", p.display()))?;
        Ok(Box::new(LocalReader { file, path: p }))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let base = self.full(dir);
        if !base.exists() {
            return Ok(out);
        }
        let mut stack = vec![(base, dir.trim_end_matches('/').to_string())];
        while let Some((abs, rel)) = stack.pop() {
            for entry in fs::read_dir(&abs).with_context(|| format!("list {}", abs.display()))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let child_rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                if entry.file_type()?.is_dir() {
                    stack.push((entry.path(), child_rel));
                } else {
                    out.push(child_rel);
                }
            }
        }
        Ok(out)
    }

    fn write_atomic(&self, path: &str, data: &[u8]) -> Result<()> {
        let scratch = self.scratch_dir();
        fs::create_dir_all(&scratch)?;
        let tmp = scratch.join(format!("w-{}", hex::encode(crate::id::random_bytes::<8>())));
        let result = (|| {
            let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
            f.write_all(data)?;
            f.sync_all()?;
            self.put_file(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn put_file(&self, local: &Path, path: &str) -> Result<()> {
        let dest = self.full(path);
        let parent = dest.parent().expect("object paths have a parent");
        if !parent.exists() {
            fs::create_dir_all(parent)?;
            sync_dir(parent.parent().unwrap_or(&self.root))?;
        }
        fs::rename(local, &dest).with_context(|| format!("rename into {}", dest.display()))?;
        sync_dir(parent)
    }

    fn remove(&self, path: &str) -> Result<()> {
        let p = self.full(path);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }

    fn scratch_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn clean_scratch(&self) -> Result<u64> {
        let mut removed = 0;
        if let Ok(entries) = fs::read_dir(self.scratch_dir()) {
            for e in entries.flatten() {
                if fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn remove_empty_dir(&self, dir: &str) {
        let _ = fs::remove_dir(self.full(dir));
    }

    fn lock(&self, info: &LockInfo, wait: Duration) -> Result<RepoLock, RepoError> {
        super::local_lock::lock(self, info, wait)
    }
}
