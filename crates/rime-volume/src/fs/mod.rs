//! Filesystem detection: picks the used-block map for a region of a volume.

pub mod btrfs;
pub mod btrfs_files;
pub mod ext4;
pub mod ext4_audit;
pub mod ext4_files;
pub mod ext4_journal;
pub mod fat;
pub mod fat_audit;
pub mod fat_dir;
pub mod jbd2;
pub mod ntfs;
pub mod records;
pub mod swap;
pub mod xfs;
pub mod xfs_files;

use crate::device::Region;
use crate::luks::LuksInfo;
use crate::usedmap::{AllBlocks, UsedMap};
use anyhow::Result;

/// Whether to check a filesystem's allocation records against the files that use them
/// (ext: blocks of in-use inodes; FAT: clusters directory entries point at) before trusting
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CrossCheck {
    /// Where nothing else vouches for them: ext bitmaps without `metadata_csum`, a FAT marked
    /// dirty.
    #[default]
    Auto,
    Always,
    Never,
}

impl CrossCheck {
    pub fn parse(s: &str) -> Result<CrossCheck> {
        match s {
            "auto" => Ok(CrossCheck::Auto),
            "always" => Ok(CrossCheck::Always),
            "never" => Ok(CrossCheck::Never),
            other => anyhow::bail!("unknown cross-check setting '{other}' (expected auto, always or never)"),
        }
    }

    /// The decision, given whether the filesystem needs it by default.
    pub fn wanted(self, by_default: bool) -> bool {
        match self {
            CrossCheck::Auto => by_default,
            CrossCheck::Always => true,
            CrossCheck::Never => false,
        }
    }
}

/// How maps are made.
#[derive(Clone, Copy, Debug, Default)]
pub struct MapOptions {
    pub cross_check: CrossCheck,
}

/// Recognises one filesystem: `Ok(None)` when its signature is absent, `Err` when the
/// signature is there but the structures make no sense.
type Probe = fn(&Region, &MapOptions) -> Result<Option<Box<dyn UsedMap>>>;

fn boxed<M: UsedMap + 'static>(m: Option<M>) -> Result<Option<Box<dyn UsedMap>>> {
    Ok(m.map(|m| Box::new(m) as Box<dyn UsedMap>))
}

/// Every filesystem Rime can map, tried in order. One line per filesystem.
const PROBES: &[(&str, Probe)] = &[
    ("ext2/3/4", |r, o| boxed(ext4::Ext4Map::probe_with(r, o)?)),
    ("xfs", |r, _| boxed(xfs::XfsMap::probe(r)?)),
    ("btrfs", |r, _| boxed(btrfs::BtrfsMap::probe(r)?)),
    ("NTFS", |r, _| boxed(ntfs::NtfsMap::probe(r)?)),
    ("FAT", |r, o| boxed(fat::FatMap::probe_with(r, o)?)),
    // Last: a real filesystem found over an old swap signature keeps more, which is safe.
    ("swap", |r, _| boxed(swap::SwapMap::probe(r)?)),
];

/// A filesystem whose structures are sound but cannot be trusted as they stand: a log or
/// journal still to replay, a dirty flag. Not damage; the reason says what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Untrusted(pub String);

/// What detection found, and any warning worth telling the user.
pub struct Detected {
    pub map: Box<dyn UsedMap>,
    pub warning: Option<String>,
    /// Set when the region is a LUKS volume (imaged whole).
    pub encrypted: Option<LuksInfo>,
}

/// Picks the most precise map for `region`, made the default way.
pub fn detect(region: &Region) -> Detected {
    detect_with(region, &MapOptions::default())
}

/// Picks the most precise map for `region`. A filesystem whose structures do not make sense
/// falls back to imaging all non-zero chunks, with a warning: never a crash, never a read out of
/// bounds.
pub fn detect_with(region: &Region, options: &MapOptions) -> Detected {
    if let Ok(Some(luks)) = crate::luks::probe(region) {
        return Detected {
            map: Box::new(AllBlocks { reason: format!("{}: imaged whole, no used-block map", luks.describe()) }),
            warning: Some(format!(
                "{}: {}; Rime cannot see inside it, so every non-zero block is imaged",
                region.path.display(),
                luks.describe()
            )),
            encrypted: Some(luks),
        };
    }
    for (name, probe) in PROBES {
        match probe(region, options) {
            Ok(Some(map)) => return Detected { map, warning: None, encrypted: None },
            Ok(None) => {}
            Err(e) => {
                return Detected {
                    map: Box::new(AllBlocks { reason: format!("non-zero chunks (damaged {name} filesystem)") }),
                    warning: Some(format!(
                    "{}: {name} signature found but the filesystem looks damaged ({e:#}); imaging all non-zero blocks",
                    region.path.display()
                )),
                    encrypted: None,
                }
            }
        }
    }
    Detected {
        map: Box::new(AllBlocks { reason: "non-zero chunks (no known filesystem)".into() }),
        warning: None,
        encrypted: None,
    }
}
