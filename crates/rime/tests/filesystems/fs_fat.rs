//! Backup and restore of FAT12/16/32 image files through the `rime` binary.
//!
//! Every image is made on a file pre-filled with random garbage (mkfs.vfat leaves the data area
//! alone), then filled about half with mtools, so its free clusters hold data a used-blocks
//! backup must leave out. The restore must pass `fsck.fat -n`, hold the same files, and equal
//! the original with exactly the map's unused bytes zeroed.
//!
//! Needs dosfstools and mtools (no root: no mounts).

use rime_volume::fs::fat::FatMap;
use rime_volume::Volume;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

use crate::fsmap_util::*;

/// A tree of mixed files totalling about `total` bytes.
fn make_tree(root: &Path, seed: u64, total: u64) {
    let mut rng = Rng(seed | 1);
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    std::fs::write(root.join("sub/deeper/Long File Name.bin"), rng.bytes(777_777)).unwrap();
    let mut written = 0u64;
    let mut i = 0;
    while written < total {
        let size = if i % 3 == 0 { rng.next_u64() % 20_000 } else { (rng.next_u64() % (4 * MIB)).min(total - written) };
        let dir = if i % 2 == 0 { root.to_path_buf() } else { root.join("sub") };
        std::fs::write(dir.join(format!("f{i:03}.dat")), rng.bytes(size as usize)).unwrap();
        written += size;
        i += 1;
    }
}

/// `fsck.fat -n -v`: bytes the filesystem uses (metadata area + used clusters).
fn fat_used_bytes(img: &Path) -> u64 {
    let out = run("fsck.fat", &["-n", "-v", s(img)]);
    let word = |prefix: &str, nth: usize| -> u64 {
        let l = out.lines().find(|l| l.contains(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in:\n{out}"));
        l.split_whitespace().nth(nth).unwrap().parse().unwrap()
    };
    let data_start = word("Data area starts at byte", 5);
    let cluster = word("bytes per cluster", 0);
    let summary = out.lines().rev().find(|l| l.contains(" clusters") && l.contains('/')).unwrap();
    let used: u64 = summary.rsplit(' ').nth(1).unwrap().split('/').next().unwrap().parse().unwrap();
    data_start + used * cluster
}

/// The original image with every byte the map leaves out zeroed: what a restore must equal.
fn expected_restore(img: &Path, to: &Path) {
    let vol = Volume::open(img, false).unwrap();
    let mut map = FatMap::probe(&vol.region()).unwrap().unwrap();
    write_masked(img, &mut map, to);
}

fn roundtrip(bits: u32, size: u64) {
    let dir = tempfile::Builder::new().prefix("rime-fat-").tempdir().unwrap();
    let d = dir.path();
    let tree = d.join("tree");
    make_tree(&tree, bits as u64, size / 2);
    let img = d.join(format!("fat{bits}.img"));
    std::fs::write(&img, Rng(0xFA7 + bits as u64).bytes(size as usize)).unwrap();
    run("mkfs.vfat", &["-F", &bits.to_string(), s(&img)]);
    for e in std::fs::read_dir(&tree).unwrap() {
        run("mcopy", &["-s", "-i", s(&img), s(&e.unwrap().path()), "::/"]);
    }
    run("fsck.fat", &["-n", s(&img)]);
    let fs_used = fat_used_bytes(&img);

    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let (v, _, _) = backup(&repo, &img);
    let vol = &v["manifest"]["volumes"][0];
    assert_eq!(vol["filesystem"], format!("fat{bits}"), "{vol}");
    let num = |k: &str| vol[k].as_u64().unwrap_or_else(|| panic!("no {k} in {vol}"));
    let (used, read, added) = (num("used_bytes"), num("read_bytes"), num("added_bytes"));
    assert!(used >= fs_used, "FAT{bits}: map marks {used} bytes, fsck.fat counts {fs_used}");
    assert!(used <= fs_used + 64 * 1024, "FAT{bits}: map marks {used} bytes, far above fsck.fat's {fs_used}");
    assert!(read >= used && read < size * 7 / 10, "FAT{bits}: read {read} of {size} bytes (used {used})");
    assert!(added < size * 7 / 10, "FAT{bits}: the free garbage must not be stored (added {added} of {size})");

    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    run("fsck.fat", &["-n", s(&restored)]);
    let expected = d.join("expected.img");
    expected_restore(&img, &expected);
    assert!(
        std::fs::read(&restored).unwrap() == std::fs::read(&expected).unwrap(),
        "FAT{bits}: restore differs from the masked original"
    );
    assert!(
        std::fs::read(&restored).unwrap() != std::fs::read(&img).unwrap(),
        "FAT{bits}: the free garbage should not come back"
    );
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    run("mcopy", &["-s", "-n", "-i", s(&restored), "::/*", s(&out)]);
    let diff = Command::new("diff").args(["-r", s(&tree), s(&out)]).output().unwrap();
    assert!(diff.status.success(), "FAT{bits}: restored files differ:\n{}", String::from_utf8_lossy(&diff.stdout));
    rime(&repo, &["verify"]);
}

#[test]
fn fat12_backup_restore() {
    roundtrip(12, 8 * MIB);
}

#[test]
fn fat16_backup_restore() {
    roundtrip(16, 64 * MIB);
}

#[test]
fn fat32_backup_restore() {
    roundtrip(32, 96 * MIB);
}

/// A FAT boot sector with nonsense in it: the backup still succeeds, imaging all non-zero
/// blocks, and says so on stderr; the restore is bit-exact.
#[test]
fn damaged_fat_falls_back_to_all_blocks() {
    let dir = tempfile::Builder::new().prefix("rime-fat-").tempdir().unwrap();
    let d = dir.path();
    let img = d.join("bad.img");
    std::fs::write(&img, Rng(5).bytes(8 * MIB as usize)).unwrap();
    run("mkfs.vfat", &["-F", "12", s(&img)]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[0x0E] = 0; // reserved sectors
    bytes[0x0F] = 0;
    std::fs::write(&img, &bytes).unwrap();
    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let out = Command::new(env!("CARGO_BIN_EXE_rime"))
        .env_remove("RIME_REPO")
        .args(["--repo", s(&repo), "backup", s(&img), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FAT") && stderr.contains("damaged"), "stderr should warn: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["manifest"]["volumes"][0]["filesystem"].is_null(), "{v}");
    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    assert!(std::fs::read(&restored).unwrap() == bytes, "fallback restore must be bit-exact");
}
