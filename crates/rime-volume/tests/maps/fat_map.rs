//! The FAT used-block map against real FAT12/16/32 filesystems made by mkfs.vfat and filled with
//! mtools (no root, no kernel driver), against hand-made boot sectors, and against damaged ones.
//!
//! Needs dosfstools (mkfs.vfat, fsck.fat) and mtools.

use rime_volume::fs::fat::{FatGeometry, FatKind, FatMap};
use rime_volume::fs::{CrossCheck, MapOptions};
use rime_volume::{UsedMap, Volume};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// A tree of mixed files (empty, tiny, odd sizes, a few MiB, nested directories, long names)
/// totalling about `total` bytes.
fn make_tree(root: &Path, seed: u64, total: u64) {
    let mut rng = Rng(seed | 1);
    std::fs::create_dir_all(root.join("docs/deep/deeper")).unwrap();
    std::fs::create_dir_all(root.join("Mixed Case Dir")).unwrap();
    std::fs::write(root.join("empty.txt"), b"").unwrap();
    std::fs::write(root.join("tiny.txt"), b"hello, FAT\n").unwrap();
    std::fs::write(root.join("docs/deep/deeper/a long file name with spaces.dat"), rng.bytes(12345)).unwrap();
    std::fs::write(root.join("Mixed Case Dir/Readme.TXT"), b"case is kept\n").unwrap();
    let mut written = 0u64;
    let mut i = 0;
    while written < total {
        let size = match i % 4 {
            0 => rng.next_u64() % 4096 + 1,
            1 => rng.next_u64() % (256 * 1024),
            _ => (rng.next_u64() % (3 * MIB)).min(total - written),
        };
        let dir = match i % 3 {
            0 => root.to_path_buf(),
            1 => root.join("docs"),
            _ => root.join("docs/deep"),
        };
        std::fs::write(dir.join(format!("file-{i:03}.bin")), rng.bytes(size as usize)).unwrap();
        written += size;
        i += 1;
    }
}

/// An image of `size` bytes full of random garbage, formatted FAT`bits`, holding `tree`.
fn make_fat(dir: &Path, name: &str, bits: u32, size: u64, tree: Option<&Path>, extra: &[&str]) -> PathBuf {
    let img = dir.join(name);
    std::fs::write(&img, Rng(size ^ bits as u64).bytes(size as usize)).unwrap();
    let mut args = vec!["-F".to_string(), bits.to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push(s(&img).to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("mkfs.vfat", &args);
    if let Some(tree) = tree {
        for e in std::fs::read_dir(tree).unwrap() {
            let p = e.unwrap().path();
            run("mcopy", &["-s", "-i", s(&img), s(&p), "::/"]);
        }
    }
    img
}

/// Walks the whole image in 64 KiB steps, as the backup does; checks every answer.
fn walk(map: &mut dyn UsedMap, size: u64) -> Vec<Range<u64>> {
    let chunk = 64 * 1024;
    let mut all: Vec<Range<u64>> = Vec::new();
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        out.clear();
        map.used_ranges(off, len, &mut out).unwrap();
        let mut prev = off;
        for r in &out {
            assert!(
                r.start >= prev && r.start < r.end && r.end <= off + len,
                "range {r:?} out of order or outside chunk at {off}"
            );
            prev = r.end;
        }
        for r in out.drain(..) {
            match all.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => all.push(r),
            }
        }
        off += len;
    }
    all
}

fn total(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

/// A copy of `img` with every byte the map calls unused set to zero: what a restore produces.
fn masked_copy(img: &Path, ranges: &[Range<u64>], to: &Path) {
    let data = std::fs::read(img).unwrap();
    let mut out = vec![0u8; data.len()];
    for r in ranges {
        out[r.start as usize..r.end as usize].copy_from_slice(&data[r.start as usize..r.end as usize]);
    }
    std::fs::write(to, out).unwrap();
}

/// What `fsck.fat -n -v` reports: (data area start, bytes per cluster, data clusters, used clusters).
fn fsck_counts(img: &Path) -> (u64, u64, u64, u64) {
    let out = run("fsck.fat", &["-n", "-v", s(img)]);
    let num_before = |needle: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in fsck.fat output:\n{out}"));
        line.split_whitespace().next().unwrap().parse().unwrap()
    };
    let data_start: u64 = out
        .lines()
        .find(|l| l.starts_with("Data area starts at byte"))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no data area start in:\n{out}"));
    let summary = out.lines().rev().find(|l| l.contains(" clusters") && l.contains('/')).unwrap();
    let frac = summary.rsplit(' ').nth(1).unwrap();
    let used: u64 = frac.split('/').next().unwrap().parse().unwrap();
    (data_start, num_before("bytes per cluster"), num_before("data clusters"), used)
}

