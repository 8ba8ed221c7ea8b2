//! What Rime cannot understand in an LVM layout is kept, never dropped: a PV whose metadata is
//! damaged, LV types Rime does not map (RAID), and an LV whose other PV is not being backed up
//! are imaged whole with a warning naming what was not understood, and restore bit-exact.

use crate::common::*;
use crate::lvm_fixture::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::FileExt;

fn warnings(json: &Value) -> String {
    json["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect::<Vec<_>>().join("\n")
}

/// Flips one byte inside every copy of the VG text found in `range` of the image (each
/// `seqno = ` line), so those copies fail their checksums.
fn damage_texts(image: &std::path::Path, range: std::ops::Range<u64>) -> usize {
    let f = fs::OpenOptions::new().read(true).write(true).open(image).unwrap();
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    f.read_exact_at(&mut buf, range.start).unwrap();
    let mut n = 0;
    let needle = b"seqno = ";
    for i in 0..buf.len().saturating_sub(needle.len()) {
        if &buf[i..i + needle.len()] == needle {
            f.write_all_at(b"S", range.start + i as u64).unwrap();
            n += 1;
        }
    }
    n
}

/// A disk with one PV partition (two metadata copies) holding an ext4 LV and a 20 MiB LV of
/// random bytes with no filesystem. Returns (disk, ext4 LV offset).
fn disk_with_two_copies(env: &Env) -> (Disk, u64, u64) {
    let disk = Disk::new(&env.path("disk.img"), 200, &[(0, LVM_GUID)]);
    let (p1, _) = disk.part(1);
    let pv = disk.part_loop(1);
    let lvm = Lvm::new(&[&pv]);
    let pe = lvm.create_vg("vg0", &[&pv], &["--pvmetadatacopies", "2"])[0];
    lvm.add_lvs("vg0", &env.path(""), &[lv("fs", true, &[linear(20, 0, 0)]), lv("blob", true, &[linear(5, 0, 20)])]);
    let src = env.path("src");
    populate_tree(&src, 61, 4 * MIB);
    let fs_at = extent_at(p1, pe, 0);
    let dev = RangeLoop::new(&disk.image, fs_at, 20 * EXT);
    mkfs("mkfs.ext4", &[], 80, Some(&src), dev.path());
    write_random_at(&disk.image, 62, extent_at(p1, pe, 20), 5 * EXT);
    // Stale bytes in the unallocated extents.
    write_random_at(&disk.image, 63, extent_at(p1, pe, 30), 60 * MIB);
    (disk, fs_at, pe)
}

#[test]
fn one_damaged_metadata_copy_is_named_and_the_other_copy_used() {
    let env = Env::new();
    let (disk, _, pe) = disk_with_two_copies(&env);
    let (p1, _) = disk.part(1);
    assert!(damage_texts(&disk.image, p1..p1 + pe) > 0, "the first metadata area holds the VG text");
    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let vol = first_volume(&json);
    let lvs = vol["partitions"][0]["lvm"]["logical_volumes"].as_array().unwrap();
    assert_eq!(lvs.iter().find(|l| l["name"] == "fs").unwrap()["filesystem"], "ext4");
    let w = warnings(&json);
    assert!(w.contains("metadata copy 0") && w.contains("checksum"), "{w}");
    assert!(vol["read_bytes"].as_u64().unwrap() < 60 * MIB, "the unallocated extents were read");
}

#[test]
fn a_pv_with_no_valid_metadata_is_imaged_whole_and_restores_bit_exact() {
    let env = Env::new();
    let (disk, _, _) = disk_with_two_copies(&env);
    let (p1, len) = disk.part(1);
    assert!(damage_texts(&disk.image, p1..p1 + len) >= 2, "both metadata areas hold the VG text");
    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let vol = first_volume(&json);
    let w = warnings(&json);
    assert!(w.contains("partition 1") && w.contains("no valid metadata copy"), "{w}");
    assert!(vol["partitions"][0]["lvm"]["problem"].is_string(), "{}", vol["partitions"][0]);
    assert_eq!(vol["partitions"][0]["map"], "non-zero chunks (damaged LVM PV)");
    assert!(vol["read_bytes"].as_u64().unwrap() >= len, "a damaged PV is read whole");
    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same_bytes(&disk.image, &restored);
}

#[test]
fn raid_lvs_and_lvs_on_missing_pvs_are_kept_whole_with_warnings() {
    let env = Env::new();
    let disk = Disk::new(&env.path("disk.img"), 200, &[(0, LVM_GUID)]);
    let other = env.path("other.img");
    fs::File::create(&other).unwrap().set_len(64 * MIB).unwrap();
    let (p1, _) = disk.part(1);
    let (pv, pv2) = (disk.part_loop(1), RangeLoop::new(&other, 0, 64 * MIB));
    let lvm = Lvm::new(&[&pv, &pv2]);
    let pe = lvm.create_vg("vg1", &[&pv, &pv2], &[])[0];
    let raid = "type = \"raid1\"\ndevice_count = 2\nregion_size = 1024\nraids = [\"mirror_rmeta_0\", \"mirror_rimage_0\", \"mirror_rmeta_1\", \"mirror_rimage_1\"]";
    lvm.add_lvs(
        "vg1",
        &env.path(""),
        &[
            lv("mirror", true, &[raw(5, raid)]),
            lv("mirror_rmeta_0", false, &[linear(1, 0, 0)]),
            lv("mirror_rimage_0", false, &[linear(5, 0, 1)]),
            lv("mirror_rmeta_1", false, &[linear(1, 0, 6)]),
            lv("mirror_rimage_1", false, &[linear(5, 0, 7)]),
            // Half here, half on the other disk, which is not backed up.
            lv("spread", true, &[linear(4, 0, 12), linear(4, 1, 0)]),
        ],
    );
    write_random_at(&disk.image, 71, extent_at(p1, pe, 0), 16 * EXT);
    drop((pv, pv2));

    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let w = warnings(&json);
    assert!(w.contains("vg1/mirror") && w.contains("'raid1'"), "{w}");
    assert!(w.contains("vg1/spread") && w.contains("not being read"), "{w}");
    let vol = first_volume(&json);
    let lvs = vol["partitions"][0]["lvm"]["logical_volumes"].as_array().unwrap();
    let image0 = lvs.iter().find(|l| l["name"] == "mirror_rimage_0").unwrap();
    assert!(image0["role"].as_str().unwrap().contains("raid1"), "{image0}");
    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &[]);
    // Every extent the RAID and the spread LV occupy here comes back exactly.
    let (a, b) = (fs::File::open(&disk.image).unwrap(), fs::File::open(&restored).unwrap());
    let mut x = vec![0u8; (16 * EXT) as usize];
    let mut y = x.clone();
    a.read_exact_at(&mut x, extent_at(p1, pe, 0)).unwrap();
    b.read_exact_at(&mut y, extent_at(p1, pe, 0)).unwrap();
    assert!(x == y, "the RAID images and the spread LV's extents restore bit-exact");
}

