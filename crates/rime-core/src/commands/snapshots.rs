//! `rime snapshots`: list what the repository holds.

use anyhow::Result;
use rime_repo::{Manifest, Repository};

pub fn list(repo: &Repository) -> Result<Vec<Manifest>> {
    let (manifests, bad) = repo.manifests()?;
    for (path, reason) in bad {
        tracing::warn!("unreadable snapshot manifest {path}: {reason}");
    }
    Ok(manifests)
}
