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

use super::fat::{FatKind, FatMap};
use anyhow::{ensure, Result};
use std::collections::{BTreeSet, HashSet};

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LONG_NAME: u8 = 0x0F;
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
        let entries = match dir {
            None => map.read_root_area()?,
            Some(first) => {
                let mut bytes = Vec::new();
                for c in chain(map, first)? {
                    if !visited.insert(c) {
                        break; // a loop, or a cluster shared with a directory already read
                    }
                    bytes.extend(map.read_cluster(c)?);
                }
                bytes
            }
        };
        for e in entries.chunks_exact(32) {
            match e[0] {
                0x00 => break,
                0xE5 => continue,
                _ => {}
            }
            let attr = e[11];
            if attr & ATTR_LONG_NAME == ATTR_LONG_NAME || attr & ATTR_VOLUME_ID != 0 {
                continue;
            }
            if &e[..11] == b".          " || &e[..11] == b"..         " {
                continue;
            }
            let hi = if geo.kind == FatKind::Fat32 { u16::from_le_bytes([e[20], e[21]]) as u64 } else { 0 };
            let first = hi << 16 | u16::from_le_bytes([e[26], e[27]]) as u64;
            if first < 2 || first >= geo.cluster_count + 2 {
                continue;
            }
            for c in chain(map, first)? {
                if !map.marked_used(c)? {
                    found.insert(c);
                    ensure!(found.len() <= MAX_FOUND, "more than {MAX_FOUND} clusters in use are marked free");
                }
            }
            if attr & ATTR_DIRECTORY != 0 {
                dirs.push(Some(first));
            }
        }
    }
    Ok(found)
}

/// A cluster chain from `first` through FAT copy 0, ending at a free, reserved, bad or
/// end-of-chain entry, at a number out of range, or after as many clusters as the volume has.
fn chain(map: &mut FatMap, first: u64) -> Result<Vec<u64>> {
    let count = map.geometry().cluster_count;
    let mut out = vec![first];
    let mut c = first;
    while (out.len() as u64) <= count {
        let next = map.entry(0, c)? as u64;
        if next < 2 || next >= count + 2 {
            break;
        }
        out.push(next);
        c = next;
    }
    Ok(out)
}
