//! `--exclude-file` and the default exclusion of swap files.

use crate::common::*;
use std::path::Path;

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A source tree with a big file to exclude and a swap file (made by mkswap on a file).
fn source_with_swap(env: &Env) -> std::path::PathBuf {
    let src = env.path("src");
    std::fs::create_dir_all(src.join("var/cache")).unwrap();
    populate_tree(&src, 5, 2 * MIB);
    write_random_file(&src.join("var/cache/huge.bin"), 77, 8 * MIB);
    let swap = src.join("swapfile");
    write_random_file(&swap, 78, 6 * MIB);
    sh("mkswap", &[swap.to_str().unwrap()]);
    src
}

#[test]
fn excluded_files_keep_their_size_and_read_as_zeros() {
    let env = Env::new();
    let src = source_with_swap(&env);
    let image = env.path("fs.img");
    mkfs("mkfs.ext4", &[], 64, Some(&src), &image);

    let plain = env.backup_json(&[image.to_str().unwrap()]);
    let json =
        env.backup_json(&[image.to_str().unwrap(), "--exclude-file", "/var/cache/huge.bin", "--compression", "none"]);
    let vol = first_volume(&json);
    let excluded = vol["excluded"].as_array().unwrap();
    let find = |p: &str| excluded.iter().find(|e| e["path"] == p).unwrap_or_else(|| panic!("{p} not excluded: {vol}"));
    assert_eq!(find("/var/cache/huge.bin")["reason"], "requested");
    assert_eq!(find("/var/cache/huge.bin")["size"].as_u64().unwrap(), 8 * MIB);
    assert_eq!(find("/swapfile")["reason"], "swap file", "swap files are excluded by default");
    // The plain backup already leaves the swap file out; --exclude-file takes 8 MiB more.
    assert!(first_volume(&plain)["excluded"].as_array().unwrap().iter().any(|e| e["path"] == "/swapfile"));
    assert!(
        vol["used_bytes"].as_u64().unwrap() + 7 * MIB < first_volume(&plain)["used_bytes"].as_u64().unwrap(),
        "excluded data is not read: {} vs {}",
        vol["used_bytes"],
        first_volume(&plain)["used_bytes"]
    );

    let out = env.path("out.img");
    env.restore(json["snapshot"].as_str().unwrap(), &out, &[]);
    assert_fsck_clean(&out);
    with_mounted(&env, &out, "restored", |m| {
        let huge = read_file(&m.join("var/cache/huge.bin"));
        assert_eq!(huge.len() as u64, 8 * MIB);
        assert!(huge.iter().all(|&b| b == 0), "excluded file reads as zeros");
        let swap = read_file(&m.join("swapfile"));
        assert_eq!(swap.len() as u64, 6 * MIB);
        assert_eq!(&swap[4086..4096], b"SWAPSPACE2", "the swap header survives");
        assert!(swap[4096..].iter().all(|&b| b == 0), "swap contents are left out");
        assert_eq!(read_file(&m.join("docs/readme.txt")), read_file(&src.join("docs/readme.txt")));
        assert_eq!(read_file(&m.join("bin/random-1.bin")), read_file(&src.join("bin/random-1.bin")));
    });
}

#[test]
fn a_missing_exclusion_is_an_error_and_changes_nothing() {
    let env = Env::new();
    let (_, image) = ext4_with_files(&env, "fs", 3, 32, MIB);
    let err = env.rime(&["backup", image.to_str().unwrap(), "--exclude-file", "/no/such/file"]).fails();
    assert!(err.contains("/no/such/file"), "{err}");
    assert!(env.snapshot_ids().is_empty());
    let err = env.rime(&["backup", image.to_str().unwrap(), "--exclude-file", "/docs"]).fails();
    assert!(err.contains("not a regular file"), "{err}");
    let err =
        env.rime(&["backup", image.to_str().unwrap(), "--all-blocks", "--exclude-file", "/docs/readme.txt"]).fails();
    assert!(err.contains("--all-blocks"), "{err}");
}

