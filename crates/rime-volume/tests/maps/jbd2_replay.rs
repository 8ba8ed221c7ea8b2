//! Rime's reading of an ext3/ext4 journal against the kernel's own replay.
//!
//! `debugfs`'s journal writer (`jo`, `jw`, `jc`) puts real jbd2 transactions into a real
//! filesystem without replaying them: committed ones, revoked blocks, an uncommitted tail, in
//! every checksum flavour (none, v1, v2, v3) with 32- and 64-bit block tags. Then the kernel
//! mounts a copy, which replays the journal. Every block of the filesystem as Rime reads it
//! through the journal must equal the same block of the kernel's replayed copy (save the
//! superblock and the journal itself, which the mount rewrites), and the used-block map must
//! cover every block the kernel's replayed bitmaps mark used. Damage that makes the kernel
//! refuse to mount must make Rime's map refuse to trust the on-disk bitmaps.

use crate::support::*;
use rime_volume::fs::ext4::Ext4Map;
use rime_volume::fs::ext4_journal::{ExtVolume, JournalState};
use rime_volume::{UsedMap, Volume};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

const BS: u64 = 4096;

/// A 64 MiB ext4 (4 KiB blocks, a 4 MiB journal, inode tables zeroed at mkfs so that mounting
/// writes nothing but the superblock and journal) with `mkfs_opts`.
fn new_fs(dir: &Path, name: &str, mkfs_opts: &[&str]) -> PathBuf {
    let img = dir.join(name);
    new_image(&img, 64);
    let mut args = vec!["-q", "-F", "-b", "4096", "-J", "size=4", "-E", "lazy_itable_init=0,lazy_journal_init=0"];
    args.extend_from_slice(mkfs_opts);
    args.push(s(&img));
    run("mkfs.ext4", &args);
    img
}

/// Runs debugfs commands (one per line) against `img`, writable.
fn debugfs(img: &Path, dir: &Path, commands: &str) {
    let script = dir.join("debugfs.cmds");
    std::fs::write(&script, commands).unwrap();
    run("debugfs", &["-w", "-f", s(&script), s(img)]);
}

/// Filesystem blocks of the journal inode.
fn journal_blocks(img: &Path) -> Vec<Range<u64>> {
    let out = run("debugfs", &["-R", "stat <8>", s(img)]);
    let extents = out.split("EXTENTS:").nth(1).expect("journal inode has extents");
    let mut ranges = Vec::new();
    for part in extents.split(',') {
        let Some(phys) = part.trim().split(':').nth(1) else { continue };
        let mut ends = phys.trim().split('-').map(|n| n.trim().parse::<u64>().unwrap());
        let a = ends.next().unwrap();
        let b = ends.next().unwrap_or(a);
        ranges.push(a..b + 1);
    }
    ranges
}

/// Who replayed the reference copy.
#[derive(Debug, PartialEq, Eq)]
enum Replayer {
    Kernel,
    /// The kernel refused to mount (a corrupt commit); e2fsprogs' recovery, which `e2fsck`
    /// runs first, replayed instead.
    E2fsprogs,
}

/// The reference replay: a copy of `img`, mounted (which replays its journal) and unmounted;
/// where the kernel refuses to mount it, replayed by `debugfs`'s journal recovery.
fn reference_replayed(img: &Path, dir: &Path) -> (PathBuf, Replayer) {
    let copy = dir.join(format!("{}.replayed", img.file_name().unwrap().to_string_lossy()));
    std::fs::copy(img, &copy).unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount").args(["-o", "loop,noinit_itable", s(&copy), s(&mnt)]).output().unwrap();
    if mounted.status.success() {
        run("umount", &[s(&mnt)]);
        return (copy, Replayer::Kernel);
    }
    std::fs::copy(img, &copy).unwrap();
    run("debugfs", &["-w", "-R", "jr", s(&copy)]);
    (copy, Replayer::E2fsprogs)
}

