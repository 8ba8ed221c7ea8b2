//! Volumes without a known filesystem, `--all-blocks`, and snapshots of several volumes.

use crate::common::*;
use std::fs;
use std::path::Path;

/// A volume with no filesystem: random regions (some not chunk-aligned) separated by large
/// zero regions, and a size that is not a multiple of the chunk size or even of 512.
fn sparse_random_volume(path: &Path, seed: u64) -> u64 {
    let size = 48 * MIB + 12_345;
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    write_random_at(path, seed, 0, 3 * MIB);
    write_random_at(path, seed + 1, 10 * MIB + 777, 100_000);
    write_random_at(path, seed + 2, 30 * MIB + 5, 1);
    write_random_at(path, seed + 3, size - 5_000, 5_000);
    size
}

#[test]
fn unknown_filesystem_restores_every_byte_and_skips_zeros() {
    let env = Env::new();
    let image = env.path("raw.img");
    let size = sparse_random_volume(&image, 41);

    let before = env.repo_bytes();
    let v = env.backup_json(&[image.to_str().unwrap()]);
    let grown = env.repo_bytes() - before;
    let vol = first_volume(&v);
    assert!(vol["filesystem"].is_null(), "no filesystem should be recognised: {vol}");
    assert_eq!(vol["size"].as_u64(), Some(size));
    assert!(vol["zero_chunks"].as_u64().unwrap() > 500, "the zero regions should be zero chunks: {vol}");
    // About 3.2 MiB of data; 48 MiB of zeros must not be stored.
    assert!(grown < 5 * MIB, "repository grew {grown} bytes for ~3.2 MiB of data in a 48 MiB volume");
    assert!(grown > 3 * MIB, "the random data must be stored (grew {grown})");

    // Every byte comes back, to a new file and over a file full of garbage.
    let restored = env.path("restored.img");
    env.restore("latest", &restored, &[]);
    assert_same_bytes(&image, &restored);
    let over = env.path("over.img");
    garbage_file(&over, 42, size);
    env.restore("latest", &over, &[]);
    assert_same_bytes(&image, &over);
    env.assert_verify_clean();
}

#[test]
fn all_blocks_keeps_stale_data_in_free_blocks() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 51, MIB);
    let image = env.path("vol.img");
    mkfs("mkfs.ext4", &["-b", "4096"], 64, Some(&src), &image);
    // Write 8 MiB of random data into a file, then delete it: its blocks are free but still
    // hold the data.
    with_mounted(&env, &image, "garbage", |mnt| {
        write_random_file(&mnt.join("secret.bin"), 52, 8 * MIB);
        sh("sync", &[]);
        fs::remove_file(mnt.join("secret.bin")).unwrap();
    });
    assert_fsck_clean(&image);
    let zf = env.path("zerofreed.img");
    zerofreed_copy(&image, &zf);
    assert!(!same_bytes(&image, &zf), "precondition: free blocks hold stale data");

    // --all-blocks: the restore equals the original exactly, stale data included.
    let v = env.backup_json(&["--all-blocks", image.to_str().unwrap()]);
    let all_id = v["snapshot"].as_str().unwrap().to_string();
    let vol = first_volume(&v);
    assert!(vol["map"].as_str().unwrap().contains("all"), "the map should say all blocks: {vol}");
    assert!(vol["added_bytes"].as_u64().unwrap() > 8 * MIB, "the stale 8 MiB must be stored: {vol}");
    let restored = env.path("restored-all.img");
    env.restore(&all_id, &restored, &[]);
    assert_same_bytes(&image, &restored);

    // Without it: the stale data is left out (the restore equals the zerofree'd image).
    let used_id = env.backup(&[image.to_str().unwrap()]);
    let restored_used = env.path("restored-used.img");
    env.restore(&used_id, &restored_used, &[]);
    assert!(!same_bytes(&image, &restored_used), "a used-blocks restore must not bring back deleted data");
    assert_ext_restore_exact(&env, &image, &restored_used, &src);
}

#[test]
fn several_volumes_in_one_snapshot() {
    let env = Env::new();
    let (src_a, ext) = ext4_with_files(&env, "a", 61, 32, MIB);
    let raw = env.path("b.img");
    sparse_random_volume(&raw, 62);
    // A second volume with the same file name as the first, in another directory.
    fs::create_dir_all(env.path("other")).unwrap();
    let same_name = env.path("other/a.img");
    write_random_file(&same_name, 63, 2 * MIB);

    let v = env.backup_json(&[ext.to_str().unwrap(), raw.to_str().unwrap(), same_name.to_str().unwrap()]);
    let id = v["snapshot"].as_str().unwrap().to_string();
    let vols = v["manifest"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 3, "one snapshot should hold the three volumes: {v}");
    let names: Vec<String> = vols.iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "volume names must be unique within a snapshot: {names:?}");
    let listed = env.snapshots();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["volumes"].as_array().unwrap().len(), 3);

    // --volume picks each one.
    let sources: Vec<&str> = vols.iter().map(|v| v["source"].as_str().unwrap()).collect();
    for (name, source) in names.iter().zip(&sources) {
        let out = env.path(&format!("restored-{}.img", name.replace('/', "_")));
        env.restore(&id, &out, &["--volume", name]);
        if *source == ext.to_str().unwrap() {
            assert_ext_restore_exact(&env, &ext, &out, &src_a);
        } else {
            assert_same_bytes(Path::new(source), &out);
        }
    }

    // An unknown name fails and lists the names there are; so does leaving --volume out.
    let target = env.path("nope.img");
    let line = env.rime(&["restore", &id, target.to_str().unwrap(), "--volume", "c.img"]).fails();
    assert!(line.contains("c.img"), "the error should name the unknown volume: {line}");
    for n in &names {
        assert!(line.contains(n.as_str()), "the error should list volume {n}: {line}");
    }
    let line = env.rime(&["restore", &id, target.to_str().unwrap()]).fails();
    assert!(line.contains("--volume"), "restoring a multi-volume snapshot needs --volume: {line}");
    assert!(!target.exists(), "failed restores must not create the target");
    env.assert_verify_clean();
}
