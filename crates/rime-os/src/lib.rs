//! Operating-system glue, kept out of the command library and the engines: every system call
//! Rime makes outside plain `std` goes through here, through `rustix` and `nix`, so that the
//! other crates need no `unsafe`. The `unsafe` blocks here (ioctls no safe wrapper offers) are
//! allowed where they stand and say why they are sound.
//!
//! - [`signals`]: taking SIGINT/SIGTERM/... synchronously in one thread (`rime serve`, `rime mount`);
//! - [`mounts`]: mount-point checks and unmounting;
//! - [`freeze`]: FIFREEZE/FITHAW of a mounted filesystem;
//! - [`process`]: whether a process is alive;
//! - [`dirfd`]: file operations relative to an open directory, for writing a restored tree;
//! - [`flock`]: whole-file locks the kernel drops when their holder dies;
//! - [`files`]: hole punching, zeroing block devices, access-pattern advice;
//! - [`qemu_locks`]: QEMU's image locks (who may write an image; keeping QEMU from it).

#![deny(unsafe_code)]

pub mod dirfd;
pub mod files;
pub mod flock;
pub mod freeze;
pub mod mounts;
pub mod process;
pub mod qemu_locks;
pub mod signals;
