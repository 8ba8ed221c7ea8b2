//! XFS used-block map from the free-space B+trees of the allocation groups.
//!
//! Every allocation group (AG) keeps its free extents in a B+tree sorted by block number (the
//! "bnobt", rooted in the AG's free-space header, the AGF). A block is used exactly when no free
//! extent covers it; that makes the AG headers, the internal log, the inode chunks, every btree
//! block and the blocks parked on the AG free list (AGFL) used, which errs on the safe side.
//!
//! Handles v4 and v5 (CRC) filesystems, 512 B–64 KiB blocks and sectors up to 32 KiB. At probe
//! time the whole structure is checked once — superblock, every AGF, every bnobt block (magic,
//! level, record counts, CRCs and owner on v5, sibling links, key order, block numbers inside the
//! AG, the sum of the free extents against the AGF's free count) — so that a damaged filesystem
//! is refused before the backup starts. The internal log is read too: the btrees on disk are
//! trusted only when the log is clean (unmounted) or merely covered (frozen), never while it holds
//! metadata changes still to be replayed, as in a crash-consistent copy of a mounted filesystem.
//! An external log cannot be checked, so such filesystems are refused (the caller falls back to
//! imaging all non-zero blocks). `used_ranges` then walks one AG's bnobt at a time,
//! lazily and in order, holding one root-to-leaf path of blocks: memory stays bounded however
//! large or fragmented the filesystem is.
//!
//! On-disk numbers are big-endian; CRCs are CRC-32C stored little-endian.

use super::Untrusted;
use crate::bytes::{be16, be32, be64};
use crate::checksum::crc32c_skipping;
use crate::device::Region;
use crate::usedmap::{push_range, UsedMap};
use anyhow::{ensure, Context, Result};
use std::ops::Range;

const SB_MAGIC: u32 = 0x5846_5342; // "XFSB"
const AGF_MAGIC: u32 = 0x5841_4746; // "XAGF"
const BNO_MAGIC_V4: u32 = 0x4142_5442; // "ABTB"
const BNO_MAGIC_V5: u32 = 0x4142_3342; // "AB3B"
const NULL_AGBLOCK: u32 = u32::MAX;
/// Deepest free-space btree accepted (the kernel's limit for any AG size is smaller).
const MAX_LEVELS: u32 = 9;
/// v5 incompatible features this map knows do not change where free space is recorded:
/// ftype, sparse inodes, meta_uuid, bigtime, needsrepair, nrext64, exchrange, parent, metadir.
const KNOWN_INCOMPAT: u32 = 0x1FF;
const INCOMPAT_META_UUID: u32 = 1 << 2;
const RO_COMPAT_RMAPBT: u32 = 1 << 1;
const RO_COMPAT_REFLINK: u32 = 1 << 2;
const SB_CRC_OFF: usize = 224;
const AGF_CRC_OFF: usize = 216;
/// Offsets in a v5 short-form btree block header.
const BB_BLKNO: usize = 16;
const BB_UUID: usize = 32;
const BB_OWNER: usize = 48;
const BB_CRC: usize = 52;

/// Superblock facts the map needs, all range-checked.
#[derive(Clone, Debug)]
pub struct Superblock {
    pub version: u16,
    pub block_size: u64,
    pub sector_size: u64,
    pub dblocks: u64,
    pub agblocks: u64,
    pub agcount: u64,
    pub agblklog: u32,
    /// Internal log as (AG, first AG block, blocks), if the log is internal.
    pub log: Option<(u64, u64, u64)>,
    pub fdblocks: u64,
    pub ro_compat: u32,
    /// The UUID stamped into v5 metadata blocks (sb_meta_uuid with the meta_uuid feature).
    pub meta_uuid: [u8; 16],
    /// Root directory inode number.
    pub root_ino: u64,
    /// Bytes per inode (256–2048, a power of two) and log2 of inodes per block.
    pub inode_size: u64,
    pub inopblog: u32,
    /// log2 of filesystem blocks per directory block.
    pub dir_block_log: u32,
    /// v5 incompatible feature bits (0 on v4).
    pub incompat: u32,
    /// Directory entries carry a file type byte (v5, or the v4 ftype feature).
    pub ftype: bool,
    /// Blocks of a realtime device (files on it cannot be read from the data device).
    pub rblocks: u64,
}

