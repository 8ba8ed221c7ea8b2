//! An ext2/3/4 filesystem as the kernel will see it: on disk, and after its journal is replayed.
//!
//! A mounted or crashed ext3/ext4 holds committed metadata in its journal that its home blocks
//! do not show yet (block bitmaps, group descriptors, inode tables, directories). [`ExtVolume`]
//! opens the filesystem both ways: `raw` reads the volume as it is, `replayed` through the
//! journal's newest committed copies (see [`super::jbd2`]). The used-block map must cover both
//! (a kernel mount replays, an `e2fsck` may); the explorer shows what a mount shows.
//!
//! Invariants: `sb` is the on-disk superblock; a replay that would change the filesystem's
//! layout (an online resize in flight) is not followed and counts as an unreadable journal; a
//! journal that cannot be read while the filesystem needs recovery is reported as
//! [`JournalState::Unreadable`] with the reason, never silently ignored.

use super::ext4::Superblock;
use super::ext4_files::Ext4Files;
use super::jbd2::{Journal, JournalRun, Replay};
use crate::checksum::crc32c_raw;
use crate::device::{BlockSource, Region};
use anyhow::{ensure, Context, Result};
use std::sync::Arc;

const SUPERBLOCK_AT: u64 = 1024;
/// Offset of `s_checksum` in the superblock.
const SB_CSUM_AT: usize = 0x3FC;
const INCOMPAT_RECOVER: u32 = 0x4;

/// What the journal means for the filesystem's on-disk structures.
#[derive(Clone)]
pub enum JournalState {
    /// No journal (ext2), or an empty one: the home blocks are the truth.
    Clean,
    /// Committed transactions await replay; `replayed` reads the filesystem after it.
    Replay {
        replay: Replay,
        replayed: Region,
        /// Whether a mount replays it (`needs_recovery`); without the flag the kernel discards
        /// the log, though `e2fsck` offers to replay it.
        kernel_replays: bool,
        /// "checksum v3", ... for messages.
        checksums: &'static str,
        /// The journal superblock: its filesystem block, and whether it carries a checksum.
        journal_sb: (u64, bool),
    },
    /// The filesystem needs recovery but its journal cannot be followed; the reason.
    Unreadable(String),
}

pub struct ExtVolume {
    pub raw: Region,
    /// The on-disk superblock.
    pub sb: Superblock,
    pub journal: JournalState,
}

impl ExtVolume {
    /// Opens the ext filesystem on `region`: `Ok(None)` when there is none, `Err` when its
    /// superblock or descriptors make no sense.
    pub fn open(region: &Region) -> Result<Option<ExtVolume>> {
        let Some(sb) = Superblock::read(region)? else {
            return Ok(None);
        };
        let fs_bytes = sb.blocks_count.saturating_mul(sb.block_size);
        ensure!(
            fs_bytes <= region.len,
            "the filesystem ({fs_bytes} bytes) is larger than the volume ({} bytes)",
            region.len
        );
        let journal = journal_state(region, &sb);
        Ok(Some(ExtVolume { raw: region.clone(), sb, journal }))
    }

    /// The filesystem as a mount shows it: replayed when the kernel replays its journal.
    pub fn mounted_view(&self) -> &Region {
        match &self.journal {
            JournalState::Replay { replayed, kernel_replays: true, .. } => replayed,
            _ => &self.raw,
        }
    }

    /// The replay, if the journal holds one to follow.
    pub fn replay(&self) -> Option<(&Replay, &Region)> {
        match &self.journal {
            JournalState::Replay { replay, replayed, .. } => Some((replay, replayed)),
            _ => None,
        }
    }

    /// The filesystem as `e2fsck -E journal_only` would leave it: replayed, its journal empty
    /// and `needs_recovery` cleared (checksums updated), so that a read-only mount, which cannot
    /// replay, shows what a read-write mount would. `None` when a mount replays nothing.
    pub fn replayed_image(&self) -> Result<Option<Region>> {
        let JournalState::Replay { replay, replayed, kernel_replays: true, journal_sb: (jsb_block, jsb_csum), .. } =
            &self.journal
        else {
            return Ok(None);
        };
        let mut sb = vec![0u8; 1024];
        replayed.read_at(SUPERBLOCK_AT, &mut sb)?;
        let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().unwrap()) & !INCOMPAT_RECOVER;
        sb[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        if self.sb.has_metadata_csum() {
            let c = crc32c_raw(!0, &sb[..SB_CSUM_AT]);
            sb[SB_CSUM_AT..].copy_from_slice(&c.to_le_bytes());
        }
        let jsb_at = jsb_block * self.sb.block_size;
        let mut jsb = vec![0u8; 1024];
        self.raw.read_at(jsb_at, &mut jsb)?;
        jsb[0x18..0x1C].copy_from_slice(&replay.end_tid.to_be_bytes()); // s_sequence: the next one
        jsb[0x1C..0x20].fill(0); // s_start: the log is empty
        if *jsb_csum {
            jsb[0xFC..0x100].fill(0);
            let c = crc32c_raw(!0, &jsb);
            jsb[0xFC..0x100].copy_from_slice(&c.to_be_bytes());
        }
        let patched = Patched { inner: replayed.clone(), patches: vec![(SUPERBLOCK_AT, sb), (jsb_at, jsb)] };
        Ok(Some(Region::from_source(Arc::new(patched), self.raw.path.clone(), self.raw.len)))
    }

