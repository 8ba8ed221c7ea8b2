//! `rime serve`: the daemon side of a protected volume, and the backup's side of talking to it.
//!
//! - [`serve`]: the daemon: opens the volume through the copy-on-write engine (`rime-snapshot`),
//!   exports it over NBD (`rime-nbd`) and/or as a FUSE file (`rime-fuse`), takes snapshot
//!   requests on the control socket, and shuts down cleanly on SIGINT/SIGTERM;
//! - [`protocol`]: the typed, versioned control protocol, shared by both ends;
//! - [`control`]: the control server; [`client`]: the backup's client and a `BlockSource` over
//!   the snapshot view;
//! - [`registry`]: how a running server is found by the volume, FUSE file or socket it serves;
//! - [`export`]: the engine as a block export for the frontends.

#![forbid(unsafe_code)]

pub mod client;
pub mod control;
pub mod export;
pub mod protocol;
pub mod registry;
pub mod serve;

pub use client::{ControlClient, ControlError, SnapshotSource};
pub use registry::{find_server, Registration};
pub use serve::{serve, ServeOptions};
