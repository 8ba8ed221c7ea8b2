//! Opening, creating and navigating a repository.

use crate::backend::{Backend, LocalBackend};
use crate::config::{RepoConfig, DEFAULT_PACK_SIZE};
use crate::error::RepoError;
use crate::id::SnapshotId;
use crate::index::{BadIndex, ChunkIndex};
use crate::lock::{LockInfo, LockMode, RepoLock};
use crate::snapshot::Manifest;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const CONFIG_PATH: &str = "config.json";

#[derive(Clone)]
pub struct Repository {
    pub backend: Arc<dyn Backend>,
    pub config: RepoConfig,
}

fn local_root(location: &str) -> Result<PathBuf, RepoError> {
    if location.is_empty() {
        return Err(RepoError::NoLocation);
    }
    if let Some((scheme, _)) = location.split_once("://") {
        return Err(RepoError::UnsupportedBackend(format!("{scheme}:// ({location})")));
    }
    Ok(PathBuf::from(location))
}

/// A manifest that could not be read: (path, reason).
pub type UnreadableManifest = (String, String);

impl Repository {
    /// Creates a new repository; refuses a location that already holds anything.
    pub fn init(location: &str, chunk_size: u32) -> Result<Repository, RepoError> {
        let root = local_root(location)?;
        if root.join(CONFIG_PATH).exists() {
            return Err(RepoError::AlreadyExists(location.into()));
        }
        if root.exists() && std::fs::read_dir(&root).with_context(|| format!("read {location}"))?.next().is_some() {
            return Err(RepoError::NotEmpty(location.into()));
        }
        let config = RepoConfig {
            format_version: crate::FORMAT_VERSION,
            id: hex::encode(crate::id::random_bytes::<16>()),
            chunk_size,
            pack_size: DEFAULT_PACK_SIZE,
            created: chrono::Utc::now(),
        };
        config.validate().map_err(|e| RepoError::BadConfig(format!("{e:#}")))?;
        std::fs::create_dir_all(&root).with_context(|| format!("create {location}"))?;
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&root));
        for dir in ["packs", "index", "snapshots", "volumes", "tmp", crate::backend::LOCKS_DIR] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        backend.write_atomic(CONFIG_PATH, &serde_json::to_vec_pretty(&config).map_err(anyhow::Error::from)?)?;
        Ok(Repository { backend, config })
    }

    pub fn open(location: &str) -> Result<Repository, RepoError> {
        let root = local_root(location)?;
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&root));
        if !backend.exists(CONFIG_PATH)? {
            return Err(RepoError::NotFound(location.into()));
        }
        let config: RepoConfig = serde_json::from_slice(&backend.read(CONFIG_PATH)?)
            .map_err(|e| RepoError::BadConfig(format!("{location}/{CONFIG_PATH} is damaged: {e}")))?;
        config.validate().map_err(|e| RepoError::BadConfig(format!("{e:#}")))?;
        Ok(Repository { backend, config })
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// Takes the repository lock for `command` (see [`crate::lock`]).
    pub fn lock(&self, mode: LockMode, command: &str, wait: Duration) -> Result<RepoLock, RepoError> {
        self.backend.lock(&LockInfo::new(mode, command), wait)
    }

    pub fn load_index(&self) -> Result<(ChunkIndex, Vec<BadIndex>)> {
        ChunkIndex::load(self.backend.as_ref())
    }

    /// One chunk's bytes, read from its pack and checked against its id.
    pub fn read_chunk(&self, index: &ChunkIndex, id: &crate::ChunkId) -> Result<Vec<u8>> {
        let loc = index.get(id).with_context(|| format!("chunk {id} is missing from the repository"))?;
        let reader = self.backend.open(&crate::pack::pack_path(&index.pack_id(loc)))?;
        crate::pack::read_blob(reader.as_ref(), &loc.entry(*id))
    }

    /// All readable manifests, oldest first, and the paths of unreadable ones with the reason.
    pub fn manifests(&self) -> Result<(Vec<Manifest>, Vec<UnreadableManifest>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for path in self.backend.list("snapshots")? {
            if !path.ends_with(".json") {
                continue;
            }
            match self
                .backend
                .read(&path)
                .and_then(|b| serde_json::from_slice::<Manifest>(&b).map_err(anyhow::Error::from))
            {
                Ok(m) if format!("snapshots/{}.json", m.id) == path => good.push(m),
                Ok(_) => bad.push((path, "manifest id does not match its file name".to_string())),
                Err(e) => bad.push((path, format!("{e:#}"))),
            }
        }
        good.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
        Ok((good, bad))
    }

    /// Resolves `latest`, a full id or a unique id prefix to a manifest.
    pub fn resolve(&self, spec: &str) -> Result<Manifest, RepoError> {
        let (all, _) = self.manifests()?;
        if spec == "latest" {
            return all.into_iter().last().ok_or(RepoError::NoSnapshots);
        }
        if spec.is_empty() || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RepoError::BadSnapshotId(spec.into()));
        }
        let spec_lower = spec.to_ascii_lowercase();
        let mut matches: Vec<Manifest> = all.into_iter().filter(|m| m.id.starts_with(&spec_lower)).collect();
        match matches.len() {
            0 => Err(RepoError::SnapshotNotFound(spec.into())),
            1 => Ok(matches.remove(0)),
            count => Err(RepoError::AmbiguousSnapshot { spec: spec.into(), count }),
        }
    }

    pub fn save_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = Manifest::path(&manifest.snapshot_id());
        self.backend.write_atomic(&path, &serde_json::to_vec_pretty(manifest)?)
    }

    /// Removes a snapshot: the manifest first (the snapshot is gone from then on), then its
    /// volume indexes (a crash in between leaves orphans that `prune` removes).
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.backend.remove(&Manifest::path(id))?;
        for path in self.backend.list(&format!("volumes/{id}"))? {
            self.backend.remove(&path)?;
        }
        self.backend.remove_empty_dir(&format!("volumes/{id}"));
        Ok(())
    }
}
