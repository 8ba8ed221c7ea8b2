//! `rime forget`: remove snapshots, by id or by retention policy. Data goes with `prune`.

use crate::retention::{self, Decision, Policy};
use anyhow::{bail, Result};
use rime_repo::lock::LockMode;
use rime_repo::{Repository, SnapshotId};
use std::time::Duration;

/// Removes the named snapshots (ids, prefixes or `latest`); returns their full ids.
pub fn forget_ids(repo: &Repository, specs: &[String], lock_wait: Duration) -> Result<Vec<String>> {
    let _lock = repo.lock(LockMode::Exclusive, lock_wait)?;
    // Resolve everything first: one bad name removes nothing.
    let mut ids = Vec::new();
    for spec in specs {
        let m = repo.resolve(spec)?;
        if !ids.contains(&m.id) {
            ids.push(m.id);
        }
    }
    for id in &ids {
        repo.remove_snapshot(&SnapshotId(id.clone()))?;
    }
    Ok(ids)
}

/// Applies a retention policy; returns every decision. With `dry_run`, removes nothing.
pub fn forget_policy(repo: &Repository, policy: &Policy, dry_run: bool, lock_wait: Duration) -> Result<Vec<Decision>> {
    if policy.is_empty() {
        bail!("no snapshot named and no --keep-* policy given");
    }
    let _lock = repo.lock(LockMode::Exclusive, lock_wait)?;
    let (all, _) = repo.manifests()?;
    let decisions = retention::apply(policy, &all);
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            repo.remove_snapshot(&SnapshotId(d.id.clone()))?;
        }
    }
    Ok(decisions)
}
