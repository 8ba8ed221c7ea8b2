//! Rime's own snapshots of the volumes it protects.
//!
//! - [`engine`]: the copy-on-write engine (protection area, difference store, snapshot view,
//!   write-inactivity period and limits) and [`cbt`], the persistent changed-block map;
//! - frontends that own a volume's I/O path: [`nbd`] (an NBD server), [`fuse`] (the volume as a
//!   file), and [`control`], the control socket through which backups take snapshots;
//! - [`client`]: the backup's side of the control socket, including a `BlockSource` over the
//!   snapshot view.

pub mod bitmap;
pub mod cbt;
pub mod engine;
pub mod store;

pub use bitmap::Bitmap;
pub use engine::{Engine, EngineConfig, SnapshotLimits};
pub mod client;
pub mod control;
pub mod fuse;
pub mod nbd;
pub mod serve;
