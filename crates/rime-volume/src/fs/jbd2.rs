//! The jbd2 journal of ext3/ext4: what the kernel's recovery would write, without writing it.
//!
//! A mounted (or crashed) ext3/ext4 keeps committed metadata — block bitmaps, group
//! descriptors, inode tables, directory blocks — in its journal until a checkpoint writes it to
//! its home location. A copy of such a volume (a snapshot, a crash) holds the truth only in the
//! journal; the home locations are stale until replay. [`Journal::scan`] reads the log exactly as
//! `fs/jbd2/recovery.c` does and returns a [`Replay`]: the newest replayed copy of every home
//! block, every home block a committed transaction writes, and a [`Region`] that reads the
//! filesystem as it will be after replay.
//!
//! Followed from the kernel, rule for rule:
//! - The log starts at `s_start` with transaction `s_sequence` and wraps from `s_maxlen` back to
//!   `s_first`. A transaction is descriptor and revoke blocks (each followed by the blocks its
//!   tags describe) closed by a commit block; every header must carry the journal magic and the
//!   expected sequence. The log ends at the first block that does not, or at an unknown block
//!   type: a transaction without its commit block is not replayed.
//! - Tags are 8, 12 (64-bit), 10, 14 (checksum v2) or 16 bytes (v3); a tag without
//!   `SAME_UUID` is followed by a 16-byte UUID; `ESCAPE` means the block's first four bytes were
//!   the journal magic and must be put back.
//! - Checksums: v1 (`COMPAT_CHECKSUM`) is a CRC-32/BE over the transaction's descriptor and data
//!   blocks, kept in the commit block; v2/v3 are CRC-32C seeded from the journal UUID, in the
//!   superblock, in a tail of every descriptor and revoke block, in the commit block and in each
//!   tag (16 bits in v2, 32 in v3, over the sequence and the block).
//! - A commit block that fails its checksum ends the log before its transaction. If it is older
//!   than the last good commit it is stale data from an earlier use of the journal; otherwise the
//!   kernel calls the journal corrupt and will not mount until `e2fsck` has replayed the log up
//!   to there, which is what the replay then describes ([`Replay::failed_commit`]). One whose
//!   header alone still checks out (its tail torn) is accepted by newer kernels and not by older
//!   ones: no single replay is certain, so that is damage.
//! - A descriptor or revoke block that fails its checksum ends the log there if the next commit
//!   is older than the last good one (stale data), and is damage otherwise; so is a replayed
//!   block whose tag checksum fails, a revoke block that overflows, or a log block outside the
//!   journal. Damage is an error: the kernel refuses to recover such a journal, and the caller
//!   must not trust the filesystem's on-disk maps either.
//! - A revoke record in transaction R cancels the copies of that block in transactions up to
//!   and including R (sequence numbers compare modulo 2^32).
//!
//! Fast commits (`FAST_COMMIT`) are logical, inode-level records that ext4 replays itself; they
//! are not followed here, and a journal that has the feature is refused when it needs replay.
//!
//! Bounded: one entry per distinct home block the log writes (at most the journal's length),
//! and the log is read once, sequentially, in runs of up to [`READ_AHEAD`] blocks.

use crate::bytes::{be16, be32, be64};
use crate::checksum::{crc32c_raw, Crc32Be};
use crate::device::{BlockSource, Region};
use crate::usedmap::push_range;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

const MAGIC: u32 = 0xC03B_3998;
const DESCRIPTOR_BLOCK: u32 = 1;
const COMMIT_BLOCK: u32 = 2;
const SUPERBLOCK_V1: u32 = 3;
const SUPERBLOCK_V2: u32 = 4;
const REVOKE_BLOCK: u32 = 5;

const COMPAT_CHECKSUM: u32 = 0x1;
const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const KNOWN_INCOMPAT: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;
const CRC32C_CHKSUM: u8 = 4;
const CRC32_CHKSUM: u8 = 1;
const CRC32_CHKSUM_SIZE: u8 = 4;

const FLAG_ESCAPE: u16 = 1;
const FLAG_SAME_UUID: u16 = 2;
const FLAG_LAST_TAG: u16 = 8;

