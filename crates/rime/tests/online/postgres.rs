//! The PostgreSQL writer, against a real PostgreSQL (Debian's packages): its data directory on
//! one ext4 volume and its WAL (`initdb --waldir`) on another, both served by `rime serve` and
//! mounted through their FUSE files, under a counter load (one commit after another, each
//! logged once acknowledged) and `pgbench`. Rime finds the running cluster by itself, refuses a
//! backup of only one of its volumes, and otherwise checkpoints it, freezes both filesystems
//! and captures both volumes at one instant. The restored pair starts (crash recovery from the
//! checkpoint), passes `pg_amcheck`, and holds every commit acknowledged before the freeze.

use crate::common::*;
use crate::hot_support::*;
use rime_testkit::mounts::{LoopDev, Mount, Mounted};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The newest installed PostgreSQL's program `name` (Debian keeps them out of PATH).
fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("this test needs PostgreSQL (installed by .ci/run)")
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    versions.sort_by_key(|p| p.to_string_lossy().split('/').nth(4).and_then(|v| v.parse::<u32>().ok()));
    versions.pop().unwrap_or_else(|| panic!("no PostgreSQL {name} under /usr/lib/postgresql"))
}

fn postgres_ids() -> (u32, u32) {
    let out = sh("id", &["-u", "postgres"]);
    let uid = out.trim().parse().expect("a postgres user (made by the postgresql package)");
    let gid = sh("id", &["-g", "postgres"]).trim().parse().unwrap();
    (uid, gid)
}

/// Runs a PostgreSQL program as the `postgres` user; panics with its output if it fails.
fn as_postgres(program: &Path, args: &[&str]) -> String {
    let (uid, gid) = postgres_ids();
    let out = Command::new(program).args(args).uid(uid).gid(gid).current_dir("/").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {args:?}: {text}", program.display());
    text
}