impl Superblock {
    /// Parses the primary superblock sector; `Ok(None)` when there is no XFS magic.
    pub fn parse(sb: &[u8]) -> Result<Option<Superblock>> {
        if sb.len() < 512 || be32(sb, 0)? != SB_MAGIC {
            return Ok(None);
        }
        let block_size = be32(sb, 4)? as u64;
        let blocklog = sb[120] as u32;
        let sector_size = be16(sb, 102)? as u64;
        let sectlog = sb[121] as u32;
        ensure!(
            (9..=16).contains(&blocklog) && block_size == 1 << blocklog,
            "block size {block_size} (log {blocklog}) is invalid"
        );
        ensure!(
            (9..=15).contains(&sectlog) && sector_size == 1 << sectlog && sector_size <= block_size,
            "sector size {sector_size} (log {sectlog}) is invalid"
        );
        let versionnum = be16(sb, 100)?;
        let version = versionnum & 0xF;
        ensure!(version == 4 || version == 5, "superblock version {version} is not supported");
        ensure!(sb.len() as u64 >= sector_size, "superblock buffer shorter than a sector");
        if version == 5 {
            let stored = crate::bytes::le32(sb, SB_CRC_OFF)?;
            let computed = crc32c_skipping(&sb[..sector_size as usize], SB_CRC_OFF);
            ensure!(stored == computed, "superblock CRC mismatch (stored {stored:#x}, computed {computed:#x})");
        }
        ensure!(sb[126] == 0, "mkfs did not finish (sb_inprogress is set)");
        let dblocks = be64(sb, 8)?;
        let agblocks = be32(sb, 84)? as u64;
        let agcount = be32(sb, 88)? as u64;
        let agblklog = sb[124] as u32;
        let incompat = if version == 5 { be32(sb, 216)? } else { 0 };
        let ro_compat = if version == 5 { be32(sb, 212)? } else { 0 };
        ensure!(incompat & !KNOWN_INCOMPAT == 0, "unknown incompatible features {:#x}", incompat & !KNOWN_INCOMPAT);
        // The header sectors (superblock, AGF, AGI, AGFL) must fit in an AG with room to spare.
        ensure!(agblocks * block_size >= 8 * sector_size && agblocks >= 8, "AG size {agblocks} blocks is too small");
        ensure!(
            agblklog <= 31 && agblocks <= 1 << agblklog && agblocks > (1u64 << agblklog) >> 1,
            "AG block log {agblklog} does not match AG size {agblocks}"
        );
        ensure!(agcount >= 1, "AG count is zero");
        let full = agcount.checked_mul(agblocks).context("AG count x AG size overflows")?;
        ensure!(
            dblocks <= full && dblocks > (agcount - 1) * agblocks,
            "data blocks {dblocks} do not match {agcount} AGs of {agblocks} blocks"
        );
        let fdblocks = be64(sb, 144)?;
        ensure!(fdblocks <= dblocks, "free block count {fdblocks} exceeds the block count {dblocks}");
        let logstart = be64(sb, 48)?;
        let logblocks = be32(sb, 96)? as u64;
        let log = if logstart != 0 {
            let ag = logstart >> agblklog;
            let agbno = logstart & ((1u64 << agblklog) - 1);
            ensure!(ag < agcount, "log start {logstart} lies in AG {ag}, past the last AG");
            let ag_len = dblocks.min((ag + 1) * agblocks) - ag * agblocks;
            ensure!(
                logblocks > 0 && agbno.checked_add(logblocks).is_some_and(|e| e <= ag_len),
                "internal log ({logblocks} blocks at {agbno} in AG {ag}) does not fit its AG"
            );
            Some((ag, agbno, logblocks))
        } else {
            None
        };
        let inode_size = be16(sb, 104)? as u64;
        let inodelog = sb[122] as u32;
        let inopblock = be16(sb, 106)? as u64;
        let inopblog = sb[123] as u32;
        ensure!(
            (8..=11).contains(&inodelog) && inode_size == 1 << inodelog,
            "inode size {inode_size} (log {inodelog}) is invalid"
        );
        ensure!(
            inopblog == blocklog.saturating_sub(inodelog) && inopblock == 1 << inopblog && inode_size <= block_size,
            "{inopblock} inodes per block (log {inopblog}) do not match the block and inode sizes"
        );
        let dir_block_log = sb[192] as u32;
        ensure!(blocklog + dir_block_log <= 16, "directory block size (log {dir_block_log} blocks) exceeds 64 KiB");
        let features2 = be32(sb, 200)?;
        let ftype = version == 5 || features2 & 0x200 != 0;
        let root_ino = be64(sb, 56)?;
        let rblocks = be64(sb, 16)?;
        let mut meta_uuid = [0u8; 16];
        if incompat & INCOMPAT_META_UUID != 0 {
            meta_uuid.copy_from_slice(&sb[248..264]);
        } else {
            meta_uuid.copy_from_slice(&sb[32..48]);
        }
        Ok(Some(Superblock {
            version,
            block_size,
            sector_size,
            dblocks,
            agblocks,
            agcount,
            agblklog,
            log,
            fdblocks,
            ro_compat,
            meta_uuid,
            root_ino,
            inode_size,
            inopblog,
            dir_block_log,
            incompat,
            ftype,
            rblocks,
        }))
    }

