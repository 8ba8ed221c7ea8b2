//! Crash safety (a backup killed with SIGKILL) and concurrent use of one repository.

use crate::common::*;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Polls until `cond` holds or `timeout` passes; returns whether it held.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn has_files(dir: &Path) -> bool {
    !files_under(dir).is_empty()
}

/// Starts `rime backup VOLUME`, waits until it has published at least one pack (or, failing
/// that, started one in the scratch folder), then SIGKILLs it. Returns true if it was killed
/// mid-way (false if it finished first).
fn kill_backup_midway(env: &Env, volume: &Path) -> bool {
    let packs = env.repo.join("packs");
    let packs_before = files_under(&packs).len();
    let mut child = ChildGuard(Some(env.spawn(&["backup", volume.to_str().unwrap()])));
    let started = wait_for(Duration::from_secs(30), || files_under(&packs).len() > packs_before);
    assert!(started, "the backup never published a pack");
    std::thread::sleep(Duration::from_millis(100));
    let mut c = child.take();
    let finished = c.try_wait().unwrap().is_some();
    c.kill().unwrap(); // SIGKILL
    let status = c.wait().unwrap();
    !finished && status.code().is_none()
}

#[test]
fn killed_backup_leaves_the_repository_usable() {
    let env = Env::new();
    // An existing snapshot that must survive untouched.
    let small = env.path("small.img");
    write_random_file(&small, 401, 3 * MIB);
    let first = env.backup(&[small.to_str().unwrap()]);
    let before_crash = env.repo_bytes();

    let big = env.path("big.img");
    urandom_file(&big, 512 * MIB);

    assert!(kill_backup_midway(&env, &big), "the backup finished before it could be killed");
    let after_crash = env.repo_bytes();
    assert!(after_crash > before_crash + 16 * MIB, "precondition: the killed backup left data behind");

    // No partial snapshot; verify passes; the old snapshot restores; the lock was released.
    assert_eq!(env.snapshot_ids(), vec![first.clone()], "a killed backup must not leave a snapshot");
    env.assert_verify_clean();
    let out = env.path("small-restored.img");
    env.restore(&first, &out, &[]);
    assert_same_bytes(&small, &out);
    fs::remove_file(&out).unwrap();

    // Prune removes the leftovers: the repository is back to its size before the crash.
    env.rime(&["prune"]).ok();
    let after_prune = env.repo_bytes();
    assert!(
        after_prune <= before_crash + 64 * 1024,
        "prune should remove the killed backup's leftovers: {before_crash} before, {after_crash} after the crash, {after_prune} after prune"
    );
    assert!(!has_files(&env.repo.join("tmp")), "prune should clear the scratch folder");
    env.assert_verify_clean();

    // Kill another backup, then back up the same volume for real: it may reuse the leftovers,
    // and a prune afterwards must keep what the new snapshot references.
    assert!(kill_backup_midway(&env, &big), "the second backup finished before it could be killed");
    let second = env.backup(&[big.to_str().unwrap()]);
    env.rime(&["prune"]).ok();
    env.assert_verify_clean();
    let mut ids = env.snapshot_ids();
    ids.sort();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    let out = env.path("big-restored.img");
    env.restore(&second, &out, &[]);
    assert_same_bytes(&big, &out);
    fs::remove_file(&out).unwrap();
    let grown = env.repo_bytes() - after_prune;
    assert!(grown < 530 * MIB, "after prune the repository holds one copy of the big volume (grew {grown})");
}

#[test]
fn concurrent_backups_both_succeed() {
    let env = Env::new();
    let (src, ext) = ext4_with_files(&env, "ext", 411, 128, 48 * MIB);
    let raw = env.path("raw.img");
    urandom_file(&raw, 96 * MIB);

    let mut a = ChildGuard(Some(env.spawn(&["backup", "--json", ext.to_str().unwrap()])));
    let mut b = ChildGuard(Some(env.spawn(&["backup", "--json", raw.to_str().unwrap()])));
    let ra = wait_run(a.take(), "backup ext").ok();
    let rb = wait_run(b.take(), "backup raw").ok();
    let (ida, idb) =
        (ra.json()["snapshot"].as_str().unwrap().to_string(), rb.json()["snapshot"].as_str().unwrap().to_string());
    let mut ids = env.snapshot_ids();
    ids.sort();
    let mut expected = vec![ida.clone(), idb.clone()];
    expected.sort();
    assert_eq!(ids, expected, "both concurrent backups should be listed");

    env.assert_verify_clean();
    let out_a = env.path("ext-restored.img");
    env.restore(&ida, &out_a, &[]);
    assert_ext_restore_exact(&env, &ext, &out_a, &src);
    let out_b = env.path("raw-restored.img");
    env.restore(&idb, &out_b, &[]);
    assert_same_bytes(&raw, &out_b);
}

