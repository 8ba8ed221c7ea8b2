//! The image explorer: `ls`, `extract` and `mount` of ext, XFS, btrfs, FAT and NTFS snapshots, and hostile images.
//!
//! One test binary per area; each file here is a module. Needs root (loop devices, mounts).

#[path = "../common/mod.rs"]
mod common;
#[path = "../explorer_util/mod.rs"]
mod explorer_util;

mod explorer_btrfs;
mod explorer_ext;
mod explorer_fat_ntfs;
mod explorer_hostile;
mod explorer_mount;
mod explorer_xfs;
