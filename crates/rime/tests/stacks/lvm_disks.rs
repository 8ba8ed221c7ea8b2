//! Disks with LVM2 as distributions install them, backed up, restored and browsed.
//!
//! The references are the kernel's and LVM's own views: each LV's filesystem is loop-mounted
//! (original and restored) and compared file by file, `xfs_repair -n` / `e2fsck -fn` check the
//! restored filesystems, `blkid` reads the restored swap header, and `lvs` reads the restored
//! volume group exactly as it read the original. Free blocks, swap pages and unallocated extents
//! are filled with random bytes first, so a backup that stored them would be caught.

use crate::common::*;
use crate::explorer_util::{assert_same_tree, start_mount, Compare};
use crate::lvm_fixture::*;
use serde_json::Value;
use std::fs;
use std::path::Path;

/// Used bytes of an XFS filesystem as XFS counts them (data blocks minus free, which includes
/// the internal log).
fn xfs_used(dev: &Path) -> u64 {
    let out = sh("xfs_db", &["-r", "-c", "sb 0", "-c", "p dblocks fdblocks blocksize", dev.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        out.lines().find_map(|l| l.strip_prefix(&format!("{name} = "))).unwrap().trim().parse().unwrap()
    };
    (field("dblocks") - field("fdblocks")) * field("blocksize")
}

/// The LV entries of a partition in `rime backup --json`'s manifest.
fn lvs_of(volume: &Value, partition: usize) -> Vec<Value> {
    volume["partitions"][partition - 1]["lvm"]["logical_volumes"].as_array().expect("an LVM PV").clone()
}

fn lv_named<'a>(lvs: &'a [Value], name: &str) -> &'a Value {
    lvs.iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("no LV {name} in {lvs:?}"))
}

/// Mounts `dev` read-only (`nouuid` for XFS copies), runs `f`, unmounts.
fn with_ro<R>(dev: &Path, dir: &Path, opts: &[&str], f: impl FnOnce(&Path) -> R) -> R {
    let mut all = vec!["ro"];
    all.extend(opts);
    let m = Mount::new(dev, dir, &all);
    let r = f(&m.dir);
    m.unmount();
    r
}

