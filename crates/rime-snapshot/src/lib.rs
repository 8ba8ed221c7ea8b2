//! Rime's own snapshots of the volumes it protects, as a library with no frontends:
//!
//! - [`engine`]: the copy-on-write engine (protection area, difference store, snapshot view,
//!   write-inactivity period and limits);
//! - [`cbt`]: the persistent changed-block map;
//! - [`store`]: the difference store (memory, then a spill file, up to a cap);
//! - [`bitmap`]: the atomic block bitmaps they share.
//!
//! Frontends (NBD, the FUSE file, the control socket) live in `rime-serve`.

#![forbid(unsafe_code)]

pub mod bitmap;
pub mod cbt;
pub mod engine;
pub mod error;
pub mod store;

pub use bitmap::Bitmap;
pub use engine::{Engine, EngineConfig, EngineState, SnapshotLimits};
pub use error::SnapshotError;