    /// Reads and parses the primary superblock of `region`; `Ok(None)` when there is no XFS magic.
    pub fn read(region: &Region) -> Result<Option<Superblock>> {
        if region.len < 512 {
            return Ok(None);
        }
        let mut first = vec![0u8; 512];
        region.read_at(0, &mut first)?;
        if be32(&first, 0)? != SB_MAGIC {
            return Ok(None);
        }
        let sectsize = be16(&first, 102)? as u64;
        ensure!(sectsize.is_power_of_two() && (512..=32768).contains(&sectsize), "sector size {sectsize} is invalid");
        ensure!(region.len >= sectsize, "the volume is smaller than one XFS sector");
        let mut raw = vec![0u8; sectsize as usize];
        region.read_at(0, &mut raw)?;
        Superblock::parse(&raw)
    }

    /// Whether metadata blocks carry CRCs, owners and UUIDs (v5).
    pub fn crc(&self) -> bool {
        self.version == 5
    }

    /// Blocks in AG `ag` (the last one may be short).
    pub fn ag_len(&self, ag: u64) -> u64 {
        self.dblocks.min((ag + 1) * self.agblocks) - ag * self.agblocks
    }

    /// Blocks at the start of every AG holding the four header sectors.
    fn header_blocks(&self) -> u64 {
        (4 * self.sector_size).div_ceil(self.block_size)
    }

    fn btree_header_len(&self) -> usize {
        if self.crc() {
            56
        } else {
            16
        }
    }
}

/// What one AGF says, checked.
#[derive(Clone, Debug)]
struct Agf {
    length: u32,
    bno_root: u32,
    bno_level: u32,
    free_blocks: u32,
    longest: u32,
    /// Blocks that hold data even though the filesystem may count them as free: free-list
    /// blocks and btree blocks past the roots.
    flcount: u32,
    btreeblks: u32,
    /// Blocks known to be in use (btree roots, log), for cross-checking the free extents.
    pinned: Vec<Range<u64>>,
}

pub struct XfsMap {
    region: Region,
    sb: Superblock,
    /// Free blocks as the AGFs count them (free extents + free list + btree blocks).
    fs_free_blocks: u64,
    cursor: Option<AgCursor>,
}

/// Position of `used_ranges` inside one AG: a bnobt walk and how far it has been answered.
struct AgCursor {
    ag: u64,
    walk: BnoWalk,
    /// The next free extent (AG block range) not yet passed, if any.
    pending: Option<Range<u64>>,
    /// End of the last free extent passed: the cursor can answer any range from here on.
    floor: u64,
}

