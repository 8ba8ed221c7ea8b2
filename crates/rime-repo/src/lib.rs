//! Rime's repository: the on-disk format described in `docs/FORMAT.md`.
//!
//! A repository holds content-addressed chunks packed into pack files, one pack index per pack,
//! one volume index per backed-up volume and one manifest per snapshot. Everything is written
//! temp file → fsync → rename, so a crash at any point leaves a usable repository: objects that
//! no manifest reaches are garbage that `prune` removes.

#![forbid(unsafe_code)]

pub mod backend;
pub mod compression;
pub mod config;
pub mod error;
pub mod id;
pub mod index;
pub mod lock;
pub mod pack;
pub mod repo;
pub mod snapshot;
pub mod volume_index;

pub use compression::Compression;
pub use config::RepoConfig;
pub use error::RepoError;
pub use id::{ChunkId, PackId, SnapshotId};
pub use index::{ChunkIndex, ChunkLocation};
pub use repo::Repository;
pub use snapshot::{
    Consistency, FileInSnapshot, LiveBackupRecord, LiveDiskRecord, Manifest, VmFileRecord, VmRecord, VmSection,
    VolumeEntry, WriterRecord, VM_FILE_KIND,
};

/// Version of the on-disk format written by this build. Readers refuse newer versions.
pub const FORMAT_VERSION: u32 = 1;
