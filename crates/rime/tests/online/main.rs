//! Online backups of volumes protected by `rime serve`: NBD and FUSE frontends, incrementals from changed-block tracking, fsync'd files on live ext3/ext4, and failures.
//!
//! One test binary per area; each file here is a module. Needs root (loop devices, mounts).

#[path = "../common/mod.rs"]
mod common;
#[path = "../crash_support/mod.rs"]
mod crash_support;
#[path = "../explorer_util/mod.rs"]
mod explorer_util;
#[path = "../hot_support/mod.rs"]
mod hot_support;

mod coherent;
mod hot_failures;
mod hot_freeze;
mod hot_fsync;
mod hot_fuse_ext4;
mod hot_incremental;
mod hot_nbd;
mod mixed_providers;
mod postgres;
mod sqlite;