#[test]
fn rhel_style_disk_images_only_used_blocks_leaves_swap_out_and_restores_exactly() {
    let env = Env::new();
    let disk = Disk::new(&env.path("disk.img"), 1200, &[(320, "L"), (0, LVM_GUID)]);
    let (p2, p2_len) = disk.part(2);
    // Stale data where nothing may be stored: the PV's unallocated extents.
    write_random_at(&disk.image, 21, p2 + 200 * MIB, p2_len - 200 * MIB);
    let pv = disk.part_loop(2);
    let lvm = Lvm::new(&[&pv]);
    let pe = lvm.create_vg("rhel", &[&pv], &[])[0];
    lvm.add_lvs(
        "rhel",
        &env.path(""),
        &[lv("root", true, &[linear(100, 0, 0)]), lv("swap", true, &[linear(32, 0, 100)])],
    );
    let root_at = extent_at(p2, pe, 0);
    let swap_at = extent_at(p2, pe, 100);
    // Swap: stale pages under a fresh header.
    write_random_at(&disk.image, 22, swap_at, 32 * EXT);
    let swap = RangeLoop::new(&disk.image, swap_at, 32 * EXT);
    sh("mkswap", &[&swap.dev]);
    let swap_uuid = sh("blkid", &["-p", "-s", "UUID", "-o", "value", &swap.dev]);
    drop(swap);
    // Root and /boot: XFS over random garbage, filled through the kernel.
    write_random_at(&disk.image, 23, root_at, 100 * EXT);
    let (src_root, src_boot) = (env.path("src-root"), env.path("src-boot"));
    populate_tree(&src_root, 24, 60 * MIB);
    populate_tree(&src_boot, 25, 8 * MIB);
    let root = RangeLoop::new(&disk.image, root_at, 100 * EXT);
    let boot = disk.part_loop(1);
    for (dev, src, tag) in [(&root, &src_root, "root"), (&boot, &src_boot, "boot")] {
        sh("mkfs.xfs", &["-q", "-f", "-K", &dev.dev]);
        let m = Mount::new(dev.path(), &env.path(&format!("fill-{tag}")), &[]);
        sh("cp", &["-a", &format!("{}/.", src.display()), m.dir.to_str().unwrap()]);
        m.unmount();
    }
    let fs_used = xfs_used(root.path()) + xfs_used(boot.path());
    let report = lvm.lv_report("rhel");
    drop((root, boot, pv));

    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let vol = first_volume(&json);
    let lvs = lvs_of(vol, 2);
    assert_eq!(vol["partitions"][1]["lvm"]["volume_group"]["name"], "rhel");
    let (root_lv, swap_lv) = (lv_named(&lvs, "root"), lv_named(&lvs, "swap"));
    assert_eq!(root_lv["path"], "disk.img:2/rhel/root");
    assert_eq!(root_lv["filesystem"], "xfs");
    assert_eq!(root_lv["layout"], "linear");
    assert_eq!(swap_lv["filesystem"], "swap");
    assert_eq!(vol["partitions"][0]["filesystem"], "xfs");
    // Read: the filesystems' used blocks, the swap header, the LVM label and metadata, the GPT.
    let read = vol["read_bytes"].as_u64().unwrap();
    let overhead = pe + 4096 + disk.part(1).0 + MIB;
    assert!(
        read <= (fs_used + overhead) * 11 / 10,
        "read {read} bytes for {fs_used} used by the filesystems (+{overhead} of LVM and GPT)"
    );
    let added = vol["added_bytes"].as_u64().unwrap();
    assert!(added < fs_used, "added {added} bytes: stale swap pages or free extents were stored");

    // Restore onto garbage: everything left out must come back as zeros, the rest exactly.
    let restored = env.path("restored.img");
    garbage_file(&restored, 26, 1200 * MIB);
    let snap = json["snapshot"].as_str().unwrap();
    env.restore(snap, &restored, &[]);
    assert_restore_is_masked_original(&disk.image, &restored);
    let rdisk = Disk { image: restored.clone(), parts: disk.parts.clone() };
    let rpv = rdisk.part_loop(2);
    assert_eq!(Lvm::new(&[&rpv]).lv_report("rhel"), report, "LVM reads the restored VG as the original");
    drop(rpv);
    let rswap = RangeLoop::new(&restored, swap_at, 32 * EXT);
    assert_eq!(sh("blkid", &["-p", "-s", "UUID", "-o", "value", &rswap.dev]), swap_uuid, "the swap header survives");
    drop(rswap);
    let mut tail = vec![0u8; (32 * EXT - 4096) as usize];
    fs::File::open(&restored).unwrap().read_exact_at_helper(swap_at + 4096, &mut tail);
    assert!(tail.iter().all(|&b| b == 0), "stale swap pages were restored");
    let mut free = vec![0u8; MIB as usize];
    fs::File::open(&restored).unwrap().read_exact_at_helper(extent_at(p2, pe, 150), &mut free);
    assert!(free.iter().all(|&b| b == 0), "an unallocated extent was restored");
    let how = Compare { dir_times: true, xattrs: false, owners: true, holes: false, modes: true, times: true };
    for (at, len, src, tag) in
        [(root_at, 100 * EXT, &src_root, "root"), (disk.part(1).0, disk.part(1).1, &src_boot, "boot")]
    {
        let dev = RangeLoop::new(&restored, at, len);
        let (ok, out, err) = sh_status_all("xfs_repair", &["-n", &dev.dev]);
        assert!(ok, "xfs_repair -n on the restored {tag}:\n{out}{err}");
        with_ro(dev.path(), &env.path(&format!("check-{tag}")), &["nouuid"], |m| assert_same_tree(src, m, &how, &[]));
    }
    // The XFS root is browsable straight from the repository. (Last: even a read-only mount
    // of an XFS that was mounted read-write before rewrites its superblock.)
    let original_root = RangeLoop::new(&disk.image, root_at, 100 * EXT);
    with_ro(original_root.path(), &env.path("orig-root"), &["nouuid"], |m| {
        let out = env.path("extracted-root");
        env.rime(&["extract", "latest", "/", "--volume", "disk.img:2/rhel/root", "--to", out.to_str().unwrap()]).ok();
        assert_same_tree(m, &out, &Compare::all(), &[]);
    });
    drop(original_root);
    let listing = env.rime(&["ls", "--json", "latest", "/", "--volume", "rhel/root"]).ok().json();
    assert!(listing["entries"].as_array().unwrap().iter().any(|e| e["name"] == "docs"), "{listing}");
}

