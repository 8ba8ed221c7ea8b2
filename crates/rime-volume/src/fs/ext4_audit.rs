//! Cross-check of ext2/3/4 block bitmaps against the blocks in-use inodes reference.
//!
//! ext2, ext3 and ext4 without `metadata_csum` keep no checksum over their block bitmaps: a bit
//! cleared by a bug, a bad sector or a torn write goes unnoticed until the block is reused. The
//! used-block map would leave such a block out, and the file that owns it would restore with a
//! hole of zeros. So before mapping, every inode the inode bitmaps mark in use (and the reserved
//! inodes: the journal, the resize inode, ...) is read, and every block it references — its
//! attribute block, extent tree nodes or indirect blocks, and its data, including directory
//! blocks — is checked against the map. Blocks the map leaves out are returned, to be imaged too.
//!
//! Reads: the used part of every inode table — up to its last inode in use, runs of up to
//! [`TABLE_READ`] bytes that hold none skipped, and `INODE_UNINIT` groups and `bg_itable_unused`
//! tails skipped where descriptor checksums vouch for them — plus each inode's extent-tree or
//! indirect blocks, by [`READERS`] threads at once. Memory: one table run per reader, the block
//! references of one round of [`GROUPS_PER_ROUND`] groups, the map's bitmap cache, and the
//! blocks found missing — capped at [`MAX_MISSING_RANGES`], beyond which
//! the bitmaps are too wrong to be worth correcting and the check fails (the caller then images
//! all non-zero blocks).

use super::ext4::{Ext4Map, GroupDesc, Superblock};
use super::ext4_files::{parse_inode, Ext4Files, Inode, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use crate::usedmap::{push_range, union_ranges};
use anyhow::{ensure, Context, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of inode table read at once.
const TABLE_READ: u64 = 1 << 20;
/// Missing ranges tolerated before the bitmaps are given up on.
const MAX_MISSING_RANGES: usize = 1 << 20;
/// Inode numbers remembered for the warning.
const INODES_KEPT: usize = 64;
/// Threads reading groups at once.
const READERS: usize = 4;
/// Groups read before their blocks are checked (bounds the references held at once).
const GROUPS_PER_ROUND: usize = 64;

/// What the check found: block ranges the bitmaps leave out (sorted, merged) and some of the
/// inodes that reference them.
#[derive(Debug, Default)]
pub struct Missing {
    pub ranges: Vec<Range<u64>>,
    pub inodes: Vec<u64>,
}

/// The blocks that in-use inodes reference and `map` leaves out. Groups are read
/// [`READERS`] at a time (the work is waiting on reads: inode tables and indirect blocks), a
/// round of [`GROUPS_PER_ROUND`] groups at once, and checked against the map in order.
pub fn missing_blocks(map: &mut Ext4Map) -> Result<Missing> {
    let sb = map.superblock().clone();
    let groups = map.mount_groups().to_vec();
    let mut found = Missing::default();
    for (round, chunk) in groups.chunks(GROUPS_PER_ROUND).enumerate() {
        let first = round * GROUPS_PER_ROUND;
        let refs = {
            let files = map.files();
            let next = AtomicUsize::new(0);
            let per_group: Vec<Result<References>> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..READERS.min(chunk.len()))
                    .map(|_| {
                        s.spawn(|| {
                            let mut out = Vec::new();
                            loop {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                let Some(d) = chunk.get(i) else { break };
                                out.push((i, group_refs(files, &sb, (first + i) as u64, d)));
                            }
                            out
                        })
                    })
                    .collect();
                let mut all: Vec<_> =
                    workers.into_iter().flat_map(|w| w.join().expect("audit reader panicked")).collect();
                all.sort_by_key(|(i, _)| *i);
                all.into_iter().map(|(_, r)| r).collect()
            });
            per_group
        };
        for group in refs {
            for (ino, r) in group? {
                let missing = map.unmapped_part(r.start, r.end)?;
                if missing.is_empty() {
                    continue;
                }
                if found.inodes.len() < INODES_KEPT && found.inodes.last() != Some(&ino) {
                    found.inodes.push(ino);
                }
                for m in missing {
                    add(&mut found.ranges, m);
                }
                ensure!(
                    found.ranges.len() <= MAX_MISSING_RANGES,
                    "the block bitmaps leave out more than {MAX_MISSING_RANGES} runs of blocks that inodes use"
                );
            }
        }
    }
    found.ranges = union_ranges(std::mem::take(&mut found.ranges));
    Ok(found)
}

