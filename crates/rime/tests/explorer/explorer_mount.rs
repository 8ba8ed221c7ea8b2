//! `rime mount`: the FUSE view of a snapshot. The per-volume image files loop-mount read-only
//! (ext4, XFS, btrfs) and match the original filesystem; the browsable trees match the kernel's
//! view; `fusermount -u` and Ctrl-C unmount cleanly and rime exits 0; bad mount points are
//! one-line errors.

use crate::common::*;
use crate::explorer_util::*;
use std::fs;
use std::time::{Duration, Instant};

/// Waits for the mount process to exit; returns its exit code.
fn wait_exit(proc: &mut MountProcess, within: Duration) -> Option<i32> {
    let child = proc.child.as_mut().unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            proc.child = None;
            return status.code();
        }
        assert!(start.elapsed() < within, "rime mount did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mounted_image_loop_mounts_and_tree_matches_then_fusermount_unmounts() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 31, 2 * MIB);
    add_metadata_cases(&src);
    let image = env.path("vol.img");
    mkfs("mkfs.ext4", &["-b", "4096", "-I", "256"], 48, Some(&src), &image);
    with_mounted(&env, &image, "x", |m| set_xattr(&m.join("docs/readme.txt"), "user.comment", b"via fuse"));
    let snap = env.backup(&[image.to_str().unwrap()]);

    let mp = env.path("mp");
    let mut proc = start_mount(&env, &snap, &mp);
    let mut names: Vec<String> =
        fs::read_dir(&mp).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["vol.img", "vol.img.files"]);
    assert_eq!(fs::metadata(mp.join("vol.img")).unwrap().len(), 48 * MIB);
    assert!(fs::OpenOptions::new().write(true).open(mp.join("vol.img")).is_err(), "the view is read-only");

    {
        let (_lo0, orig) = loop_ro(&image, &env.path("orig"));
        let (_lo1, via) = loop_ro(&mp.join("vol.img"), &env.path("via-fuse"));
        // The loop-mounted image file is the same filesystem, bit for bit.
        assert_same_tree(&orig.dir, &via.dir, &Compare::all(), &[]);
        // The browsable tree matches the kernel's view, xattrs and hard links included.
        assert_same_tree(&orig.dir, &mp.join("vol.img.files"), &Compare::all(), &[]);
        via.unmount();
        orig.unmount();
    }

    sh("fusermount", &["-u", mp.to_str().unwrap()]);
    assert_eq!(wait_exit(&mut proc, Duration::from_secs(15)), Some(0));
    assert!(!is_mounted(&mp));
}

#[test]
fn xfs_and_btrfs_volumes_loop_mount_from_the_view_and_ctrl_c_unmounts() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 41, MIB);
    let btrfs = env.path("btrfs.img");
    fs::File::create(&btrfs).unwrap().set_len(128 * MIB).unwrap();
    sh("mkfs.btrfs", &["-q", "--rootdir", src.to_str().unwrap(), btrfs.to_str().unwrap()]);
    let xfs = env.path("xfs.img");
    fs::File::create(&xfs).unwrap().set_len(320 * MIB).unwrap();
    sh("mkfs.xfs", &["-q", xfs.to_str().unwrap()]);
    with_mounted(&env, &xfs, "xfs", |m| sh("cp", &["-a", &format!("{}/.", src.display()), m.to_str().unwrap()]));
    let snap = env.backup(&[btrfs.to_str().unwrap(), xfs.to_str().unwrap()]);

    let mp = env.path("mp");
    let mut proc = start_mount(&env, &snap, &mp);
    for name in ["btrfs.img", "xfs.img"] {
        let (_lo, m) = loop_ro(&mp.join(name), &env.path(&format!("m-{name}")));
        // mkfs.btrfs --rootdir does not keep symlink times: compare contents, types, modes, owners.
        let how = Compare { dir_times: false, xattrs: false, owners: true, holes: false, modes: true, times: false };
        assert_same_tree(&src, &m.dir, &how, &[]);
        m.unmount();
    }
    // XFS and btrfs are browsable: their trees match the original.
    let how = Compare { dir_times: false, xattrs: false, owners: true, holes: false, modes: true, times: true };
    assert_same_tree(&src, &mp.join("xfs.img.files"), &how, &[]);
    // mkfs.btrfs --rootdir does not keep symlink times.
    let how = Compare { dir_times: false, xattrs: false, owners: true, holes: false, modes: true, times: false };
    assert_same_tree(&src, &mp.join("btrfs.img.files"), &how, &[]);

    // Ctrl-C: unmount and exit 0.
    let pid = proc.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(wait_exit(&mut proc, Duration::from_secs(15)), Some(0));
    assert!(!is_mounted(&mp));
}