#[test]
fn maps_cover_exactly_the_clusters_fsck_counts_and_keep_every_file() {
    let dir = tempfile::tempdir().unwrap();
    for (bits, size, extra) in [
        (12u32, 8 * MIB, vec![]),
        (16, 64 * MIB, vec![]),
        (32, 96 * MIB, vec![]),
        (32, 80 * MIB, vec!["-S", "1024", "-s", "1"]),
        (16, 48 * MIB, vec!["-f", "1", "-s", "8"]),
    ] {
        let what = format!("FAT{bits} {extra:?}");
        let tree = dir.path().join(format!("tree{bits}-{}", extra.len()));
        make_tree(&tree, bits as u64 + size, size * 45 / 100);
        let img = make_fat(dir.path(), "fat.img", bits, size, Some(&tree), &extra);
        let vol = Volume::open(&img, false).unwrap();
        let mut map = FatMap::probe(&vol.region()).unwrap_or_else(|e| panic!("{what}: {e:#}")).expect("FAT recognised");
        let kind = match bits {
            12 => FatKind::Fat12,
            16 => FatKind::Fat16,
            _ => FatKind::Fat32,
        };
        assert_eq!(map.geometry().kind, kind, "{what}");
        assert_eq!(map.filesystem(), Some(kind.name()));
        let ranges = walk(&mut map, vol.size);
        let mapped = total(&ranges);

        // Exactly: the metadata area, the clusters fsck.fat counts as used, and the sectors
        // past the last cluster.
        let (data_start, cluster, clusters, used) = fsck_counts(&img);
        let geo = map.geometry();
        assert_eq!(
            (geo.data_start, geo.cluster_bytes, geo.cluster_count),
            (data_start, cluster, clusters),
            "{what}: geometry"
        );
        let fs_used = data_start + used * cluster;
        let tail = vol.size - (data_start + clusters * cluster);
        assert_eq!(mapped, fs_used + tail, "{what}: map {mapped} vs fsck.fat's used {fs_used} + tail {tail}");
        assert!(mapped < vol.size * 6 / 10, "{what}: about half full, yet {mapped} of {} bytes mapped", vol.size);
        assert!(mapped > vol.size * 4 / 10, "{what}: {mapped} of {} bytes mapped", vol.size);
        if kind == FatKind::Fat32 {
            assert_eq!(map.reported_used_bytes(), Some(fs_used), "{what}: FSInfo free count");
        }

        // The image with unused bytes zeroed is a clean filesystem holding the same files.
        let masked = dir.path().join("masked.img");
        masked_copy(&img, &ranges, &masked);
        assert_ne!(
            std::fs::read(&img).unwrap(),
            std::fs::read(&masked).unwrap(),
            "{what}: free garbage should be gone"
        );
        run("fsck.fat", &["-n", s(&masked)]);
        let out = dir.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir(&out).unwrap();
        run("mcopy", &["-s", "-n", "-i", s(&masked), "::/*", s(&out)]);
        let diff = Command::new("diff").args(["-r", s(&tree), s(&out)]).output().unwrap();
        assert!(diff.status.success(), "{what}: files differ:\n{}", String::from_utf8_lossy(&diff.stdout));
    }
}

#[test]
fn an_empty_filesystem_maps_only_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_fat(dir.path(), "empty.img", 32, 64 * MIB, None, &[]);
    let vol = Volume::open(&img, false).unwrap();
    let mut map = FatMap::probe(&vol.region()).unwrap().unwrap();
    let mapped = total(&walk(&mut map, vol.size));
    let (data_start, cluster, _, used) = fsck_counts(&img);
    assert_eq!(used, 1, "only the root directory cluster");
    assert!(mapped <= data_start + cluster + 64 * 1024, "empty FAT32 maps {mapped} bytes");
}

