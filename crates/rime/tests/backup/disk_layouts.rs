//! Whole disks (GPT and MBR partition tables) and VM disk image formats read through qemu-nbd.

use crate::common::*;
use std::path::Path;

/// Writes `src` into `disk` at byte `offset` without truncating.
fn place(src: &Path, disk: &Path, offset: u64) {
    let data = std::fs::read(src).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data, offset).unwrap();
}

fn range_of(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(path).unwrap(), &mut buf, offset).unwrap();
    buf
}

fn sfdisk(disk: &Path, script: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("sfdisk")
        .arg("-q")
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (fdisk package) is installed");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
}

#[test]
fn gpt_disk_keeps_table_gaps_and_maps_each_partition() {
    let env = Env::new();
    let disk = env.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(100 * MIB).unwrap();
    sfdisk(&disk, "label: gpt\nstart=2048, size=40M, type=linux\nsize=20M, type=linux\nsize=30M, type=linux\n");
    let (src1, p1) = make_ext(&env, "p1", "mkfs.ext4", &[], 40, 1, 3 * MIB, true);
    let (_, p3) = make_ext(&env, "p3", "mkfs.ext4", &["-b", "1024"], 30, 3, 2 * MIB, true);
    place(&p1, &disk, MIB);
    write_random_at(&disk, 7, 41 * MIB, 20 * MIB); // partition 2: no filesystem
    place(&p3, &disk, 61 * MIB);
    write_random_at(&disk, 9, 40 * 512, 100_000); // a boot loader between the GPT and partition 1

    let backup = env.backup_json(&[disk.to_str().unwrap()]);
    let vol = first_volume(&backup);
    assert_eq!(vol["partition_table"], "gpt");
    let parts = vol["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0]["filesystem"], "ext4");
    assert!(parts[1]["filesystem"].is_null());
    assert_eq!(parts[2]["filesystem"], "ext4");
    // Free space of the two ext4 partitions is not read.
    assert!(vol["read_bytes"].as_u64().unwrap() < 60 * MIB, "read {}", vol["read_bytes"]);

    let out = env.path("out.img");
    env.restore("latest", &out, &[]);
    assert_eq!(range_of(&disk, 0, MIB), range_of(&out, 0, MIB), "partition table and boot gap");
    assert_eq!(range_of(&disk, 41 * MIB, 20 * MIB), range_of(&out, 41 * MIB, 20 * MIB), "unknown partition");
    assert_eq!(range_of(&disk, 91 * MIB, 9 * MIB), range_of(&out, 91 * MIB, 9 * MIB), "tail and backup GPT");
    for (img, offset, size) in [(&p1, MIB, 40 * MIB), (&p3, 61 * MIB, 30 * MIB)] {
        let part = env.path("part.img");
        std::fs::write(&part, range_of(&out, offset, size)).unwrap();
        let zf = env.path("zf.img");
        zerofreed_copy(img, &zf);
        assert_same_bytes(&zf, &part);
        assert_fsck_clean(&part);
    }
    assert_same_files(
        &{
            let part = env.path("p1-restored.img");
            std::fs::write(&part, range_of(&out, MIB, 40 * MIB)).unwrap();
            part
        },
        &src1,
        &env.path("rdump"),
    );
}

#[test]
fn mbr_disk_with_logical_partitions() {
    let env = Env::new();
    let disk = env.path("mbr.img");
    std::fs::File::create(&disk).unwrap().set_len(100 * MIB).unwrap();
    let name = disk.to_str().unwrap();
    sfdisk(
        &disk,
        &format!(
            "label: dos\n{name}1 : start=2048, size=30M, type=83\n{name}2 : start=63488, size=60M, type=5\n{name}5 : size=20M, type=83\n{name}6 : size=20M, type=83\n"
        ),
    );
    let dump = sh("sfdisk", &["-d", name]);
    let start6: u64 = dump
        .lines()
        .find(|l| l.starts_with(&format!("{name}6")))
        .and_then(|l| l.split("start=").nth(1))
        .and_then(|s| s.split(',').next())
        .map(|s| s.trim().parse().unwrap())
        .expect("logical partition 6 exists");
    let (_, l6) = make_ext(&env, "l6", "mkfs.ext4", &[], 20, 6, 2 * MIB, true);
    place(&l6, &disk, start6 * 512);

    let backup = env.backup_json(&[name]);
    let vol = first_volume(&backup);
    assert_eq!(vol["partition_table"], "mbr");
    let numbers: Vec<u64> =
        vol["partitions"].as_array().unwrap().iter().map(|p| p["number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, vec![1, 5, 6]);
    assert_eq!(vol["partitions"][2]["filesystem"], "ext4");

    let out = env.path("out.img");
    env.restore("latest", &out, &[]);
    // The MBR and the EBR chain survive.
    assert_eq!(range_of(&disk, 0, 512), range_of(&out, 0, 512));
    assert_eq!(
        sh("sfdisk", &["-d", name]).replace(name, "X"),
        sh("sfdisk", &["-d", out.to_str().unwrap()]).replace(out.to_str().unwrap(), "X")
    );
    let part = env.path("l6-restored.img");
    std::fs::write(&part, range_of(&out, start6 * 512, 20 * MIB)).unwrap();
    let zf = env.path("zf.img");
    zerofreed_copy(&l6, &zf);
    assert_same_bytes(&zf, &part);
}

#[test]
fn partition_table_that_does_not_fit_the_disk_is_refused() {
    let env = Env::new();
    let disk = env.path("cut.img");
    std::fs::File::create(&disk).unwrap().set_len(64 * MIB).unwrap();
    sfdisk(&disk, "label: dos\nstart=2048, size=60M, type=83\n");
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(32 * MIB).unwrap();
    let err = env.rime(&["backup", disk.to_str().unwrap()]).fails();
    assert!(err.contains("does not fit the disk"), "{err}");
    assert!(env.snapshot_ids().is_empty(), "a failed backup leaves no snapshot");
}

#[test]
fn qcow2_backing_chain_is_read_as_the_guest_sees_it() {
    let env = Env::new();
    // Raw data with holes: every non-zero byte must come back.
    let base_raw = env.path("base.raw");
    std::fs::File::create(&base_raw).unwrap().set_len(48 * MIB).unwrap();
    write_random_at(&base_raw, 11, 0, 5 * MIB);
    write_random_at(&base_raw, 12, 30 * MIB, 3 * MIB);
    let base = env.path("base.qcow2");
    let top = env.path("top.qcow2");
    sh("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", base_raw.to_str().unwrap(), base.to_str().unwrap()]);
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", top.to_str().unwrap()],
    );
    // The overlay changes some of the base and adds data where the base had none.
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 1M 2M", "-c", "write -P 0xa5 40M 1M", top.to_str().unwrap()]);
    let expected = env.path("expected.raw");
    sh("qemu-img", &["convert", "-O", "raw", top.to_str().unwrap(), expected.to_str().unwrap()]);

    let backup = env.backup_json(&[top.to_str().unwrap()]);
    assert_eq!(first_volume(&backup)["kind"], "disk-image:qcow2");
    assert_eq!(first_volume(&backup)["size"].as_u64().unwrap(), 48 * MIB);
    let out = env.path("out.raw");
    env.restore("latest", &out, &[]);
    assert_same_bytes(&expected, &out);

    // And back to qcow2 through qemu-img.
    let out_q = env.path("out.qcow2");
    env.restore("latest", &out_q, &["--format", "qcow2"]);
    assert!(sh("qemu-img", &["info", out_q.to_str().unwrap()]).contains("file format: qcow2"));
    sh("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", out_q.to_str().unwrap(), expected.to_str().unwrap()]);
    // No qemu-nbd is left running for this image (other tests run theirs meanwhile).
    let top_arg = top.display().to_string();
    let left = sh("ps", &["-eo", "args"]).lines().any(|l| l.starts_with("qemu-nbd") && l.contains(&top_arg));
    assert!(!left, "qemu-nbd left running for {top_arg}");
}