fn chown_postgres(path: &Path) {
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

/// A server, stopped (fast) when dropped.
struct Server {
    data: Option<PathBuf>,
}

impl Server {
    fn start(data: &Path, port: u16, socket_dir: &Path) -> Server {
        let conf = format!(
            "\nport = {port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\nmax_wal_size = 64MB\nmin_wal_size = 32MB\n",
            socket_dir.display()
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        let log = socket_dir.join(format!("server-{port}.log"));
        let (d, l) = (data.to_str().unwrap(), log.to_str().unwrap());
        as_postgres(&pg_bin("pg_ctl"), &["-D", d, "-l", l, "-w", "-t", "120", "start"]);
        Server { data: Some(data.to_path_buf()) }
    }

    fn stop_now(&mut self) {
        let Some(data) = self.data.take() else { return };
        let (uid, gid) = postgres_ids();
        let _ = Command::new(pg_bin("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"])
            .uid(uid)
            .gid(gid)
            .current_dir("/")
            .output();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn psql(socket_dir: &Path, port: u16, sql: &str) -> String {
    let port = port.to_string();
    as_postgres(
        &pg_bin("psql"),
        &[
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            socket_dir.to_str().unwrap(),
            "-p",
            &port,
            "-d",
            "postgres",
            "-c",
            sql,
        ],
    )
}

/// A process group run as `postgres`, killed when dropped.
fn load(script: &str) -> ChildGuard {
    let (uid, gid) = postgres_ids();
    ChildGuard(Some(
        Command::new("sh")
            .args(["-c", script])
            .uid(uid)
            .gid(gid)
            .current_dir("/")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

fn kill_group(guard: &mut ChildGuard) {
    let pgid = guard.0.as_ref().unwrap().id();
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
    let _ = guard.take().wait();
}

#[test]
fn a_busy_postgresql_with_its_wal_on_another_volume_restores_with_every_commit_before_the_freeze() {
    require(&["fusermount3", "fsfreeze"]);
    let (initdb, pgbench, pg_amcheck) = (pg_bin("initdb"), pg_bin("pgbench"), pg_bin("pg_amcheck"));
    let env = Env::new();
    // The postgres user must reach its directories under the test's private one.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket_dir = env.path("sockets");
    std::fs::create_dir(&socket_dir).unwrap();
    chown_postgres(&socket_dir);

    let mut served = Vec::new();
    for name in ["pgdata", "pgwal"] {
        let dir = env.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join(format!("{name}.img"));
        std::fs::File::create(&image).unwrap().set_len(256 * MIB).unwrap();
        sh("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        served.push((Served::start(&dir, &image, true, &["--wip-ms", "50"]), image));
    }
    let los: Vec<LoopDev> = served.iter().map(|(s, _)| LoopDev::attach(&s.fuse_file())).collect();
    let mnts: Vec<Mount> =
        los.iter().zip(["data-mnt", "wal-mnt"]).map(|(lo, dir)| Mount::new(&lo.dev, &env.path(dir), &[])).collect();
    for m in &mnts {
        std::fs::create_dir(m.dir.join("pg")).unwrap();
        chown_postgres(&m.dir.join("pg"));
    }
    let data = mnts[0].dir.join("pg/data");
    let wal = mnts[1].dir.join("pg/wal");
    as_postgres(
        &initdb,
        &[
            "-D",
            data.to_str().unwrap(),
            "--waldir",
            wal.to_str().unwrap(),
            "--auth-local=peer",
            "-U",
            "postgres",
            "--no-sync",
        ],
    );
    let port = 5433;
    let mut server = Server::start(&data, port, &socket_dir);
    psql(&socket_dir, port, "CREATE TABLE counter (n bigint PRIMARY KEY, at timestamptz DEFAULT now())");
    let (sock, port_s) = (socket_dir.to_str().unwrap().to_string(), port.to_string());
    as_postgres(&pgbench, &["-i", "-q", "-s", "2", "-h", &sock, "-p", &port_s, "postgres"]);

    let volumes: Vec<String> = served.iter().map(|(s, _)| s.volume.display().to_string()).collect();
    // `rime writers` finds the cluster by itself, with its data and WAL on the two volumes.
    let report = env.rime(&["writers", "--json", &volumes[0], &volumes[1]]).ok().json();
    let pg = report["writers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["kind"] == "postgresql")
        .unwrap_or_else(|| panic!("the running cluster is listed: {report}"))
        .clone();
    let on = |role: &str| pg["paths"].as_array().unwrap().iter().find(|p| p["role"] == role).unwrap()["volume"].clone();
    assert_eq!(on("data directory"), volumes[0], "{pg}");
    assert_eq!(on("WAL directory"), volumes[1], "{pg}");

    // The load: commits one after another, each logged once psql returned, and pgbench.
    let log = socket_dir.join("committed.log");
    let counter = format!(
        "i=0; while :; do i=$((i+1)); {psql} -X -q -h '{sock}' -p {port} -d postgres -c \"INSERT INTO counter (n) VALUES ($i)\" && echo $i >> '{log}'; done",
        psql = pg_bin("psql").display(),
        log = log.display()
    );
    let mut counter = load(&counter);
    let bench = format!("{} -n -c 2 -T 600 -h '{sock}' -p {port} postgres", pgbench.display());
    let mut bench = load(&bench);
    std::thread::sleep(Duration::from_secs(3));

    // Only one of its two volumes: refused before anything is frozen (exit code 9).
    let run = env.rime(&["backup", "--mode", "online", &volumes[0]]);
    let code = run.code;
    let line = run.fails();
    assert_eq!(code, Some(9), "{line}");
    assert!(line.contains("only partly") && line.contains("WAL directory"), "{line}");
    assert!(env.snapshots().is_empty(), "nothing was backed up");

    let marker = format!("echo FREEZE >> '{}'", log.display());
    let backup = env.backup_json(&["--mode", "online", &volumes[0], &volumes[1], "--before-snapshot", &marker]);
    std::thread::sleep(Duration::from_millis(500));
    kill_group(&mut counter);
    kill_group(&mut bench);
    let text = std::fs::read_to_string(&log).unwrap();
    let before: Vec<u64> = text.lines().take_while(|l| *l != "FREEZE").map(|l| l.parse().unwrap()).collect();
    assert!(before.len() > 20, "the application committed before the backup: {}", before.len());
    assert!(text.lines().skip_while(|l| *l != "FREEZE").count() > 2, "and went on committing after the freeze");

    let c = &backup["manifest"]["consistency"];
    assert_eq!(c["coherent"], true, "{c}");
    let writer =
        c["writers"].as_array().unwrap().iter().find(|w| w["kind"] == "postgresql").unwrap_or_else(|| panic!("{c}"));
    let details = &writer["details"];
    assert_eq!(details["data directory"], data.canonicalize().unwrap().display().to_string(), "{writer}");
    assert_eq!(details["WAL directory"], wal.canonicalize().unwrap().display().to_string(), "{writer}");
    assert!(details["checkpoint_lsn"].as_str().is_some_and(|l| l.contains('/')), "{writer}");
    assert!(details["server_version"].as_str().is_some_and(|v| !v.is_empty()), "{writer}");
    let frozen = held_writers(c, "fsfreeze");
    assert_eq!(frozen.len(), 2, "both filesystems frozen: {c}");
    let snapshot = backup["snapshot"].as_str().unwrap().to_string();

    server.stop_now();
    drop(mnts);
    drop(los);
    for (s, _) in served.iter_mut() {
        s.stop();
    }

    // Restore both volumes and start the copy: its WAL directory moved with its volume.
    let restored: Vec<PathBuf> = ["pgdata.img", "pgwal.img"]
        .iter()
        .map(|v| {
            let out = env.path(&format!("restored-{v}"));
            env.restore(&snapshot, &out, &["--volume", v]);
            out
        })
        .collect();
    let rdata_mnt = Mounted::new(&restored[0], &env.path("rdata"), "");
    let rwal_mnt = Mounted::new(&restored[1], &env.path("rwal"), "");
    let rdata = rdata_mnt.0.join("pg/data");
    let rwal = rwal_mnt.0.join("pg/wal");
    std::fs::remove_file(rdata.join("pg_wal")).unwrap();
    std::os::unix::fs::symlink(&rwal, rdata.join("pg_wal")).unwrap();
    let _ = std::fs::remove_file(rdata.join("postmaster.pid"));
    let rport = 5434;
    let restored_server = Server::start(&rdata, rport, &socket_dir);
    let rport_s = rport.to_string();
    as_postgres(
        &pg_amcheck,
        &["-h", &sock, "-p", &rport_s, "-d", "postgres", "--install-missing", "--heapallindexed", "--rootdescend"],
    );
    let have: std::collections::HashSet<u64> =
        psql(&socket_dir, rport, "SELECT n FROM counter").lines().filter_map(|l| l.trim().parse().ok()).collect();
    let missing: Vec<u64> = before.iter().copied().filter(|n| !have.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{} commits acknowledged before the freeze are missing: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let accounts = psql(&socket_dir, rport, "SELECT count(*) FROM pgbench_accounts");
    assert_eq!(accounts.trim(), "200000", "pgbench's accounts survived");
    drop(restored_server);
}
