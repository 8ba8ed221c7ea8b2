//! Helpers shared by Rime's integration tests (a dev-dependency only): running programs
//! ([`cmd`]), reproducible data ([`data`]), loop devices and mounts that are always released
//! on drop ([`mounts`]), and the peers Rime is measured against ([`peers`]). Tests need root for
//! the mounts.

pub mod cmd;
pub mod data;
pub mod mounts;
pub mod peers;

pub use cmd::{have, require, run, run_status};
pub use data::{dir_bytes, write_random, write_random_file, Rng};
pub use mounts::{wait_until_closed, LoopDev, Mount, Mounted};

pub const MIB: u64 = 1 << 20;

/// A path as `&str` (test paths are always UTF-8).
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
