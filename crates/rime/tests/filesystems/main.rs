//! Used-block maps of every filesystem end to end (XFS, btrfs, FAT, NTFS against partclone and the kernel), bitmaps damaged on purpose, and crash-consistent copies of mounted filesystems.
//!
//! One test binary per area; each file here is a module. Needs root (loop devices, mounts).

#[path = "../common/mod.rs"]
mod common;
#[path = "../crash_support/mod.rs"]
mod crash_support;
#[path = "../fsmap_util/mod.rs"]
mod fsmap_util;

mod bitmap_damage;
mod crash_consistency;
mod fs_btrfs;
mod fs_fat;
mod fs_ntfs;
mod fs_xfs;
mod reflink_provider;
