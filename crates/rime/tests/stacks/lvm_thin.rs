//! A Proxmox-style thin pool: two thin volumes and a thin snapshot sharing blocks with its
//! origin, backed up, browsed and restored.
//!
//! The pool's metadata is written by `thin_restore` (thin-provisioning-tools) from a mapping
//! built here, and each thin volume's filesystem (made and filled by the kernel in a plain image
//! file) is laid into the pool's data blocks exactly where that mapping says. The snapshot is the
//! origin before later changes: blocks that did not change afterwards are shared, as a real thin
//! snapshot shares them. The pool's data area starts full of random bytes, so a backup that read
//! unprovisioned pool blocks, or blocks a thin volume maps but its filesystem no longer uses,
//! would be caught.

use crate::common::*;
use crate::explorer_util::{assert_same_tree, Compare};
use crate::lvm_fixture::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const BLOCK: u64 = 64 * 1024;
/// Pool data: 50 extents.
const POOL_EXTENTS: u64 = 50;

/// A thin device's mapping: (virtual block, data block).
type Mapping = Vec<(u64, u64)>;

/// Thin mappings being built: (virtual block, data block) per device.
struct Pool {
    next: u64,
}

impl Pool {
    /// Maps every non-zero block of `image`; blocks equal to the same block of `shared` (an
    /// earlier image with its mapping) reuse that data block.
    fn map(&mut self, image: &[u8], shared: Option<(&[u8], &Mapping)>) -> Mapping {
        let mut out = Vec::new();
        for (v, block) in image.chunks(BLOCK as usize).enumerate() {
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            let reuse = shared.and_then(|(other, map)| {
                let same = other.get(v * BLOCK as usize..(v + 1) * BLOCK as usize) == Some(block);
                same.then(|| map.iter().find(|(ov, _)| *ov == v as u64).map(|(_, d)| *d)).flatten()
            });
            let d = reuse.unwrap_or_else(|| {
                self.next += 1;
                self.next - 1
            });
            out.push((v as u64, d));
        }
        assert!(self.next <= POOL_EXTENTS * EXT / BLOCK, "the test's pool is too small");
        out
    }
}

fn xml(devices: &[(u64, &[(u64, u64)])]) -> String {
    let mut x = format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"3\" flags=\"0\" version=\"2\" data_block_size=\"{}\" nr_data_blocks=\"{}\">\n",
        BLOCK / 512,
        POOL_EXTENTS * EXT / BLOCK
    );
    for (id, map) in devices {
        x.push_str(&format!(
            "<device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"0\" creation_time=\"0\" snap_time=\"1\">\n",
            map.len()
        ));
        for (v, d) in map.iter() {
            x.push_str(&format!("<single_mapping origin_block=\"{v}\" data_block=\"{d}\" time=\"0\"/>\n"));
        }
        x.push_str("</device>\n");
    }
    x.push_str("</superblock>\n");
    x
}

/// An ext4 image of `mib` MiB filled from `src`, as bytes.
fn ext4_image(env: &Env, name: &str, mib: u64, src: &Path) -> PathBuf {
    let img = env.path(name);
    mkfs("mkfs.ext4", &["-E", "lazy_itable_init=0"], mib, Some(src), &img);
    img
}

/// Reads a thin volume back from a disk through its mapping.
fn gather(disk: &Path, tdata_at: u64, map: &[(u64, u64)], size: u64, out: &Path) {
    let d = fs::File::open(disk).unwrap();
    let f = fs::File::create(out).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for (v, data) in map {
        d.read_exact_at(&mut buf, tdata_at + data * BLOCK).unwrap();
        f.write_all_at(&buf, v * BLOCK).unwrap();
    }
}

/// Loop-mounts an image read-only for `f`.
fn with_image_ro<R>(env: &Env, img: &Path, tag: &str, f: impl FnOnce(&Path) -> R) -> R {
    let lo = LoopDev::attach(img);
    let name = img.file_name().unwrap().to_string_lossy();
    let m = Mount::new(&lo.dev, &env.path(&format!("ro-{tag}-{name}")), &["ro"]);
    let r = f(&m.dir);
    m.unmount();
    r
}

