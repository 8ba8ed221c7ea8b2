//! Filesystem detection: picks the used-block map for a region of a volume.

pub mod btrfs;
pub mod ext4;
pub mod ext4_audit;
pub mod ext4_files;
pub mod ext4_journal;
pub mod fat;
pub mod jbd2;
pub mod ntfs;
pub mod xfs;

use crate::device::Region;
use crate::usedmap::{AllBlocks, UsedMap};
use anyhow::Result;

/// Recognises one filesystem: `Ok(None)` when its signature is absent, `Err` when the
/// signature is there but the structures make no sense.
type Probe = fn(&Region) -> Result<Option<Box<dyn UsedMap>>>;

/// Every filesystem Rime can map, tried in order. One line per filesystem.
const PROBES: &[(&str, Probe)] = &[
    ("ext2/3/4", |r| Ok(ext4::Ext4Map::probe(r)?.map(|m| Box::new(m) as Box<dyn UsedMap>))),
    ("xfs", |r| Ok(xfs::XfsMap::probe(r)?.map(|m| Box::new(m) as Box<dyn UsedMap>))),
    ("btrfs", |r| Ok(btrfs::BtrfsMap::probe(r)?.map(|m| Box::new(m) as Box<dyn UsedMap>))),
    ("NTFS", |r| Ok(ntfs::NtfsMap::probe(r)?.map(|m| Box::new(m) as Box<dyn UsedMap>))),
    ("FAT", |r| Ok(fat::FatMap::probe(r)?.map(|m| Box::new(m) as Box<dyn UsedMap>))),
];

/// What detection found, and any warning worth telling the user.
pub struct Detected {
    pub map: Box<dyn UsedMap>,
    pub warning: Option<String>,
}

/// Picks the most precise map for `region`. A filesystem whose structures do not make sense
/// falls back to imaging all non-zero chunks, with a warning: never a crash, never a read out of
/// bounds.
pub fn detect(region: &Region) -> Detected {
    for (name, probe) in PROBES {
        match probe(region) {
            Ok(Some(map)) => return Detected { map, warning: None },
            Ok(None) => {}
            Err(e) => {
                return Detected {
                    map: Box::new(AllBlocks { reason: format!("non-zero chunks (damaged {name} filesystem)") }),
                    warning: Some(format!(
                    "{}: {name} signature found but the filesystem looks damaged ({e:#}); imaging all non-zero blocks",
                    region.path.display()
                )),
                }
            }
        }
    }
    Detected { map: Box::new(AllBlocks { reason: "non-zero chunks (no known filesystem)".into() }), warning: None }
}
