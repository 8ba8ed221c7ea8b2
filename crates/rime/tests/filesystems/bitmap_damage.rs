//! Block bitmaps that lie: a bit cleared on purpose for a block a file uses.
//!
//! With `metadata_csum` the bitmap then fails its checksum: its group is imaged as all
//! non-zero blocks, with a warning. Without it (ext2, ext3, ext4 without metadata_csum) nothing
//! vouches for the bitmap, and the cross-check of the blocks in-use inodes reference finds the
//! block, images it and warns. Either way the restored file is intact. `--cross-check never`
//! shows what the check saves (the block restores as zeros); `--cross-check always` catches a
//! bitmap whose checksum was updated along with the lie.

use crate::common::*;
use std::path::Path;

const BS: u64 = 4096;

/// A 64 MiB filesystem holding `victim` (1 MiB of random bytes) and some other files.
fn make(env: &Env, name: &str, mkfs: &str, opts: &[&str]) -> (std::path::PathBuf, Vec<u8>) {
    let src = env.path(&format!("{name}-src"));
    populate_tree(&src, 3, 2 * MIB);
    let victim = Rng::new(77).bytes(MIB as usize);
    std::fs::write(src.join("victim"), &victim).unwrap();
    let image = env.path(&format!("{name}.img"));
    let mut args = vec!["-q", "-F", "-b", "4096"];
    args.extend_from_slice(opts);
    args.extend(["-d", src.to_str().unwrap(), image.to_str().unwrap()]);
    std::fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    sh(mkfs, &args);
    (image, victim)
}

/// A data block of `/victim`, the block bitmap that covers it and the bit's position.
fn victim_block(image: &Path) -> (u64, u64, u64) {
    let blocks = sh("debugfs", &["-R", "blocks /victim", image.to_str().unwrap()]);
    let blocks: Vec<u64> = blocks.split_whitespace().map(|b| b.parse().unwrap()).collect();
    let block = blocks[blocks.len() / 2];
    let dump = sh("dumpe2fs", &[image.to_str().unwrap()]);
    let per_group: u64 = dump
        .lines()
        .find_map(|l| l.strip_prefix("Blocks per group:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("blocks per group");
    let group = block / per_group;
    let header = format!("Group {group}:");
    let section = dump.split(&header).nth(1).expect("the group's section");
    let bitmap: u64 = section
        .split("Block bitmap at ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .map(|n| n.parse().unwrap())
        .expect("block bitmap location");
    (block, bitmap, block - group * per_group)
}

/// Clears the bitmap bit of `/victim`'s middle block with a raw write (no checksum updated);
/// returns the block.
fn clear_bit_raw(image: &Path) -> u64 {
    let (block, bitmap, bit) = victim_block(image);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(image).unwrap();
    let at = bitmap * BS + bit / 8;
    let mut b = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    assert!(b[0] & (1 << (bit % 8)) != 0, "the victim's block should be marked used");
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] & !(1 << (bit % 8))], at).unwrap();
    block
}

fn restored_victim(env: &Env, snapshot: &str) -> Vec<u8> {
    let restored = env.path("restored.img");
    let _ = std::fs::remove_file(&restored);
    env.restore(snapshot, &restored, &[]);
    let out = env.path("victim.out");
    let _ = std::fs::remove_file(&out);
    // -c: the restored bitmap is as damaged as the original (its checksum may fail).
    sh("debugfs", &["-c", "-R", &format!("dump /victim {}", out.display()), restored.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

/// Backs up `image` with extra arguments; returns (snapshot, warnings joined).
fn backup(env: &Env, image: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec![image.to_str().unwrap()];
    args.extend_from_slice(extra);
    let j = env.backup_json(&args);
    let warnings: Vec<String> =
        j["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect();
    (j["snapshot"].as_str().unwrap().to_string(), warnings.join("\n"))
}

#[test]
fn a_bitmap_failing_its_checksum_makes_its_group_imaged_whole() {
    let env = Env::new();
    let (image, victim) = make(&env, "csum", "mkfs.ext4", &[]);
    clear_bit_raw(&image);
    let (ok, fsck) = sh_status("e2fsck", &["-fn", image.to_str().unwrap()]);
    assert!(!ok, "the damage should be visible to e2fsck:\n{fsck}");
    let (snapshot, warnings) = backup(&env, &image, &[]);
    assert!(warnings.contains("block bitmap") && warnings.contains("fails its checksum"), "{warnings}");
    assert!(restored_victim(&env, &snapshot) == victim, "the victim must restore intact");
}

#[test]
fn bitmaps_without_checksums_are_checked_against_the_inodes() {
    let env = Env::new();
    for (name, mkfs, opts) in [
        ("ext2", "mkfs.ext2", vec![]),
        ("ext3", "mkfs.ext3", vec![]),
        ("ext4-nocsum", "mkfs.ext4", vec!["-O", "^metadata_csum"]),
    ] {
        let (image, victim) = make(&env, name, mkfs, &opts);
        let clean = env.backup_json(&[image.to_str().unwrap()]);
        assert_eq!(clean["warnings"], serde_json::json!([]), "{name}: an undamaged filesystem checks clean");
        let block = clear_bit_raw(&image);
        let (snapshot, warnings) = backup(&env, &image, &[]);
        assert!(warnings.contains("leave out 1 block that in-use inodes reference"), "{name}: {warnings}");
        assert!(restored_victim(&env, &snapshot) == victim, "{name}: the victim must restore intact");

        // Without the check the block is lost: what the check is for.
        let (snapshot, warnings) = backup(&env, &image, &["--cross-check", "never"]);
        assert_eq!(warnings, "", "{name}");
        assert!(
            restored_victim(&env, &snapshot) != victim,
            "{name}: block {block} should be lost without the cross-check"
        );
    }
}

#[test]
fn a_lying_bitmap_with_a_valid_checksum_is_caught_when_asked() {
    let env = Env::new();
    let (image, victim) = make(&env, "freeb", "mkfs.ext4", &[]);
    let (block, _, _) = victim_block(&image);
    // debugfs frees the block properly: bitmap, checksum and counts agree with the lie.
    sh("debugfs", &["-w", "-R", &format!("freeb {block}"), image.to_str().unwrap()]);
    let (snapshot, warnings) = backup(&env, &image, &["--cross-check", "always"]);
    assert!(warnings.contains("in-use inodes reference"), "{warnings}");
    assert!(restored_victim(&env, &snapshot) == victim);
}