/// A restored thin volume passes e2fsck and holds what the original holds.
fn assert_matches(env: &Env, img: &Path, original: &Path, tag: &str) {
    let (ok, o, e) = rime_testkit::run_status("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert!(ok, "e2fsck -fn on {tag}:\n{o}{e}");
    with_image_ro(env, original, tag, |o| {
        with_image_ro(env, img, tag, |m| assert_same_tree(o, m, &Compare::all(), &[]))
    });
}

#[test]
fn thin_pool_with_two_thin_volumes_and_a_snapshot_backs_up_browses_and_restores() {
    let env = Env::new();
    let disk = Disk::new(&env.path("disk.img"), 300, &[(0, LVM_GUID)]);
    let (p1, _) = disk.part(1);
    let pv = disk.part_loop(1);
    let lvm = Lvm::new(&[&pv]);
    let pe = lvm.create_vg("pve", &[&pv], &[])[0];
    lvm.add_lvs(
        "pve",
        &env.path(""),
        &[
            lv("data", true, &[thin_pool(POOL_EXTENTS, "data_tmeta", "data_tdata", 64)]),
            lv("data_tmeta", false, &[linear(1, 0, 0)]),
            lv("data_tdata", false, &[linear(POOL_EXTENTS, 0, 1)]),
            lv("lvol0_pmspare", false, &[linear(1, 0, 1 + POOL_EXTENTS)]),
            lv("vm-100-disk-0", true, &[thin(64, "data", 1, None)]),
            lv("vm-101-disk-0", true, &[thin(32, "data", 2, None)]),
            lv("snap_vm-100-disk-0_before", true, &[thin(64, "data", 3, Some("vm-100-disk-0"))]),
        ],
    );
    let tmeta_at = extent_at(p1, pe, 0);
    let tdata_at = extent_at(p1, pe, 1);
    write_random_at(&disk.image, 51, tdata_at, POOL_EXTENTS * EXT);

    // vm-100: a filesystem, its snapshot, then later changes (new files, a big file deleted).
    let (src_a, src_b) = (env.path("src-a"), env.path("src-b"));
    populate_tree(&src_a, 52, 30 * MIB);
    populate_tree(&src_b, 53, 12 * MIB);
    let vm100 = ext4_image(&env, "vm100.img", 256, &src_a);
    let snap = env.path("snap.img");
    fs::copy(&vm100, &snap).unwrap();
    with_mounted(&env, &vm100, "vm100", |m| {
        write_random_file(&m.join("scratch.bin"), 54, 16 * MIB);
        sh("sync", &[]);
        fs::remove_file(m.join("scratch.bin")).unwrap();
        write_random_file(&m.join("docs/after-snapshot.bin"), 55, 3 * MIB);
        fs::remove_file(m.join("bin/random-1.bin")).unwrap();
    });
    let vm101 = ext4_image(&env, "vm101.img", 128, &src_b);
    let (b100, bsnap, b101) = (fs::read(&vm100).unwrap(), fs::read(&snap).unwrap(), fs::read(&vm101).unwrap());
    let mut pool = Pool { next: 0 };
    let m100 = pool.map(&b100, None);
    let msnap = pool.map(&bsnap, Some((&b100, &m100)));
    let m101 = pool.map(&b101, None);
    let shared = msnap.iter().filter(|(v, d)| m100.contains(&(*v, *d))).count() as u64 * BLOCK;
    assert!(shared > 25 * MIB, "the snapshot shares its unchanged blocks ({shared} bytes)");
    let out = fs::OpenOptions::new().write(true).open(&disk.image).unwrap();
    for (bytes, map) in [(&b100, &m100), (&bsnap, &msnap), (&b101, &m101)] {
        for (v, d) in map.iter() {
            let at = (*v * BLOCK) as usize;
            out.write_all_at(&bytes[at..at + BLOCK as usize], tdata_at + d * BLOCK).unwrap();
        }
    }
    drop(out);
    let xml_path = env.path("pool.xml");
    fs::write(&xml_path, xml(&[(1, &m100), (2, &m101), (3, &msnap)])).unwrap();
    let tmeta = RangeLoop::new(&disk.image, tmeta_at, EXT);
    sh("thin_restore", &["-q", "-i", xml_path.to_str().unwrap(), "-o", &tmeta.dev]);
    drop((tmeta, pv));
    let fs_used = ext_used_bytes(&vm100) + ext_used_bytes(&snap) + ext_used_bytes(&vm101);

    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let vol = first_volume(&json);
    let lvs = vol["partitions"][0]["lvm"]["logical_volumes"].as_array().unwrap().clone();
    let by_name = |n: &str| lvs.iter().find(|l| l["name"] == n).unwrap_or_else(|| panic!("no LV {n}")).clone();
    for n in ["vm-100-disk-0", "vm-101-disk-0", "snap_vm-100-disk-0_before"] {
        assert_eq!(by_name(n)["filesystem"], "ext4", "{n}");
        assert_eq!(by_name(n)["layout"], "thin", "{n}");
        assert_eq!(by_name(n)["pool"], "data", "{n}");
    }
    assert_eq!(by_name("snap_vm-100-disk-0_before")["origin"], "vm-100-disk-0");
    assert_eq!(by_name("data")["layout"], "thin-pool");
    assert_eq!(by_name("data_tmeta")["visible"], false);
    // Shared blocks are read once, unprovisioned and unused pool blocks not at all.
    let read = vol["read_bytes"].as_u64().unwrap();
    assert!(read + shared / 2 < fs_used, "read {read} bytes; the three filesystems use {fs_used}, sharing {shared}");
    assert!(read < 100 * MIB, "read {read} bytes of a pool of {} MiB", POOL_EXTENTS * 4);

    // Browse each thin volume from the repository: it holds what the kernel reads in it.
    for (spec, reference) in [
        ("disk.img:1/pve/vm-100-disk-0", &vm100),
        ("pve/snap_vm-100-disk-0_before", &snap),
        ("pve/vm-101-disk-0", &vm101),
    ] {
        let to = env.path(&format!("x-{}", spec.replace(['/', ':'], "-")));
        env.rime(&["extract", "latest", "/", "--volume", spec, "--to", to.to_str().unwrap()]).ok();
        with_image_ro(&env, reference, "x", |m| assert_same_tree(m, &to, &Compare::all(), &[]));
    }

    // Restored, each thin volume reads back through the pool into a clean filesystem.
    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_restore_is_masked_original(&disk.image, &restored);
    for (map, size, reference, tag) in
        [(&m100, 256 * MIB, &vm100, "vm100"), (&msnap, 256 * MIB, &snap, "snap"), (&m101, 128 * MIB, &vm101, "vm101")]
    {
        let img = env.path(&format!("restored-{tag}.img"));
        gather(&restored, tdata_at, map, size, &img);
        assert_matches(&env, &img, reference, tag);
    }
    // The pool metadata came back whole: LVM and thin_dump read the restored pool as the original.
    let rmeta = RangeLoop::new(&restored, tmeta_at, EXT);
    let dump = sh("thin_dump", &[&rmeta.dev]);
    for id in 1..=3 {
        assert!(dump.contains(&format!("dev_id=\"{id}\"")), "thin device {id} missing from the restored pool:\n{dump}");
    }
    drop(rmeta);

    // Damaged pool metadata: the thin volumes cannot be mapped, so the pool's data is kept whole.
    write_random_at(&disk.image, 56, tmeta_at + 4096, 60 * 1024);
    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let warnings = json["warnings"].to_string();
    assert!(warnings.contains("pve/vm-100-disk-0") && warnings.contains("thin pool data"), "{warnings}");
    let read = first_volume(&json)["read_bytes"].as_u64().unwrap();
    assert!(read >= POOL_EXTENTS * EXT, "read {read} bytes: the pool's data must be kept whole");
}