impl XfsMap {
    /// Recognises an XFS filesystem. `Ok(None)`: not XFS; `Err`: XFS but unusable.
    pub fn probe(region: &Region) -> Result<Option<XfsMap>> {
        let Some(sb) = Superblock::read(region)? else {
            return Ok(None);
        };
        let fs_bytes = sb.dblocks.checked_mul(sb.block_size).context("filesystem size overflows")?;
        ensure!(
            fs_bytes <= region.len,
            "the filesystem ({fs_bytes} bytes) is larger than the volume ({} bytes)",
            region.len
        );
        let mut map = XfsMap { region: region.clone(), sb, fs_free_blocks: 0, cursor: None };
        // Check every AG once, now, so that damage shows before the backup starts.
        let mut free = 0u64;
        for ag in 0..map.sb.agcount {
            let agf = map.read_agf(ag)?;
            let mut walk = BnoWalk::new(ag, &agf);
            let (mut sum, mut longest, mut extents) = (0u64, 0u64, 0u64);
            while let Some(ext) = walk.next(&map.region, &map.sb)? {
                sum += ext.end - ext.start;
                longest = longest.max(ext.end - ext.start);
                extents += 1;
            }
            ensure!(
                sum == agf.free_blocks as u64,
                "AG {ag}: the free-space btree holds {sum} free blocks in {extents} extents, the AGF says {}",
                agf.free_blocks
            );
            ensure!(
                longest == agf.longest as u64 || (sum == 0 && agf.longest <= 1),
                "AG {ag}: the longest free extent is {longest} blocks, the AGF says {}",
                agf.longest
            );
            free += agf.free_blocks as u64 + agf.flcount as u64 + agf.btreeblks as u64;
        }
        ensure!(free <= map.sb.dblocks, "the AGFs count {free} free blocks in a {} block filesystem", map.sb.dblocks);
        map.fs_free_blocks = free;
        match log_state(&map.region, &map.sb)? {
            LogState::Clean | LogState::Covered => {}
            LogState::Dirty(why) => {
                return Err(Untrusted(format!(
                    "the log holds metadata changes not yet written in place ({why}): the free-space btrees may be \
                     stale until the log is replayed (mount the filesystem, or freeze it before taking a snapshot)"
                ))
                .into())
            }
        }
        Ok(Some(map))
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Reads and checks the AGF of `ag`.
    fn read_agf(&self, ag: u64) -> Result<Agf> {
        let sb = &self.sb;
        let ss = sb.sector_size as usize;
        let mut b = vec![0u8; ss];
        self.region.read_at(ag * sb.agblocks * sb.block_size + sb.sector_size, &mut b)?;
        ensure!(be32(&b, 0)? == AGF_MAGIC, "AG {ag}: bad AGF magic {:#x}", be32(&b, 0)?);
        ensure!(be32(&b, 4)? == 1, "AG {ag}: AGF version {} is not supported", be32(&b, 4)?);
        ensure!(be32(&b, 8)? as u64 == ag, "AG {ag}: the AGF claims to be AG {}", be32(&b, 8)?);
        if sb.crc() {
            let stored = crate::bytes::le32(&b, AGF_CRC_OFF)?;
            ensure!(stored == crc32c_skipping(&b, AGF_CRC_OFF), "AG {ag}: AGF CRC mismatch");
            ensure!(b[64..80] == sb.meta_uuid, "AG {ag}: the AGF belongs to another filesystem (UUID mismatch)");
        }
        let ag_len = sb.ag_len(ag);
        let length = be32(&b, 12)?;
        ensure!(length as u64 == ag_len, "AG {ag}: the AGF says {length} blocks, the superblock {ag_len}");
        let bno_root = be32(&b, 16)?;
        let bno_level = be32(&b, 28)?;
        ensure!((1..=MAX_LEVELS).contains(&bno_level), "AG {ag}: free-space btree depth {bno_level} is invalid");
        let hdr = sb.header_blocks();
        let in_ag = |bno: u32| (bno as u64) >= hdr && (bno as u64) < ag_len;
        ensure!(in_ag(bno_root), "AG {ag}: free-space btree root {bno_root} lies outside the AG");
        let flcount = be32(&b, 48)?;
        let agfl_slots = (sb.sector_size - if sb.crc() { 36 } else { 0 }) / 4;
        ensure!(flcount as u64 <= agfl_slots, "AG {ag}: free list count {flcount} exceeds its {agfl_slots} slots");
        let free_blocks = be32(&b, 52)?;
        let longest = be32(&b, 56)?;
        let btreeblks = be32(&b, 60)?;
        ensure!(
            free_blocks as u64 <= ag_len && longest <= free_blocks.max(1),
            "AG {ag}: free block counts are invalid"
        );
        ensure!(btreeblks as u64 <= ag_len, "AG {ag}: btree block count {btreeblks} is invalid");
        let mut pinned = Vec::with_capacity(6);
        pinned.push(0..hdr);
        let mut pin = |bno: u32| {
            if in_ag(bno) {
                pinned.push(bno as u64..bno as u64 + 1);
            }
        };
        pin(bno_root);
        pin(be32(&b, 20)?); // by-size btree root
        if sb.ro_compat & RO_COMPAT_RMAPBT != 0 {
            pin(be32(&b, 24)?);
        }
        if sb.ro_compat & RO_COMPAT_REFLINK != 0 {
            pin(be32(&b, 88)?);
        }
        if let Some((log_ag, start, len)) = sb.log {
            if log_ag == ag {
                pinned.push(start..start + len);
            }
        }
        pinned.sort_by_key(|r| r.start);
        Ok(Agf { length, bno_root, bno_level, free_blocks, longest, flcount, btreeblks, pinned })
    }

    /// Used blocks of AG `ag` within AG blocks `[b0, b1)`, appended as filesystem block ranges.
    fn ag_used(&mut self, ag: u64, b0: u64, b1: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let restart = match &self.cursor {
            Some(c) => c.ag != ag || c.floor > b0,
            None => true,
        };
        if restart {
            let agf = self.read_agf(ag)?;
            let mut walk = BnoWalk::new(ag, &agf);
            let pending = walk.next(&self.region, &self.sb)?;
            self.cursor = Some(AgCursor { ag, walk, pending, floor: 0 });
        }
        let base = ag * self.sb.agblocks;
        let cursor = self.cursor.as_mut().expect("cursor just set");
        let mut pos = b0;
        while pos < b1 {
            match cursor.pending.clone() {
                Some(free) if free.end <= pos => {
                    cursor.floor = free.end;
                    cursor.pending = cursor.walk.next(&self.region, &self.sb)?;
                }
                Some(free) if free.start < b1 => {
                    if free.start > pos {
                        push_range(out, base + pos..base + free.start);
                    }
                    pos = free.end.min(b1);
                }
                _ => {
                    push_range(out, base + pos..base + b1);
                    pos = b1;
                }
            }
        }
        Ok(())
    }
}

impl UsedMap for XfsMap {
    fn filesystem(&self) -> Option<&str> {
        Some("xfs")
    }

