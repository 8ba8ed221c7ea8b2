//! Incremental online backups from the changed-block map: after scattered 4 KiB writes only
//! the changed blocks are read from the volume (the rest of a touched chunk comes from the
//! previous snapshot), across a clean restart of the server too, and every incremental
//! restores to the volume byte for byte on its own.

use crate::common::*;
use crate::hot_support::*;

#[test]
fn incrementals_read_only_changed_blocks_and_restore_exactly() {
    require(&["qemu-io"]);
    let env = Env::new();
    let image = env.path("vol.img");
    urandom_file(&image, 64 * MIB);
    let mut served = Served::start(env.dir.path(), &image, false, &["--wip-ms", "50"]);
    let ctl = served.control.to_str().unwrap().to_string();
    let full = env.backup_json(&["--mode", "online", &ctl]);
    assert_eq!(first_volume(&full)["read_bytes"].as_u64().unwrap(), 64 * MIB);

    let mut rng = Rng::new(5);
    let mut snaps = vec![(full["snapshot"].as_str().unwrap().to_string(), env.path("expect-0.img"))];
    std::fs::copy(&image, &snaps[0].1).unwrap();
    for round in 1..=3u64 {
        // 40 scattered 4 KiB writes, a 256 KiB run, and a write-zeroes.
        let mut cmds: Vec<String> =
            (0..40).map(|_| format!("write -P {} {}k 4k", round * 3, rng.below(16384) * 4)).collect();
        cmds.push(format!("write -P 0x77 {}M 256k", 10 + round));
        cmds.push(format!("write -z {}M 64k", 40 + round));
        qemu_io(&served.nbd_uri(), &cmds);
        if round == 2 {
            // The map survives a clean restart.
            served.stop();
            served.restart();
            assert_eq!(served.status()["cbt_origin"], "clean");
        }
        let v = env.backup_json(&["--mode", "online", &ctl]);
        let vol = first_volume(&v);
        let map = vol["map"].as_str().unwrap();
        assert!(map.contains("incremental from"), "{map}");
        let read = vol["read_bytes"].as_u64().unwrap();
        // 40 blocks, 64 blocks and 16 blocks at most.
        assert!((64 * 4096..=120 * 4096).contains(&read), "round {round}: read {read} bytes ({map})");
        let expect = env.path(&format!("expect-{round}.img"));
        std::fs::copy(&image, &expect).unwrap();
        snaps.push((v["snapshot"].as_str().unwrap().to_string(), expect));
    }
    served.stop();
    for (snap, expect) in &snaps {
        let restored = env.path("restored.img");
        let _ = std::fs::remove_file(&restored);
        env.restore(snap, &restored, &[]);
        assert_same_bytes(expect, &restored);
    }
    env.assert_verify_clean();
}
