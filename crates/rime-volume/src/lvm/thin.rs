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
//! against the pool's data device. A thin volume's mapping is never held whole: a lookup walks
//! only the B-tree nodes whose keys overlap the blocks asked for (through a small cache of
//! nodes), so memory stays bounded however large or fragmented the volume is. A whole tree is
//! walked once when the pool is opened, to find damage before a backup relies on it.
//!
//! The metadata on disk is what the pool last committed. The kernel commits on every flush, and
//! a filesystem flushes before it acknowledges an fsync or completes a freeze, so for a quiesced
//! or offline pool it is complete. A pool marked `needs_check` is not trusted.

use crate::bytes::{le32, le64};
use crate::checksum::crc32c_raw;
use crate::device::Region;
use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

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
/// Nodes kept in memory (4 KiB each): the upper levels of every tree and a window of leaves.
const CACHED_NODES: usize = 256;

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
    cache: Mutex<NodeCache>,
}

#[derive(Default)]
struct NodeCache {
    nodes: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
}

/// One thin device of a pool, for lookups.
pub struct ThinDevice {
    md: Arc<ThinMetadata>,
    id: u64,
    root: u64,
    /// Blocks of the pool's data volume: every mapping must point inside it.
    data_blocks: u64,
}

impl ThinDevice {
    pub fn block_size(&self) -> u64 {
        self.md.data_block_size
    }

    /// The runs of the device's mapping that overlap virtual blocks `blocks`, in order.
    pub fn runs_in(&self, blocks: Range<u64>) -> Result<Vec<Run>> {
        let mut runs: Vec<Run> = Vec::new();
        let id = self.id;
        self.md.walk(self.root, blocks, &mut self.md.budget(), &mut |virt, value| {
            let data = value >> 24;
            ensure!(data < self.data_blocks, "thin device {id} maps block {virt} past the end of the pool ({data})");
            match runs.last_mut() {
                Some(r) if r.virt + r.len == virt && r.data + r.len == data => r.len += 1,
                _ => runs.push(Run { virt, data, len: 1 }),
            }
            Ok(())
        })?;
        Ok(runs)
    }

    /// Walks the whole mapping once, checking every node and entry; returns the mapped blocks.
    pub fn check(&self, virtual_blocks: u64) -> Result<u64> {
        let (id, mut mapped) = (self.id, 0);
        self.md.walk(self.root, 0..u64::MAX, &mut self.md.budget(), &mut |virt, value| {
            ensure!(virt < virtual_blocks, "thin device {id} maps block {virt}, past its size");
            ensure!(value >> 24 < self.data_blocks, "thin device {id} maps block {virt} past the end of the pool");
            mapped += 1;
            Ok(())
        })?;
        Ok(mapped)
    }
}

impl ThinMetadata {
    pub fn open(region: Region) -> Result<Arc<ThinMetadata>> {
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
        Ok(Arc::new(ThinMetadata {
            region,
            data_block_size,
            mapping_root: le64(&sb, 320)?,
            blocks,
            transaction: le64(&sb, 48)?,
            cache: Mutex::new(NodeCache::default()),
        }))
    }

    /// Thin device `id`, whose mapping must point inside a data volume of `data_blocks`.
    pub fn device(self: &Arc<Self>, id: u64, data_blocks: u64) -> Result<ThinDevice> {
        let mut root = None;
        self.walk(self.mapping_root, id..id + 1, &mut self.budget(), &mut |_, value| {
            root = Some(value);
            Ok(())
        })?;
        let root = root.with_context(|| format!("thin device {id} is not in the pool's metadata"))?;
        Ok(ThinDevice { md: self.clone(), id, root, data_blocks })
    }

    /// A walk visits each node of one tree once, so never more nodes than the device has.
    fn budget(&self) -> Walk {
        Walk { depth: 0, nodes_left: self.blocks, last_key: None }
    }

