//! Opening, creating and navigating a repository.

use crate::backend::{Backend, LocalBackend};
use crate::config::{RepoConfig, DEFAULT_PACK_SIZE};
use crate::id::SnapshotId;
use crate::index::{BadIndex, ChunkIndex};
use crate::lock::{LockMode, RepoLock};
use crate::snapshot::Manifest;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const CONFIG_PATH: &str = "config.json";

pub struct Repository {
    pub backend: Arc<dyn Backend>,
    pub config: RepoConfig,
    root: PathBuf,
}

fn local_root(location: &str) -> Result<PathBuf> {
    if location.is_empty() {
        bail!("no repository given: use --repo LOCATION or set RIME_REPO");
    }
    if location.starts_with("s3://") {
        bail!("S3 repositories are not supported by this build yet: {location}");
    }
    Ok(PathBuf::from(location))
}

/// A manifest that could not be read: (path, reason).
pub type UnreadableManifest = (String, String);

impl Repository {
    /// Creates a new repository; refuses a location that already holds anything.
    pub fn init(location: &str, chunk_size: u32) -> Result<Repository> {
        let root = local_root(location)?;
        if root.join(CONFIG_PATH).exists() {
            bail!("a repository already exists at {location}");
        }
        if root.exists() && std::fs::read_dir(&root).with_context(|| format!("read {location}"))?.next().is_some() {
            bail!("{location} is not empty; refusing to create a repository there");
        }
        let config = RepoConfig {
            format_version: crate::FORMAT_VERSION,
            id: hex::encode(crate::id::random_bytes::<16>()),
            chunk_size,
            pack_size: DEFAULT_PACK_SIZE,
            created: chrono::Utc::now(),
        };
        config.validate()?;
        std::fs::create_dir_all(&root).with_context(|| format!("create {location}"))?;
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&root));
        for dir in ["packs", "index", "snapshots", "volumes", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        backend.write_atomic(CONFIG_PATH, &serde_json::to_vec_pretty(&config)?)?;
        Ok(Repository { backend, config, root })
    }

    pub fn open(location: &str) -> Result<Repository> {
        let root = local_root(location)?;
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&root));
        if !backend.exists(CONFIG_PATH)? {
            bail!("no repository at {location} (create one with `rime init`)");
        }
        let config: RepoConfig = serde_json::from_slice(&backend.read(CONFIG_PATH)?)
            .with_context(|| format!("{location}/{CONFIG_PATH} is damaged"))?;
        config.validate()?;
        Ok(Repository { backend, config, root })
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    pub fn lock(&self, mode: LockMode, wait: Duration) -> Result<RepoLock> {
        RepoLock::acquire(&self.root.join("lock"), mode, wait)
    }

    pub fn load_index(&self) -> Result<(ChunkIndex, Vec<BadIndex>)> {
        ChunkIndex::load(self.backend.as_ref())
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
    pub fn resolve(&self, spec: &str) -> Result<Manifest> {
        let (all, _) = self.manifests()?;
        if spec == "latest" {
            return all.into_iter().last().context("the repository has no snapshots");
        }
        if spec.is_empty() || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("'{spec}' is not a snapshot id (expected hex digits or 'latest')");
        }
        let spec_lower = spec.to_ascii_lowercase();
        let mut matches: Vec<Manifest> = all.into_iter().filter(|m| m.id.starts_with(&spec_lower)).collect();
        match matches.len() {
            0 => bail!("no snapshot '{spec}' in the repository"),
            1 => Ok(matches.remove(0)),
            n => bail!("'{spec}' is ambiguous: {n} snapshots start with it"),
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
        let _ = std::fs::remove_dir(self.root.join("volumes").join(&id.0));
        Ok(())
    }

    /// Removes leftovers of interrupted writers in the scratch folder. Call only while holding
    /// the exclusive lock.
    pub fn clean_scratch(&self) -> Result<u64> {
        let mut removed = 0;
        let dir = self.backend.scratch_dir();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if std::fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}
