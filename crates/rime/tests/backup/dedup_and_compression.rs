//! Deduplication across snapshots, volumes and within a volume; compression levels.

use crate::common::*;
use std::fs;

#[test]
fn same_image_twice_adds_almost_nothing() {
    let env = Env::new();
    let (src, image) = ext4_with_files(&env, "vol", 71, 64, 8 * MIB);
    let img = image.to_str().unwrap();

    let first = env.backup_json(&[img]);
    let first_added = added_bytes(&first);
    assert!(first_added > 8 * MIB, "the first backup stores the data (added {first_added})");
    let size_after_first = env.repo_bytes();

    let second = env.backup_json(&[img]);
    let vol = first_volume(&second);
    assert_eq!(vol["added_bytes"].as_u64(), Some(0), "an unchanged volume should add no chunk data: {vol}");
    assert_eq!(vol["new_chunks"].as_u64(), Some(0), "{vol}");
    let grown = env.repo_bytes() - size_after_first;
    assert!(grown < 256 * 1024, "the second backup of the same image grew the repository by {grown} bytes");

    // Both snapshots restore.
    for id in [first["snapshot"].as_str().unwrap(), second["snapshot"].as_str().unwrap()] {
        let out = env.path(&format!("restored-{id}.img"));
        env.restore(id, &out, &[]);
        assert_ext_restore_exact(&env, &image, &out, &src);
        fs::remove_file(&out).unwrap();
    }
}

#[test]
fn identical_volumes_and_repeated_blocks_dedup() {
    let env = Env::new();
    let a = env.path("a.img");
    write_random_file(&a, 81, 8 * MIB);
    let b = env.path("b.img");
    fs::copy(&a, &b).unwrap();
    // A volume made of one random MiB repeated eight times.
    let repeated = env.path("repeated.img");
    let block = Rng::new(82).bytes(MIB as usize);
    fs::write(&repeated, block.repeat(8)).unwrap();

    let v = env.backup_json(&[a.to_str().unwrap(), b.to_str().unwrap(), repeated.to_str().unwrap()]);
    let vols = v["manifest"]["volumes"].as_array().unwrap();
    let added: Vec<u64> = vols.iter().map(|v| v["added_bytes"].as_u64().unwrap()).collect();
    assert!(added[0] >= 8 * MIB, "the first copy is stored: {added:?}");
    assert_eq!(added[1], 0, "the second, identical volume should add nothing: {added:?}");
    assert!(
        added[2] < MIB + MIB / 4,
        "a volume of one MiB repeated 8 times should store about one MiB, not {}",
        added[2]
    );
    assert!(env.repo_bytes() < 10 * MIB, "repository holds {} bytes for ~9 MiB of unique data", env.repo_bytes());
    let id = v["snapshot"].as_str().unwrap();
    for (name, path) in [("a.img", &a), ("b.img", &b), ("repeated.img", &repeated)] {
        let out = env.path(&format!("out-{name}"));
        env.restore(id, &out, &["--volume", name]);
        assert_same_bytes(path, &out);
    }
}

#[test]
fn changing_a_small_file_adds_little() {
    let env = Env::new();
    let (src, image) = ext4_with_files(&env, "vol", 91, 64, 20 * MIB);
    let img = image.to_str().unwrap();
    let v1 = env.backup_json(&[img]);
    let first_added = added_bytes(&v1);
    assert!(first_added > 20 * MIB);
    let image_v1 = env.path("v1.img");
    fs::copy(&image, &image_v1).unwrap();

    // Change one small file (through the kernel's ext4 driver, journal and all).
    with_mounted(&env, &image, "edit", |mnt| {
        let p = mnt.join("docs/notes with spaces.txt");
        let mut text = fs::read_to_string(&p).unwrap();
        text.push_str("one more line\n");
        fs::write(&p, &text).unwrap();
    });
    let src2 = env.path("vol-src-v2");
    sh("cp", &["-a", src.to_str().unwrap(), src2.to_str().unwrap()]);
    let p = src2.join("docs/notes with spaces.txt");
    let mut text = fs::read_to_string(&p).unwrap();
    text.push_str("one more line\n");
    fs::write(&p, text).unwrap();

    let before = env.repo_bytes();
    let v2 = env.backup_json(&[img]);
    let second_added = added_bytes(&v2);
    let grown = env.repo_bytes() - before;
    assert!(second_added > 0, "the change must be stored");
    assert!(
        second_added < MIB && second_added * 20 < first_added,
        "changing one small file added {second_added} bytes (first backup {first_added})"
    );
    assert!(grown < 2 * MIB, "repository grew {grown} bytes for one small change");

    // Both versions restore exactly.
    let out1 = env.path("out1.img");
    env.restore(v1["snapshot"].as_str().unwrap(), &out1, &[]);
    assert_ext_restore_exact(&env, &image_v1, &out1, &src);
    let out2 = env.path("out2.img");
    env.restore(v2["snapshot"].as_str().unwrap(), &out2, &[]);
    assert_ext_restore_exact(&env, &image, &out2, &src2);
}

#[test]
fn compression_levels_restore_exactly_and_compress() {
    let work = Env::without_repo();
    // Text-heavy filesystem: ~3 MiB of text plus a little random data (kept small: `best` is
    // slow, above all in debug builds).
    let src = work.path("src");
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 101, 256 * 1024);
    let mut rng = Rng::new(102);
    for i in 0..4 {
        fs::write(src.join(format!("docs/book-{i}.txt")), rng.text(768 * 1024)).unwrap();
    }
    let image = work.path("text.img");
    mkfs("mkfs.ext4", &["-b", "4096"], 32, Some(&src), &image);

    let mut stored = Vec::new();
    for level in ["none", "fast", "normal", "best"] {
        let env = Env::new();
        let v = env.backup_json(&["--compression", level, image.to_str().unwrap()]);
        let added = added_bytes(&v);
        let repo = env.repo_bytes();
        let out = env.path("restored.img");
        env.restore("latest", &out, &[]);
        assert_ext_restore_exact(&env, &image, &out, &src);
        env.assert_verify_clean();
        stored.push((level, added, repo));
    }
    let (none, fast, normal, best) = (stored[0], stored[1], stored[2], stored[3]);
    assert!(none.1 > 3 * MIB, "uncompressed storage holds all the text: {stored:?}");
    assert!(none.1 > 2 * normal.1, "normal should compress text at least 2x: {stored:?}");
    assert!(none.2 > 2 * normal.2, "repository sizes should show it too: {stored:?}");
    assert!(none.1 > 2 * fast.1, "fast should still compress text: {stored:?}");
    assert!(best.1 <= normal.1 + normal.1 / 50, "best should not be larger than normal: {stored:?}");
}
