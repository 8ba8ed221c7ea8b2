//! Used-block maps and the ext journal reader against real filesystems made by their own tools and read by the kernel.
//!
//! One test binary for this crate; each file here is a module.

#[path = "../support/mod.rs"]
mod support;

mod btrfs_map;
mod ext4_map;
mod fat_map;
mod jbd2_replay;
mod ntfs_map;
mod xfs_map;
