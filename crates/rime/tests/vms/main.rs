//! VM awareness against a real libvirtd with QEMU (TCG): the layout of a host's domains and
//! their coverage by volumes, stop and resume, `--vm-aware` backups and `restore --vm`; and the
//! small real guest (Debian's kernel, busybox, qemu-ga) that tests needing a guest OS boot.
//!
//! One test binary per area; each file here is a module. Needs root (loop devices, mounts) and
//! the libvirtd that `.ci/run` installs and starts.

#[path = "../common/mod.rs"]
mod common;
#[path = "../hot_support/mod.rs"]
mod hot_support;
#[path = "../vm_support/mod.rs"]
mod vm_support;

mod guest_boot;
mod instant;
mod layout;
mod live_backup;
mod stop_resume;
mod vm_backup;
mod vm_restore;