#[test]
fn exclusions_reach_into_partitions_of_a_disk() {
    let env = Env::new();
    let src = source_with_swap(&env);
    let part = env.path("part.img");
    mkfs("mkfs.ext4", &[], 48, Some(&src), &part);
    let disk = env.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 * MIB).unwrap();
    let mut child =
        std::process::Command::new("sfdisk").arg("-q").arg(&disk).stdin(std::process::Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"label: gpt\nstart=2048, size=48M, type=linux\n").unwrap();
    assert!(child.wait().unwrap().success());
    let data = std::fs::read(&part).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&std::fs::OpenOptions::new().write(true).open(&disk).unwrap(), &data, MIB)
        .unwrap();

    let json = env.backup_json(&[disk.to_str().unwrap(), "--exclude-file", "/var/cache/huge.bin"]);
    let excluded = first_volume(&json)["excluded"].as_array().unwrap().clone();
    assert_eq!(excluded.len(), 2, "{excluded:?}");
    let out = env.path("out.img");
    env.restore("latest", &out, &[]);
    let mut restored_part = vec![0u8; 48 * MIB as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&out).unwrap(), &mut restored_part, MIB).unwrap();
    let rp = env.path("restored-part.img");
    std::fs::write(&rp, &restored_part).unwrap();
    assert_fsck_clean(&rp);
    with_mounted(&env, &rp, "part", |m| {
        let huge = read_file(&m.join("var/cache/huge.bin"));
        assert!(huge.len() as u64 == 8 * MIB && huge.iter().all(|&b| b == 0));
        assert_eq!(read_file(&m.join("docs/readme.txt")), read_file(&src.join("docs/readme.txt")));
    });
}

#[test]
fn ntfs_page_files_are_left_out_and_named_files_too() {
    let env = Env::new();
    let img = env.path("ntfs.img");
    std::fs::File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    sh("mkntfs", &["-F", "-Q", img.to_str().unwrap()]);
    {
        let m = Mounted::ntfs3g(&img, &env.path("mnt"), false);
        write_random_file(&m.0.join("pagefile.sys"), 31, 8 * MIB);
        std::fs::create_dir_all(m.0.join("Users/me")).unwrap();
        write_random_file(&m.0.join("Users/me/cache.bin"), 32, 4 * MIB);
        write_random_file(&m.0.join("Users/me/keep.bin"), 33, 3 * MIB);
    }
    let json = env.backup_json(&[img.to_str().unwrap(), "--exclude-file", "/users/ME/Cache.bin"]);
    let vol = first_volume(&json);
    assert_eq!(vol["filesystem"], "ntfs");
    let excluded = vol["excluded"].as_array().unwrap();
    assert!(excluded.iter().any(|e| e["path"] == "/pagefile.sys" && e["reason"] == "swap file"), "{excluded:?}");
    assert!(
        excluded.iter().any(|e| e["path"] == "/users/ME/Cache.bin" && e["size"].as_u64() == Some(4 * MIB)),
        "{excluded:?}"
    );
    assert!(vol["read_bytes"].as_u64().unwrap() < 12 * MIB, "excluded data is not read: {}", vol["read_bytes"]);

    let out = env.path("out.img");
    env.restore("latest", &out, &[]);
    sh("ntfsfix", &["-n", out.to_str().unwrap()]);
    let m = Mounted::ntfs3g(&out, &env.path("mnt-out"), true);
    let page = read_file(&m.0.join("pagefile.sys"));
    assert!(
        page.len() as u64 == 8 * MIB && page.iter().all(|&b| b == 0),
        "pagefile.sys keeps its size, reads as zeros"
    );
    let cache = read_file(&m.0.join("Users/me/cache.bin"));
    assert!(cache.len() as u64 == 4 * MIB && cache.iter().all(|&b| b == 0));
    let expected = env.path("keep-expected.bin");
    write_random_file(&expected, 33, 3 * MIB);
    assert!(read_file(&m.0.join("Users/me/keep.bin")) == read_file(&expected), "kept files keep their data");
}