    /// Visits the (key, value) pairs with keys in `keys` of the 64-bit-valued B-tree at
    /// `block`, in key order, descending only into children that can hold such keys.
    fn walk(
        &self,
        block: u64,
        keys: Range<u64>,
        walk: &mut Walk,
        visit: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        ensure!(walk.depth < MAX_DEPTH, "thin pool metadata B-tree is deeper than {MAX_DEPTH} levels (a loop?)");
        ensure!(walk.nodes_left > 0, "thin pool metadata B-tree visits more nodes than it has (a loop)");
        walk.nodes_left -= 1;
        let node = self.node(block)?;
        let flags = le32(&node, 4)?;
        let (count, max, value_size) = (le32(&node, 16)? as usize, le32(&node, 20)? as usize, le32(&node, 24)?);
        ensure!(value_size == 8, "thin pool metadata block {block} holds {value_size}-byte values");
        ensure!(
            count <= max && NODE_HEADER + max * 16 <= BLOCK as usize,
            "thin pool metadata block {block} holds more entries than fit"
        );
        let key = |i: usize| le64(&node, NODE_HEADER + 8 * i);
        let value = |i: usize| le64(&node, NODE_HEADER + 8 * max + 8 * i);
        for i in 1..count {
            ensure!(key(i)? > key(i - 1)?, "thin pool metadata block {block} has keys out of order");
        }
        for i in 0..count {
            let k = key(i)?;
            match flags {
                INTERNAL_NODE => {
                    // Child i holds keys from its own key up to the next child's.
                    let next = if i + 1 < count { key(i + 1)? } else { u64::MAX };
                    if next <= keys.start && i + 1 < count {
                        continue;
                    }
                    if k >= keys.end {
                        break;
                    }
                    walk.depth += 1;
                    self.walk(value(i)?, keys.clone(), walk, visit)?;
                    walk.depth -= 1;
                }
                LEAF_NODE if k < keys.start => {}
                LEAF_NODE if k >= keys.end => break,
                LEAF_NODE => {
                    ensure!(walk.last_key.is_none_or(|l| k > l), "thin pool metadata B-tree repeats key {k} (a loop?)");
                    walk.last_key = Some(k);
                    visit(k, value(i)?)?
                }
                _ => bail!("thin pool metadata block {block} is neither an internal node nor a leaf"),
            }
        }
        Ok(())
    }
}

impl ThinMetadata {
    /// Reads (or finds in the cache) metadata block `block`, checked.
    fn node(&self, block: u64) -> Result<Arc<Vec<u8>>> {
        ensure!(block > 0 && block < self.blocks, "thin pool metadata points at block {block}, outside it");
        if let Some(n) = self.cache.lock().unwrap().nodes.get(&block) {
            return Ok(n.clone());
        }
        let mut node = vec![0u8; BLOCK as usize];
        self.region.read_at(block * BLOCK, &mut node)?;
        ensure!(
            dm_checksum(&node[4..], BTREE_CSUM_XOR) == le32(&node, 0)?,
            "thin pool metadata block {block} fails its checksum"
        );
        ensure!(le64(&node, 8)? == block, "thin pool metadata block {block} names another block");
        let node = Arc::new(node);
        let mut cache = self.cache.lock().unwrap();
        if cache.order.len() >= CACHED_NODES {
            if let Some(old) = cache.order.pop_front() {
                cache.nodes.remove(&old);
            }
        }
        cache.order.push_back(block);
        cache.nodes.insert(block, node.clone());
        Ok(node)
    }
}

struct Walk {
    depth: usize,
    nodes_left: u64,
    /// The last leaf key visited: keys must rise across the whole walk, so a crafted tree
    /// that reaches a leaf twice is caught instead of visited again.
    last_key: Option<u64>,
}

/// device-mapper's block checksum: the kernel's raw CRC-32C from !0, XORed with a constant.
fn dm_checksum(data: &[u8], xor: u32) -> u32 {
    crc32c_raw(!0, data) ^ xor
}