/// Bytes of `struct commit_header` (60, padded to the alignment of its 64-bit commit time).
const COMMIT_HEADER: usize = 64;

/// Journal blocks read in one request while scanning.
const READ_AHEAD: u64 = 256;

/// A run of the journal: journal blocks `[logical, logical + len)` at filesystem blocks from
/// `physical`.
#[derive(Clone, Copy, Debug)]
pub struct JournalRun {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

/// The journal superblock's facts.
#[derive(Clone, Debug)]
pub struct JournalSuperblock {
    pub block_size: u64,
    /// Blocks in the journal.
    pub maxlen: u64,
    /// First log block (after the superblock).
    pub first: u64,
    /// Sequence of the oldest transaction still in the log.
    pub sequence: u32,
    /// Log block of that transaction; 0 when the journal is empty (clean).
    pub start: u64,
    pub compat: u32,
    pub incompat: u32,
    pub uuid: [u8; 16],
}

impl JournalSuperblock {
    /// Whether the superblock carries a checksum (journal checksums v2 and v3).
    pub fn has_superblock_checksum(&self) -> bool {
        self.csum_v2or3()
    }

    fn csum_v2or3(&self) -> bool {
        self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0
    }
    fn csum_v3(&self) -> bool {
        self.incompat & INCOMPAT_CSUM_V3 != 0
    }
    fn is_64bit(&self) -> bool {
        self.incompat & INCOMPAT_64BIT != 0
    }
    pub fn has_fast_commit(&self) -> bool {
        self.incompat & INCOMPAT_FAST_COMMIT != 0
    }

    /// Bytes of one descriptor tag, as `journal_tag_bytes` computes it.
    fn tag_bytes(&self) -> usize {
        if self.csum_v3() {
            return 16;
        }
        let sz = 12 + if self.incompat & INCOMPAT_CSUM_V2 != 0 { 2 } else { 0 };
        if self.is_64bit() {
            sz
        } else {
            sz - 4
        }
    }

    /// The checksum version in words, for messages and the manifest.
    pub fn checksum_name(&self) -> &'static str {
        if self.csum_v3() {
            "checksum v3"
        } else if self.incompat & INCOMPAT_CSUM_V2 != 0 {
            "checksum v2"
        } else if self.compat & COMPAT_CHECKSUM != 0 {
            "checksum v1"
        } else {
            "no checksums"
        }
    }
}

/// One copy of a home block in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Copy {
    /// Filesystem block that holds the copy (inside the journal).
    at: u64,
    /// The copy's first four bytes stand for the journal magic.
    escaped: bool,
    tid: u32,
}

/// The journal of one filesystem, opened for reading.
pub struct Journal {
    region: Region,
    runs: Vec<JournalRun>,
    pub sb: JournalSuperblock,
    fs_blocks: u64,
    csum_seed: u32,
    /// Read-ahead window: (first journal block, bytes).
    window: Option<(u64, Vec<u8>)>,
}

