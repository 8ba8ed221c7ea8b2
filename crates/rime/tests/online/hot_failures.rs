//! Hot backup failure cases: the difference store reaching its cap, the backup killed
//! mid-way, the server killed mid-way, and no write-inactivity period within the limit. In
//! each, the volume keeps every write, writers are never stuck, and the server is idle again.

use crate::common::*;
use crate::hot_support::*;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

fn assert_pattern(file: &std::path::Path, offset: u64, len: u64, byte: u8) {
    let f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    assert!(buf.iter().all(|&b| b == byte), "{} at {offset}+{len} is not all {byte:#x}", file.display());
}

/// A backup slow enough to be caught mid-way: incompressible data at zstd level 19, one thread.
fn slow_backup(env: &Env, volume: &std::path::Path) -> ChildGuard {
    ChildGuard(Some(spawn_backup(&env.repo, volume, &["--mode", "online", "--compression", "best", "--threads", "1"])))
}

#[test]
fn difference_store_cap_aborts_the_backup_cleanly() {
    require(&["qemu-io"]);
    let env = Env::new();
    let image = env.path("vol.img");
    urandom_file(&image, 96 * MIB);
    let served = Served::start(
        env.dir.path(),
        &image,
        false,
        &["--wip-ms", "50", "--store-memory", "128K", "--store-cap", "1M"],
    );
    let mut backup = slow_backup(&env, &served.control);
    assert!(served.wait_state("active", Duration::from_secs(30)).is_some());
    // 32 MiB of writes while the backup runs: far more than the store's cap.
    let t = Instant::now();
    qemu_io(&served.nbd_uri(), &(0..32).map(|i| format!("write -P 0x5a {}M 1M", 32 + i)).collect::<Vec<_>>());
    assert!(t.elapsed() < Duration::from_secs(20), "writers were held up: {:?}", t.elapsed());
    let run = wait_run(backup.take(), "backup");
    assert_eq!(run.code, Some(7), "a failed snapshot has its own exit code: {run:?}");
    let msg = run.fails();
    assert!(msg.contains("difference store") && msg.contains("cap"), "{msg}");
    assert!(served.wait_state("idle", Duration::from_secs(10)).is_some(), "{}", served.status());
    // Every write is in the volume; no snapshot was published.
    assert_pattern(&image, 32 * MIB, 32 * MIB, 0x5a);
    assert!(env.snapshot_ids().is_empty());
    // The next backup (quiet volume) succeeds.
    env.backup(&["--mode", "online", served.control.to_str().unwrap()]);
}

#[test]
fn backup_killed_mid_way_leaves_the_server_idle_within_10s() {
    let env = Env::new();
    let image = env.path("vol.img");
    urandom_file(&image, 96 * MIB);
    let served = Served::start(env.dir.path(), &image, false, &["--wip-ms", "50"]);
    let mut backup = slow_backup(&env, &served.control);
    assert!(served.wait_state("active", Duration::from_secs(30)).is_some());
    std::thread::sleep(Duration::from_millis(200));
    let mut child = backup.take();
    assert!(child.try_wait().unwrap().is_none(), "the backup finished before it could be killed");
    child.kill().unwrap();
    child.wait().unwrap();
    let took = served.wait_state("idle", Duration::from_secs(10));
    assert!(took.is_some(), "server not idle 10 s after the backup died: {}", served.status());
    let st = served.status();
    assert_eq!(st["store"]["bytes"], 0, "{st}");
    // A new snapshot can be taken right away.
    env.backup(&["--mode", "online", served.control.to_str().unwrap(), "--compression", "fast"]);
}

#[test]
fn a_hung_backup_loses_its_snapshot_after_the_backup_timeout() {
    let env = Env::new();
    let image = env.path("vol.img");
    // Large enough that zstd -19 on one thread is still reading it after 4 s on a fast machine.
    urandom_file(&image, 384 * MIB);
    let served = Served::start(env.dir.path(), &image, false, &["--wip-ms", "50", "--backup-timeout", "3"]);
    let mut backup = slow_backup(&env, &served.control);
    assert!(served.wait_state("active", Duration::from_secs(30)).is_some());
    let pid = backup.0.as_ref().unwrap().id() as i32;
    // A running backup keeps its snapshot past the timeout (it reads and pings).
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        backup.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the backup finished within 4 s: the volume is too small to catch it reading"
    );
    assert_eq!(served.status()["state"], "active", "a live backup lost its snapshot");
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let took = served.wait_state("aborted", Duration::from_secs(10));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(took.is_some(), "a stopped backup kept its snapshot: {}", served.status());
    let st = served.status();
    assert_eq!(st["store"]["bytes"], 0, "{st}");
    let msg = wait_run(backup.take(), "backup").fails();
    assert!(msg.contains("made no request"), "{msg}");
    assert!(served.wait_state("idle", Duration::from_secs(10)).is_some());
}

