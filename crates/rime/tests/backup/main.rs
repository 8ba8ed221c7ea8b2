//! Backups, restores and the repository through the `rime` binary: ext round trips, dedup and compression, raw images and several volumes, block devices, whole disks, exclusions, retention, verify, crashes and locking, damaged filesystems, command-line errors and exit codes.
//!
//! One test binary per area; each file here is a module. Needs root (loop devices, mounts).

#[path = "../common/mod.rs"]
mod common;

mod block_devices;
mod cli_errors;
mod crash_and_locking;
mod damaged_fs;
mod dedup_and_compression;
mod disk_layouts;
mod exclusions;
mod ext_roundtrip;
mod hooks;
mod qemu_locks;
mod raw_and_multi;
mod remote_fs;
mod retention;
mod verify;