/// `a` after `b`, modulo 2^32 (the kernel's `tid_gt`).
fn tid_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Journal {
    /// Opens the internal journal whose blocks `runs` lists, on a filesystem of `fs_blocks`
    /// blocks of `block_size` bytes in `region`. Refuses what the kernel would refuse to load.
    pub fn open(region: &Region, block_size: u64, fs_blocks: u64, mut runs: Vec<JournalRun>) -> Result<Journal> {
        runs.sort_by_key(|r| r.logical);
        for r in &runs {
            ensure!(
                r.physical.checked_add(r.len).is_some_and(|e| e <= fs_blocks),
                "the journal's blocks lie outside the filesystem"
            );
        }
        let mut j = Journal {
            region: region.clone(),
            runs,
            sb: JournalSuperblock {
                block_size,
                maxlen: 0,
                first: 0,
                sequence: 0,
                start: 0,
                compat: 0,
                incompat: 0,
                uuid: [0; 16],
            },
            fs_blocks,
            csum_seed: 0,
            window: None,
        };
        let raw = j.read_block(0).context("reading the journal superblock")?;
        ensure!(be32(&raw, 0)? == MAGIC, "the journal superblock has no jbd2 magic");
        let version = be32(&raw, 4)?;
        ensure!(
            version == SUPERBLOCK_V1 || version == SUPERBLOCK_V2,
            "the journal superblock has an unknown type {version}"
        );
        let v2 = version == SUPERBLOCK_V2;
        let sb = JournalSuperblock {
            block_size: be32(&raw, 0xC)? as u64,
            maxlen: be32(&raw, 0x10)? as u64,
            first: be32(&raw, 0x14)? as u64,
            sequence: be32(&raw, 0x18)?,
            start: be32(&raw, 0x1C)? as u64,
            compat: if v2 { be32(&raw, 0x24)? } else { 0 },
            incompat: if v2 { be32(&raw, 0x28)? } else { 0 },
            uuid: raw[0x30..0x40].try_into().unwrap(),
        };
        ensure!(
            sb.block_size == block_size,
            "the journal's block size ({}) differs from the filesystem's ({block_size})",
            sb.block_size
        );
        let blocks_mapped = j.runs.iter().map(|r| r.logical + r.len).max().unwrap_or(0);
        ensure!(
            sb.maxlen >= 1024.min(blocks_mapped) && sb.maxlen <= blocks_mapped,
            "the journal claims {} blocks but its inode maps {blocks_mapped}",
            sb.maxlen
        );
        ensure!(sb.first >= 1 && sb.first < sb.maxlen, "the journal's first log block {} is invalid", sb.first);
        ensure!(
            sb.incompat & !KNOWN_INCOMPAT == 0,
            "the journal has features this kernel-compatible reader does not know ({:#x})",
            sb.incompat & !KNOWN_INCOMPAT
        );
        ensure!(
            !(sb.incompat & INCOMPAT_CSUM_V2 != 0 && sb.csum_v3()),
            "the journal claims checksums v2 and v3 at once"
        );
        ensure!(
            !(sb.csum_v2or3() && sb.compat & COMPAT_CHECKSUM != 0),
            "the journal claims checksums v1 and v2/v3 at once"
        );
        if sb.csum_v2or3() {
            ensure!(raw[0x50] == CRC32C_CHKSUM, "the journal's checksum type {} is unknown", raw[0x50]);
            let mut copy = raw[..1024].to_vec();
            copy[0xFC..0x100].fill(0);
            ensure!(be32(&raw, 0xFC)? == crc32c_raw(!0, &copy), "the journal superblock fails its checksum");
            j.csum_seed = crc32c_raw(!0, &sb.uuid);
        }
        j.sb = sb;
        Ok(j)
    }

    /// The filesystem block holding the journal superblock (journal block 0).
    pub fn superblock_block(&self) -> Result<u64> {
        Ok(self.fs_block_of(0)?.0)
    }

    /// Whether the log holds transactions (`s_start` is non-zero): the kernel replays them on
    /// mount when the filesystem says it needs recovery.
    pub fn has_log(&self) -> bool {
        self.sb.start != 0
    }

    fn fs_block_of(&self, logical: u64) -> Result<(u64, u64)> {
        let i = self.runs.partition_point(|r| r.logical + r.len <= logical);
        match self.runs.get(i) {
            Some(r) if r.logical <= logical => Ok((r.physical + (logical - r.logical), r.logical + r.len - logical)),
            _ => bail!("journal block {logical} is not mapped (a hole in the journal inode)"),
        }
    }

    /// Journal block `logical`'s bytes, read ahead in runs while scanning forward.
    fn read_block(&mut self, logical: u64) -> Result<Vec<u8>> {
        let bs = self.sb.block_size as usize;
        if let Some((first, buf)) = &self.window {
            if logical >= *first && ((logical - first) as usize + 1) * bs <= buf.len() {
                let o = (logical - first) as usize * bs;
                return Ok(buf[o..o + bs].to_vec());
            }
        }
        let (physical, contiguous) = self.fs_block_of(logical)?;
        let limit = if self.sb.maxlen > logical { self.sb.maxlen - logical } else { 1 };
        let n = contiguous.min(READ_AHEAD).min(limit).max(1);
        let mut buf = vec![0u8; n as usize * bs];
        self.region.read_at(physical * self.sb.block_size, &mut buf)?;
        let out = buf[..bs].to_vec();
        self.window = Some((logical, buf));
        Ok(out)
    }

    /// Reads the log from its start and returns what replay would write. `Err` when the log is
    /// damaged such that the kernel would refuse to recover it.
    pub fn scan(&mut self) -> Result<Replay> {
        let sb = self.sb.clone();
        ensure!(!sb.has_fast_commit(), "the journal uses fast commits, which only ext4 itself can replay");
        let mut replay = Replay::empty(sb.sequence);
        if sb.start == 0 {
            return Ok(replay);
        }
        let bs = sb.block_size as usize;
        let v1 = sb.compat & COMPAT_CHECKSUM != 0;
        let last = sb.maxlen; // j_last: one past the last log block
        let wrap = |b: u64| if b >= last { b - (last - sb.first) } else { b };
        let tail = if sb.csum_v2or3() { 4 } else { 0 };
        let tag_bytes = sb.tag_bytes();
        let mut next_tid = sb.sequence;
        let mut block = sb.start;
        let mut need_check_commit_time = false;
        let mut last_commit_time = 0u64;
        // The open transaction, adopted at its commit block if that is good.
        let mut pending = Transaction::default();
        let mut crc_v1 = Crc32Be::new();
        let mut revokes: BTreeMap<u64, u32> = BTreeMap::new();
        let mut copies: BTreeMap<u64, Copy> = BTreeMap::new();
        // Copies whose tag checksum failed, with their transaction: damage unless revoked.
        let mut bad_copies: Vec<(u64, u32)> = Vec::new();
        // A log is never longer than the journal; a longer one loops.
        let mut budget = sb.maxlen;
        loop {
            ensure!(block < sb.maxlen, "log block {block} lies outside the journal");
            let buf = self.read_block(block)?;
            let here = block;
            block = wrap(block + 1);
            if be32(&buf, 0)? != MAGIC || be32(&buf, 8)? != next_tid {
                break;
            }
            ensure!(budget > 0, "the journal's log does not end");
            budget -= 1;
            match be32(&buf, 4)? {
                DESCRIPTOR_BLOCK => {
                    let good = !sb.csum_v2or3() || block_tail_ok(&buf, self.csum_seed);
                    // Stale blocks from an earlier use of the journal fail too; the next
                    // commit block tells which.
                    need_check_commit_time |= !good;
                    if v1 && good {
                        crc_v1.update(&buf);
                    }
                    let mut off = 12;
                    while off + tag_bytes <= bs - tail {
                        let tag = &buf[off..off + tag_bytes];
                        let flags = be16(tag, 6)?;
                        let mut home = be32(tag, 0)? as u64;
                        if sb.is_64bit() {
                            home |= (be32(tag, 8)? as u64) << 32;
                        }
                        let log_block = block;
                        block = wrap(block + 1);
                        ensure!(budget > 0, "the journal's log does not end");
                        budget -= 1;
                        if good {
                            let (at, _) = self.fs_block_of(log_block)?;
                            let mut checksum_ok = true;
                            if v1 || sb.csum_v2or3() {
                                let data = self.read_block(log_block)?;
                                if v1 {
                                    crc_v1.update(&data);
                                }
                                checksum_ok =
                                    !sb.csum_v2or3() || tag_checksum_ok(&sb, tag, &data, next_tid, self.csum_seed);
                            }
                            pending.copies.push((
                                home,
                                Copy { at, escaped: flags & FLAG_ESCAPE != 0, tid: next_tid },
                                checksum_ok,
                            ));
                        }
                        off += tag_bytes;
                        if flags & FLAG_SAME_UUID == 0 {
                            off += 16;
                        }
                        if flags & FLAG_LAST_TAG != 0 {
                            break;
                        }
                    }
                }
                REVOKE_BLOCK => {
                    need_check_commit_time |= sb.csum_v2or3() && !block_tail_ok(&buf, self.csum_seed);
                    let count = be32(&buf, 12)? as usize;
                    if count > bs - tail {
                        pending.damage.get_or_insert(format!("the revoke block at log block {here} overflows"));
                        continue;
                    }
                    let rec = if sb.is_64bit() { 8 } else { 4 };
                    let mut off = 16;
                    while off + rec <= count {
                        pending.revokes.push(if rec == 8 { be64(&buf, off)? } else { be32(&buf, off)? as u64 });
                        off += rec;
                    }
                }
                COMMIT_BLOCK => {
                    let commit_time = be64(&buf, 48)?;
                    if need_check_commit_time {
                        ensure!(
                            commit_time < last_commit_time,
                            "transaction {next_tid} holds a descriptor or revoke block that fails its checksum"
                        );
                        break; // stale data: the log ends before this transaction
                    }
                    let mut commit_ok = true;
                    if v1 {
                        let (kind, size, found) = (buf[12], buf[13], be32(&buf, 16)?);
                        let matches = kind == CRC32_CHKSUM && size == CRC32_CHKSUM_SIZE && found == crc_v1.value();
                        let unused = kind == 0 && size == 0 && found == 0;
                        commit_ok = matches || unused;
                        crc_v1 = Crc32Be::new();
                    }
                    if sb.csum_v2or3() && be32(&buf, 16)? != commit_checksum(&buf, bs, self.csum_seed) {
                        // Newer kernels accept a commit block whose header alone checks out
                        // (its tail torn), older ones end the log there: the two replays
                        // differ, so neither can be trusted to be the one that happens.
                        ensure!(
                            be32(&buf, 16)? != commit_checksum(&buf, COMMIT_HEADER, self.csum_seed),
                            "the commit block of transaction {next_tid} is torn after its header, which some \
                             kernels replay and others do not"
                        );
                        commit_ok = false;
                    }
                    if !commit_ok {
                        // The log ends before this transaction. Unless the commit is older
                        // than the last good one (stale data), the kernel calls the journal
                        // corrupt and refuses to mount (with async commit it scans on, but
                        // replays nothing more either); e2fsck then replays up to here.
                        if commit_time >= last_commit_time && sb.incompat & INCOMPAT_ASYNC_COMMIT == 0 {
                            replay.failed_commit = Some(next_tid);
                        }
                        break;
                    }
                    let t = std::mem::take(&mut pending);
                    if let Some(why) = t.damage {
                        bail!("{why}");
                    }
                    for b in t.revokes {
                        let e = revokes.entry(b).or_insert(next_tid);
                        if tid_gt(next_tid, *e) {
                            *e = next_tid;
                        }
                    }
                    for (home, copy, checksum_ok) in t.copies {
                        ensure!(home < self.fs_blocks, "the journal writes block {home}, outside the filesystem");
                        replay.homes_written.push(home);
                        if checksum_ok {
                            copies.insert(home, copy);
                        } else {
                            bad_copies.push((home, next_tid));
                        }
                    }
                    last_commit_time = commit_time;
                    replay.transactions += 1;
                    next_tid = next_tid.wrapping_add(1);
                }
                _ => break,
            }
        }
        replay.end_tid = next_tid;
        // A revoke in transaction R cancels copies from transactions up to R.
        let revoked = |home: &u64, tid: u32| revokes.get(home).is_some_and(|&r| !tid_gt(tid, r));
        if let Some((home, tid)) = bad_copies.iter().find(|(h, t)| !revoked(h, *t)) {
            bail!("the copy of block {home} in transaction {tid} fails its checksum");
        }
        // Copies only grow newer, so the newest copy of a block decides.
        copies.retain(|home, c| !revoked(home, c.tid));
        replay.copies = Arc::new(copies);
        replay.homes_written.sort_unstable();
        replay.homes_written.dedup();
        Ok(replay)
    }
}