/// Asserts that Rime's replayed view of `img` equals the reference replay block for block,
/// outside the superblock and the journal; returns the number of blocks the journal changed.
fn assert_view_matches_replay(img: &Path, dir: &Path, by: Replayer) -> usize {
    let vol = Volume::open(img, false).unwrap();
    let ext = ExtVolume::open(&vol.region()).unwrap().expect("an ext filesystem");
    let (replayed, replayer) = reference_replayed(img, dir);
    assert_eq!(replayer, by, "{}: who could replay the journal", img.display());
    let view = match &ext.journal {
        // Where the kernel refuses, e2fsck replays what precedes the corrupt commit.
        JournalState::Replay { replayed, .. } => replayed,
        _ => ext.mounted_view(),
    };
    let reference = Volume::open(&replayed, false).unwrap();
    let journal = journal_blocks(img);
    let (mut a, mut b) = (vec![0u8; BS as usize], vec![0u8; BS as usize]);
    let mut changed = 0;
    for block in 1..vol.size / BS {
        if journal.iter().any(|r| r.contains(&block)) {
            continue;
        }
        view.read_at(block * BS, &mut a).unwrap();
        reference.read_at(block * BS, &mut b).unwrap();
        assert!(a == b, "{}: block {block} differs from the {replayer:?} replay", img.display());
        let mut raw = vec![0u8; BS as usize];
        vol.read_at(block * BS, &mut raw).unwrap();
        changed += usize::from(raw != a);
    }
    assert_map_covers_kernel_bitmaps(img, &replayed);
    changed
}

/// Every block the kernel's replayed bitmaps mark used is in Rime's map of the unreplayed image.
fn assert_map_covers_kernel_bitmaps(img: &Path, replayed: &Path) {
    let used = |image: &Path| -> Vec<Range<u64>> {
        let vol = Volume::open(image, false).unwrap();
        let mut map = Ext4Map::probe(&vol.region()).unwrap().unwrap();
        let mut out = Vec::new();
        map.used_ranges(0, vol.size, &mut out).unwrap();
        out
    };
    let rime = used(img);
    for r in used(replayed) {
        let mut pos = r.start;
        for m in rime.iter().filter(|m| m.end > r.start && m.start < r.end) {
            assert!(
                m.start <= pos,
                "bytes {pos}..{} are used after the kernel's replay but not in Rime's map",
                m.start
            );
            pos = pos.max(m.end);
        }
        assert!(pos >= r.end, "bytes {pos}..{} are used after the kernel's replay but not in Rime's map", r.end);
    }
}

fn replay_of(img: &Path) -> JournalState {
    let vol = Volume::open(img, false).unwrap();
    ExtVolume::open(&vol.region()).unwrap().unwrap().journal
}

fn write_block_file(dir: &Path, name: &str, seed: u64, blocks: u64, magic_first: bool) -> PathBuf {
    let p = dir.join(name);
    let mut data = Rng(seed).bytes((blocks * BS) as usize);
    if magic_first {
        // A block that starts with the journal magic is stored escaped in the log.
        data[..4].copy_from_slice(&0xC03B_3998u32.to_be_bytes());
    }
    std::fs::write(&p, data).unwrap();
    p
}

/// Transactions that exercise everything: several blocks, a block starting with the journal
/// magic, a revoked block (in a transaction of its own), a block written twice (the newer copy
/// wins), and an uncommitted transaction whose blocks must not appear.
fn transactions(dir: &Path, jo: &str) -> String {
    let a = write_block_file(dir, "a.bin", 1, 3, false);
    let b = write_block_file(dir, "b.bin", 2, 1, true);
    let c = write_block_file(dir, "c.bin", 3, 2, false);
    let d = write_block_file(dir, "d.bin", 4, 1, false);
    format!(
        "{jo}\njw -b 12000,12001,12002 {a}\njw -b 12010 {b}\njw -r 12001 /dev/null\njw -b 12020,12002 {c}\njw -b 12030 -c {d}\njc\n",
        a = s(&a),
        b = s(&b),
        c = s(&c),
        d = s(&d)
    )
}

/// Filesystem block holding journal block `log_block`.
fn journal_block_at(img: &Path, log_block: u64) -> u64 {
    let mut left = log_block;
    for r in journal_blocks(img) {
        if left < r.end - r.start {
            return r.start + left;
        }
        left -= r.end - r.start;
    }
    panic!("journal block {log_block} is past the journal");
}