    fn describe(&self) -> String {
        format!("xfs v{} free-space btrees", self.sb.version)
    }

    fn reported_used_bytes(&self) -> Option<u64> {
        Some((self.sb.dblocks - self.fs_free_blocks) * self.sb.block_size)
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let bs = self.sb.block_size;
        let end = start + len;
        let fs_end = self.sb.dblocks * bs;
        // Work in blocks; a partial block at either end counts as the whole block.
        let b1 = end.min(fs_end).div_ceil(bs);
        let mut b = start / bs;
        let mut blocks = Vec::new();
        while b < b1 {
            let ag = b / self.sb.agblocks;
            let ag_first = ag * self.sb.agblocks;
            let stop = (ag_first + self.sb.ag_len(ag)).min(b1);
            self.ag_used(ag, b - ag_first, stop - ag_first, &mut blocks)?;
            b = stop;
        }
        for r in blocks {
            push_range(out, (r.start * bs).max(start)..(r.end * bs).min(end));
        }
        // Bytes past the filesystem's end (a volume larger than its filesystem) are kept.
        if end > fs_end {
            push_range(out, fs_end.max(start)..end);
        }
        Ok(())
    }
}

/// One block of the walk's current root-to-leaf path.
struct Frame {
    buf: Vec<u8>,
    level: u32,
    numrecs: usize,
    next: usize,
}

/// An in-order walk over one AG's by-block-number free-space btree, yielding free extents as
/// AG block ranges. Holds one path of blocks. Every block is checked as it is read: magic,
/// level, record count, v5 CRC/owner/location/UUID, sibling links level by level, keys equal to
/// the first key of the child they point at; extents must come in strictly increasing,
/// non-overlapping order inside the AG and must not cover blocks known to be in use. Since the
/// levels strictly decrease downwards and the extents strictly increase, a loop or a block
/// reachable twice is caught at once.
struct BnoWalk {
    ag: u64,
    ag_len: u64,
    root: u32,
    levels: u32,
    pinned: Vec<Range<u64>>,
    started: bool,
    stack: Vec<Frame>,
    /// Per level: (last block visited, its right sibling).
    last_at_level: Vec<Option<(u32, u32)>>,
    /// End of the last extent returned.
    prev_end: u64,
}

impl BnoWalk {
    fn new(ag: u64, agf: &Agf) -> BnoWalk {
        BnoWalk {
            ag,
            ag_len: agf.length as u64,
            root: agf.bno_root,
            levels: agf.bno_level,
            pinned: agf.pinned.clone(),
            started: false,
            stack: Vec::with_capacity(agf.bno_level as usize),
            last_at_level: vec![None; agf.bno_level as usize],
            prev_end: 0,
        }
    }