#[test]
fn cloned_disks_backed_up_together_are_kept_whole_not_confused() {
    let env = Env::new();
    let (disk, _, _) = disk_with_two_copies(&env);
    // A VM disk cloned from a template: the same PV and VG UUIDs on both.
    let clone = env.path("clone.img");
    fs::copy(&disk.image, &clone).unwrap();
    let json = env.backup_json(&[disk.image.to_str().unwrap(), clone.to_str().unwrap()]);
    let w = warnings(&json);
    assert!(w.contains("appears on 2 volumes or partitions"), "{w}");
    let snap = json["snapshot"].as_str().unwrap();
    for (image, name) in [(&disk.image, "disk.img"), (&clone, "clone.img")] {
        let restored = env.path(&format!("restored-{name}"));
        env.restore(snap, &restored, &["--volume", name]);
        assert_same_bytes(image, &restored);
    }
}

#[test]
fn a_pvmove_in_progress_keeps_its_volume_group_whole() {
    let env = Env::new();
    let disk = Disk::new(&env.path("disk.img"), 120, &[(0, LVM_GUID)]);
    let (p1, _) = disk.part(1);
    let pv = disk.part_loop(1);
    let lvm = Lvm::new(&[&pv]);
    let pe = lvm.create_vg("vgm", &[&pv], &[])[0];
    // What LVM writes while `pvmove` copies extents 0-4 to 10-14: the LV points at the
    // temporary mirror, which points at both places on the PV.
    let mirror = "type = \"mirror\"\nmirror_count = 2\nregion_size = 1024\nmirrors = [\"pv0\", 0, \"pv0\", 10]";
    lvm.add_lvs(
        "vgm",
        &env.path(""),
        &[
            lv("moving", true, &[raw(5, "type = \"striped\"\nstripe_count = 1\nstripes = [\"pvmove0\", 0]")]),
            lv("pvmove0", false, &[raw(5, mirror)]),
        ],
    );
    drop(pv);
    write_random_at(&disk.image, 95, extent_at(p1, pe, 0), 15 * EXT);
    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let w = warnings(&json);
    assert!(w.contains("pvmove"), "{w}");
    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same_bytes(&disk.image, &restored);
}

#[test]
fn a_stale_swap_signature_under_a_partition_table_is_not_taken_for_swap() {
    let env = Env::new();
    let image = env.path("reused.img");
    fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    sh("mkswap", &[image.to_str().unwrap()]);
    // Partitioned later by a tool that leaves old signatures alone: an MBR in sector 0 only.
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&(100 * 1024u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(&mbr, 0).unwrap();
    drop(f);
    write_random_at(&image, 96, MIB, 50 * MIB);
    let json = env.backup_json(&[image.to_str().unwrap()]);
    let vol = first_volume(&json);
    assert_eq!(vol["partition_table"], "mbr", "{vol}");
    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same_bytes(&image, &restored);
}
