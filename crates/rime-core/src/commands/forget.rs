//! `rime forget`: remove snapshots, by id or by retention policy. Data goes with `prune`.

use crate::retention::{self, Decision, Policy};
use anyhow::{bail, Result};
use rime_repo::lock::LockMode;
use rime_repo::{Repository, SnapshotId};
use std::time::Duration;

/// Removes the named snapshots (ids, prefixes or `latest`); returns their full ids.
pub fn forget_ids(repo: &Repository, specs: &[String], lock_wait: Duration) -> Result<Vec<String>> {
    let _lock = repo.lock(LockMode::Exclusive, "forget", lock_wait)?;
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
    let _lock = repo.lock(LockMode::Exclusive, "forget", lock_wait)?;
    let (all, _) = repo.manifests()?;
    let decisions = retention::apply(policy, &all);
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            repo.remove_snapshot(&SnapshotId(d.id.clone()))?;
        }
    }
    Ok(decisions)
}

/// What [`keep_last`] removed.
#[derive(Debug, Default)]
pub struct Cycled {
    pub forgotten: Vec<String>,
    pub pruned: Option<super::prune::PruneSummary>,
}

/// Cyclic backups (`backup --keep-last N`), run after a successful backup: keeps the last `n`
/// of this host's snapshots of the same set of volumes as `latest`, forgets the rest and prunes.
pub fn keep_last(
    repo: &Repository,
    latest: &rime_repo::Manifest,
    n: usize,
    progress: &dyn crate::progress::Progress,
) -> Result<Cycled> {
    let (all, _) = repo.manifests()?;
    let group = latest.group_key();
    let same: Vec<_> = all.into_iter().filter(|m| m.group_key() == group).collect();
    let policy = Policy { keep_last: Some(n), ..Policy::default() };
    let drop_ids: Vec<String> =
        retention::apply(&policy, &same).into_iter().filter(|d| !d.keep).map(|d| d.id).collect();
    if drop_ids.is_empty() {
        return Ok(Cycled::default());
    }
    let wait = Duration::from_secs(60);
    let forgotten = forget_ids(repo, &drop_ids, wait)?;
    let pruned = Some(super::prune::prune(repo, progress, wait)?);
    Ok(Cycled { forgotten, pruned })
}
