//! Filesystem detection: picks the used-block map for a volume.

pub mod ext4;

use crate::device::Volume;
use crate::usedmap::{AllBlocks, UsedMap};

/// What detection found, and any warning worth telling the user.
pub struct Detected {
    pub map: Box<dyn UsedMap>,
    pub warning: Option<String>,
}

/// Picks the most precise map for `volume`. A filesystem whose structures do not make sense
/// falls back to imaging all non-zero chunks, with a warning: never a crash, never a read out of
/// bounds.
pub fn detect(volume: &Volume) -> Detected {
    match ext4::Ext4Map::probe(volume) {
        Ok(Some(map)) => return Detected { map: Box::new(map), warning: None },
        Ok(None) => {}
        Err(e) => {
            return Detected {
                map: Box::new(AllBlocks { reason: "non-zero chunks (damaged ext filesystem)".into() }),
                warning: Some(format!(
                    "{}: ext2/3/4 superblock found but the filesystem looks damaged ({e:#}); imaging all non-zero blocks",
                    volume.path.display()
                )),
            }
        }
    }
    Detected { map: Box::new(AllBlocks { reason: "non-zero chunks (no known filesystem)".into() }), warning: None }
}
