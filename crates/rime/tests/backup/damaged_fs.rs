//! A damaged or hostile filesystem never crashes a backup: Rime falls back to imaging all
//! non-zero blocks, says so on stderr, and the restore gives back every byte.

use crate::common::*;
use std::os::unix::fs::FileExt;

#[test]
fn damaged_ext_superblock_falls_back_to_non_zero_blocks() {
    let env = Env::new();
    let (_, image) = ext4_with_files(&env, "fs", 8, 32, 2 * MIB);
    // Point group 0's block bitmap far outside the filesystem.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
    let mut log = [0u8; 4];
    f.read_exact_at(&mut log, 1024 + 0x18).unwrap();
    let block_size = 1024u64 << u32::from_le_bytes(log);
    let descriptors = if block_size == 1024 { 2048 } else { block_size };
    f.write_all_at(&0x7fff_fff0u32.to_le_bytes(), descriptors).unwrap();
    drop(f);
    let run = env.rime(&["backup", "--json", image.to_str().unwrap()]).ok();
    assert!(run.stderr.contains("looks damaged") && run.stderr.contains("non-zero"), "stderr: {}", run.stderr);
    let json = run.json();
    let vol = first_volume(&json);
    assert!(vol["map"].as_str().unwrap().contains("non-zero"), "{vol}");
    let out = env.path("out.img");
    env.restore("latest", &out, &[]);
    // With no trustworthy map every byte is kept, garbage in free blocks included.
    assert_same_bytes(&image, &out);
}

#[test]
fn random_garbage_with_an_ext_magic_is_survived() {
    let env = Env::new();
    let image = env.path("hostile.img");
    write_random_file(&image, 99, 16 * MIB);
    // An ext magic on top of random bytes: every other field is nonsense.
    let f = std::fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(&0xEF53u16.to_le_bytes(), 1024 + 0x38).unwrap();
    drop(f);
    env.rime(&["backup", image.to_str().unwrap()]).ok();
    let out = env.path("out.img");
    env.restore("latest", &out, &[]);
    assert_same_bytes(&image, &out);
    env.assert_verify_clean();
}
