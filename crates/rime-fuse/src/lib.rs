//! FUSE, in one home (the `fuser` crate underneath):
//!
//! - [`volume_file`]: a block export (the protected volume of `rime serve`) as one read-write
//!   file, for a loop device to carry a mounted filesystem;
//! - [`snapshot_view`]: a snapshot as a read-only tree of image files and file trees
//!   (`rime mount`), served in the foreground until unmounted or signalled.

#![forbid(unsafe_code)]

pub mod snapshot_view;
pub mod volume_file;

pub use snapshot_view::{serve as serve_snapshot_view, SnapshotView};
pub use volume_file::FuseExport;
