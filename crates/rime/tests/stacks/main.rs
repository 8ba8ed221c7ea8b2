//! Storage stacks inside volumes: LVM2 (linear, striped, thin, damaged and unmapped layouts)
//! and LUKS, each built by the real tools in image files, backed up, browsed and restored.
//!
//! One test binary per area; each file here is a module. Needs root (loop devices, mounts),
//! LVM2 tools, thin-provisioning-tools and cryptsetup.

#[path = "../common/mod.rs"]
mod common;
#[path = "../explorer_util/mod.rs"]
mod explorer_util;

mod luks;
mod lvm_damage;
mod lvm_disks;
mod lvm_fixture;
mod lvm_thin;
