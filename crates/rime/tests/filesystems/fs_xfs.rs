//! Backup and restore of XFS image files through the `rime` binary.
//!
//! The image is made with `mkfs.xfs -K` (no discard) on a file full of random garbage and filled
//! about half through a loop mount, so its free blocks hold data a used-blocks backup must leave
//! out. The restore must pass `xfs_repair -n`, hold the same files (read through a read-only
//! loop mount), and equal the original with exactly the map's unused bytes zeroed.
//!
//! Needs xfsprogs, root and loop devices. `figures_next_to_partclone` (ignored; run it with
//! `--ignored --nocapture`, in release mode) also needs partclone and zstd.

use crate::fsmap_util::*;
use std::path::Path;

fn make_xfs(
    d: &Path,
    name: &str,
    size: u64,
    data: u64,
    mkfs_opts: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf, u64) {
    let src = d.join(format!("{name}-src"));
    populate(&src, size ^ data, data);
    let img = d.join(format!("{name}.img"));
    garbage_image(&img, size, size);
    let mut args = vec!["-q", "-f", "-K"];
    args.extend(mkfs_opts);
    args.push(s(&img));
    run("mkfs.xfs", &args);
    let df_used = {
        let m = Mounted::new(&img, &d.join(format!("{name}-mnt")), "");
        copy_tree(&src, &m.0);
        churn(&m.0, &src);
        m.df_used()
    };
    (src, img, df_used)
}

fn roundtrip(name: &str, size: u64, data: u64, mkfs_opts: &[&str]) {
    let dir = tempfile::Builder::new().prefix("rime-xfs-").tempdir().unwrap();
    let d = dir.path();
    let (src, img, df_used) = make_xfs(d, name, size, data, mkfs_opts);
    run("xfs_repair", &["-n", s(&img)]);

    let repo = backup_with_used_map(d, &img, "xfs", size, df_used, &format!("{mkfs_opts:?}"));

    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    let (ok, out, err) = run_status("xfs_repair", &["-n", s(&restored)]);
    assert!(ok, "{mkfs_opts:?}: xfs_repair -n finds problems in the restored image:\n{out}{err}");
    assert_restore_is_masked_original(&img, &restored);
    let m = Mounted::new(&restored, &d.join("restored-mnt"), "ro,nouuid");
    assert_same_tree(&src, &m.0);
    drop(m);
    rime(&repo, &["verify"]);
}

#[test]
fn xfs_backup_restore_is_repair_clean_and_keeps_every_file() {
    roundtrip("xfs", 512 * MIB, 220 * MIB, &[]);
}

#[test]
fn xfs_small_blocks_reflink_rmap_backup_restore() {
    roundtrip("xfs1k", 400 * MIB, 150 * MIB, &["-b", "size=1024", "-m", "reflink=1,rmapbt=1", "-d", "agcount=3"]);
}

/// A damaged AGF: the backup still succeeds, imaging all non-zero blocks, says so on stderr,
/// and the restore is bit-exact.
#[test]
fn damaged_xfs_falls_back_to_all_nonzero_blocks() {
    let dir = tempfile::Builder::new().prefix("rime-xfs-").tempdir().unwrap();
    let d = dir.path();
    let img = d.join("bad.img");
    garbage_image(&img, 320 * MIB, 3);
    run("mkfs.xfs", &["-q", "-f", "-K", s(&img)]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[512] ^= 0xFF; // AG 0's AGF magic
    assert_damaged_falls_back(d, &img, &bytes, "xfs");
}

/// Figures for docs/PERFORMANCE.md: a 2 GiB XFS image about half full, backed up by rime and
/// by `partclone.xfs | zstd -T0`, in the same run. Prints one table row.
#[test]
#[ignore]
fn figures_next_to_partclone() {
    let dir = tempfile::Builder::new().prefix("rime-xfs-fig-").tempdir().unwrap();
    let d = dir.path();
    let size = 2048 * MIB;
    let (_src, img, df_used) = make_xfs(d, "fig", size, 1000 * MIB, &[]);
    print_figures_next_to_partclone(d, "xfs", &img, size, df_used);
}

/// A crash-consistent copy of a mounted XFS (files written and synced, never unmounted): its
/// allocations may be only in the log, so the map is refused and every non-zero block imaged.
/// After restore, mounting replays the log and every file is intact.
#[test]
fn xfs_crash_copy_falls_back_and_keeps_every_file() {
    let dir = tempfile::Builder::new().prefix("rime-xfs-").tempdir().unwrap();
    let d = dir.path();
    let img = d.join("live.img");
    garbage_image(&img, 320 * MIB, 4);
    run("mkfs.xfs", &["-q", "-f", "-K", s(&img)]);
    let src = d.join("src");
    populate(&src, 9, 40 * MIB);
    let copy = d.join("crash.img");
    {
        let m = Mounted::new(&img, &d.join("live-mnt"), "");
        copy_tree(&src, &m.0);
        std::fs::copy(&img, &copy).unwrap();
    }
    // Unless the kernel happened to cover the log between the sync and the copy (xfs_logprint
    // shows), the copy's log holds changes to inodes and allocation btrees.
    let logprint = run("xfs_logprint", &["-t", s(&copy)]);
    let pending = logprint.contains("INODE")
        || logprint.lines().any(|l| l.contains("start blkno:") && !l.contains("start blkno:0x0 "));
    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let (v, err, _) = backup(&repo, &copy);
    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    if pending {
        assert!(err.contains("xfs") && err.contains("log"), "stderr should say why the map was refused: {err}");
        assert!(v["manifest"]["volumes"][0]["filesystem"].is_null(), "{v}");
        assert!(
            std::fs::read(&restored).unwrap() == std::fs::read(&copy).unwrap(),
            "fallback restore must be bit-exact"
        );
    }
    {
        let m = Mounted::new(&restored, &d.join("restored-mnt"), "nouuid");
        assert_same_tree(&src, &m.0);
    }
    let (ok, out, err) = run_status("xfs_repair", &["-n", s(&restored)]);
    assert!(ok, "xfs_repair -n after log replay:\n{out}{err}");
}