    /// Reads block `agbno` expected at `level`; `first_key`: the start block its parent's key says
    /// its first record has.
    fn visit(
        &mut self,
        region: &Region,
        sb: &Superblock,
        agbno: u32,
        level: u32,
        first_key: Option<u32>,
    ) -> Result<()> {
        let ag = self.ag;
        ensure!(
            (agbno as u64) >= sb.header_blocks() && (agbno as u64) < self.ag_len,
            "AG {ag}: free-space btree block {agbno} lies outside the AG"
        );
        let bs = sb.block_size as usize;
        let mut buf = vec![0u8; bs];
        let daddr_block = ag * sb.agblocks + agbno as u64;
        region.read_at(daddr_block * sb.block_size, &mut buf)?;
        let magic = be32(&buf, 0)?;
        let want = if sb.crc() { BNO_MAGIC_V5 } else { BNO_MAGIC_V4 };
        ensure!(magic == want, "AG {ag}: free-space btree block {agbno} has bad magic {magic:#x}");
        if sb.crc() {
            let stored = crate::bytes::le32(&buf, BB_CRC)?;
            ensure!(stored == crc32c_skipping(&buf, BB_CRC), "AG {ag}: free-space btree block {agbno} has a bad CRC");
            ensure!(
                be64(&buf, BB_BLKNO)? == daddr_block * (sb.block_size / 512),
                "AG {ag}: free-space btree block {agbno} claims to live elsewhere"
            );
            ensure!(
                buf[BB_UUID..BB_UUID + 16] == sb.meta_uuid,
                "AG {ag}: free-space btree block {agbno} has a foreign UUID"
            );
            ensure!(
                be32(&buf, BB_OWNER)? as u64 == ag,
                "AG {ag}: free-space btree block {agbno} belongs to another AG"
            );
        }
        let blevel = be16(&buf, 4)? as u32;
        ensure!(blevel == level, "AG {ag}: free-space btree block {agbno} is at level {blevel}, expected {level}");
        let numrecs = be16(&buf, 6)? as usize;
        let hdr = sb.btree_header_len();
        let max = if level == 0 { (bs - hdr) / 8 } else { (bs - hdr) / 12 };
        let is_root = agbno == self.root;
        ensure!(
            numrecs <= max && (numrecs >= 1 || (is_root && level == 0)),
            "AG {ag}: free-space btree block {agbno} holds {numrecs} records (at most {max})"
        );
        let (left, right) = (be32(&buf, 8)?, be32(&buf, 12)?);
        let slot = &mut self.last_at_level[level as usize];
        match *slot {
            None => ensure!(left == NULL_AGBLOCK, "AG {ag}: the first free-space btree block at level {level} has a left sibling"),
            Some((prev, prev_right)) => ensure!(
                prev_right == agbno && left == prev,
                "AG {ag}: free-space btree sibling links at level {level} are broken ({prev} -> {prev_right}, {agbno} <- {left})"
            ),
        }
        *slot = Some((agbno, right));
        if let Some(k) = first_key {
            ensure!(
                numrecs > 0 && be32(&buf, hdr)? == k,
                "AG {ag}: free-space btree block {agbno} does not start at its parent's key"
            );
        }
        if level > 0 {
            // Keys strictly increasing.
            for i in 1..numrecs {
                ensure!(
                    be32(&buf, hdr + i * 8)? > be32(&buf, hdr + (i - 1) * 8)?,
                    "AG {ag}: free-space btree node {agbno} has keys out of order"
                );
            }
        }
        self.stack.push(Frame { buf, level, numrecs, next: 0 });
        Ok(())
    }

    /// The next free extent in block order, or `None` at the end of the AG.
    fn next(&mut self, region: &Region, sb: &Superblock) -> Result<Option<Range<u64>>> {
        if !self.started {
            self.started = true;
            self.visit(region, sb, self.root, self.levels - 1, None)?;
        }
        let hdr = sb.btree_header_len();
        let node_max = (sb.block_size as usize - hdr) / 12;
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            if top.next >= top.numrecs {
                self.stack.pop();
                if self.stack.is_empty() {
                    // End of the walk: the last block at every level has no right sibling.
                    for (l, last) in self.last_at_level.iter().enumerate() {
                        ensure!(
                            last.is_some_and(|(_, right)| right == NULL_AGBLOCK),
                            "AG {}: free-space btree level {l} does not end cleanly",
                            self.ag
                        );
                    }
                }
                continue;
            }
            let i = top.next;
            top.next += 1;
            if top.level == 0 {
                let start = be32(&top.buf, hdr + i * 8)? as u64;
                let count = be32(&top.buf, hdr + i * 8 + 4)? as u64;
                let ag = self.ag;
                ensure!(count > 0, "AG {ag}: empty free extent at block {start}");
                ensure!(start + count <= self.ag_len, "AG {ag}: free extent {start}+{count} runs past the AG");
                ensure!(start >= self.prev_end, "AG {ag}: free extents out of order or overlapping at block {start}");
                let ext = start..start + count;
                let lo = self.pinned.partition_point(|p| p.end <= ext.start);
                if let Some(p) = self.pinned.get(lo) {
                    ensure!(p.start >= ext.end, "AG {ag}: free extent {start}+{count} covers in-use blocks {p:?}");
                }
                self.prev_end = ext.end;
                return Ok(Some(ext));
            }
            let key = be32(&top.buf, hdr + i * 8)?;
            let ptr = be32(&top.buf, hdr + node_max * 8 + i * 4)?;
            let level = top.level - 1;
            self.visit(region, sb, ptr, level, Some(key))?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The internal log: may the on-disk metadata be trusted as it stands?
// ---------------------------------------------------------------------------------------------
//
// XFS writes metadata changes to its log first and in place later. Until the log is replayed,
// the free-space btrees on disk may lack recent allocations, so a map read from them could call
// freshly written blocks free. That is the state of a crash-consistent copy of a mounted
// filesystem. Two states are safe: a clean log (the last record is an unmount record that is its
// own tail) and a covered log (what freezing leaves: every record from the tail on logs nothing
// but the primary superblock, which the map does not rely on).

const LOG_MAGIC: u32 = 0xFEED_BABE;
const BB: usize = 512;
const CYCLE_SLOTS: usize = 64; // cycle-data words per (extended) record header
const XLOG_CONTINUE_TRANS: u8 = 0x04;
const XLOG_WAS_CONT_TRANS: u8 = 0x08;
const XLOG_UNMOUNT_TRANS: u8 = 0x20;
const TRANS_HEADER_MAGIC: u32 = 0x5452_414E; // "TRAN", host order (little-endian logs only)
const LI_BUF: u16 = 0x123C;
/// Records from the tail to the head examined before calling the log dirty.
const MAX_COVERING_RECORDS: usize = 64;

/// Whether the metadata on disk can be trusted as it stands.
#[derive(Debug, PartialEq, Eq)]
pub enum LogState {
    /// Unmounted cleanly.
    Clean,
    /// Frozen or idle: the log holds nothing but superblock updates.
    Covered,
    /// Metadata changes await replay (why).
    Dirty(String),
}

/// A log record: header facts and its data (first words of each block restored).
struct LogRecord {
    lsn: u64,
    tail: u64,
    num_ops: u32,
    /// Blocks the record takes: headers + data.
    blocks: u64,
    data: Vec<u8>,
}

struct Log<'a> {
    region: &'a Region,
    start: u64,
    bbs: u64,
}

impl Log<'_> {
    /// `count` basic blocks from `first`, wrapping at the end of the log.
    fn read(&self, first: u64, count: u64) -> Result<Vec<u8>> {
        ensure!(count <= self.bbs, "log record longer than the log");
        let mut out = vec![0u8; count as usize * BB];
        let head = count.min(self.bbs - first);
        self.region.read_at(self.start + first * BB as u64, &mut out[..head as usize * BB])?;
        if head < count {
            self.region.read_at(self.start, &mut out[head as usize * BB..])?;
        }
        Ok(out)
    }

