//! Records the file readers (`ext4_files`, `xfs_files`, `btrfs_files`) share with the explorer.
//!
//! Names and values are bytes exactly as stored: an image may hold names containing `/`, NUL or
//! `..`, which callers that create files must refuse.

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
