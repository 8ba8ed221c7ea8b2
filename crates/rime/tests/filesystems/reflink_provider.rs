//! The reflink snapshot provider: an image file in use on XFS (reflink on) is cloned with
//! FICLONE and the clone is backed up; the clone is gone afterwards, and a clone left by a
//! killed backup is cleaned up by the next one.

use crate::common::*;
use crate::crash_support::ReflinkHost;

fn clones_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".rime-clone-"))
        .collect()
}

#[test]
fn an_image_in_use_on_xfs_is_backed_up_from_a_reflink_clone() {
    rime_testkit::require(&["qemu-io", "mkfs.xfs"]);
    let env = Env::new();
    let host = ReflinkHost::new(&env, 512);
    let (_src, built) = ext4_with_files(&env, "vm", 21, 64, 4 * MIB);
    let image = host.path("vm.img");
    std::fs::copy(&built, &image).unwrap();
    // Left by a backup that was killed (no process 999999), and one of a live process (ours).
    let dead = host.path(".vm.img.rime-clone-999999-0badc0de");
    let live = host.path(&format!(".vm.img.rime-clone-{}-0c0ffee0", std::process::id()));
    std::fs::write(&dead, b"x").unwrap();
    std::fs::write(&live, b"x").unwrap();

    // A "VM" holds the image open for writing.
    let vm = rime_testkit::peers::QemuHolding::open(&image);
    let offline = env.rime(&["backup", "--mode", "offline", image.to_str().unwrap()]);
    assert_eq!(offline.code, Some(6), "offline still refuses an image in use: {offline:?}");

    let dry = env.rime(&["backup", "--dry-run", "--json", image.to_str().unwrap()]).ok().json();
    assert_eq!(dry["volumes"][0]["provider"], "reflink", "{dry}");
    assert!(dry["volumes"][0]["reason"].as_str().unwrap().contains("open for writing by QEMU"), "{dry}");
    assert_eq!(env.snapshot_ids().len(), 0, "a dry run backs up nothing");
    let v = env.backup_json(&["--mode", "auto", image.to_str().unwrap()]);
    let vol = first_volume(&v);
    assert_eq!(vol["source"], image.display().to_string(), "named after the image, not the clone");
    assert!(vol["map"].as_str().unwrap().contains("reflink clone"), "{vol}");
    assert_eq!(vol["filesystem"], "ext4");
    vm.quit();

    let left = clones_in(&host.dir);
    assert_eq!(left, [live.file_name().unwrap().to_string_lossy().into_owned()], "only the live process's clone stays");
    let restored = env.path("restored.img");
    env.restore(v["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_fsck_clean(&restored);
    assert_same_files(&restored, &_src, &env.path("scratch"));
}

#[test]
fn providers_can_be_forced_and_are_explained() {
    rime_testkit::require(&["mkfs.xfs"]);
    let env = Env::new();
    let host = ReflinkHost::new(&env, 512);
    let (_src, built) = ext4_with_files(&env, "idle", 22, 32, MIB);
    let image = host.path("idle.img");
    std::fs::copy(&built, &image).unwrap();
    let dry = env.rime(&["backup", "--dry-run", "--json", image.to_str().unwrap()]).ok().json();
    assert_eq!(
        (dry["volumes"][0]["provider"].as_str(), dry["volumes"][0]["reason"].as_str()),
        (Some("offline"), Some("not in use"))
    );
    // Forced: a reflink clone even of an idle image.
    let v = env.backup_json(&["--provider", "reflink", image.to_str().unwrap()]);
    assert!(first_volume(&v)["map"].as_str().unwrap().contains("reflink clone"), "{v}");
    assert!(clones_in(&host.dir).is_empty());
    // A provider that cannot take the volume: a clear refusal, nothing backed up.
    let run = env.rime(&["backup", "--provider", "rime-serve", image.to_str().unwrap()]);
    assert_eq!(run.code, Some(6), "{run:?}");
    assert!(run.fails().contains("--provider rime-serve cannot take it: not protected by rime serve"));
    assert_eq!(env.snapshot_ids().len(), 1);
}

#[test]
fn images_in_one_btrfs_subvolume_are_taken_by_one_read_only_snapshot() {
    rime_testkit::require(&["qemu-io", "mkfs.btrfs", "btrfs"]);
    let env = Env::new();
    let host = ReflinkHost::btrfs(&env, 512);
    let mut sources = Vec::new();
    let mut images = Vec::new();
    for (i, name) in ["web", "db"].iter().enumerate() {
        let (src, built) = ext4_with_files(&env, name, 30 + i as u64, 24, MIB);
        let image = host.path(&format!("{name}.img"));
        std::fs::copy(&built, &image).unwrap();
        sources.push(src);
        images.push(image);
    }
    // Left by a killed backup (no process 999999): deleted by the next one.
    let dead = host.path(".rime-snapshot-999999-0badc0de");
    sh("btrfs", &["subvolume", "snapshot", "-r", host.dir.to_str().unwrap(), dead.to_str().unwrap()]);
    // Two "VMs", one per image: both in use, both need a snapshot.
    let vms: Vec<_> = images.iter().map(|i| rime_testkit::peers::QemuHolding::open(i)).collect();
    let args: Vec<&str> = images.iter().map(|p| p.to_str().unwrap()).collect();
    let mut dry_args = vec!["backup", "--dry-run", "--json"];
    dry_args.extend(&args);
    let dry = env.rime(&dry_args).ok().json();
    for v in dry["volumes"].as_array().unwrap() {
        assert_eq!(v["provider"], "btrfs-snapshot", "{dry}");
        assert!(v["reason"].as_str().unwrap().contains("one read-only subvolume snapshot"), "{dry}");
    }
    let v = env.backup_json(&args);
    vms.into_iter().for_each(|vm| vm.quit());
    let c = &v["manifest"]["consistency"];
    assert_eq!(c["coherent"], true, "{c}");
    let vols = v["manifest"]["volumes"].as_array().unwrap();
    assert!(vols.iter().all(|x| x["provider"] == "btrfs-snapshot"), "{vols:?}");
    assert_eq!(vols[0]["captured_at"], vols[1]["captured_at"], "one instant for both");
    let left: Vec<String> = std::fs::read_dir(&host.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".rime-snapshot-"))
        .collect();
    assert!(left.is_empty(), "snapshots left behind: {left:?}");
    for (i, name) in ["web.img", "db.img"].iter().enumerate() {
        let restored = env.path(&format!("restored-{name}"));
        env.restore(v["snapshot"].as_str().unwrap(), &restored, &["--volume", name]);
        assert_fsck_clean(&restored);
        assert_same_files(&restored, &sources[i], &env.path(&format!("scratch-{i}")));
    }
}