#[test]
fn ubuntu_style_disk_ext4_root_in_lvm_is_browsable_and_its_swap_file_left_out() {
    let env = Env::new();
    let disk =
        Disk::new(&env.path("disk.img"), 600, &[(1, "21686148-6449-6E6F-744E-656564454649"), (64, "L"), (0, LVM_GUID)]);
    let (p3, _) = disk.part(3);
    let pv = disk.part_loop(3);
    let lvm = Lvm::new(&[&pv]);
    let pe = lvm.create_vg("ubuntu-vg", &[&pv], &[])[0];
    lvm.add_lvs("ubuntu-vg", &env.path(""), &[lv("ubuntu-lv", true, &[linear(80, 0, 0)])]);
    let lv_at = extent_at(p3, pe, 0);
    write_random_at(&disk.image, 31, lv_at, 80 * EXT);
    let src = env.path("src");
    populate_tree(&src, 32, 40 * MIB);
    let root = RangeLoop::new(&disk.image, lv_at, 80 * EXT);
    sh("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &root.dev]);
    {
        let m = Mount::new(root.path(), &env.path("fill"), &[]);
        sh("cp", &["-a", &format!("{}/.", src.display()), m.dir.to_str().unwrap()]);
        // Ubuntu's swap file, with stale pages.
        let swapfile = m.dir.join("swap.img");
        write_random_file(&swapfile, 33, 48 * MIB);
        sh("mkswap", &[swapfile.to_str().unwrap()]);
        m.unmount();
    }
    sh("mkfs.ext4", &["-q", "-F", &disk.part_loop(2).dev]);
    let fs_used = ext_used_bytes(root.path()) + ext_used_bytes(disk.part_loop(2).path());
    drop((root, pv));

    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let vol = first_volume(&json);
    let lvs = lvs_of(vol, 3);
    assert_eq!(lv_named(&lvs, "ubuntu-lv")["filesystem"], "ext4");
    let excluded = vol["excluded"].as_array().unwrap();
    let swap = excluded.iter().find(|e| e["path"] == "/swap.img").expect("the swap file inside the LV is left out");
    assert_eq!(swap["reason"], "swap file");
    assert!(swap["bytes"].as_u64().unwrap() >= 47 * MIB, "{swap}");
    // The filesystems count the swap file as used; its pages are not read.
    let read = vol["read_bytes"].as_u64().unwrap();
    let wanted = fs_used - swap["bytes"].as_u64().unwrap() + pe + 2 * MIB;
    assert!(read <= wanted * 11 / 10, "read {read} bytes for {wanted} wanted: swap pages or free blocks were read");

    // Browse the LV straight from the repository, by its full name and by VG/LV alone.
    let original = RangeLoop::new(&disk.image, lv_at, 80 * EXT);
    with_ro(original.path(), &env.path("orig"), &[], |m| {
        for spec in ["disk.img:3/ubuntu-vg/ubuntu-lv", "ubuntu-vg/ubuntu-lv"] {
            let listing = env.rime(&["ls", "--json", "latest", "/docs", "--volume", spec]).ok().json();
            let mut names: Vec<String> =
                listing["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().into()).collect();
            let mut expected: Vec<String> = fs::read_dir(m.join("docs"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into())
                .collect();
            names.sort();
            expected.sort();
            assert_eq!(names, expected, "{spec}");
        }
        let out = env.path("extracted");
        env.rime(&[
            "extract",
            "latest",
            "/",
            "--volume",
            "disk.img:3/ubuntu-vg/ubuntu-lv",
            "--to",
            out.to_str().unwrap(),
        ])
        .ok();
        assert_same_tree(m, &out, &Compare::all(), &["swap.img", "lost+found"]);
    });
    drop(original);
    // A partition or volume that is a PV names its LVs when asked for files.
    let err = env.rime(&["ls", "latest", "/", "--volume", "disk.img:3"]).fails();
    assert!(err.contains("disk.img:3/ubuntu-vg/ubuntu-lv"), "{err}");
    let err = env.rime(&["ls", "latest", "/", "--volume", "ubuntu-vg/nope"]).fails();
    assert!(err.contains("no logical volume") && err.lines().count() == 1, "{err}");
    let err = env.rime(&["ls", "latest", "/"]).fails();
    assert!(err.contains("disk.img:3 (LVM2 PV with disk.img:3/ubuntu-vg/ubuntu-lv)"), "{err}");

    // `rime mount` shows the LV as an image file and as a tree, named as device-mapper names it.
    let mp = env.path("mp");
    let proc = start_mount(&env, "latest", &mp);
    let tree = mp.join("disk.img.part3.ubuntu--vg-ubuntu--lv.files");
    let image = mp.join("disk.img.part3.ubuntu--vg-ubuntu--lv.img");
    assert_eq!(fs::metadata(&image).unwrap().len(), 80 * EXT);
    let original = RangeLoop::new(&disk.image, lv_at, 80 * EXT);
    with_ro(original.path(), &env.path("orig-for-mount"), &[], |m| {
        let how = Compare { dir_times: true, xattrs: false, owners: true, holes: false, modes: true, times: true };
        assert_same_tree(&m.join("docs"), &tree.join("docs"), &how, &[]);
    });
    drop(original);
    drop(proc);

    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &[]);
    let rlv = RangeLoop::new(&restored, lv_at, 80 * EXT);
    let (ok, out, err) = sh_status_all("e2fsck", &["-fn", &rlv.dev]);
    assert!(ok, "e2fsck -fn on the restored LV:\n{out}{err}");
    with_ro(rlv.path(), &env.path("restored-mnt"), &[], |m| {
        assert_same_tree(&src, m, &Compare::all(), &["swap.img", "lost+found"]);
        let header = fs::read(m.join("swap.img")).unwrap();
        assert_eq!(&header[4086..4096], b"SWAPSPACE2", "the swap file keeps its header");
        assert!(header[4096..].iter().all(|&b| b == 0), "the swap file's pages were restored");
    });
}

#[test]
fn striped_lv_across_two_pvs_and_a_pv_given_directly() {
    let env = Env::new();
    // Two PV partitions of one disk, one VG over both; a striped LV and a linear one.
    let disk = Disk::new(&env.path("disk.img"), 520, &[(256, LVM_GUID), (0, LVM_GUID)]);
    let (pv1, pv2) = (disk.part_loop(1), disk.part_loop(2));
    let lvm = Lvm::new(&[&pv1, &pv2]);
    let pes = lvm.create_vg("data", &[&pv1, &pv2], &[]);
    lvm.add_lvs(
        "data",
        &env.path(""),
        &[lv("stripes", true, &[striped(40, 64, &[(0, 0), (1, 0)])]), lv("tail", true, &[linear(10, 1, 20)])],
    );
    // The striped LV's filesystem, made in a plain file and laid out chunk by chunk as LVM
    // stripes it: chunk c of 64 KiB goes to stripe c mod 2, row c div 2.
    let src = env.path("src");
    populate_tree(&src, 41, 50 * MIB);
    let fs_img = env.path("stripes.ext4");
    mkfs("mkfs.ext4", &[], 160, Some(&src), &fs_img);
    let chunk = 64 * 1024;
    let place = |c: u64| {
        let (part, pe_start) = if c.is_multiple_of(2) { (disk.part(1).0, pes[0]) } else { (disk.part(2).0, pes[1]) };
        part + pe_start + (c / 2) * chunk
    };
    let data = fs::read(&fs_img).unwrap();
    let out = fs::OpenOptions::new().write(true).open(&disk.image).unwrap();
    for (c, bytes) in data.chunks(chunk as usize).enumerate() {
        std::os::unix::fs::FileExt::write_all_at(&out, bytes, place(c as u64)).unwrap();
    }
    drop((out, pv1, pv2));
    // A PV given directly, without a partition table.
    let pv_img = env.path("pv.img");
    fs::File::create(&pv_img).unwrap().set_len(100 * MIB).unwrap();
    let direct = RangeLoop::new(&pv_img, 0, 100 * MIB);
    let solo = Lvm::new(&[&direct]);
    let pe = solo.create_vg("solo", &[&direct], &[])[0];
    solo.add_lvs("solo", &env.path(""), &[lv("home", true, &[linear(20, 0, 0)])]);
    let home_src = env.path("home-src");
    populate_tree(&home_src, 42, 10 * MIB);
    let home = RangeLoop::new(&pv_img, pe, 20 * EXT);
    mkfs("mkfs.ext4", &[], 80, Some(&home_src), home.path());
    drop((home, direct));

    let json = env.backup_json(&[disk.image.to_str().unwrap(), pv_img.to_str().unwrap()]);
    let vols = json["manifest"]["volumes"].as_array().unwrap();
    for part in [1, 2] {
        let s = lv_named(&lvs_of(&vols[0], part), "stripes").clone();
        assert_eq!(s["layout"], "striped (2 stripes of 64 KiB)", "partition {part}");
        assert_eq!(s["filesystem"], "ext4");
    }
    assert_eq!(vols[1]["lvm"]["volume_group"]["name"], "solo");
    assert_eq!(lv_named(vols[1]["lvm"]["logical_volumes"].as_array().unwrap(), "home")["path"], "pv.img/solo/home");

    // Extracted from the repository, each LV holds what the kernel reads in its filesystem.
    let fs_lo = LoopDev::attach(&fs_img);
    let home = RangeLoop::new(&pv_img, pe, 20 * EXT);
    for (spec, dev) in [("disk.img:1/data/stripes", &fs_lo.dev), ("solo/home", &home.path().to_path_buf())] {
        let out = env.path(&format!("x-{}", spec.replace('/', "-")));
        env.rime(&["extract", "latest", "/", "--volume", spec, "--to", out.to_str().unwrap()]).ok();
        with_ro(dev, &env.path(&format!("k-{}", spec.replace('/', "-"))), &[], |m| {
            assert_same_tree(m, &out, &Compare::all(), &[]);
        });
    }
    drop((fs_lo, home));

    // Restored, the striped LV gathers back into a filesystem e2fsck passes, with every file.
    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &["--volume", "disk.img"]);
    let rdisk = fs::read(&restored).unwrap();
    let mut gathered = vec![0u8; data.len()];
    for (c, bytes) in gathered.chunks_mut(chunk as usize).enumerate() {
        let at = place(c as u64) as usize;
        bytes.copy_from_slice(&rdisk[at..at + bytes.len()]);
    }
    let gathered_img = env.path("gathered.ext4");
    fs::write(&gathered_img, &gathered).unwrap();
    let (ok, o, e) = sh_status_all("e2fsck", &["-fn", gathered_img.to_str().unwrap()]);
    assert!(ok, "e2fsck -fn on the restored striped LV:\n{o}{e}");
    let (lo, orig) = (LoopDev::attach(&gathered_img), LoopDev::attach(&fs_img));
    with_ro(&lo.dev, &env.path("gathered-mnt"), &[], |m| {
        with_ro(&orig.dev, &env.path("orig-mnt"), &[], |o| assert_same_tree(o, m, &Compare::all(), &[]));
    });
}

/// `read_exact_at` on a file, panicking on error.
trait ReadAt {
    fn read_exact_at_helper(&self, offset: u64, buf: &mut [u8]);
}

impl ReadAt for fs::File {
    fn read_exact_at_helper(&self, offset: u64, buf: &mut [u8]) {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset).unwrap();
    }
}

