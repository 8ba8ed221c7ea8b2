//! Rime's commands as a library, one module per command (`commands::backup`, ...), so the
//! command line stays a thin layer of argument parsing and output formatting.

#![forbid(unsafe_code)]

pub mod archive;
pub mod btrfs_snapshot;
pub mod capture;
pub mod commands;
pub mod error;
pub mod exclusions;
pub mod explorer;
pub mod incremental;
pub mod interrupt;
pub mod inuse;
pub mod online;
pub mod places;
pub mod progress;
pub mod providers;
pub mod references;
pub mod reflink;
pub mod retention;
pub mod snapshot_reader;
pub mod storage_stack;
pub mod target;
pub mod vms;

pub use error::CommandError;
pub use progress::{NoProgress, Progress};

/// Worker threads for hashing, compressing and decompressing: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// This machine's host name, recorded in every snapshot.
pub fn hostname() -> String {
    rime_os::process::host_name()
}