/// A transaction being read: its copies (with whether their tag checksums held), revoked
/// blocks, and damage that matters only if the transaction commits.
#[derive(Default)]
struct Transaction {
    copies: Vec<(u64, Copy, bool)>,
    revokes: Vec<u64>,
    damage: Option<String>,
}

/// A commit block's v2/v3 checksum over its first `covered` bytes, the rest and the checksum
/// field taken as zero (`covered` is the block size, or the header for the partial check).
fn commit_checksum(buf: &[u8], covered: usize, seed: u32) -> u32 {
    let mut copy = vec![0u8; buf.len()];
    copy[..covered].copy_from_slice(&buf[..covered]);
    copy[16..20].fill(0);
    crc32c_raw(seed, &copy)
}

fn block_tail_ok(buf: &[u8], seed: u32) -> bool {
    let n = buf.len();
    let mut copy = buf.to_vec();
    copy[n - 4..].fill(0);
    be32(buf, n - 4).is_ok_and(|stored| stored == crc32c_raw(seed, &copy))
}

fn tag_checksum_ok(sb: &JournalSuperblock, tag: &[u8], data: &[u8], tid: u32, seed: u32) -> bool {
    let c = crc32c_raw(seed, &tid.to_be_bytes());
    let c = crc32c_raw(c, data);
    if sb.csum_v3() {
        be32(tag, 12).is_ok_and(|stored| stored == c)
    } else {
        be16(tag, 4).is_ok_and(|stored| stored == c as u16)
    }
}

