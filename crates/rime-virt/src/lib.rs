//! Rime's view of a VM host, through libvirt (docs/VMS.md).
//!
//! - [`virsh`]: the one way Rime talks to libvirt: `virsh` run with an argument vector, never a
//!   shell string, every domain addressed by its UUID (a name could read as an id or a UUID);
//! - [`state`]: libvirt's domain states and what a backup does in each (the state table);
//! - [`xml`]: the parts of a domain's XML that name its files, and the rewrite of those paths
//!   for a restore to another place;
//! - [`domains`]: every domain on the host, defined or transient, with its state;
//! - [`files`]: every file a domain is made of (XML, disks with their backing chains, media,
//!   NVRAM, managed-save image, snapshots' external files), and domain XML left behind;
//! - [`control`]: managed save of many domains at once and their start again, with bounded
//!   waits;
//! - [`checkpoints`], [`pull_backup`], [`agent`]: the live backup API: checkpoints (the points
//!   dirty bitmaps count from), pull-mode backup jobs exporting each disk's point-in-time view
//!   over NBD, and the guest agent's filesystem freeze.
//!
//! Invariants: no name, path or XML ever passes through a shell; a domain is addressed by UUID
//! once it has been found; every wait is bounded; every failure is a one-line [`VirtError`].
//!
//! Why `virsh` and not the `virt` crate: the crate links `libvirt.so` into the binary, so Rime
//! would neither build nor start on a host without libvirt's development files and library
//! (a plain file server, or a fresh machine running the README's first command). `virsh` is
//! libvirt's own client, present wherever `libvirtd` is, and only the VM commands need it. All
//! calls go through [`virsh::Libvirt`], so moving to the crate later changes one module.

#![forbid(unsafe_code)]

pub mod agent;
pub mod checkpoints;
pub mod control;
pub mod domains;
pub mod files;
pub mod pull_backup;
pub mod state;
pub mod virsh;
pub mod xml;

pub use domains::Domain;
pub use state::{DomainState, State, Treatment};
pub use virsh::{Libvirt, VirtError};