/// A synthetic FAT12/16 boot sector with `clusters` data clusters of one 512-byte sector.
fn boot_sector(clusters: u64, fat32_layout: bool) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 0xEB;
    b[1] = 0x3C;
    b[2] = 0x90;
    b[3..11].copy_from_slice(b"mkfs.fat");
    b[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
    b[0x0D] = 1;
    b[0x10] = 2;
    b[0x15] = 0xF8;
    let (root_entries, bits) = if fat32_layout { (0u64, 32) } else { (512, if clusters < 4085 { 12 } else { 16 }) };
    let fat_sectors = ((clusters + 2) * bits).div_ceil(8).div_ceil(512);
    let reserved = if fat32_layout { 32 } else { 1 };
    let total = reserved + 2 * fat_sectors + root_entries * 32 / 512 + clusters;
    b[0x0E..0x10].copy_from_slice(&(reserved as u16).to_le_bytes());
    b[0x11..0x13].copy_from_slice(&(root_entries as u16).to_le_bytes());
    b[0x20..0x24].copy_from_slice(&(total as u32).to_le_bytes());
    if fat32_layout {
        b[0x24..0x28].copy_from_slice(&(fat_sectors as u32).to_le_bytes());
        b[0x2C..0x30].copy_from_slice(&2u32.to_le_bytes());
        b[0x52..0x5A].copy_from_slice(b"FAT32   ");
    } else {
        b[0x16..0x18].copy_from_slice(&(fat_sectors as u16).to_le_bytes());
        b[0x36..0x3E].copy_from_slice(b"FAT16   ");
    }
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

#[test]
fn fat_type_follows_the_cluster_count() {
    let big = 1 << 40;
    let kind = |c, fat32| FatGeometry::parse(&boot_sector(c, fat32), big).unwrap().unwrap().kind;
    assert_eq!(kind(1, false), FatKind::Fat12);
    assert_eq!(kind(4084, false), FatKind::Fat12);
    assert_eq!(kind(4085, false), FatKind::Fat16);
    assert_eq!(kind(65524, false), FatKind::Fat16);
    assert_eq!(kind(65525, true), FatKind::Fat32);
    // A FAT32 layout is FAT32 even below the count (as Linux and fsck.fat read it).
    assert_eq!(kind(70, true), FatKind::Fat32);
    // A FAT16 layout with a FAT32 cluster count cannot be read safely.
    let mut b = boot_sector(65524, false);
    let tot = u32::from_le_bytes(b[0x20..0x24].try_into().unwrap()) + 10;
    b[0x20..0x24].copy_from_slice(&tot.to_le_bytes());
    assert!(FatGeometry::parse(&b, big).is_err(), "65534 clusters with a 16-bit layout");
    // The geometry is what the specification computes.
    let g = FatGeometry::parse(&boot_sector(5000, false), big).unwrap().unwrap();
    let fat_sectors = (5002u64 * 2).div_ceil(512);
    assert_eq!(g.fat_start, 512);
    assert_eq!(g.data_start, (1 + 2 * fat_sectors + 32) * 512);
    assert_eq!(g.data_end, g.data_start + 5000 * 512);
    assert_eq!(g.cluster_range(2), g.data_start..g.data_start + 512);
}

#[test]
fn nonsense_boot_sectors_are_errors() {
    let big = 1 << 40;
    let good = boot_sector(5000, false);
    assert!(FatGeometry::parse(&good, big).unwrap().is_some());
    let with = |off: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[off..off + bytes.len()].copy_from_slice(bytes);
        FatGeometry::parse(&b, big)
    };
    // Claims to be FAT (FAT16 label and signature) but the numbers are wrong.
    assert!(with(0x0B, &3000u16.to_le_bytes()).is_err(), "bytes per sector 3000");
    assert!(with(0x0B, &256u16.to_le_bytes()).is_err(), "bytes per sector 256");
    assert!(with(0x0B, &8192u16.to_le_bytes()).is_err(), "bytes per sector 8192");
    assert!(with(0x0D, &[3]).is_err(), "sectors per cluster 3");
    assert!(with(0x0D, &[0]).is_err(), "sectors per cluster 0");
    assert!(with(0x0E, &0u16.to_le_bytes()).is_err(), "no reserved sectors");
    assert!(with(0x10, &[0]).is_err(), "no FATs");
    assert!(with(0x16, &1u16.to_le_bytes()).is_err(), "FAT too small for its clusters");
    assert!(with(0x20, &50u32.to_le_bytes()).is_err(), "metadata larger than the filesystem");
    // Larger than the volume.
    assert!(FatGeometry::parse(&good, 1 << 20).is_err());
    // FAT32 root directory outside the data area.
    let mut b = boot_sector(70000, true);
    b[0x2C..0x30].copy_from_slice(&80000u32.to_le_bytes());
    assert!(FatGeometry::parse(&b, big).is_err());
    // Not FAT at all: zeros, an NTFS boot sector, an MBR-like sector.
    assert!(FatGeometry::parse(&[0u8; 512], big).unwrap().is_none());
    let mut ntfs = good.clone();
    ntfs[3..11].copy_from_slice(b"NTFS    ");
    assert!(FatGeometry::parse(&ntfs, big).unwrap().is_none());
    let mut mbr = vec![0u8; 512];
    mbr[0] = 0xEB;
    mbr[1] = 0x63;
    mbr[2] = 0x90;
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    assert!(FatGeometry::parse(&mbr, big).unwrap().is_none());
}

