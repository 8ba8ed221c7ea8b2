//! Application consistency around a backup's snapshot.
//!
//! - [`hooks`]: commands run at the three stages of a backup (before the snapshot, after it,
//!   after the backup), with the environment scripts expect and timeouts;
//! - [`job`]: the job file (TOML, one table per job) that declares a backup's volumes and hooks;
//! - [`writers`]: what holds data on the volumes and is frozen for the snapshot (`fsfreeze`);
//! - [`sqlite`]: SQLite databases held consistent by their write lock for the snapshot;
//! - [`postgres`]: running PostgreSQL clusters found on the volumes, checkpointed and frozen.
//!
//! The order and failure rules (docs/CONSISTENCY.md) are the caller's to follow: `rime-core`'s
//! backup runs before-snapshot, the snapshot, after-snapshot always, then images the data only
//! if the snapshot succeeded, and runs after-backup with the outcome.

#![forbid(unsafe_code)]

pub mod hooks;
pub mod job;
pub mod postgres;
pub mod sqlite;
pub mod writers;

pub use hooks::{Hook, HookCommand, HookContext, HookError, Hooks, Stage};
