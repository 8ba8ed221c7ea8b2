//! Virtual machines on the volumes Rime backs up (docs/VMS.md): the host's VM layout and each
//! VM's coverage by a set of volumes ([`layout`]), the VM part of a `--vm-aware` backup
//! ([`backup`]), putting a VM back from a snapshot ([`restore`]), and running one straight from
//! the repository before its data is copied back ([`instant`], served by [`instant_export`]).

pub mod allocation;
pub mod backup;
pub mod instant;
pub mod instant_export;
pub mod layout;
pub mod live;
pub mod restore;
pub mod used_maps;