    /// One line on the journal, for the map's description; `None` when there is nothing to say.
    pub fn describe_journal(&self) -> Option<String> {
        match &self.journal {
            JournalState::Clean => None,
            JournalState::Replay { replay, kernel_replays, checksums, .. } => Some(format!(
                "{} committed journal transaction{} ({} blocks, {checksums}) replayed{}",
                replay.transactions,
                if replay.transactions == 1 { "" } else { "s" },
                replay.blocks_replayed(),
                if *kernel_replays { "" } else { " (left in a journal the filesystem does not flag for recovery)" }
            )),
            JournalState::Unreadable(why) => Some(format!("journal not readable: {why}")),
        }
    }
}

/// Reads the journal of the filesystem with superblock `sb` on `region`.
fn journal_state(region: &Region, sb: &Superblock) -> JournalState {
    if !sb.has_journal() {
        return JournalState::Clean;
    }
    let needed = sb.needs_recovery();
    match open_replay(region, sb) {
        Ok(None) => JournalState::Clean,
        Ok(Some(Opened { replay, replayed, checksums, journal_sb })) => {
            if replay.is_empty() && replay.transactions == 0 {
                JournalState::Clean
            } else {
                JournalState::Replay { replay, replayed, kernel_replays: needed, checksums, journal_sb }
            }
        }
        // A journal that is not needed cannot hide anything from the home blocks.
        Err(_) if !needed => JournalState::Clean,
        Err(e) => JournalState::Unreadable(format!("{e:#}")),
    }
}

/// A journal read to its end.
struct Opened {
    replay: Replay,
    replayed: Region,
    checksums: &'static str,
    journal_sb: (u64, bool),
}

/// The journal's replay and the replayed view; `Ok(None)` when the log is empty.
fn open_replay(region: &Region, sb: &Superblock) -> Result<Option<Opened>> {
    ensure!(
        sb.journal_inum != 0,
        "the journal is on a separate device, which a backup of this volume does not include"
    );
    let groups = sb.group_descs(region)?;
    let files = Ext4Files::new(region.clone(), sb.clone(), groups.iter().map(|d| d.inode_table).collect());
    let inode = files.inode(sb.journal_inum).context("reading the journal inode")?;
    let runs = files
        .block_map(&inode, &mut |_| {})
        .context("mapping the journal inode")?
        .into_iter()
        .map(|r| JournalRun { logical: r.logical, physical: r.physical, len: r.len })
        .collect();
    let mut journal = Journal::open(region, sb.block_size, sb.blocks_count, runs)?;
    if !journal.has_log() {
        return Ok(None);
    }
    ensure!(!sb.has_fast_commit(), "the filesystem uses fast commits, which only ext4 itself can replay");
    let checksums = journal.sb.checksum_name();
    let journal_sb = (journal.superblock_block()?, journal.sb.has_superblock_checksum());
    let started = std::time::Instant::now();
    let replay = journal.scan()?;
    tracing::debug!(
        transactions = replay.transactions,
        blocks = replay.blocks_replayed(),
        seconds = started.elapsed().as_secs_f64(),
        "{}: journal read",
        region.path.display()
    );
    let replayed = replay.overlay(region, sb.block_size);
    if let Some(after) = Superblock::read(&replayed)? {
        ensure!(sb.same_layout(&after), "the journal changes the filesystem's layout (an online resize in progress)");
    }
    Ok(Some(Opened { replay, replayed, checksums, journal_sb }))
}

/// A region with some byte ranges replaced.
struct Patched {
    inner: Region,
    /// (offset, bytes), not overlapping.
    patches: Vec<(u64, Vec<u8>)>,
}

impl BlockSource for Patched {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(offset, buf).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let end = offset + buf.len() as u64;
        for (at, bytes) in &self.patches {
            let (a, b) = ((*at).max(offset), (at + bytes.len() as u64).min(end));
            if a < b {
                buf[(a - offset) as usize..(b - offset) as usize]
                    .copy_from_slice(&bytes[(a - at) as usize..(b - at) as usize]);
            }
        }
        Ok(())
    }
}