#[test]
fn prune_during_a_backup_waits_or_fails_cleanly() {
    let env = Env::new();
    // Something for prune to delete: a forgotten snapshot.
    let old = env.path("old.img");
    write_random_file(&old, 421, 4 * MIB);
    let old_id = env.backup(&[old.to_str().unwrap()]);
    env.rime(&["forget", &old_id]).ok();

    // Big enough, on one worker thread, to be still running when the prune starts.
    let big = env.path("big.img");
    urandom_file(&big, 512 * MIB);
    let mut backup = ChildGuard(Some(env.spawn(&["--threads", "1", "backup", "--json", big.to_str().unwrap()])));
    // Wait until the backup is under way (writing its first pack).
    let tmp = env.repo.join("tmp");
    let packs_before = files_under(&env.repo.join("packs")).len();
    assert!(
        wait_for(Duration::from_secs(30), || has_files(&tmp)
            || files_under(&env.repo.join("packs")).len() > packs_before),
        "the backup never started writing"
    );
    let mut child = backup.take();
    assert!(child.try_wait().unwrap().is_none(), "the backup should still be running");

    let prune = env.rime(&["prune", "--json"]);
    // The backup writes its manifest before it releases the lock: a prune that ran only after
    // the backup finished finds the manifest there when it returns.
    let manifest_there_when_prune_returned = !files_under(&env.repo.join("snapshots")).is_empty();
    let backup_run = wait_run(child, "backup big").ok();
    let new_id = backup_run.json()["snapshot"].as_str().unwrap().to_string();
    let mut freed = 0;
    if prune.code == Some(0) {
        freed = prune.json()["prune"]["bytes_freed"].as_u64().unwrap();
        assert!(
            manifest_there_when_prune_returned,
            "prune must not run while a backup holds the repository (it finished before the backup)"
        );
    } else {
        let line = prune.fails();
        assert!(line.contains("lock"), "a prune that cannot run should say the repository is locked: {line}");
    }

    // No damage: the backup's snapshot verifies (every chunk re-read and checked).
    assert_eq!(env.snapshot_ids(), vec![new_id.clone()]);
    env.assert_verify_clean();
    // A prune now runs and removes the forgotten snapshot's data, keeping the new one's.
    let pruned = env.rime(&["prune", "--json"]).ok().json();
    freed += pruned["prune"]["bytes_freed"].as_u64().unwrap();
    assert!(freed >= 4 * MIB, "the forgotten snapshot's 4 MiB should be freed (freed {freed})");
    env.assert_verify_clean();
    let out = env.path("big-restored.img");
    env.restore(&new_id, &out, &[]);
    assert_same_bytes(&big, &out);
}

#[test]
fn commands_wait_for_an_exclusive_lock_holder() {
    // Hold the repository's exclusive lock from outside (as a running prune would) for two
    // seconds: a backup waits for it, then succeeds.
    let env = Env::new();
    let vol = env.path("vol.img");
    write_random_file(&vol, 431, 2 * MIB);
    let lock = env.repo.join("lock");
    let mut holder = ChildGuard(Some(
        std::process::Command::new("flock")
            .args(["-x", lock.to_str().unwrap(), "-c", "sleep 2"])
            .spawn()
            .expect("run flock"),
    ));
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let id = env.backup(&[vol.to_str().unwrap()]);
    assert!(
        start.elapsed() >= Duration::from_millis(1200),
        "the backup should have waited for the lock holder (took {:?})",
        start.elapsed()
    );
    holder.take().wait().unwrap();
    let out = env.path("out.img");
    env.restore(&id, &out, &[]);
    assert_same_bytes(&vol, &out);
}