#[test]
fn other_content_is_not_fat() {
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.img");
    std::fs::write(&zero, vec![0u8; MIB as usize]).unwrap();
    assert!(FatMap::probe(&Volume::open(&zero, false).unwrap().region()).unwrap().is_none());
    let ext = dir.path().join("ext.img");
    std::fs::write(&ext, vec![0u8; 16 * MIB as usize]).unwrap();
    run("mkfs.ext4", &["-q", "-F", s(&ext)]);
    assert!(FatMap::probe(&Volume::open(&ext, false).unwrap().region()).unwrap().is_none());
    // And detection picks FAT for a FAT image.
    let img = make_fat(dir.path(), "f.img", 16, 32 * MIB, None, &[]);
    let d = rime_volume::fs::detect(&Volume::open(&img, false).unwrap().region());
    assert_eq!(d.map.filesystem(), Some("fat16"));
    assert!(d.warning.is_none());
}

#[test]
fn damaged_filesystems_are_rejected_or_mapped_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut rejected = 0;
    let mut mapped = 0;
    for bits in [12u32, 16, 32] {
        let size = if bits == 12 { 4 * MIB } else { 40 * MIB };
        let tree = dir.path().join(format!("t{bits}"));
        make_tree(&tree, bits as u64, size / 4);
        let img = make_fat(dir.path(), &format!("good{bits}.img"), bits, size, Some(&tree), &[]);
        let good = std::fs::read(&img).unwrap();
        let geo = {
            let vol = Volume::open(&img, false).unwrap();
            FatMap::probe(&vol.region()).unwrap().unwrap().geometry().clone()
        };
        let path = dir.path().join("bad.img");
        for round in 0..70 {
            let mut bad = good.clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let pos = if round % 2 == 0 {
                    rng.next_u64() % 512
                } else {
                    geo.fat_start + rng.next_u64() % (geo.fat_bytes * geo.fat_count)
                } as usize;
                bad[pos] = rng.next_u64() as u8;
            }
            std::fs::write(&path, &bad).unwrap();
            let vol = Volume::open(&path, false).unwrap();
            match FatMap::probe(&vol.region()) {
                Ok(Some(mut map)) => {
                    mapped += 1;
                    let mut out = Vec::new();
                    let mut off = 0;
                    while off < vol.size {
                        out.clear();
                        let len = (64 * 1024).min(vol.size - off);
                        if map.used_ranges(off, len, &mut out).is_err() {
                            break;
                        }
                        assert!(out.iter().all(|r| r.start >= off && r.end <= off + len));
                        off += len;
                    }
                }
                Ok(None) | Err(_) => rejected += 1,
            }
        }
    }
    assert!(rejected > 0, "no corruption was ever detected");
    assert!(mapped > 0, "every corruption was rejected (FAT damage should still map)");
}

/// The first and last cluster of a file, as `mshowfat` gives its (single) run.
fn file_clusters(img: &Path, path: &str) -> (u64, u64) {
    let out = run("mshowfat", &["-i", s(img), path]);
    let run = out.split('<').nth(1).and_then(|r| r.split('>').next()).expect("one cluster run");
    let (a, b) = run.split_once('-').unwrap_or((run, run));
    (a.trim().parse().unwrap(), b.trim().parse().unwrap())
}

