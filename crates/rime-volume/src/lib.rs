//! Rime's view of volumes: block devices and image files, and the used-block maps that the
//! filesystems on them provide.

pub mod backing;
pub mod bytes;
pub mod checksum;
pub mod device;
pub mod error;
pub mod fs;
pub mod layout;
pub mod luks;
pub mod lvm;
pub mod lzo;
pub mod partition;
pub mod qemu;
pub mod remote;
pub mod usedmap;

pub use device::{AlignedBuf, BlockSource, Region, Volume, VolumeKind};
pub use error::VolumeError;
pub use usedmap::{AllBlocks, UsedMap};
