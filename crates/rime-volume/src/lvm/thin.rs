//! Thin-pool metadata (device-mapper's persistent-data format): which pool data blocks each
//! thin volume maps.
//!
//! ```text
//! block 0          superblock: magic 27022010, version, data block size, the roots of the
//!                  two-level data-mapping B-tree and of the device-details B-tree
//! mapping tree     top level: thin device id -> root of that device's tree;
//!                  bottom level: virtual block -> (data block << 24 | time)
//! ```
//!
//! Every block is 4 KiB and carries a CRC-32C (the kernel's `dm_bm_checksum`: raw CRC from !0,
//! XORed with a per-type constant) and its own block number; both are checked, as are node
//! flags, entry counts against the block size, key order and tree depth. Data blocks are checked
//! against the pool's data device. Mappings are read one device at a time and returned as runs
//! of consecutive blocks, so memory grows with the fragmentation of a thin volume, not its size.
//!
//! The metadata on disk is what the pool last committed. The kernel commits on every flush, and
//! a filesystem flushes before it acknowledges an fsync or completes a freeze, so for a quiesced
//! or offline pool it is complete. A pool marked `needs_check` is not trusted.

use crate::bytes::{le32, le64};
use crate::checksum::crc32c_raw;
use crate::device::Region;
use anyhow::{bail, ensure, Context, Result};

const BLOCK: u64 = 4096;
const MAGIC: u64 = 27_022_010;
const SUPERBLOCK_CSUM_XOR: u32 = 160_774;
const BTREE_CSUM_XOR: u32 = 121_107;
const INTERNAL_NODE: u32 = 1;
const LEAF_NODE: u32 = 2;
const NEEDS_CHECK: u32 = 1;
/// A B-tree of 4 KiB nodes holding at most 2^64 keys is far shallower than this.
const MAX_DEPTH: usize = 12;
const NODE_HEADER: usize = 32;

/// A run of a thin volume: virtual blocks `[virt, virt + len)` lie at data blocks
/// `[data, data + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub virt: u64,
    pub data: u64,
    pub len: u64,
}

/// A pool's metadata device, opened and checked.
pub struct ThinMetadata {
    region: Region,
    /// Bytes per pool data block.
    pub data_block_size: u64,
    mapping_root: u64,
    /// Blocks of the metadata device.
    blocks: u64,
    pub transaction: u64,
}

impl ThinMetadata {
    pub fn open(region: Region) -> Result<ThinMetadata> {
        let blocks = region.len / BLOCK;
        ensure!(blocks > 0, "the thin pool's metadata volume is empty");
        let mut sb = vec![0u8; BLOCK as usize];
        region.read_at(0, &mut sb)?;
        ensure!(le64(&sb, 32)? == MAGIC, "the thin pool's metadata has no superblock (magic missing)");
        ensure!(
            dm_checksum(&sb[4..], SUPERBLOCK_CSUM_XOR) == le32(&sb, 0)?,
            "the thin pool's metadata superblock fails its checksum"
        );
        ensure!(le64(&sb, 8)? == 0, "the thin pool's metadata superblock names another block");
        let version = le32(&sb, 40)?;
        ensure!((1..=2).contains(&version), "thin pool metadata version {version} is unknown");
        ensure!(le32(&sb, 4)? & NEEDS_CHECK == 0, "the thin pool is marked as needing thin_check");
        ensure!(le32(&sb, 340)? as u64 * 512 == BLOCK, "thin pool metadata blocks are not 4 KiB");
        let data_block_size = le32(&sb, 336)? as u64 * 512;
        ensure!(
            data_block_size >= 64 * 1024 && data_block_size.is_multiple_of(64 * 1024),
            "thin pool data block size {data_block_size} is invalid"
        );
        Ok(ThinMetadata { region, data_block_size, mapping_root: le64(&sb, 320)?, blocks, transaction: le64(&sb, 48)? })
    }