#[test]
fn every_checksum_flavour_replays_as_the_kernel_does() {
    let dir = tempfile::tempdir().unwrap();
    // debugfs's checksum v1 covers revoke blocks, the kernel's does not: to the kernel the
    // revoke-only transaction's commit fails its checksum, so it refuses to mount, and e2fsck
    // replays the two transactions before it; so must Rime.
    use Replayer::*;
    for (name, mkfs_opts, jo, committed, by) in [
        ("v3-64bit", vec![], "jo -c -v 3", 4, Kernel),
        ("v3-32bit", vec!["-O", "^64bit"], "jo -c -v 3", 4, Kernel),
        ("v2-64bit", vec![], "jo -c -v 2", 4, Kernel),
        ("v2-32bit", vec!["-O", "^64bit"], "jo -c -v 2", 4, Kernel),
        ("v1-64bit", vec!["-O", "^metadata_csum"], "jo -c -v 1", 2, E2fsprogs),
        ("v1-32bit", vec!["-O", "^metadata_csum,^64bit"], "jo -c", 2, E2fsprogs),
        ("none-64bit", vec!["-O", "^metadata_csum"], "jo", 4, Kernel),
        ("none-32bit", vec!["-O", "^metadata_csum,^64bit"], "jo", 4, Kernel),
    ] {
        let img = new_fs(dir.path(), &format!("{name}.img"), &mkfs_opts);
        debugfs(&img, dir.path(), &transactions(dir.path(), jo));
        match replay_of(&img) {
            JournalState::Replay { replay, kernel_replays, checksums, .. } => {
                assert!(kernel_replays, "{name}");
                assert_eq!(replay.failed_commit.is_some(), by == E2fsprogs, "{name}: a corrupt commit");
                assert_eq!(replay.transactions, committed, "{name} ({checksums}): committed transactions");
                assert!(replay.replays(12000) && replay.replays(12002) && replay.replays(12010), "{name}");
                assert_eq!(replay.replays(12001), committed < 3, "{name}: block 12001 is revoked in transaction 3");
                assert_eq!(replay.replays(12020), committed == 4, "{name}: block 12020");
                assert!(!replay.replays(12030), "{name}: block 12030 was never committed");
            }
            _ => panic!("{name}: the journal should hold transactions to replay"),
        }
        let changed = assert_view_matches_replay(&img, dir.path(), by);
        assert!(changed >= 3, "{name}: only {changed} blocks changed by replay");
    }
}

/// Flips a byte of journal block `log_block` (a block of the log, counted from the journal's start).
fn damage_log_block(img: &Path, log_block: u64, byte: u64) {
    let at = journal_block_at(img, log_block) * BS + byte;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut b = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x5A], at).unwrap();
}

/// Log blocks and their types as `debugfs logdump` reports them.
fn log_layout(img: &Path) -> Vec<(u64, u32, String)> {
    let out = run("debugfs", &["-R", "logdump", s(img)]);
    out.lines()
        .filter_map(|l| {
            let l = l.strip_prefix("Found expected sequence ")?;
            let (seq, rest) = l.split_once(", type ")?;
            let (_, at) = rest.rsplit_once(" at block ")?;
            let kind = rest.split('(').nth(1)?.split(')').next()?.to_string();
            Some((at.trim().parse().ok()?, seq.parse().ok()?, kind))
        })
        .collect()
}

