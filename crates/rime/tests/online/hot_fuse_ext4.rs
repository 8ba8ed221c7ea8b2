//! Hot backup of a mounted ext4: the volume is served by `rime serve`, a loop device sits on
//! its FUSE file and ext4 is mounted from it, and `fio` writes continuously (random 4 KiB
//! writes with fsyncs) while `rime backup --mode online` images it. The filesystem is frozen
//! only around the snapshot instant (as a freeze hook would), so the image is a clean ext4;
//! `fstrim` discards free space while the backup runs.
//! The restored image must equal the volume at the snapshot instant (dumped by the server at
//! that instant) with free blocks zeroed, and pass `e2fsck -fn`. Then, with fio still
//! writing, an incremental backup reads only changed blocks and restores just as exactly.

use crate::common::*;
use crate::hot_support::*;
use std::path::Path;
use std::time::Duration;

/// Freezes the filesystem, starts an online backup, thaws once the snapshot is taken; returns
/// the backup's JSON.
fn backup_frozen(env: &Env, served: &Served, mnt: &Path, volume_arg: &Path) -> serde_json::Value {
    sh("fsfreeze", &["-f", mnt.to_str().unwrap()]);
    let child = spawn_backup(&env.repo, volume_arg, &["--mode", "online"]);
    let guard = ChildGuard(Some(child));
    let taken = served.wait_state("active", Duration::from_secs(30));
    sh("fsfreeze", &["-u", mnt.to_str().unwrap()]);
    // Discards during the backup (through the loop device, FUSE fallocate, the engine's trim)
    // are copied before they punch holes, like writes.
    sh("fstrim", &[mnt.to_str().unwrap()]);
    let mut guard = guard;
    let run = wait_run(guard.take(), "backup --mode online");
    assert!(taken.is_some(), "the snapshot was never taken:\n{run:?}");
    run.ok().json()
}

fn latest_dump(served: &Served) -> std::path::PathBuf {
    let mut dumps: Vec<_> = std::fs::read_dir(&served.dumps).unwrap().flatten().map(|e| e.path()).collect();
    dumps.sort_by_key(|p| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("snapshot-")
            .trim_end_matches(".img")
            .parse::<u64>()
            .unwrap_or(0)
    });
    dumps.pop().expect("a dumped snapshot")
}

#[test]
fn ext4_on_loop_on_fuse_under_fio_backs_up_exactly() {
    require(&["fio", "fusermount3"]);
    let env = Env::new();
    let (_src, image) = make_ext(&env, "vol", "mkfs.ext4", &["-b", "4096"], 256, 11, 40 * MIB, true);
    let mut served = Served::start(env.dir.path(), &image, true, &["--wip-ms", "100"]);
    let fuse_file = served.fuse_file();
    let lo = LoopDev::attach(&fuse_file);
    let mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);
    let mut fio = fio_fs(&mnt.dir, 24, 300);
    std::thread::sleep(Duration::from_secs(2));
    fio.assert_running();

    // Full backup, named by the FUSE file: the server is found from it.
    let cow_before = served.status()["cow_blocks"].as_u64().unwrap();
    let full = backup_frozen(&env, &served, &mnt.dir, &fuse_file);
    fio.assert_running();
    let st = served.status();
    assert_eq!(st["state"], "idle", "{st}");
    assert!(
        st["cow_blocks"].as_u64().unwrap() > cow_before,
        "fio's writes should have hit protected blocks during the backup: {st}"
    );
    let dump1 = latest_dump(&served);
    let v = first_volume(&full);
    assert_eq!(v["source"], image.canonicalize().unwrap().display().to_string());
    assert!(v["map"].as_str().unwrap().contains("online snapshot"), "{v}");
    let snap1 = full["snapshot"].as_str().unwrap().to_string();

    // Incremental, named by the control socket, fio still writing.
    std::thread::sleep(Duration::from_secs(1));
    let incr = backup_frozen(&env, &served, &mnt.dir, &served.control.clone());
    fio.assert_running();
    let dump2 = latest_dump(&served);
    assert_ne!(dump1, dump2);
    let vi = first_volume(&incr);
    assert!(vi["map"].as_str().unwrap().contains("incremental from"), "{vi}");
    let (full_read, incr_read) = (v["read_bytes"].as_u64().unwrap(), vi["read_bytes"].as_u64().unwrap());
    // fio keeps rewriting its 24 MiB file, so how much changed depends on the machine's speed.
    assert!(incr_read < full_read, "incremental read {incr_read} bytes, the full backup {full_read}");

    fio.stop();
    mnt.unmount();
    drop(lo);
    served.stop();

    for (snap, dump) in [(snap1.as_str(), &dump1), (incr["snapshot"].as_str().unwrap(), &dump2)] {
        let restored = env.path("restored.img");
        let _ = std::fs::remove_file(&restored);
        env.restore(snap, &restored, &[]);
        let expected = env.path("expected.img");
        zerofreed_copy(dump, &expected);
        assert_same_bytes(&expected, &restored);
        assert_fsck_clean(&restored);
        std::fs::remove_file(&expected).unwrap();
    }
    env.assert_verify_clean();
}
