//! Block devices (loop devices) as volumes and as restore targets; refusal of targets that are
//! too small or mounted, and of mounted volumes in offline mode.

use crate::common::*;
use std::fs;

#[test]
fn loop_device_backup_restores_to_a_device_and_to_a_file() {
    let env = Env::new();
    let (src, image) = ext4_with_files(&env, "vol", 11, 64, 4 * MIB);
    let lo = LoopDev::attach(&image);

    let v = env.backup_json(&[lo.path()]);
    let id = v["snapshot"].as_str().unwrap().to_string();
    let vol = first_volume(&v);
    assert_eq!(vol["kind"], "block-device", "{vol}");
    assert_eq!(vol["filesystem"], "ext4", "{vol}");
    assert_eq!(vol["size"].as_u64(), Some(64 * MIB));
    drop(lo);

    // To another loop device of the same size, whose backing file is full of garbage: every
    // used block comes back and every free block reads as zeros.
    let target_file = env.path("target-dev.img");
    garbage_file(&target_file, 12, 64 * MIB);
    {
        let target = LoopDev::attach(&target_file);
        env.restore(&id, &target.dev, &[]);
        // Read through the device too (what a user would mount).
        let zf = env.path("zf.img");
        zerofreed_copy(&image, &zf);
        assert_same_bytes(&zf, &target.dev);
        fs::remove_file(&zf).unwrap();
    }
    assert_ext_restore_exact(&env, &image, &target_file, &src);

    // To a file.
    let restored = env.path("restored.img");
    env.restore(&id, &restored, &[]);
    assert_ext_restore_exact(&env, &image, &restored, &src);

    // A larger device is fine too; nothing past the volume's end is written.
    let bigger = env.path("bigger.img");
    garbage_file(&bigger, 13, 80 * MIB);
    let tail_before = read_range(&bigger, 64 * MIB, 16 * MIB);
    {
        let target = LoopDev::attach(&bigger);
        env.restore(&id, &target.dev, &[]);
    }
    assert_eq!(read_range(&bigger, 64 * MIB, 16 * MIB), tail_before, "restore wrote past the volume's end");
    fs::OpenOptions::new().write(true).open(&bigger).unwrap().set_len(64 * MIB).unwrap();
    assert_ext_restore_exact(&env, &image, &bigger, &src);
}

fn read_range(path: &std::path::Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn restore_refuses_too_small_and_mounted_targets() {
    let env = Env::new();
    let (src, image) = ext4_with_files(&env, "vol", 21, 64, 2 * MIB);
    let id = env.backup(&[image.to_str().unwrap()]);

    // A file that is too small: refused, one line, the file untouched.
    let small = env.path("small.img");
    garbage_file(&small, 22, 32 * MIB);
    let before = fs::read(&small).unwrap();
    let line = env.rime(&["restore", &id, small.to_str().unwrap()]).fails();
    assert!(line.contains("too small"), "the error should say the target is too small: {line}");
    assert!(fs::read(&small).unwrap() == before, "a refused restore must not write to the target");

    // A loop device that is too small: the same.
    {
        let lo = LoopDev::attach(&small);
        let line = env.rime(&["restore", &id, lo.path()]).fails();
        assert!(line.contains("too small"), "the error should say the device is too small: {line}");
    }
    assert!(fs::read(&small).unwrap() == before, "a refused restore must not write to the device");

    // A mounted device: refused; so is the image file behind a mounted loop device.
    let target_file = env.path("target.img");
    env.restore(&id, &target_file, &[]);
    {
        let lo = LoopDev::attach(&target_file);
        let mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);
        fs::write(mnt.dir.join("written-while-mounted.txt"), "live data").unwrap();
        sh("sync", &[]);
        let line = env.rime(&["restore", &id, lo.path()]).fails();
        assert!(
            line.contains("in use") || line.contains("mounted"),
            "restore onto a mounted device should be refused as in use: {line}"
        );
        let line = env.rime(&["restore", &id, target_file.to_str().unwrap()]).fails();
        assert!(
            line.contains("in use") || line.contains("mounted"),
            "restore onto the image of a mounted loop device should be refused: {line}"
        );
        assert_eq!(fs::read_to_string(mnt.dir.join("written-while-mounted.txt")).unwrap(), "live data");
        mnt.unmount();
    }
    // The mounted filesystem was left alone: still clean, still holding the file written to it.
    assert_fsck_clean(&target_file);
    let listing = sh("debugfs", &["-R", "ls /", target_file.to_str().unwrap()]);
    assert!(listing.contains("written-while-mounted.txt"), "the live file should survive: {listing}");
    let _ = src;
}

#[test]
fn offline_backup_of_a_mounted_device_is_refused() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 31, 32, MIB);
    let lo = LoopDev::attach(&image);
    let mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);

    let run = env.rime(&["backup", "--mode", "offline", lo.path()]);
    assert_eq!(run.code, Some(6), "a volume in use has its own exit code: {run:?}");
    let line = run.fails();
    assert!(
        line.contains("in use") || line.contains("mounted"),
        "offline backup of a mounted device should say it is in use: {line}"
    );
    assert!(line.contains(lo.path()), "the error should name the device: {line}");
    // The image file behind the mounted device is in use as well.
    let line = env.rime(&["backup", "--mode", "offline", image.to_str().unwrap()]).fails();
    assert!(line.contains("in use") || line.contains("mounted"), "{line}");
    assert!(env.snapshots().is_empty(), "a refused backup must leave no snapshot");
    env.assert_verify_clean();

    // Once unmounted, the same offline backup works.
    mnt.unmount();
    env.backup(&["--mode", "offline", lo.path()]);
    assert_eq!(env.snapshots().len(), 1);
}