    /// Thin device ids that have a mapping tree.
    pub fn devices(&self) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        self.walk(self.mapping_root, &mut self.budget(), &mut |key, _| {
            ids.push(key);
            Ok(())
        })?;
        Ok(ids)
    }

    /// The mapping of thin device `id`, in runs sorted by virtual block; data blocks are
    /// checked against `data_blocks`, the size of the pool's data volume in blocks.
    pub fn runs(&self, id: u64, data_blocks: u64) -> Result<Vec<Run>> {
        let mut root = None;
        self.walk(self.mapping_root, &mut self.budget(), &mut |key, value| {
            if key == id {
                root = Some(value);
            }
            Ok(())
        })?;
        let root = root.with_context(|| format!("thin device {id} is not in the pool's metadata"))?;
        let mut runs: Vec<Run> = Vec::new();
        self.walk(root, &mut self.budget(), &mut |virt, value| {
            let data = value >> 24;
            ensure!(data < data_blocks, "thin device {id} maps block {virt} past the end of the pool ({data})");
            match runs.last_mut() {
                Some(r) if r.virt + r.len == virt && r.data + r.len == data => r.len += 1,
                _ => runs.push(Run { virt, data, len: 1 }),
            }
            Ok(())
        })?;
        Ok(runs)
    }

    /// A walk visits each node of one tree once, so never more nodes than the device has.
    fn budget(&self) -> Walk {
        Walk { depth: 0, nodes_left: self.blocks }
    }

    /// Visits the (key, value) pairs of the 64-bit-valued B-tree at `block`, in key order.
    fn walk(&self, block: u64, walk: &mut Walk, visit: &mut dyn FnMut(u64, u64) -> Result<()>) -> Result<()> {
        ensure!(walk.depth < MAX_DEPTH, "thin pool metadata B-tree is deeper than {MAX_DEPTH} levels (a loop?)");
        ensure!(walk.nodes_left > 0, "thin pool metadata B-tree visits more nodes than it has (a loop)");
        walk.nodes_left -= 1;
        ensure!(block > 0 && block < self.blocks, "thin pool metadata points at block {block}, outside it");
        let mut node = vec![0u8; BLOCK as usize];
        self.region.read_at(block * BLOCK, &mut node)?;
        ensure!(
            dm_checksum(&node[4..], BTREE_CSUM_XOR) == le32(&node, 0)?,
            "thin pool metadata block {block} fails its checksum"
        );
        ensure!(le64(&node, 8)? == block, "thin pool metadata block {block} names another block");
        let flags = le32(&node, 4)?;
        let (count, max, value_size) = (le32(&node, 16)? as usize, le32(&node, 20)? as usize, le32(&node, 24)?);
        ensure!(value_size == 8, "thin pool metadata block {block} holds {value_size}-byte values");
        ensure!(
            count <= max && NODE_HEADER + max * 16 <= BLOCK as usize,
            "thin pool metadata block {block} holds more entries than fit"
        );
        let mut last = None;
        for i in 0..count {
            let key = le64(&node, NODE_HEADER + 8 * i)?;
            let value = le64(&node, NODE_HEADER + 8 * max + 8 * i)?;
            ensure!(last.is_none_or(|l| key > l), "thin pool metadata block {block} has keys out of order");
            last = Some(key);
            match flags {
                INTERNAL_NODE => {
                    walk.depth += 1;
                    self.walk(value, walk, visit)?;
                    walk.depth -= 1;
                }
                LEAF_NODE => visit(key, value)?,
                _ => bail!("thin pool metadata block {block} is neither an internal node nor a leaf"),
            }
        }
        Ok(())
    }
}

struct Walk {
    depth: usize,
    nodes_left: u64,
}

/// device-mapper's block checksum: the kernel's raw CRC-32C from !0, XORed with a constant.
fn dm_checksum(data: &[u8], xor: u32) -> u32 {
    crc32c_raw(!0, data) ^ xor
}