/// Writes FAT entry `n` of copy `copy` (16- or 32-bit entries).
fn set_fat_entry(img: &Path, geo: &FatGeometry, copy: u64, n: u64, value: u32) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let base = geo.fat_start + copy * geo.fat_bytes;
    match geo.kind {
        FatKind::Fat16 => std::os::unix::fs::FileExt::write_all_at(&f, &(value as u16).to_le_bytes(), base + n * 2),
        FatKind::Fat32 => std::os::unix::fs::FileExt::write_all_at(&f, &value.to_le_bytes(), base + n * 4),
        FatKind::Fat12 => panic!("FAT12 entries are not written by this test"),
    }
    .unwrap();
}

fn covers(ranges: &[Range<u64>], r: &Range<u64>) -> bool {
    ranges.iter().any(|u| u.start <= r.start && u.end >= r.end)
}

fn geometry(img: &Path) -> FatGeometry {
    let mut boot = vec![0u8; 512];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(img).unwrap(), &mut boot, 0).unwrap();
    FatGeometry::parse(&boot, std::fs::metadata(img).unwrap().len()).unwrap().unwrap()
}

fn map_with(img: &Path, cross_check: CrossCheck) -> (Vec<Range<u64>>, Vec<String>, String) {
    let vol = Volume::open(img, false).unwrap();
    let mut map = FatMap::probe_with(&vol.region(), &MapOptions { cross_check }).unwrap().unwrap();
    let ranges = walk(&mut map, vol.size);
    (ranges, map.take_warnings(), map.describe())
}

/// A crash between writing a directory entry and its FAT entries: the entry points at clusters
/// the FAT calls free. On a volume marked dirty the directories are walked, and the clusters
/// they reach are imaged.
#[test]
fn a_dirty_fat_is_checked_against_its_directories() {
    let dir = tempfile::tempdir().unwrap();
    for (bits, size, state_byte) in [(16u32, 16 * MIB, 0x25u64), (32, 64 * MIB, 0x41)] {
        let img = make_fat(dir.path(), &format!("dirty{bits}.img"), bits, size, None, &[]);
        std::fs::write(dir.path().join("victim.bin"), Rng(9).bytes(100_000)).unwrap();
        run("mcopy", &["-i", s(&img), s(&dir.path().join("victim.bin")), "::/"]);
        let geo = geometry(&img);
        let (first, last) = file_clusters(&img, "::/victim.bin");
        for copy in 0..geo.fat_count {
            for n in first..=last {
                set_fat_entry(&img, &geo, copy, n, 0);
            }
        }
        let victim = geo.cluster_range(first);
        // Clean: the FAT is trusted as it stands, and the cluster is free by its word.
        let (ranges, warnings, _) = map_with(&img, CrossCheck::Auto);
        assert!(!covers(&ranges, &victim) && warnings.is_empty(), "FAT{bits}: {warnings:?}");
        // Dirty (as Linux marks a mounted volume): the directories are checked first.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x01], state_byte).unwrap();
        let (ranges, warnings, described) = map_with(&img, CrossCheck::Auto);
        assert!(covers(&ranges, &victim), "FAT{bits}: the cluster the directory entry points at must be imaged");
        assert!(
            warnings.iter().any(|w| w.contains("directory entries point at") && w.contains("dirty")),
            "{warnings:?}"
        );
        assert!(described.contains("dirty"), "{described}");
        let (ranges, _, _) = map_with(&img, CrossCheck::Never);
        assert!(!covers(&ranges, &victim), "FAT{bits}: --cross-check never trusts the FAT");
    }
}

/// A write torn between the FAT copies: the second copy marks a cluster the first calls free.
#[test]
fn fat_copies_that_disagree_are_united_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let img = make_fat(dir.path(), "torn.img", 16, 16 * MIB, None, &[]);
    let geo = geometry(&img);
    let n = geo.cluster_count; // a free cluster near the end
    set_fat_entry(&img, &geo, 1, n, 0xFFFF);
    let (ranges, warnings, _) = map_with(&img, CrossCheck::Auto);
    assert!(covers(&ranges, &geo.cluster_range(n)), "a cluster any copy marks used is imaged");
    assert!(warnings.iter().any(|w| w.contains("disagree on 1 cluster")), "{warnings:?}");
}
