//! The ext used-block map against real filesystems made by mke2fs, and against damaged ones.

use rime_volume::fs::ext4::Ext4Map;
use rime_volume::{UsedMap, Volume};
use std::path::Path;
use std::process::Command;

fn mkfs(dir: &Path, name: &str, size_mib: u64, args: &[&str], content: Option<&Path>) -> std::path::PathBuf {
    let img = dir.join(name);
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size_mib << 20).unwrap();
    drop(f);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.arg("-q").arg("-F").args(args);
    if let Some(c) = content {
        cmd.arg("-d").arg(c);
    }
    let st = cmd.arg(&img).status().expect("mkfs.ext4 (e2fsprogs) is installed");
    assert!(st.success(), "mkfs.ext4 {args:?} failed");
    img
}

fn used_bytes(img: &Path) -> u64 {
    let vol = Volume::open(img, false).unwrap();
    let mut map = Ext4Map::probe(&vol.region())
        .unwrap_or_else(|e| panic!("{}: {e:#}", img.display()))
        .expect("ext filesystem recognised");
    let mut ranges = Vec::new();
    let chunk = 1 << 20;
    let mut off = 0;
    while off < vol.size {
        let len = chunk.min(vol.size - off);
        let before = ranges.len();
        map.used_ranges(off, len, &mut ranges).unwrap();
        for r in &ranges[before..] {
            assert!(r.start >= off && r.end <= off + len && r.start < r.end, "range {r:?} outside chunk at {off}");
        }
        off += len;
    }
    ranges.iter().map(|r| r.end - r.start).sum()
}

fn reported_used(img: &Path) -> u64 {
    let vol = Volume::open(img, false).unwrap();
    Ext4Map::probe(&vol.region()).unwrap().unwrap().reported_used_bytes().unwrap()
}

#[test]
fn map_matches_the_filesystems_own_free_count() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("big"), vec![7u8; 9 << 20]).unwrap();
    for (i, args) in [
        vec![],
        vec!["-O", "^flex_bg"],
        vec!["-O", "^64bit"],
        vec!["-b", "1024"],
        vec!["-O", "^metadata_csum,uninit_bg"],
        vec!["-O", "bigalloc", "-C", "16384"],
        vec!["-O", "meta_bg,^resize_inode"],
        vec!["-O", "sparse_super2"],
        vec![
            "-T",
            "ext2",
            "-O",
            "^has_journal,^extent,^flex_bg,^64bit,^metadata_csum,^dir_nlink,^extra_isize,^huge_file",
        ],
    ]
    .iter()
    .enumerate()
    {
        let img = mkfs(dir.path(), &format!("fs{i}.img"), 64, args, Some(&content));
        let map = used_bytes(&img);
        let reported = reported_used(&img);
        // The map may count a few metadata blocks the free count leaves out (boot block,
        // over-estimated descriptor copies), never fewer than the filesystem uses.
        assert!(map >= reported, "{args:?}: map {map} < reported used {reported}");
        assert!(map <= reported + (2 << 20), "{args:?}: map {map} far above reported used {reported}");
        assert!(map < 40 << 20, "{args:?}: a 64 MiB fs holding 9 MiB maps {map} bytes as used");
    }
}

#[test]
fn not_ext_is_not_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let vol = Volume::open(&img, false).unwrap();
    assert!(Ext4Map::probe(&vol.region()).unwrap().is_none());
}

#[test]
fn damaged_filesystems_are_rejected_or_mapped_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    let img = mkfs(dir.path(), "good.img", 32, &[], None);
    let good = std::fs::read(&img).unwrap();
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut rejected = 0;
    for round in 0..300 {
        let mut bad = good.clone();
        // Corrupt the superblock or the first descriptor block.
        for _ in 0..1 + next() % 4 {
            let pos = if round % 2 == 0 { 1024 + next() % 1024 } else { 4096 + next() % 4096 } as usize;
            bad[pos] = next() as u8;
        }
        let path = dir.path().join("bad.img");
        std::fs::write(&path, &bad).unwrap();
        let vol = Volume::open(&path, false).unwrap();
        match Ext4Map::probe(&vol.region()) {
            Ok(Some(mut map)) => {
                let mut ranges = Vec::new();
                let mut off = 0;
                while off < vol.size {
                    if map.used_ranges(off, 1 << 20, &mut ranges).is_err() {
                        break;
                    }
                    off += 1 << 20;
                }
            }
            Ok(None) | Err(_) => rejected += 1,
        }
    }
    assert!(rejected > 0, "no corruption was ever detected");

    // A filesystem claiming more blocks than the volume has is refused.
    let mut lying = good.clone();
    lying[1024 + 4..1024 + 8].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let path = dir.path().join("lying.img");
    std::fs::write(&path, &lying).unwrap();
    let vol = Volume::open(&path, false).unwrap();
    assert!(Ext4Map::probe(&vol.region()).is_err());
}

#[test]
fn swap_files_are_recognised_by_their_signature() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir(&content).unwrap();
    let swap = content.join("swapfile");
    std::fs::write(&swap, vec![0x55u8; 6 << 20]).unwrap();
    assert!(Command::new("mkswap").arg(&swap).output().unwrap().status.success());
    std::fs::write(content.join("swap.img"), vec![0x55u8; 1 << 20]).unwrap(); // no signature
    for args in [vec![], vec!["-b", "4096"]] {
        let img = mkfs(dir.path(), "swap.img", 64, &args, Some(&content));
        let vol = Volume::open(&img, false).unwrap();
        let mut map = Ext4Map::probe(&vol.region()).unwrap().unwrap();

        let swaps: Vec<String> = map.swap_files().unwrap().into_iter().map(|s| s.path).collect();
        assert_eq!(swaps, vec!["/swapfile".to_string()], "{args:?}");
        let fe = map.file_extents("/swapfile").unwrap().unwrap();
        assert_eq!(fe.size, 6 << 20);
        // The extents hold the file's bytes: the signature is where the file says.
        let sig_extent = fe
            .extents
            .iter()
            .find(|e| e.file_offset <= 4086 && 4086 < e.file_offset + (e.range.end - e.range.start))
            .unwrap();
        let mut sig = [0u8; 10];
        vol.read_at(sig_extent.range.start + 4086 - sig_extent.file_offset, &mut sig).unwrap();
        assert_eq!(&sig, b"SWAPSPACE2");
        assert!(map.file_extents("/nope").unwrap().is_none());
    }
}