#[test]
fn vm_disk_formats_use_the_filesystem_map_inside() {
    let env = Env::new();
    let (src, raw) = make_ext(&env, "guest", "mkfs.ext4", &[], 64, 21, 4 * MIB, true);
    let zf = env.path("guest-zf.img");
    zerofreed_copy(&raw, &zf);
    for format in ["qcow2", "vpc", "vhdx", "vmdk"] {
        let image = env.path(&format!("guest.{format}"));
        let mut args = vec!["convert", "-f", "raw", "-O", format];
        if format == "vpc" {
            args.extend(["-o", "force_size=on"]);
        }
        args.extend([raw.to_str().unwrap(), image.to_str().unwrap()]);
        sh("qemu-img", &args);
        let backup = env.backup_json(&[image.to_str().unwrap()]);
        let vol = first_volume(&backup);
        assert_eq!(vol["kind"], format!("disk-image:{format}"));
        assert_eq!(vol["filesystem"], "ext4", "{format}");
        assert!(vol["read_bytes"].as_u64().unwrap() < 32 * MIB, "{format}: read {}", vol["read_bytes"]);
        let out = env.path(&format!("out-{format}.img"));
        env.restore("latest", &out, &[]);
        assert_same_bytes(&zf, &out);
    }
    assert_fsck_clean(&zf);
    assert_same_files(&zf, &src, &env.path("rdump"));
}

#[test]
fn unreadable_disk_image_is_a_clear_error() {
    let env = Env::new();
    let bad = env.path("bad.qcow2");
    std::fs::write(&bad, b"QFI\xfb this is not really a qcow2 image").unwrap();
    let err = env.rime(&["backup", bad.to_str().unwrap()]).fails();
    assert!(err.contains("qemu-nbd cannot open"), "{err}");
    let run = env.rime(&["backup", env.path("nope.img").to_str().unwrap()]);
    assert_eq!(run.code, Some(4), "{run:?}");
    let missing = run.fails();
    assert!(missing.contains("nope.img") && missing.contains("does not exist"), "{missing}");
}
