//! Helpers shared by the filesystem map tests (`btrfs_map.rs`, `xfs_map.rs`, `fat_map.rs`,
//! `ntfs_map.rs`, `jbd2_replay.rs`): the shared test kit (programs, reproducible data, mounts
//! released on drop) and image files.

#![allow(dead_code, unused_imports)]

pub use rime_testkit::{run, s, Mounted, Rng, MIB};
pub use rime_testkit::{run_status, wait_until_closed, write_random};
use std::fs;
use std::path::Path;

/// A new all-zero (sparse) image file of `size_mib` MiB, replacing any old one.
pub fn new_image(img: &Path, size_mib: u64) {
    let _ = fs::remove_file(img);
    fs::File::create(img).unwrap().set_len(size_mib * MIB).unwrap();
}