/// Block ranges in-use inodes reference, each with its inode number.
type References = Vec<(u64, Range<u64>)>;

/// Every (inode, block range) that the in-use inodes of group `g` reference.
fn group_refs(files: &Ext4Files, sb: &Superblock, g: u64, d: &GroupDesc) -> Result<References> {
    let region = files.region();
    let (ipg, isz) = (sb.inodes_per_group, sb.inode_size);
    let vouched = sb.has_group_desc_csum() && d.checksum_ok;
    if vouched && d.inode_uninit() {
        return Ok(Vec::new());
    }
    let mut inode_bitmap = vec![0u8; sb.block_size as usize];
    region
        .read_at(d.inode_bitmap * sb.block_size, &mut inode_bitmap)
        .with_context(|| format!("inode bitmap of group {g}"))?;
    let in_use = |i: u64| inode_bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0;
    // Only the table up to the last inode in use (the reserved ones count in group 0), and only
    // the pieces of it that hold one: inodes are allocated from the front.
    let reserved = if g == 0 { sb.first_ino.saturating_sub(1).min(ipg) } else { 0 };
    let mut slots = if vouched && d.itable_unused <= ipg { ipg - d.itable_unused } else { ipg };
    slots = (0..slots).rev().find(|&i| in_use(i)).map_or(0, |i| i + 1).max(reserved);
    let mut out = Vec::new();
    let mut slot = 0;
    while slot < slots {
        let n = (TABLE_READ / isz).min(slots - slot);
        if slot >= reserved && !(slot..slot + n).any(in_use) {
            slot += n;
            continue;
        }
        let mut table = vec![0u8; (n * isz) as usize];
        region
            .read_at(d.inode_table * sb.block_size + slot * isz, &mut table)
            .with_context(|| format!("inode table of group {g}"))?;
        for k in 0..n {
            let i = slot + k;
            let ino = g * ipg + i + 1;
            if !in_use(i) && ino >= sb.first_ino {
                continue;
            }
            let inode = parse_inode(ino, &table[(k * isz) as usize..((k + 1) * isz) as usize])?;
            let refs = referenced(files, sb, &inode).with_context(|| format!("blocks of inode {ino}"))?;
            out.extend(refs.into_iter().map(|r| (ino, r)));
        }
        slot += n;
    }
    Ok(out)
}

/// Appends `r`, merging with the last range when it continues it (runs mostly come in order).
fn add(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    match ranges.last() {
        Some(last) if last.end <= r.start => push_range(ranges, r),
        _ => ranges.push(r),
    }
}

/// Block ranges an inode references: its attribute block, the blocks of its mapping (extent
/// tree or indirect blocks) and its data. Devices, FIFOs, sockets, fast symlinks and inline data
/// reference none. Reserved inodes (below `first_ino`) with no mode are read when they hold blocks.
fn referenced(files: &Ext4Files, sb: &Superblock, inode: &Inode) -> Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    if inode.file_acl != 0 {
        out.push(inode.file_acl..inode.file_acl + 1);
    }
    let t = inode.mode & S_IFMT;
    let maps_blocks = match t {
        S_IFREG | S_IFDIR => true,
        S_IFLNK => !files.is_fast_symlink(inode),
        0 => inode.ino < sb.first_ino && inode.blocks > 0,
        _ => false,
    };
    if maps_blocks && !inode.is_inline() {
        let mut tree = Vec::new();
        let runs = files.block_map(inode, &mut |b| tree.push(b))?;
        out.extend(tree.into_iter().map(|b| b..b + 1));
        out.extend(runs.iter().map(|r| r.physical..r.physical + r.len));
    }
    Ok(out)
}
