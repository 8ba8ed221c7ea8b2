//! The SQLite writer: a WAL-mode database on a mounted ext4 that `rime serve` protects, taking
//! write transactions without pause during the backup. Rime checkpoints its WAL and holds its
//! write lock for the snapshot; the restored database passes `PRAGMA integrity_check` and holds
//! every transaction committed before the freeze.

use crate::common::*;
use crate::hot_support::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

#[test]
fn a_busy_sqlite_database_restores_with_every_commit_before_the_freeze() {
    require(&["fusermount3", "sqlite3"]);
    let env = Env::new();
    let image = env.path("volume.img");
    std::fs::File::create(&image).unwrap().set_len(256 * MIB).unwrap();
    sh("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    let mut served = Served::start(env.dir.path(), &image, true, &["--wip-ms", "50"]);
    let fuse_file = served.fuse_file();
    let lo = LoopDev::attach(&fuse_file);
    let mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);
    let db = mnt.dir.join("app.db");
    sh("sqlite3", &[db.to_str().unwrap(), "PRAGMA journal_mode=WAL; CREATE TABLE t(v INTEGER PRIMARY KEY, pad BLOB);"]);
    // The application: one transaction after another; each committed value goes to a log
    // outside the volume once sqlite3 has returned.
    let log = env.path("committed.log");
    let load = format!(
        "i=0; while :; do i=$((i+1)); sqlite3 -cmd '.timeout 20000' '{db}' \"INSERT INTO t VALUES($i, randomblob(2000))\" && echo $i >> '{log}'; done",
        db = db.display(),
        log = log.display()
    );
    let mut app = ChildGuard(Some(
        Command::new("sh")
            .args(["-c", &load])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let marker = format!("echo FREEZE >> '{}'", log.display());
    let backup = env.backup_json(&[
        fuse_file.to_str().unwrap(),
        "--mode",
        "online",
        "--sqlite",
        db.to_str().unwrap(),
        "--before-snapshot",
        &marker,
    ]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The load and its sqlite3 in flight: the whole process group.
    let pgid = app.0.as_ref().unwrap().id();
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
    drop(app.take());
    let snapshot = backup["snapshot"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    let before: Vec<u64> = text.lines().take_while(|l| *l != "FREEZE").map(|l| l.parse().unwrap()).collect();
    assert!(before.len() > 20, "the application committed before the backup: {}", before.len());
    assert!(text.lines().skip_while(|l| *l != "FREEZE").count() > 2, "and went on committing after the freeze");
    drop(mnt); // retries while the killed sqlite3 lets go
    drop(lo);
    served.stop();

    let restored = env.path("restored.img");
    env.restore(&snapshot, &restored, &[]);
    with_mounted(&env, &restored, "restored", |m| {
        // Checkpointed (TRUNCATE) and then held: no transaction is left in the snapshot's WAL
        // (one would be a 32-byte header and at least one 4120-byte frame). Without the writer
        // the WAL holds the load's latest transactions (12 KB when measured).
        let wal = std::fs::metadata(m.join("app.db-wal")).map(|md| md.len()).unwrap_or(0);
        assert!(wal < 32 + 4120, "the WAL was not checkpointed and held: {wal} bytes");
        let db = m.join("app.db");
        let (ok, out) = sh_status("sqlite3", &[db.to_str().unwrap(), "PRAGMA integrity_check;"]);
        assert!(ok && out.trim() == "ok", "integrity_check: {out}");
        let (ok, out) = sh_status("sqlite3", &[db.to_str().unwrap(), "SELECT v FROM t ORDER BY v;"]);
        assert!(ok, "{out}");
        let have: std::collections::HashSet<u64> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let missing: Vec<u64> = before.iter().copied().filter(|v| !have.contains(v)).collect();
        assert!(
            missing.is_empty(),
            "{} commits made before the freeze are missing: {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    });
}
