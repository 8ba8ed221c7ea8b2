//! Backup and restore of btrfs image files through the `rime` binary.
//!
//! The image is made with `mkfs.btrfs -K` (no discard) on a file full of random garbage and
//! filled about half through a loop mount, so its free space holds data a used-blocks backup
//! must leave out. The restore must pass `btrfs check --readonly`, scrub clean (every copy of
//! every block, so both DUP stripes came back), hold the same files (read through a read-only
//! loop mount), and equal the original with exactly the map's unused bytes zeroed.
//!
//! Needs btrfs-progs, root and loop devices. `figures_next_to_partclone` (ignored; run it with
//! `--ignored --nocapture`, in release mode) also needs partclone and zstd.

use crate::fsmap_util::*;
use std::path::Path;

fn make_btrfs(
    d: &Path,
    name: &str,
    size: u64,
    data: u64,
    mkfs_opts: &[&str],
    mount_opts: &str,
) -> (std::path::PathBuf, std::path::PathBuf, u64) {
    let src = d.join(format!("{name}-src"));
    populate(&src, size ^ data, data);
    let img = d.join(format!("{name}.img"));
    garbage_image(&img, size, size);
    let mut args = vec!["-q", "-f", "-K"];
    args.extend(mkfs_opts);
    args.push(s(&img));
    run("mkfs.btrfs", &args);
    let df_used = {
        let m = Mounted::new(&img, &d.join(format!("{name}-mnt")), mount_opts);
        copy_tree(&src, &m.0);
        churn(&m.0, &src);
        // df counts the global block reserve (kept back in memory, not on disk) as used.
        let reserve: u64 = run("btrfs", &["filesystem", "df", "-b", s(&m.0)])
            .lines()
            .find_map(|l| l.strip_prefix("GlobalReserve, single: total="))
            .map(|r| r.split(',').next().unwrap().parse().unwrap())
            .expect("btrfs filesystem df shows the global reserve");
        m.df_used() - reserve
    };
    (src, img, df_used)
}

fn roundtrip(name: &str, size: u64, data: u64, mkfs_opts: &[&str], mount_opts: &str) {
    let dir = tempfile::Builder::new().prefix("rime-btrfs-").tempdir().unwrap();
    let d = dir.path();
    let (src, img, df_used) = make_btrfs(d, name, size, data, mkfs_opts, mount_opts);
    run("btrfs", &["check", "--readonly", s(&img)]);

    let repo = backup_with_used_map(d, &img, "btrfs", size, df_used, &format!("{mkfs_opts:?}"));

    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    let (ok, out, err) = run_status("btrfs", &["check", "--readonly", s(&restored)]);
    assert!(ok, "{mkfs_opts:?}: btrfs check --readonly finds problems in the restored image:\n{out}{err}");
    assert_restore_is_masked_original(&img, &restored);
    let m = Mounted::new(&restored, &d.join("restored-mnt"), "ro");
    assert_same_tree(&src, &m.0);
    let (ok, out, err) = run_status("btrfs", &["scrub", "start", "-B", "-r", s(&m.0)]);
    assert!(ok && out.contains("no errors found"), "{mkfs_opts:?}: scrub of the restored image:\n{out}{err}");
    drop(m);
    rime(&repo, &["verify"]);
}

#[test]
fn btrfs_backup_restore_is_check_clean_and_keeps_every_file() {
    // Defaults: DUP metadata, single data.
    roundtrip("btrfs", 512 * MIB, 220 * MIB, &[], "");
}

#[test]
fn btrfs_dup_data_compressed_small_nodes_backup_restore() {
    roundtrip("btrfsdup", 640 * MIB, 120 * MIB, &["-d", "dup", "-n", "4096"], "compress=zstd");
}

#[test]
fn btrfs_mixed_single_backup_restore() {
    roundtrip("btrfsmixed", 400 * MIB, 160 * MIB, &["-M", "-m", "single", "-d", "single"], "");
}

