//! Records the file readers (`ext4_files`, `xfs_files`, `btrfs_files`) share with the explorer.
//!
//! Names and values are bytes exactly as stored: an image may hold names containing `/`, NUL or
//! `..`, which callers that create files must refuse.

use std::ops::Range;

/// An inode timestamp: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeTime {
    pub sec: i64,
    pub nsec: u32,
}

/// One name in a directory and the inode it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
}

/// An extended attribute: full name (`user.comment`, `trusted.x`, `security.selinux`,
/// `system.posix_acl_access`, ...) and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// A file's data ranges in bytes from its written extents, given as (first file block, blocks)
/// in file order: clipped to the file's size, touching ranges merged.
pub fn data_ranges_of(extents: impl Iterator<Item = (u64, u64)>, block_size: u64, size: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (first, blocks) in extents {
        let a = first.saturating_mul(block_size).min(size);
        let b = first.saturating_add(blocks).saturating_mul(block_size).min(size);
        if a >= b {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == a => last.end = b,
            _ => out.push(a..b),
        }
    }
    out
}
