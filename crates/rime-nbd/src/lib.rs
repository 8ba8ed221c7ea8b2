//! NBD, in one home: the protocol numbers ([`proto`]), a client that reads an export and
//! queries its metadata contexts ([`client`], used to read disk images through `qemu-nbd`, and
//! allocation and dirty bitmaps of QEMU's backup exports), and a server that exports any
//! [`Export`] ([`server`], used by `rime serve` for a protected volume).
//!
//! Written here rather than taken from a crate: the maintained NBD crates are client-only or
//! async-only, and the server must hand every write synchronously to the copy-on-write engine.
//! Protocol facts from the NBD protocol document (`doc/proto.md` of the NBD project).

#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;
mod wire;

pub use client::{Extent, NbdClient, ServerError};
pub use server::{Address, NbdServer};

/// What an NBD server exports: a fixed-size block device. Offsets and lengths the server passes
/// are always within `0..size()`.
pub trait Export: Send + Sync {
    fn size(&self) -> u64;
    /// Shown to clients that ask for a description (`NBD_OPT_LIST`, `NBD_INFO_DESCRIPTION`).
    fn description(&self) -> &str;
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// `fua`: durable before the call returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()>;
    /// `may_punch`: the range may become a hole rather than written zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_punch: bool) -> std::io::Result<()>;
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()>;
    fn flush(&self) -> std::io::Result<()>;
    /// A read-only export: the server advertises it as such and refuses writes, trims and
    /// write-zeroes with EPERM before they reach [`Export::write`] and its kin.
    fn read_only(&self) -> bool {
        false
    }
    /// The export can tell which of its ranges read as zeros ([`Export::zero_extents`]): the
    /// server then offers structured replies and the `base:allocation` metadata context, so a
    /// client such as QEMU skips those ranges instead of reading them.
    fn reports_zeros(&self) -> bool {
        false
    }
    /// `offset..offset + len` (within the export) as consecutive `(length, reads as zeros)` runs
    /// in order, covering the range or a prefix of it (at least one run).
    fn zero_extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        let _ = offset;
        Ok(vec![(len, false)])
    }
}
