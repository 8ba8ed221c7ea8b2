//! The repository format and its locks.
//!
//! One test binary for this crate; each file here is a module.

mod format;
mod locks;
