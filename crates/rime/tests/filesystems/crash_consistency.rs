//! Crash-consistent copies of mounted filesystems lose nothing that was fsync'd.
//!
//! A filesystem image on a reflink-capable host (XFS) is loop-mounted and written by a load
//! that creates, appends, overwrites, truncates, renames and deletes files, fsyncing each change
//! with its directory. At 20 random moments `cp --reflink` takes an instant copy of the image —
//! exactly what a storage snapshot or a power cut leaves: a journal (or log) full of committed
//! changes whose home blocks are stale. Each copy is backed up by Rime, restored and mounted;
//! the copy itself is mounted too, and the kernel's replay of it is the reference: the
//! restored tree must equal the copy's tree file for file, and every file fsync'd before the
//! copy must be in both with its contents. For ext, `rime extract` of some snapshots must equal
//! the kernel's view as well.
//!
//! ext3, ext4 (metadata_csum and 64-bit: journal checksum v3), ext4 without either (no journal
//! checksum, 32-bit tags), ext4 with the `journal_checksum` mount option (checksum v1), XFS and
//! btrfs. The ext journals are 4 MiB so that the log wraps during the load.

use crate::common::*;
use crate::crash_support::*;
use std::time::Duration;

const COPIES: usize = 20;

struct Case {
    name: &'static str,
    mkfs: &'static str,
    mkfs_opts: &'static [&'static str],
    size_mib: u64,
    mount_opts: &'static [&'static str],
    /// ext: the journal checksum flavour the maps must name ("checksum v3", ...).
    journal: Option<&'static str>,
}

fn run_case(case: &Case) {
    let env = Env::new();
    let host = ReflinkHost::new(&env, 8192);
    let image = host.path("volume.img");
    std::fs::File::create(&image).unwrap().set_len(case.size_mib * MIB).unwrap();
    let mut args = case.mkfs_opts.to_vec();
    args.push(image.to_str().unwrap());
    sh(case.mkfs, &args);

    // The load, and the copies taken at random moments while it runs.
    let lo = LoopDev::attach(&image);
    let mnt = Mount::new(&lo.dev, &env.path("live"), case.mount_opts);
    let mut writer = Writer::start(&mnt.dir, 0x5eed ^ case.size_mib);
    let mut rng = Rng::new(case.name.len() as u64 * 7919);
    std::thread::sleep(Duration::from_millis(300));
    let mut copies = Vec::new();
    for i in 0..COPIES {
        std::thread::sleep(Duration::from_millis(50 + rng.below(250)));
        let copy = host.path(&format!("copy-{i}.img"));
        let durable = crash_copy(&writer, &image, &copy);
        copies.push((copy, durable));
    }
    let ops = writer.ops();
    writer.stop();
    mnt.unmount();
    drop(lo);
    assert!(ops > 100, "{}: the load made only {ops} changes", case.name);

    let (mut followed, mut wrapped, mut flavour_seen) = (0, false, false);
    for (i, (copy, durable)) in copies.iter().enumerate() {
        if case.journal.is_some() {
            wrapped |= ext_log_wraps(copy);
        }
        let backup = env.backup_json(&[copy.to_str().unwrap()]);
        let snapshot = backup["snapshot"].as_str().unwrap().to_string();
        let map = first_volume(&backup)["map"].as_str().unwrap().to_string();
        followed += usize::from(map.contains("replayed") || map.contains("log tree") || map.contains("non-zero"));
        flavour_seen |= case.journal.is_some_and(|j| map.contains(j));
        if case.journal.is_some() {
            // A healthy crash copy is followed, not distrusted: its on-disk bitmaps are stale
            // and fail their checksums, the replayed ones must not.
            assert_eq!(backup["warnings"], serde_json::json!([]), "{} copy {i}: {map}", case.name);
        }
        let restored = host.path("restored.img");
        let _ = std::fs::remove_file(&restored);
        env.restore(&snapshot, &restored, &[]);

        // The kernel's replay of the copy itself is the reference.
        let reference = mounted_tree(copy, &env.path("mnt-copy"), &[]);
        assert_durable_in(&format!("{} copy {i} (kernel replay)", case.name), durable, &reference);
        let got = mounted_tree(&restored, &env.path("mnt-restored"), &[]);
        assert_same_tree(&format!("{} copy {i}: restored image ({map})", case.name), &reference, &got);

        if case.journal.is_some() && i % 5 == 0 {
            let out = env.path("extracted");
            let _ = std::fs::remove_dir_all(&out);
            env.rime(&["extract", &snapshot, "/", "--to", out.to_str().unwrap()]).ok();
            let _ = std::fs::remove_dir_all(out.join("lost+found"));
            assert_same_tree(&format!("{} copy {i}: rime extract", case.name), &reference, &read_tree(&out));
            std::fs::remove_dir_all(&out).unwrap();
        }
        std::fs::remove_file(&restored).unwrap();
        std::fs::remove_file(copy).unwrap();
    }
    // The test means something only if copies caught committed changes in flight.
    assert!(followed > 0, "{}: no copy had a journal or log to follow", case.name);
    if let Some(flavour) = case.journal {
        assert!(wrapped, "{}: the journal never wrapped during the load", case.name);
        assert!(flavour_seen, "{}: no map followed a journal with {flavour}", case.name);
    }
    env.assert_verify_clean();
}

fn ext_case(
    name: &'static str,
    mkfs: &'static str,
    mkfs_opts: &'static [&'static str],
    mount_opts: &'static [&'static str],
    journal: &'static str,
) -> Case {
    Case { name, mkfs, mkfs_opts, size_mib: 256, mount_opts, journal: Some(journal) }
}

#[test]
fn ext3_copies_during_fsync_load() {
    run_case(&ext_case("ext3", "mkfs.ext3", &["-q", "-F", "-b", "4096", "-J", "size=4"], &[], "no checksums"));
}

#[test]
fn ext4_metadata_csum_64bit_copies_during_fsync_load() {
    run_case(&ext_case("ext4", "mkfs.ext4", &["-q", "-F", "-b", "4096", "-J", "size=4"], &[], "checksum v3"));
}

#[test]
fn ext4_without_checksums_or_64bit_copies_during_fsync_load() {
    let opts = &["-q", "-F", "-b", "4096", "-J", "size=4", "-O", "^metadata_csum,^64bit"];
    run_case(&ext_case("ext4-plain", "mkfs.ext4", opts, &[], "no checksums"));
}

#[test]
fn ext4_journal_checksum_v1_copies_during_fsync_load() {
    let opts = &["-q", "-F", "-b", "4096", "-J", "size=4", "-O", "^metadata_csum"];
    run_case(&ext_case("ext4-jcsum-v1", "mkfs.ext4", opts, &["journal_checksum"], "checksum v1"));
}

#[test]
fn xfs_copies_during_fsync_load() {
    run_case(&Case {
        name: "xfs",
        mkfs: "mkfs.xfs",
        mkfs_opts: &["-q", "-f"],
        size_mib: 320,
        mount_opts: &[],
        journal: None,
    });
}

#[test]
fn btrfs_copies_during_fsync_load() {
    run_case(&Case {
        name: "btrfs",
        mkfs: "mkfs.btrfs",
        mkfs_opts: &["-q", "-f"],
        size_mib: 256,
        mount_opts: &[],
        journal: None,
    });
}