#[test]
fn a_torn_commit_ends_the_log_and_damage_inside_a_transaction_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A commit block whose header fails its checksum ends the log before its transaction: the
    // kernel refuses to mount, e2fsck replays the transactions before it and nothing after.
    let img = new_fs(dir.path(), "torn.img", &[]);
    debugfs(&img, dir.path(), &transactions(dir.path(), "jo -c -v 3"));
    let commit = log_layout(&img).iter().filter(|(_, _, k)| k == "commit block").nth(1).unwrap().0;
    damage_log_block(&img, commit, 20);
    match replay_of(&img) {
        JournalState::Replay { replay, .. } => {
            assert_eq!(replay.transactions, 1, "only the first transaction precedes the torn commit");
            assert_eq!(replay.failed_commit, Some(2));
            assert!(!replay.replays(12010), "block 12010 belongs to the torn transaction");
        }
        _ => panic!("the first transaction should still be replayed"),
    }
    assert_view_matches_replay(&img, dir.path(), Replayer::E2fsprogs);

    // A commit block torn after its header: kernels since 6.x replay the transaction, older
    // ones do not. Rime cannot know which will, so the journal counts as unreadable.
    let img = new_fs(dir.path(), "torn-tail.img", &[]);
    debugfs(&img, dir.path(), &transactions(dir.path(), "jo -c -v 3"));
    let commit = log_layout(&img).iter().filter(|(_, _, k)| k == "commit block").nth(1).unwrap().0;
    damage_log_block(&img, commit, 100);
    match replay_of(&img) {
        JournalState::Unreadable(why) => assert!(why.contains("torn"), "{why}"),
        _ => panic!("a commit torn after its header must not be followed"),
    }

    // A data block that fails its tag checksum: the kernel refuses to recover, and so the map
    // must not trust the bitmaps.
    let img = new_fs(dir.path(), "bad-data.img", &[]);
    debugfs(&img, dir.path(), &transactions(dir.path(), "jo -c -v 3"));
    let (first_descriptor, _, _) = log_layout(&img)[0].clone();
    damage_log_block(&img, first_descriptor + 1, 7);
    assert!(
        matches!(replay_of(&img), JournalState::Unreadable(_)),
        "a bad data block must make the journal unreadable"
    );
    let copy = dir.path().join("bad-data.copy");
    std::fs::copy(&img, &copy).unwrap();
    std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
    let mounted = Command::new("mount").args(["-o", "loop", s(&copy), s(&dir.path().join("mnt"))]).status().unwrap();
    if mounted.success() {
        Command::new("umount").arg(dir.path().join("mnt")).status().unwrap();
        panic!("the kernel mounted a journal with a damaged block; the test premise is wrong");
    }
    let vol = Volume::open(&img, false).unwrap();
    let mut map = Ext4Map::probe(&vol.region()).unwrap().unwrap();
    let mut used = Vec::new();
    map.used_ranges(0, vol.size, &mut used).unwrap();
    assert_eq!(used, vec![0..vol.size], "an unreadable journal means every block counts");
    let warnings = map.take_warnings();
    assert!(warnings.iter().any(|w| w.contains("cannot be read")), "{warnings:?}");
    assert!(map.describe().contains("non-zero chunks"), "{}", map.describe());
}

#[test]
fn journals_rime_cannot_follow_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    // Fast commits are replayed by ext4 itself.
    let img = new_fs(dir.path(), "fc.img", &["-O", "fast_commit"]);
    debugfs(&img, dir.path(), &transactions(dir.path(), "jo -c -v 3"));
    match replay_of(&img) {
        JournalState::Unreadable(why) => assert!(why.contains("fast commit"), "{why}"),
        _ => panic!("a fast-commit journal needing replay must not be followed"),
    }
    // An external journal is not on the volume.
    let jdev = dir.path().join("journal.img");
    new_image(&jdev, 16);
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", "-O", "journal_dev", s(&jdev)]);
    let lo = run("losetup", &["-f", "--show", s(&jdev)]).trim().to_string();
    let img = dir.path().join("ext.img");
    new_image(&img, 64);
    let made =
        Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-J", &format!("device={lo}"), s(&img)]).status();
    run("losetup", &["-d", &lo]);
    assert!(made.unwrap().success());
    run("debugfs", &["-w", "-R", "feature needs_recovery", s(&img)]);
    match replay_of(&img) {
        JournalState::Unreadable(why) => assert!(why.contains("separate device"), "{why}"),
        _ => panic!("an external journal needing replay cannot be followed"),
    }
    // Without needs_recovery the on-disk bitmaps stand: nothing to refuse.
    run("debugfs", &["-w", "-R", "feature ^needs_recovery", s(&img)]);
    assert!(matches!(replay_of(&img), JournalState::Clean));
}
