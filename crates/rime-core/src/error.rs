//! Failures of commands that callers tell apart (the CLI gives each its own exit code).
//! Repository failures are `rime_repo::RepoError`; these are the commands' own.

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A volume is in use (mounted, claimed, open for writing) and cannot be imaged
    /// consistently without a snapshot provider.
    #[error("{0}")]
    VolumeInUse(String),
    /// A snapshot is damaged: chunks missing from the repository or corrupt.
    #[error("{0}")]
    Damaged(String),
    /// A path named inside a snapshot does not exist.
    #[error("{0}")]
    PathNotFound(String),
}