/// What replaying a journal writes.
#[derive(Clone, Debug)]
pub struct Replay {
    /// Newest replayed copy of each home block.
    copies: Arc<BTreeMap<u64, Copy>>,
    /// Every home block a committed transaction writes, revoked or not; sorted, distinct.
    homes_written: Vec<u64>,
    /// Committed transactions in the log.
    pub transactions: u32,
    /// First transaction of the log, and the one after its last committed transaction.
    pub first_tid: u32,
    pub end_tid: u32,
    /// A transaction whose commit block fails its checksum: the kernel refuses to mount until
    /// `e2fsck` has replayed the journal up to it (which is what this replay is).
    pub failed_commit: Option<u32>,
}

impl Replay {
    fn empty(tid: u32) -> Replay {
        Replay {
            copies: Arc::new(BTreeMap::new()),
            homes_written: Vec::new(),
            transactions: 0,
            first_tid: tid,
            end_tid: tid,
            failed_commit: None,
        }
    }

    /// Whether replay changes anything.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    /// Blocks replay writes.
    pub fn blocks_replayed(&self) -> usize {
        self.copies.len()
    }

    /// Whether replay writes home block `b`.
    pub fn replays(&self, b: u64) -> bool {
        self.copies.contains_key(&b)
    }

    /// Every home block a committed transaction writes, as sorted block ranges.
    pub fn written_ranges(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for &b in &self.homes_written {
            push_range(&mut out, b..b + 1);
        }
        out
    }

