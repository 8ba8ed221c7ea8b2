//! LVM2 inside a volume: physical volumes, their volume groups, and the logical volumes in them
//! (linear, striped, thin), read from the on-disk label and text metadata without LVM's tools or
//! device-mapper.
//!
//! One module per job: [`label`] reads a PV's label and picks its newest valid metadata copy,
//! [`text`] parses the metadata language, [`vg`] turns it into volume groups, [`thin`] reads a
//! thin pool's B-trees, [`extents`] maps an LV's bytes to its PVs and reads through that map,
//! [`assemble`] puts the PVs of one volume together, and [`pvmap`] gives each PV the used-block
//! map its LVs' filesystems make. Everything read from disk is checked before it is used;
//! whatever cannot be understood is kept whole, with a warning, never dropped.

pub mod assemble;
pub mod extents;
pub mod label;
pub mod pvmap;
pub mod text;
pub mod thin;
pub mod vg;

pub use assemble::Assembly;
pub use pvmap::{map_pvs, LvInfo, PvInfo, PvMap, VgInfo};