/// A damaged chunk tree: the backup still succeeds, imaging all non-zero blocks, says so on
/// stderr, and the restore is bit-exact.
#[test]
fn damaged_btrfs_falls_back_to_all_nonzero_blocks() {
    let dir = tempfile::Builder::new().prefix("rime-btrfs-").tempdir().unwrap();
    let d = dir.path();
    let img = d.join("bad.img");
    garbage_image(&img, 256 * MIB, 3);
    run("mkfs.btrfs", &["-q", "-f", "-K", "-m", "single", s(&img)]);
    let mut bytes = std::fs::read(&img).unwrap();
    let sb = 65536;
    let chunk_root = u64::from_le_bytes(bytes[sb + 0x58..sb + 0x60].try_into().unwrap());
    // mkfs places its first chunks at logical == physical.
    bytes[chunk_root as usize + 0x70] ^= 0xFF; // inside the chunk tree root's header: bad checksum
    assert_damaged_falls_back(d, &img, &bytes, "btrfs");
}

/// Figures for docs/PERFORMANCE.md: a 2 GiB btrfs image about half full, backed up by rime and
/// by `partclone.btrfs | zstd -T0`, in the same run. Prints one table row.
#[test]
#[ignore]
fn figures_next_to_partclone() {
    let dir = tempfile::Builder::new().prefix("rime-btrfs-fig-").tempdir().unwrap();
    let d = dir.path();
    let size = 2048 * MIB;
    let (_src, img, df_used) = make_btrfs(d, "fig", size, 1000 * MIB, &[], "");
    print_figures_next_to_partclone(d, "btrfs", &img, size, df_used);
}

/// A crash-consistent copy of a mounted btrfs right after an fsync: the file's extents are only
/// in the fsync log tree, not yet in the extent tree. The map keeps whole chunks for such a
/// copy, so after restore the mount replays the log and the file is intact.
#[test]
fn btrfs_crash_copy_with_an_fsync_log_keeps_the_logged_file() {
    let dir = tempfile::Builder::new().prefix("rime-btrfs-").tempdir().unwrap();
    let d = dir.path();
    let img = d.join("live.img");
    garbage_image(&img, 300 * MIB, 4);
    run("mkfs.btrfs", &["-q", "-f", "-K", s(&img)]);
    let payload = Rng(77).bytes(3_000_000);
    let copy = d.join("crash.img");
    {
        let m = Mounted::new(&img, &d.join("live-mnt"), "");
        run("sync", &[]);
        // A transaction commit between the fsync and the copy would clear the log; try again.
        let mut logged = false;
        for _ in 0..5 {
            let mut f = std::fs::File::create(m.0.join("fsynced")).unwrap();
            std::io::Write::write_all(&mut f, &payload).unwrap();
            f.sync_all().unwrap();
            std::fs::copy(&img, &copy).unwrap();
            let sb = std::fs::read(&copy).unwrap()[65536..65536 + 4096].to_vec();
            if u64::from_le_bytes(sb[0x60..0x68].try_into().unwrap()) != 0 {
                logged = true;
                break;
            }
        }
        assert!(logged, "the copy should hold a log tree");
    }
    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let (v, err, _) = backup(&repo, &copy);
    assert!(err.trim().is_empty(), "{err}");
    let vol = &v["manifest"]["volumes"][0];
    assert_eq!(vol["filesystem"], "btrfs", "{vol}");
    assert!(vol["map"].as_str().unwrap_or_default().contains("log tree"), "{vol}");
    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    assert_restore_is_masked_original(&copy, &restored);
    {
        let m = Mounted::new(&restored, &d.join("restored-mnt"), "");
        assert!(std::fs::read(m.0.join("fsynced")).unwrap() == payload, "the fsynced file should survive log replay");
    }
    let (ok, out, err) = run_status("btrfs", &["check", "--readonly", s(&restored)]);
    assert!(ok, "btrfs check --readonly after log replay:\n{out}{err}");
}
