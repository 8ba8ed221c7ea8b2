//! The control protocol against a real engine, and the NBD server against QEMU's own clients.
//!
//! One test binary for this crate; each file here is a module.

mod control;
mod nbd_qemu;
