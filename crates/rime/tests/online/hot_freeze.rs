//! An application-consistent online backup: `fsfreeze` hooks freeze the mounted ext4 on a
//! volume that `rime serve` protects, the snapshot is taken while it is frozen, and the thaw
//! follows. The image needs no journal replay (the freeze flushed it), holds every file written
//! before the freeze, and the hooks saw a point-in-time snapshot from `rime-serve`.

use crate::common::*;
use crate::hot_support::*;
use std::path::PathBuf;

/// A 256 MiB ext4 that `rime serve` protects, loop-mounted through its FUSE file, holding 50
/// files written but not synced: only a freeze makes them reach the volume before a snapshot.
struct ServedExt4 {
    image: PathBuf,
    fuse_file: PathBuf,
    // Dropped in this order: unmount, detach, stop the server.
    mnt: Mount,
    lo: LoopDev,
    served: Served,
}

impl ServedExt4 {
    fn with_unsynced_files(env: &Env) -> ServedExt4 {
        let image = env.path("volume.img");
        std::fs::File::create(&image).unwrap().set_len(256 * MIB).unwrap();
        sh("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let served = Served::start(env.dir.path(), &image, true, &["--wip-ms", "100"]);
        let fuse_file = served.fuse_file();
        let lo = LoopDev::attach(&fuse_file);
        let mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);
        for i in 0..50u64 {
            std::fs::write(mnt.dir.join(format!("file-{i}")), Rng::new(i).bytes(50_000)).unwrap();
        }
        ServedExt4 { image, fuse_file, mnt, lo, served }
    }

    fn stop(self) {
        let ServedExt4 { mnt, lo, mut served, .. } = self;
        mnt.unmount();
        drop(lo);
        served.stop();
    }
}

/// The restored snapshot of a frozen [`ServedExt4`] is clean as it stands (no journal to
/// replay) and holds every file, but not `after`, written once thawed.
fn assert_restored_frozen(env: &Env, snapshot: &str) {
    let restored = env.path("restored.img");
    env.restore(snapshot, &restored, &[]);
    let (clean, out) = sh_status("e2fsck", &["-fn", restored.to_str().unwrap()]);
    assert!(clean, "the restored image of a frozen filesystem is clean as it stands:\n{out}");
    with_mounted(env, &restored, "restored", |m| {
        for i in 0..50u64 {
            assert_eq!(std::fs::read(m.join(format!("file-{i}"))).unwrap(), Rng::new(i).bytes(50_000), "file-{i}");
        }
        assert!(!m.join("after").exists(), "written after the snapshot");
    });
}

#[test]
fn fsfreeze_hooks_give_an_image_that_needs_no_journal_replay() {
    require(&["fusermount3", "fsfreeze"]);
    let env = Env::new();
    let v = ServedExt4::with_unsynced_files(&env);
    let (fuse_file, mnt) = (&v.fuse_file, &v.mnt);
    let log = env.path("hooks.log");
    let freeze = format!(
        "fsfreeze --freeze '{}' && echo \"$RIME_STAGE $RIME_SNAPSHOT_ACTIVE $RIME_PROVIDER\" >> '{}'",
        mnt.dir.display(),
        log.display()
    );
    let thaw = format!(
        "fsfreeze --unfreeze '{}'; echo \"$RIME_STAGE $RIME_SNAPSHOT_ACTIVE $RIME_PROVIDER\" >> '{}'",
        mnt.dir.display(),
        log.display()
    );
    let backup = env.backup_json(&[
        fuse_file.to_str().unwrap(),
        "--mode",
        "online",
        "--freeze",
        "never", // the hooks freeze, not the built-in writer
        "--before-snapshot",
        &freeze,
        "--after-snapshot",
        &thaw,
    ]);
    let snapshot = backup["snapshot"].as_str().unwrap().to_string();
    let map = first_volume(&backup)["map"].as_str().unwrap().to_string();
    assert!(!map.contains("journal transaction"), "a frozen filesystem leaves nothing to replay: {map}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "before-snapshot no rime-serve\nafter-snapshot yes rime-serve\n",
        "the freeze runs before the snapshot, the thaw after it, knowing a snapshot is active"
    );
    // Thawed: the filesystem takes writes again.
    std::fs::write(mnt.dir.join("after"), b"writable again").unwrap();
    v.stop();
    assert_restored_frozen(&env, &snapshot);
}

#[test]
fn filesystems_on_served_volumes_are_frozen_by_default() {
    require(&["fusermount3", "fsfreeze"]);
    let env = Env::new();
    let v = ServedExt4::with_unsynced_files(&env);
    let (image, fuse_file, lo, mnt) = (&v.image, &v.fuse_file, &v.lo, &v.mnt);
    // `rime writers` shows the writer a backup will freeze: the ext4 on the loop device over
    // the FUSE file, by the volume's FUSE file and, with no volume named, among all served ones.
    for args in [
        vec!["writers", "--json", fuse_file.to_str().unwrap()],
        vec!["writers", "--json", image.to_str().unwrap()],
        vec!["writers", "--json"],
    ] {
        let r = env.rime(&args).ok().json();
        // Without a volume named, other tests' servers may be listed too: find ours.
        let all = r["writers"].as_array().unwrap_or_else(|| panic!("{r}"));
        let w = all.iter().find(|w| w["mount_point"] == mnt.dir.display().to_string()).unwrap_or_else(|| panic!("{r}"));
        assert_eq!((w["kind"].as_str(), w["filesystem"].as_str()), (Some("fsfreeze"), Some("ext4")), "{r}");
        assert_eq!(w["mount_point"], mnt.dir.display().to_string(), "{r}");
        assert_eq!(w["device"], lo.path(), "{r}");
    }
    let other = env.path("other.img");
    std::fs::File::create(&other).unwrap().set_len(MIB).unwrap();
    let none = env.rime(&["writers", "--json", other.to_str().unwrap()]).ok().json();
    assert_eq!(none["writers"], serde_json::json!([]), "an unserved, unmounted image has none: {none}");
    // The built-in writer freezes it; hooks see the snapshot active while it is frozen.
    let log = env.path("hooks.log");
    let probe = format!(
        "grep -q ' {} ' /proc/self/mountinfo && echo \"$RIME_STAGE\" >> '{}'",
        mnt.dir.display(),
        log.display()
    );
    let backup = env.backup_json(&[fuse_file.to_str().unwrap(), "--mode", "online", "--after-snapshot", &probe]);
    let map = first_volume(&backup)["map"].as_str().unwrap().to_string();
    assert!(!map.contains("journal transaction"), "frozen by default, nothing left to replay: {map}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "after-snapshot\n");
    std::fs::write(mnt.dir.join("after"), b"thawed").unwrap();
    let snapshot = backup["snapshot"].as_str().unwrap().to_string();
    v.stop();
    assert_restored_frozen(&env, &snapshot);
}