#[test]
fn fat_tree_is_browsable_and_sigterm_unmounts() {
    let env = Env::new();
    let fat = env.path("fat.img");
    fs::File::create(&fat).unwrap().set_len(32 * MIB).unwrap();
    sh("mkfs.vfat", &[fat.to_str().unwrap()]);
    let payload = env.path("payload.bin");
    write_random_file(&payload, 3, 700_000);
    sh("mmd", &["-i", fat.to_str().unwrap(), "::/Sub Dir"]);
    sh("mcopy", &["-i", fat.to_str().unwrap(), payload.to_str().unwrap(), "::/Sub Dir/Payload File.bin"]);
    let snap = env.backup(&[fat.to_str().unwrap()]);
    let mp = env.path("mp");
    let mut proc = start_mount(&env, &snap, &mp);
    let got = fs::read(mp.join("fat.img.files/Sub Dir/Payload File.bin")).unwrap();
    assert!(got == fs::read(&payload).unwrap());
    let pid = proc.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut proc, Duration::from_secs(15)), Some(0));
    assert!(!is_mounted(&mp));
}

#[test]
fn bad_mount_points_are_one_line_errors() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 2, 16, MIB / 2);
    let snap = env.backup(&[image.to_str().unwrap()]);

    let missing = env.path("missing");
    let e = env.rime(&["mount", &snap, missing.to_str().unwrap()]).fails();
    assert!(e.contains("does not exist"), "{e}");
    let full = env.path("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("x"), b"x").unwrap();
    let e = env.rime(&["mount", &snap, full.to_str().unwrap()]).fails();
    assert!(e.contains("not empty"), "{e}");
    let e = env.rime(&["mount", &snap, image.to_str().unwrap()]).fails();
    assert!(e.contains("not a directory"), "{e}");

    // Busy: already a mount point (a first rime mount).
    let mp = env.path("mp");
    let mut proc = start_mount(&env, &snap, &mp);
    let e = env.rime(&["mount", &snap, mp.to_str().unwrap()]).fails();
    assert!(e.contains("busy"), "{e}");
    sh("fusermount", &["-u", mp.to_str().unwrap()]);
    assert_eq!(wait_exit(&mut proc, Duration::from_secs(15)), Some(0));
}

#[test]
fn a_mount_holds_the_shared_lock_and_prune_is_refused_with_exit_code_3() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 7, 16, 256 * 1024);
    let snap = env.backup(&[image.to_str().unwrap()]);
    let mp = env.path("mp");
    let mut proc = start_mount(&env, &snap, &mp);
    let prune = env.rime(&["--lock-wait", "0", "prune"]);
    assert_eq!(prune.code, Some(3), "a locked repository has its own exit code: {prune:?}");
    let line = prune.fails();
    let pid = proc.child.as_ref().unwrap().id();
    assert!(
        line.contains("locked") && line.contains("rime explore (shared)") && line.contains(&format!("pid {pid}")),
        "the refusal names the holder: {line}"
    );
    sh("fusermount", &["-u", mp.to_str().unwrap()]);
    assert_eq!(wait_exit(&mut proc, Duration::from_secs(20)), Some(0));
    env.rime(&["--lock-wait", "0", "prune"]).ok();
}
