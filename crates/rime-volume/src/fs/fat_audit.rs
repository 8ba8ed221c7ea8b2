//! Cross-check of a FAT against its directories: clusters that directory entries reach but no
//! FAT copy marks used.
//!
//! FAT has no journal. A volume that was not unmounted cleanly (or was mounted when its copy
//! was taken) can hold a directory entry whose clusters the FAT does not show yet: Linux writes
//! the entry and the FAT separately. The kernel still reads such an entry's first cluster (it
//! comes from the entry, not the FAT), and `fsck.fat` looks at it too, so a map that trusts the
//! FAT alone would leave out a block that will be read. So for a dirty volume every directory
//! is walked from the root: each entry's first cluster, and its chain as FAT copy 0 gives it
//! (the copy the kernel reads), are checked against the map; a chain ends where the FAT says
//! free or gives a number out of range, as the kernel's reading does.
//!
//! Bounded: each directory cluster is read once (a set of visited directory clusters stops
//! loops), chains are capped at the cluster count, and at most [`MAX_FOUND`] clusters are
//! collected before the FAT is given up on (the caller then images all non-zero blocks).

use super::fat::FatMap;
use super::fat_dir::{chain, parse_dir, read_dir_bytes};
use anyhow::{ensure, Result};
use std::collections::{BTreeSet, HashSet};

/// Clusters found missing before the FAT is given up on.
const MAX_FOUND: usize = 1 << 20;

/// Clusters that directory entries reach and no FAT copy marks used, sorted.
pub fn missing_clusters(map: &mut FatMap) -> Result<BTreeSet<u64>> {
    let geo = map.geometry().clone();
    let mut found = BTreeSet::new();
    let mut visited = HashSet::new();
    // Directories to read: FAT12/16 keep the root in a fixed area, FAT32 in a cluster chain.
    let mut dirs: Vec<Option<u64>> = vec![geo.root_cluster];
    while let Some(dir) = dirs.pop() {
        let bytes = read_dir_bytes(map, dir, &mut visited)?;
        for e in parse_dir(&bytes, geo.kind)? {
            for c in chain(map, e.first_cluster)? {
                if !map.marked_used(c)? {
                    found.insert(c);
                    ensure!(found.len() <= MAX_FOUND, "more than {MAX_FOUND} clusters in use are marked free");
                }
            }
            if e.is_dir() && e.first_cluster >= 2 {
                dirs.push(Some(e.first_cluster));
            }
        }
    }
    Ok(found)
}
