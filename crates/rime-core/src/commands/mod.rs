//! One module per command.

pub mod backup;
pub mod extract;
pub mod forget;
pub mod init;
pub mod ls;
pub mod mount;
pub mod prune;
pub mod restore;
pub mod snapshots;
pub mod verify;
pub mod vm;
pub mod writers;
