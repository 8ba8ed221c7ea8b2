//! Backup and bit-exact restore of ext2/3/4 image files, across the ext feature matrix.
//!
//! Every image is made on a file pre-filled with random garbage (`mkfs -E nodiscard`), so its
//! free blocks hold data a used-blocks backup must leave out: the restore must equal the
//! `zerofree`'d original, not the original, and a backup that imaged the free blocks (or missed
//! a used one) fails the byte comparison.

use crate::common::*;
use std::fs;

#[test]
fn ext4_backup_restore_is_bit_exact_and_listed() {
    let env = Env::new();
    let (src, image) = ext4_with_files(&env, "vol", 1, 64, 5 * MIB);
    let img = image.to_str().unwrap();

    // Backup: one JSON document with the snapshot id and a manifest describing the volume.
    let v = env.backup_json(&[img]);
    let id = v["snapshot"].as_str().unwrap().to_string();
    let vol = first_volume(&v);
    assert_eq!(vol["filesystem"], "ext4", "the ext4 filesystem should be recognised: {vol}");
    assert_eq!(vol["size"].as_u64(), Some(64 * MIB));
    let used = vol["used_bytes"].as_u64().unwrap();
    let fs_used = ext_used_bytes(&image);
    assert!(used >= fs_used, "used-block map marks {used} bytes, the filesystem uses {fs_used}");
    assert!(used < 32 * MIB, "the used-block map should leave the free half out (used {used})");

    // snapshots --json: a list of objects with id, time, volumes.
    let list = env.snapshots();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert!(list[0]["time"].is_string(), "snapshot time: {}", list[0]);
    let vols = list[0]["volumes"].as_array().expect("volumes is a list");
    assert_eq!(vols.len(), 1);
    assert!(vols[0].to_string().contains("vol.img"), "the snapshot should name its volume: {}", vols[0]);
    // The human listing shows the (short) id; without a terminal, a backup prints no progress.
    let human = env.rime(&["snapshots"]).ok();
    assert!(human.stdout.contains(&id[..8]), "snapshots should list {id}: {}", human.stdout);

    // Restore `latest` to a new file: bit-exact against the zerofree'd original, fsck-clean,
    // the same files (contents, symlinks, hard links).
    let restored = env.path("restored.img");
    env.restore("latest", &restored, &[]);
    assert!(
        !same_bytes(&image, &restored),
        "the restore should not carry the garbage in free blocks (it must equal the zerofree'd image)"
    );
    assert_ext_restore_exact(&env, &image, &restored, &src);

    // Restore by id prefix over an existing file full of garbage: free blocks become zeros.
    let over = env.path("over.img");
    garbage_file(&over, 77, 64 * MIB);
    env.restore(&id[..8], &over, &[]);
    assert_ext_restore_exact(&env, &image, &over, &src);

    // `latest` moves to the newest snapshot; older ids still restore.
    let (src2, image2) = ext4_with_files(&env, "second", 2, 32, MIB);
    let run = env.rime(&["backup", image2.to_str().unwrap()]).ok();
    assert!(run.stderr.trim().is_empty(), "a backup off a terminal should print nothing on stderr: {}", run.stderr);
    let newest = env.snapshot_ids();
    assert_eq!(newest.len(), 2);
    let (_, latest_report, _) = env.verify(Some("latest"));
    assert_eq!(latest_report["snapshots"].as_array().unwrap().len(), 1);
    assert_ne!(latest_report["snapshots"][0], id.as_str(), "latest should be the second backup");
    let latest_restored = env.path("latest.img");
    env.restore("latest", &latest_restored, &[]);
    assert_ext_restore_exact(&env, &image2, &latest_restored, &src2);
    let old = env.path("old.img");
    env.restore(&id, &old, &[]);
    assert_ext_restore_exact(&env, &image, &old, &src);
    env.assert_verify_clean();
}

/// Backs up an ext image made with `program opts` (4 KiB blocks in 8 MiB groups unless `opts`
/// sets a block size, so that even a 64 MiB image has several block groups), restores it,
/// checks it bit-exact, fsck-clean and file-identical, and checks that the filesystem was
/// recognised and its free blocks left out.
fn roundtrip(name: &str, program: &str, opts: &[&str], expect_fs: &str) {
    roundtrip_with(name, program, opts, expect_fs, 2 * MIB, |_| {});
}

fn roundtrip_with(
    name: &str,
    program: &str,
    opts: &[&str],
    expect_fs: &str,
    random_bytes: u64,
    check_image: impl FnOnce(&std::path::Path),
) {
    let env = Env::new();
    let mut all_opts: Vec<&str> = Vec::new();
    if !opts.contains(&"-b") {
        all_opts.extend(["-b", "4096", "-g", "2048"]);
    }
    all_opts.extend(opts);
    let (src, image) = make_ext(&env, name, program, &all_opts, 64, 3, random_bytes, true);
    assert_fsck_clean(&image);
    check_image(&image);
    let v = env.backup_json(&[image.to_str().unwrap()]);
    let vol = first_volume(&v);
    assert_eq!(vol["filesystem"], expect_fs, "filesystem of {program} {all_opts:?}: {vol}");
    let used = vol["used_bytes"].as_u64().unwrap();
    let fs_used = ext_used_bytes(&image);
    assert!(used >= fs_used, "{all_opts:?}: map marks {used} bytes used, the filesystem uses {fs_used}");
    assert!(
        used <= fs_used + 8 * MIB,
        "{all_opts:?}: map marks {used} bytes used, far more than the filesystem's {fs_used}"
    );
    let added = vol["added_bytes"].as_u64().unwrap();
    assert!(added < 24 * MIB, "{all_opts:?}: the 64 MiB image's free garbage must not be stored (added {added})");

    let restored = env.path("restored.img");
    env.restore("latest", &restored, &[]);
    assert_ext_restore_exact(&env, &image, &restored, &src);
    env.assert_verify_clean();
}