    /// Reads the record whose header is at block `at`; `None` when it is incomplete (torn).
    fn record(&self, at: u64) -> Result<Option<LogRecord>> {
        let h = self.read(at, 1)?;
        ensure!(be32(&h, 0)? == LOG_MAGIC, "no log record header at log block {at}");
        let cycle = be32(&h, 4)?;
        let version = be32(&h, 8)?;
        let len = be32(&h, 12)? as u64;
        let lsn = be64(&h, 16)?;
        ensure!(
            (version == 1 || version == 2) && lsn >> 32 == cycle as u64 && lsn & 0xFFFF_FFFF == at,
            "log record header at block {at} is inconsistent"
        );
        ensure!(len <= 2 << 20, "log record at block {at} claims {len} bytes");
        let size = be32(&h, 320)? as u64;
        let hblks = if version == 2 && size > 32768 { size.div_ceil(32768) } else { 1 };
        let dblks = len.div_ceil(BB as u64);
        ensure!(
            dblks <= hblks * CYCLE_SLOTS as u64,
            "log record at block {at} has more blocks than its headers describe"
        );
        let all = self.read(at, hblks + dblks)?;
        // Blocks past the end of the log were written with the next cycle number.
        let stamp = |k: u64| {
            if at + k >= self.bbs {
                let c = cycle.wrapping_add(1);
                if c == LOG_MAGIC {
                    c.wrapping_add(1)
                } else {
                    c
                }
            } else {
                cycle
            }
        };
        for k in 1..hblks {
            if be32(&all, k as usize * BB)? != stamp(k) {
                return Ok(None);
            }
        }
        let mut data = all[hblks as usize * BB..].to_vec();
        for j in 0..dblks as usize {
            if be32(&data, j * BB)? != stamp(hblks + j as u64) {
                return Ok(None);
            }
            let saved = if j < CYCLE_SLOTS {
                be32(&all, 44 + 4 * j)?
            } else {
                be32(&all, (j / CYCLE_SLOTS) * BB + 4 + 4 * (j % CYCLE_SLOTS))?
            };
            data[j * BB..j * BB + 4].copy_from_slice(&saved.to_be_bytes());
        }
        data.truncate(len as usize);
        Ok(Some(LogRecord { lsn, tail: be64(&h, 24)?, num_ops: be32(&h, 40)?, blocks: hblks + dblks, data }))
    }
}

/// The log operations of a record: (flags, region).
fn log_ops(r: &LogRecord) -> Result<Vec<(u8, &[u8])>> {
    let mut ops = Vec::new();
    let mut o = 0usize;
    for _ in 0..r.num_ops {
        ensure!(o + 12 <= r.data.len(), "log record {:#x} is truncated", r.lsn);
        let len = be32(&r.data, o + 4)? as usize;
        let flags = r.data[o + 9];
        let end =
            (o + 12).checked_add(len).filter(|&e| e <= r.data.len()).context("log operation runs past its record")?;
        ops.push((flags, &r.data[o + 12..end]));
        o = end;
    }
    Ok(ops)
}

/// Whether a record logs nothing but the primary superblock (the log covering that freezing
/// and idling do), in self-contained transactions.
fn logs_only_the_superblock(r: &LogRecord) -> Result<bool> {
    let mut skip = 0u32;
    for (flags, region) in log_ops(r)? {
        if flags & (XLOG_CONTINUE_TRANS | XLOG_WAS_CONT_TRANS) != 0 {
            return Ok(false);
        }
        if region.is_empty() {
            continue;
        }
        if skip > 0 {
            skip -= 1;
            continue;
        }
        if crate::bytes::le32(region, 0).is_ok_and(|m| m == TRANS_HEADER_MAGIC) {
            continue;
        }
        if region.len() >= 16 && crate::bytes::le16(region, 0)? == LI_BUF {
            let blkno = crate::bytes::le64(region, 8)?;
            let regions = crate::bytes::le16(region, 2)? as u32;
            if blkno != 0 || regions == 0 {
                return Ok(false);
            }
            skip = regions - 1;
            continue;
        }
        return Ok(false);
    }
    Ok(true)
}

/// The state of the internal log; an external log is an `Untrusted` error.
pub fn log_state(region: &Region, sb: &Superblock) -> Result<LogState> {
    let Some((ag, agbno, blocks)) = sb.log else {
        return Err(
            Untrusted("the log is on an external device, so whether it is clean cannot be checked".into()).into()
        );
    };
    let log =
        Log { region, start: (ag * sb.agblocks + agbno) * sb.block_size, bbs: blocks * sb.block_size / BB as u64 };
    // The head: the record header with the highest sequence number.
    let mut best: Option<(u64, u64)> = None; // (lsn, block)
    let step = 2048u64; // blocks per read (1 MiB)
    let mut at = 0;
    while at < log.bbs {
        let n = step.min(log.bbs - at);
        let buf = log.read(at, n)?;
        for k in 0..n as usize {
            let b = &buf[k * BB..(k + 1) * BB];
            if be32(b, 0)? != LOG_MAGIC {
                continue;
            }
            let (cycle, version, lsn) = (be32(b, 4)?, be32(b, 8)?, be64(b, 16)?);
            if (version == 1 || version == 2)
                && cycle != 0
                && lsn >> 32 == cycle as u64
                && lsn & 0xFFFF_FFFF == at + k as u64
                && best.is_none_or(|(l, _)| lsn > l)
            {
                best = Some((lsn, at + k as u64));
            }
        }
        at += n;
    }
    let Some((_, head_at)) = best else {
        return Ok(LogState::Dirty("no log record found".into()));
    };
    let Some(last) = log.record(head_at)? else {
        return Ok(LogState::Dirty("the last log record is torn".into()));
    };
    if last.tail == last.lsn && last.num_ops == 1 && log_ops(&last)?[0].0 & XLOG_UNMOUNT_TRANS != 0 {
        return Ok(LogState::Clean);
    }
    // Walk from the tail to the head: covered when every record logs only the superblock.
    let mut lsn = last.tail;
    for _ in 0..MAX_COVERING_RECORDS {
        let at = lsn & 0xFFFF_FFFF;
        ensure!(at < log.bbs, "log tail {lsn:#x} lies outside the log");
        let Some(r) = log.record(at)? else {
            return Ok(LogState::Dirty(format!("log record at block {at} is torn")));
        };
        if r.lsn != lsn {
            return Ok(LogState::Dirty(format!("the log tail {lsn:#x} holds record {:#x}", r.lsn)));
        }
        if !logs_only_the_superblock(&r)? {
            return Ok(LogState::Dirty(format!("log record {lsn:#x} changes metadata")));
        }
        if r.lsn == last.lsn {
            return Ok(LogState::Covered);
        }
        let next = at + r.blocks;
        let cycle = (lsn >> 32) + if next >= log.bbs { 1 } else { 0 };
        lsn = cycle << 32 | (next % log.bbs);
    }
    Ok(LogState::Dirty(format!("more than {MAX_COVERING_RECORDS} log records await replay")))
}
