//! fsync'd files survive an online backup of a mounted ext4 or ext3, taken with no freeze.
//!
//! `rime serve` protects a 1 GiB image; a loop device on its FUSE file carries the mounted
//! filesystem; 200 files of 200 kB are written and fsync'd one by one; then `rime backup
//! --mode online` snapshots the volume while it stays mounted (no freeze: the snapshot is
//! crash-consistent, its committed changes still in the journal). The restored image, mounted
//! (the kernel replays its journal), holds every file intact, and `rime ls` and `rime extract`
//! show them straight from the snapshot.

use crate::common::*;
use crate::crash_support::*;
use crate::explorer_util::{loop_ro, start_mount};
use crate::hot_support::*;

const FILES: u64 = 200;
const FILE_BYTES: usize = 200_000;

fn content(i: u64) -> Vec<u8> {
    Rng::new(0xF11E ^ i).bytes(FILE_BYTES)
}

fn fsynced_files_survive(mkfs: &str) {
    require(&["fusermount3"]);
    let env = Env::new();
    let image = env.path("volume.img");
    std::fs::File::create(&image).unwrap().set_len(1024 * MIB).unwrap();
    sh(mkfs, &["-q", "-F", image.to_str().unwrap()]);
    let mut served = Served::start(env.dir.path(), &image, true, &["--wip-ms", "100"]);
    let fuse_file = served.fuse_file();
    let lo = LoopDev::attach(&fuse_file);
    let mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);
    for i in 0..FILES {
        let path = mnt.dir.join(format!("file-{i:03}"));
        let mut f = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut f, &content(i)).unwrap();
        f.sync_all().unwrap();
    }
    std::fs::File::open(&mnt.dir).unwrap().sync_all().unwrap();

    // No freeze: the point is the crash-consistent snapshot, journal and all.
    let backup = env.backup_json(&[fuse_file.to_str().unwrap(), "--mode", "online", "--freeze", "never"]);
    let v = first_volume(&backup);
    let map = v["map"].as_str().unwrap();
    assert!(map.contains("online snapshot"), "{map}");
    assert!(
        map.contains("journal transaction"),
        "the snapshot should have caught committed changes in the journal: {map}"
    );
    assert_eq!(backup["warnings"], serde_json::json!([]), "{map}");
    let snapshot = backup["snapshot"].as_str().unwrap().to_string();
    mnt.unmount();
    drop(lo);
    served.stop();

    let expected: Durable = (0..FILES).map(|i| (format!("file-{i:03}"), content(i))).collect();
    let restored = env.path("restored.img");
    env.restore(&snapshot, &restored, &[]);
    let tree = mounted_tree(&restored, &env.path("mnt-restored"), &[]);
    assert_durable_in(&format!("{mkfs}: restored and mounted"), &expected, &tree);
    assert_fsck_clean(&restored);

    let listed = env.rime(&["ls", &snapshot, "/"]).ok().stdout;
    for i in 0..FILES {
        assert!(listed.lines().any(|l| l == format!("file-{i:03}")), "{mkfs}: rime ls misses file-{i:03}:\n{listed}");
    }
    let out = env.path("extracted");
    env.rime(&["extract", &snapshot, "/", "--to", out.to_str().unwrap()]).ok();
    assert_durable_in(&format!("{mkfs}: rime extract"), &expected, &read_tree(&out));

    // rime mount: the browsable tree, and the image replayed and marked clean, which a
    // read-only loop mount takes (the raw image would need its journal replayed first).
    let view = env.path("view");
    let _mount = start_mount(&env, &snapshot, &view);
    assert_durable_in(&format!("{mkfs}: rime mount files"), &expected, &read_tree(&view.join("volume.img.files")));
    let (lo, m) = loop_ro(&view.join("volume.img.replayed"), &env.path("mnt-replayed"));
    assert_durable_in(&format!("{mkfs}: rime mount replayed image"), &expected, &read_tree(&m.dir));
    drop(m);
    drop(lo);
    env.assert_verify_clean();
}

#[test]
fn ext4_fsynced_files_survive_an_online_backup_without_freeze() {
    fsynced_files_survive("mkfs.ext4");
}

#[test]
fn ext3_fsynced_files_survive_an_online_backup_without_freeze() {
    fsynced_files_survive("mkfs.ext3");
}