/// `dumpe2fs` output for an image.
fn dumpe2fs(image: &std::path::Path) -> String {
    sh("dumpe2fs", &[image.to_str().unwrap()])
}

#[test]
fn ext4_default_features() {
    roundtrip_with("default", "mkfs.ext4", &[], "ext4", 2 * MIB, |img| {
        let features = sh("dumpe2fs", &["-h", img.to_str().unwrap()]);
        for f in ["flex_bg", "64bit", "metadata_csum", "sparse_super", "extent"] {
            assert!(features.contains(f), "default mkfs.ext4 should enable {f}");
        }
        assert!(dumpe2fs(img).contains("BLOCK_UNINIT"), "some groups should be uninitialised");
    });
}

#[test]
fn ext4_mke2fs_defaults_for_a_small_fs() {
    // No options at all: for a 64 MiB filesystem mke2fs picks its "small" profile.
    let env = Env::new();
    let (src, image) = make_ext(&env, "small", "mkfs.ext4", &[], 64, 5, 3 * MIB, true);
    env.backup(&[image.to_str().unwrap()]);
    let restored = env.path("restored.img");
    env.restore("latest", &restored, &[]);
    assert_ext_restore_exact(&env, &image, &restored, &src);
}

#[test]
fn ext4_without_flex_bg() {
    roundtrip("noflex", "mkfs.ext4", &["-O", "^flex_bg"], "ext4");
}

#[test]
fn ext4_without_64bit() {
    roundtrip("no64", "mkfs.ext4", &["-O", "^64bit"], "ext4");
}

#[test]
fn ext4_uninit_bg_without_metadata_csum() {
    roundtrip_with("uninit", "mkfs.ext4", &["-O", "^metadata_csum,uninit_bg"], "ext4", 2 * MIB, |img| {
        let d = dumpe2fs(img);
        assert!(d.contains("uninit_bg") && !d.contains("metadata_csum"), "features: {d}");
        assert!(d.contains("BLOCK_UNINIT"), "some groups should be uninitialised");
    });
}

#[test]
fn ext4_1k_blocks() {
    roundtrip("1k", "mkfs.ext4", &["-b", "1024"], "ext4");
}

#[test]
fn ext4_bigalloc() {
    roundtrip("bigalloc", "mkfs.ext4", &["-O", "bigalloc", "-C", "16384"], "ext4");
}

#[test]
fn ext4_meta_bg_without_resize_inode() {
    roundtrip("metabg", "mkfs.ext4", &["-O", "meta_bg,^resize_inode"], "ext4");
}

/// meta_bg puts a descriptor block in groups 0, 1 and the last of each meta group; group 1 also
/// holds a superblock backup. With little data group 1 is BLOCK_UNINIT, and its used ranges
/// (superblock copy + descriptor block) overlap.
#[test]
fn ext4_meta_bg_with_uninitialised_group_1() {
    roundtrip_with("metabg1", "mkfs.ext4", &["-O", "meta_bg,^resize_inode"], "ext4", 64 * 1024, |img| {
        let d = dumpe2fs(img);
        let group1 = d.lines().find(|l| l.starts_with("Group 1:")).expect("group 1");
        assert!(group1.contains("BLOCK_UNINIT"), "precondition: group 1 is BLOCK_UNINIT: {group1}");
    });
}

#[test]
fn ext4_sparse_super2() {
    roundtrip("sparse2", "mkfs.ext4", &["-O", "sparse_super2"], "ext4");
}

#[test]
fn ext2() {
    roundtrip("ext2", "mkfs.ext2", &[], "ext2");
}

#[test]
fn ext2_1k_blocks() {
    roundtrip("ext2-1k", "mkfs.ext2", &["-b", "1024"], "ext2");
}

#[test]
fn ext3() {
    roundtrip("ext3", "mkfs.ext3", &[], "ext3");
}

#[test]
fn mostly_empty_filesystem_stores_little() {
    let env = Env::new();
    // 128 MiB filesystem, 5 MiB of random files; the rest is free and full of random garbage.
    let (_src, image) = ext4_with_files(&env, "sparse", 4, 128, 5 * MIB);
    let before = env.repo_bytes();
    let v = env.backup_json(&[image.to_str().unwrap()]);
    let grown = env.repo_bytes() - before;
    assert!(grown < 16 * MIB, "a 128 MiB fs with 5 MiB of files added {grown} bytes to the repository");
    assert!(grown > 5 * MIB, "the 5 MiB of random files must be stored (repository grew {grown})");
    let vol = first_volume(&v);
    assert!(vol["read_bytes"].as_u64().unwrap() < 32 * MIB, "only used blocks should be read: {vol}");
    assert!(vol["map"].as_str().unwrap().contains("ext"), "the map should come from ext bitmaps: {vol}");
    fs::remove_file(&image).unwrap();
}
