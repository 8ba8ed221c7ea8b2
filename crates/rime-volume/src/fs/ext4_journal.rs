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
use crate::device::Region;
use anyhow::{ensure, Context, Result};

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
        Ok(Some((replay, replayed, checksums))) => {
            if replay.is_empty() && replay.transactions == 0 {
                JournalState::Clean
            } else {
                JournalState::Replay { replay, replayed, kernel_replays: needed, checksums }
            }
        }
        // A journal that is not needed cannot hide anything from the home blocks.
        Err(_) if !needed => JournalState::Clean,
        Err(e) => JournalState::Unreadable(format!("{e:#}")),
    }
}

/// The journal's replay and the replayed view; `Ok(None)` when the log is empty.
fn open_replay(region: &Region, sb: &Superblock) -> Result<Option<(Replay, Region, &'static str)>> {
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
    let replay = journal.scan()?;
    let replayed = replay.overlay(region, sb.block_size);
    if let Some(after) = Superblock::read(&replayed)? {
        ensure!(sb.same_layout(&after), "the journal changes the filesystem's layout (an online resize in progress)");
    }
    Ok(Some((replay, replayed, checksums)))
}
