//! Rime's commands as a library, one module per command (`commands::backup`, ...), so the
//! command line stays a thin layer of argument parsing and output formatting.

pub mod archive;
pub mod commands;
pub mod exclusions;
pub mod explorer;
pub mod inuse;
pub mod online;
pub mod progress;
pub mod references;
pub mod retention;
pub mod snapshot_reader;
pub mod target;

pub use progress::{NoProgress, Progress};

/// Worker threads for hashing, compressing and decompressing: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// This machine's host name, recorded in every snapshot.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
