//! What can go wrong with a repository, in kinds a caller can tell apart (the CLI gives each
//! its own exit code; see the README).

use crate::lock::LockInfo;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no repository given: use --repo LOCATION or set RIME_REPO")]
    NoLocation,
    #[error("{0} repositories are not supported by this build yet")]
    UnsupportedBackend(String),
    #[error("no repository at {0} (create one with `rime init`)")]
    NotFound(String),
    #[error("a repository already exists at {0}")]
    AlreadyExists(String),
    #[error("{0} is not empty; refusing to create a repository there")]
    NotEmpty(String),
    /// `config.json` is damaged, or of a format this build does not read.
    #[error("{0}")]
    BadConfig(String),
    #[error("repository is locked: {}", describe_holders(.holders, .wanted))]
    Locked { wanted: crate::lock::LockMode, holders: Vec<LockInfo> },
    #[error("the repository has no snapshots")]
    NoSnapshots,
    #[error("no snapshot '{0}' in the repository")]
    SnapshotNotFound(String),
    #[error("'{spec}' is ambiguous: {count} snapshots start with it")]
    AmbiguousSnapshot { spec: String, count: usize },
    #[error("'{0}' is not a snapshot id (expected hex digits or 'latest')")]
    BadSnapshotId(String),
    /// A chunk read back does not decode, or decodes to bytes of another digest.
    #[error("chunk {id} is corrupt ({why})")]
    ChunkDamaged { id: String, why: String },
    /// The backend failed (I/O, permissions, ...).
    #[error("{0:#}")]
    Backend(#[from] anyhow::Error),
}

fn describe_holders(holders: &[LockInfo], wanted: &crate::lock::LockMode) -> String {
    let fallback = match wanted {
        crate::lock::LockMode::Shared => "a forget or prune is running",
        crate::lock::LockMode::Exclusive => "another rime process is using it",
    };
    if holders.is_empty() {
        return fallback.to_string();
    }
    let each: Vec<String> = holders.iter().map(LockInfo::describe).collect();
    format!("{fallback} ({})", each.join("; "))
}

impl From<std::io::Error> for RepoError {
    fn from(e: std::io::Error) -> RepoError {
        RepoError::Backend(e.into())
    }
}