/// Runs a program; (success, stdout, stderr).
pub fn sh_status_all(program: &str, args: &[&str]) -> (bool, String, String) {
    rime_testkit::cmd::run_status(program, args)
}

#[test]
fn a_volume_group_spanning_two_disks_is_mapped_and_browsed_across_them_even_from_a_pv_without_metadata() {
    let env = Env::new();
    // Disk 1: GPT with the first PV as partition 1; disk 2: the second PV given directly.
    let disk = Disk::new(&env.path("disk1.img"), 100, &[(0, LVM_GUID)]);
    let disk2 = env.path("disk2.img");
    fs::File::create(&disk2).unwrap().set_len(100 * MIB).unwrap();
    let (p1, _) = disk.part(1);
    let (pv1, pv2) = (disk.part_loop(1), RangeLoop::new(&disk2, 0, 100 * MIB));
    let lvm = Lvm::new(&[&pv1, &pv2]);
    // The second PV keeps no metadata copy: its VG is known only from the first disk.
    lvm.run("pvcreate", &["-ff", "-y", &pv1.dev]);
    lvm.run("pvcreate", &["-ff", "-y", "--pvmetadatacopies", "0", &pv2.dev]);
    lvm.run("vgcreate", &["-s", "4m", "wide", &pv1.dev, &pv2.dev]);
    let pes = [lvm.pe_start(&pv1), lvm.pe_start(&pv2)];
    lvm.add_lvs("wide", &env.path(""), &[lv("span", true, &[linear(15, 0, 0), linear(15, 1, 0)])]);
    drop((pv1, pv2));
    // Stale bytes after the LV on both disks: not read.
    write_random_at(&disk.image, 91, extent_at(p1, pes[0], 16), 40 * MIB);
    write_random_at(&disk2, 92, extent_at(0, pes[1], 16), 40 * MIB);
    // The LV's ext4, made in a file, laid out as its two segments.
    let src = env.path("src");
    populate_tree(&src, 93, 40 * MIB);
    let fs_img = env.path("span.ext4");
    mkfs("mkfs.ext4", &[], 120, Some(&src), &fs_img);
    let data = fs::read(&fs_img).unwrap();
    let half = (15 * EXT) as usize;
    let (first_at, second_at) = (extent_at(p1, pes[0], 0), extent_at(0, pes[1], 0));
    let w = |path: &Path, at: u64, bytes: &[u8]| {
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
    };
    w(&disk.image, first_at, &data[..half]);
    w(&disk2, second_at, &data[half..]);

    let json = env.backup_json(&[disk.image.to_str().unwrap(), disk2.to_str().unwrap()]);
    let warnings = json["warnings"].to_string();
    assert!(!warnings.contains("not being read"), "the VG is whole across the two disks: {warnings}");
    let vols = json["manifest"]["volumes"].as_array().unwrap();
    assert_eq!(lv_named(&lvs_of(&vols[0], 1), "span")["filesystem"], "ext4");
    assert_eq!(lv_named(vols[1]["lvm"]["logical_volumes"].as_array().unwrap(), "span")["filesystem"], "ext4");
    for v in vols {
        assert!(v["read_bytes"].as_u64().unwrap() < 70 * MIB, "{}: the stale extents were read", v["name"]);
    }
    // Browsed as one LV, read from both volumes of the snapshot.
    let out = env.path("extracted");
    env.rime(&["extract", "latest", "/", "--volume", "wide/span", "--to", out.to_str().unwrap()]).ok();
    let lo = LoopDev::attach(&fs_img);
    with_ro(&lo.dev, &env.path("k"), &[], |m| assert_same_tree(m, &out, &Compare::all(), &[]));
    drop(lo);
    // Restored, the two halves make a filesystem e2fsck passes.
    let (r1, r2) = (env.path("r1.img"), env.path("r2.img"));
    let snap = json["snapshot"].as_str().unwrap();
    env.restore(snap, &r1, &["--volume", "disk1.img"]);
    env.restore(snap, &r2, &["--volume", "disk2.img"]);
    let mut back = fs::read(&r1).unwrap()[first_at as usize..first_at as usize + half].to_vec();
    back.extend_from_slice(&fs::read(&r2).unwrap()[second_at as usize..second_at as usize + half]);
    let back_img = env.path("back.ext4");
    fs::write(&back_img, &back).unwrap();
    let (ok, o, e) = sh_status_all("e2fsck", &["-fn", back_img.to_str().unwrap()]);
    assert!(ok, "e2fsck -fn on the restored LV:\n{o}{e}");
}