#[test]
fn server_killed_mid_way_loses_no_written_data_and_cbt_says_all_changed() {
    require(&["qemu-io"]);
    let env = Env::new();
    let image = env.path("vol.img");
    urandom_file(&image, 96 * MIB);
    let mut served = Served::start(env.dir.path(), &image, false, &["--wip-ms", "50"]);
    // A first backup, so the changed-block map has a base.
    env.backup(&["--mode", "online", served.control.to_str().unwrap(), "--compression", "fast"]);
    assert!(served.status()["cbt_base"].is_string());
    // Clean restart keeps the map.
    qemu_io(&served.nbd_uri(), &["write -P 0x21 1M 64k".to_string()]);
    served.stop();
    served.restart();
    let st = served.status();
    assert_eq!(st["cbt_origin"], "clean", "{st}");
    assert_eq!(st["changed_blocks"], 16, "{st}");

    // Writes (no flush), a backup under way, and the server is killed.
    qemu_io(&served.nbd_uri(), &(0..8).map(|i| format!("write -P 0x3c {}M 1M", 8 + i)).collect::<Vec<_>>());
    // Into another repository: no changed-block base there, so a full (slow) backup.
    let repo2 = env.path("repo2");
    rime_raw(&["--repo", repo2.to_str().unwrap(), "init"]).ok();
    let mut backup = ChildGuard(Some(spawn_backup(
        &repo2,
        &served.control,
        &["--mode", "online", "--compression", "best", "--threads", "1"],
    )));
    assert!(served.wait_state("active", Duration::from_secs(30)).is_some());
    qemu_io(&served.nbd_uri(), &["write -P 0x4d 60M 2M".to_string()]);
    assert!(
        backup.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the backup finished before the server was killed"
    );
    served.kill();
    let run = wait_run(backup.take(), "backup");
    assert_eq!(run.code, Some(7), "{run:?}");
    let msg = run.fails();
    assert!(msg.contains("rime serve") || msg.contains("control socket"), "{msg}");
    // Nothing acknowledged before the kill is lost.
    assert_pattern(&image, MIB, 64 * 1024, 0x21);
    assert_pattern(&image, 8 * MIB, 8 * MIB, 0x3c);
    assert_pattern(&image, 60 * MIB, 2 * MIB, 0x4d);
    // After the crash, everything counts as changed and the base is gone.
    served.restart();
    let st = served.status();
    assert_eq!(st["cbt_origin"], "unclean", "{st}");
    assert_eq!(st["changed_blocks"].as_u64().unwrap(), 96 * MIB / 4096, "{st}");
    assert!(st["cbt_base"].is_null(), "{st}");
    // So the next backup is a full one, and restores exactly.
    let v = env.backup_json(&["--mode", "online", served.control.to_str().unwrap(), "--compression", "fast"]);
    assert!(!first_volume(&v)["map"].as_str().unwrap().contains("incremental"));
    let restored = env.path("restored.img");
    env.restore(v["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same_bytes(&image, &restored);
}

#[test]
fn no_write_inactivity_within_the_limit_fails_clearly() {
    require(&["fio"]);
    let env = Env::new();
    let image = env.path("vol.img");
    urandom_file(&image, 64 * MIB);
    let served = Served::start(env.dir.path(), &image, false, &["--wip-ms", "1000", "--snapshot-limit", "3"]);
    // Writes without a pause.
    let mut fio = fio_nbd(&served.nbd_uri(), 64, 0, 0, 60);
    std::thread::sleep(Duration::from_millis(500));
    fio.assert_running();
    let t = Instant::now();
    let run = env.rime(&["backup", "--mode", "online", served.control.to_str().unwrap()]);
    let took = t.elapsed();
    assert_eq!(run.code, Some(7), "{run:?}");
    let msg = run.fails();
    fio.assert_running();
    fio.stop();
    assert!(msg.contains("write-inactivity period") && msg.contains("time limit"), "{msg}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(15), "{took:?}");
    assert_eq!(served.status()["state"], "idle");
    assert!(env.snapshot_ids().is_empty());
}
