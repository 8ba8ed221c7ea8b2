//! Providers together, and writers Rime does not hold.
//!
//! A backup of a volume served by `rime serve` and of an image file in use on XFS takes the
//! reflink clone while the served volume's write gate is held, and freezes the filesystems
//! mounted from both (the one on the image file through its loop device): files written but not
//! synced before the backup are in both images, which need no journal replay.
//!
//! A served volume whose filesystem is frozen but which something else writes directly (here a
//! raw writer on the FUSE file, past the end of the filesystem) must fail the backup: the writes
//! either never leave a quiet moment or reach the volume inside the freeze, and either way the
//! snapshot is not application-consistent.

use crate::common::*;
use crate::crash_support::ReflinkHost;
use crate::hot_support::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn write_unsynced(dir: &Path, seed: u64) {
    for i in 0..20u64 {
        std::fs::write(dir.join(format!("file-{i}")), Rng::new(seed + i).bytes(40_000)).unwrap();
    }
}

/// The restored image is clean without journal replay and holds every unsynced file.
fn assert_frozen_image(env: &Env, image: &Path, seed: u64) {
    let (clean, out) = sh_status("e2fsck", &["-fn", image.to_str().unwrap()]);
    assert!(clean, "{} is clean as it stands (it was frozen):\n{out}", image.display());
    let tag = image.file_name().unwrap().to_string_lossy().into_owned();
    with_mounted(env, image, &tag, |m| {
        for i in 0..20u64 {
            let got = std::fs::read(m.join(format!("file-{i}"))).unwrap_or_default();
            assert!(got == Rng::new(seed + i).bytes(40_000), "{tag}: file-{i} was flushed by the freeze");
        }
    });
}

#[test]
fn a_served_volume_and_a_reflink_image_are_frozen_and_captured_at_one_instant() {
    require(&["fusermount3", "mkfs.xfs"]);
    let env = Env::new();
    let served_image = env.path("served.img");
    std::fs::File::create(&served_image).unwrap().set_len(128 * MIB).unwrap();
    sh("mkfs.ext4", &["-q", "-F", served_image.to_str().unwrap()]);
    let mut served = Served::start(env.dir.path(), &served_image, true, &["--wip-ms", "200"]);
    let host = ReflinkHost::new(&env, 512);
    let vm = host.path("vm.img");
    std::fs::File::create(&vm).unwrap().set_len(128 * MIB).unwrap();
    sh("mkfs.ext4", &["-q", "-F", vm.to_str().unwrap()]);
    {
        let served_lo = LoopDev::attach(&served.fuse_file());
        let served_mnt = Mount::new(&served_lo.dev, &env.path("served-mnt"), &[]);
        let vm_lo = LoopDev::attach(&vm);
        let vm_mnt = Mount::new(&vm_lo.dev, &env.path("vm-mnt"), &[]);
        write_unsynced(&served_mnt.dir, 100);
        write_unsynced(&vm_mnt.dir, 200);

        let b = env.backup_json(&["--mode", "online", served_image.to_str().unwrap(), vm.to_str().unwrap()]);
        let vols = b["manifest"]["volumes"].as_array().unwrap();
        let providers: Vec<&str> = vols.iter().map(|v| v["provider"].as_str().unwrap()).collect();
        assert_eq!(providers, ["rime-serve", "reflink"], "{b}");
        let c = &b["manifest"]["consistency"];
        assert_eq!(c["coherent"], true, "{c}");
        let instant = c["instant"].as_str().unwrap();
        assert!(instant.contains("1 reflink clone taken while every gate was held"), "{instant}");
        let frozen = held_writers(c, "fsfreeze");
        assert_eq!(frozen.len(), 2, "the filesystems on both volumes were frozen: {c}");
        assert!(frozen.iter().any(|n| n.ends_with("vm-mnt")), "{frozen:?}");
        // The clone's instant lies inside the served volume's gate window.
        let at: Vec<f64> = vols.iter().map(|v| v["captured_at"].as_f64().unwrap()).collect();
        let gate_ms = c["gate_closed_ms"].as_f64().unwrap();
        assert!(at[1] >= at[0] && (at[1] - at[0]) * 1000.0 <= gate_ms + 1.0, "{at:?} within {gate_ms} ms");
        // The frozen served volume waited only briefly for its quiet moment, not its 200 ms.
        assert!(c["freeze_window_ms"].as_f64().unwrap() < 2000.0, "{c}");

        let snapshot = b["snapshot"].as_str().unwrap().to_string();
        drop(vm_mnt);
        drop(vm_lo);
        drop(served_mnt);
        drop(served_lo);
        for (name, seed) in [("served.img", 100), ("vm.img", 200)] {
            let out = env.path(&format!("restored-{name}"));
            env.restore(&snapshot, &out, &["--volume", name]);
            assert_frozen_image(&env, &out, seed);
        }
    }
    served.stop();
    let clones: Vec<_> = std::fs::read_dir(&host.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".rime-clone-"))
        .collect();
    assert!(clones.is_empty(), "the clone was removed");
}

#[test]
fn a_writer_rime_does_not_hold_fails_the_frozen_backup() {
    require(&["fusermount3", "fsfreeze"]);
    let env = Env::new();
    let image = env.path("volume.img");
    std::fs::File::create(&image).unwrap().set_len(64 * MIB).unwrap();
    // The filesystem covers the first 32 MiB; the raw writer writes past it.
    sh("mkfs.ext4", &["-q", "-F", image.to_str().unwrap(), "32M"]);
    let mut served = Served::start(env.dir.path(), &image, true, &["--wip-ms", "100", "--snapshot-limit", "3"]);
    let fuse_file = served.fuse_file();
    {
        let lo = LoopDev::attach(&fuse_file);
        let mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let raw = {
            let (stop, written, file) = (stop.clone(), written.clone(), fuse_file.clone());
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(file).unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    f.write_all_at(&[i as u8; 4096], 48 * MIB + (i % 256) * 4096).unwrap();
                    f.sync_data().unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let run = env.rime(&["backup", "--mode", "online", image.to_str().unwrap()]);
        let code = run.code;
        let line = run.fails();
        stop.store(true, Ordering::Relaxed);
        raw.join().unwrap();
        assert_eq!(code, Some(7), "{line}");
        assert!(
            line.contains("writes reached") || line.contains("without pause"),
            "the error says what went wrong: {line}"
        );
        assert!(written.load(Ordering::Relaxed) > 5, "the raw writer ran during the backup");
        assert!(env.snapshots().is_empty(), "no snapshot was kept");
        // Thawed: unfreezing a filesystem that is not frozen fails with EINVAL.
        let (ok, out) = sh_status("fsfreeze", &["--unfreeze", mnt.dir.to_str().unwrap()]);
        assert!(!ok && out.contains("Invalid argument"), "the filesystem was thawed: {out}");
        std::fs::write(mnt.dir.join("after"), b"writable").unwrap();
    }
    served.stop();
}