    /// `region` (the filesystem) as it reads after replay: each replayed block from its newest
    /// copy in the journal, everything else from its home.
    pub fn overlay(&self, region: &Region, block_size: u64) -> Region {
        if self.copies.is_empty() {
            return region.clone();
        }
        let source =
            Replayed { fs: region.clone(), block_size, copies: self.copies.clone(), scratch: Mutex::new(Vec::new()) };
        Region::from_source(Arc::new(source), region.path.clone(), region.len)
    }
}

/// A filesystem read through its journal's replayed copies.
struct Replayed {
    fs: Region,
    block_size: u64,
    copies: Arc<BTreeMap<u64, Copy>>,
    scratch: Mutex<Vec<u8>>,
}

impl BlockSource for Replayed {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let io = |e: anyhow::Error| std::io::Error::other(format!("{e:#}"));
        let bs = self.block_size;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / bs, end.div_ceil(bs));
        let mut pos = offset;
        for (&home, copy) in self.copies.range(first..last) {
            let block_start = home * bs;
            if block_start > pos {
                let n = (block_start - pos) as usize;
                let o = (pos - offset) as usize;
                self.fs.read_at(pos, &mut buf[o..o + n]).map_err(io)?;
                pos = block_start;
            }
            let mut scratch = self.scratch.lock().unwrap();
            scratch.resize(bs as usize, 0);
            self.fs.read_at(copy.at * bs, &mut scratch).map_err(io)?;
            if copy.escaped {
                scratch[..4].copy_from_slice(&MAGIC.to_be_bytes());
            }
            let from = (pos - block_start) as usize;
            let to = ((end - block_start) as usize).min(bs as usize);
            let o = (pos - offset) as usize;
            buf[o..o + (to - from)].copy_from_slice(&scratch[from..to]);
            pos = block_start + to as u64;
        }
        if pos < end {
            let o = (pos - offset) as usize;
            self.fs.read_at(pos, &mut buf[o..]).map_err(io)?;
        }
        Ok(())
    }
}
