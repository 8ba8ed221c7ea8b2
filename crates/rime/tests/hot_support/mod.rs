//! Helpers for the hot-backup tests: a `rime serve` process (stopped in `Drop`), its control
//! socket, and background writers (`fio`, `qemu-io`) that are always stopped.

#![allow(dead_code)]

use crate::common::{rime_command, sh_status};
pub use rime_testkit::require;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One request on a control socket.
pub fn control(sock: &Path, req: Value) -> Value {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

pub struct Served {
    pub child: Option<Child>,
    pub volume: PathBuf,
    pub control: PathBuf,
    pub nbd: PathBuf,
    pub fuse_dir: Option<PathBuf>,
    pub dumps: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
}

impl Served {
    /// `rime serve VOLUME` with an NBD unix socket, a control socket, snapshot dumps and the
    /// given extra arguments, all under `dir`; with `fuse`, also a FUSE export.
    pub fn start(dir: &Path, volume: &Path, fuse: bool, extra: &[&str]) -> Served {
        let mut s = Served {
            child: None,
            volume: volume.to_path_buf(),
            control: dir.join("control.sock"),
            nbd: dir.join("nbd.sock"),
            fuse_dir: fuse.then(|| dir.join("fuse")),
            dumps: dir.join("dumps"),
            state: dir.join("cbt-state"),
            log: dir.join("serve.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        std::fs::create_dir_all(&s.dumps).unwrap();
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.control);
        let mut c = rime_command();
        c.arg("serve").arg(&self.volume);
        c.arg("--nbd").arg(format!("unix:{}", self.nbd.display()));
        c.arg("--control").arg(&self.control);
        c.arg("--state-dir").arg(&self.state);
        c.arg("--dump-snapshots").arg(&self.dumps);
        c.arg("--spill-dir").arg(self.dumps.parent().unwrap());
        if let Some(f) = &self.fuse_dir {
            c.arg("--fuse").arg(f);
        }
        c.args(&self.extra);
        let log = std::fs::File::create(&self.log).unwrap();
        c.stdout(Stdio::null()).stderr(log);
        self.child = Some(c.spawn().expect("spawn rime serve"));
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("rime serve exited ({st}): {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if UnixStream::connect(&self.control).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("rime serve did not start: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
    }

    /// Starts it again (after a stop or a kill).
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }

    pub fn fuse_file(&self) -> PathBuf {
        self.fuse_dir.as_ref().expect("no FUSE export").join(self.volume.file_name().unwrap())
    }

    pub fn nbd_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.nbd.display())
    }

    pub fn status(&self) -> Value {
        control(&self.control, json!({"op": "status"}))["status"].clone()
    }

    /// Waits until the server's snapshot state is `state`; returns how long it took.
    pub fn wait_state(&self, state: &str, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.status()["state"] == state {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The dumped volume at snapshot `id`'s instant.
    pub fn dump(&self, id: u64) -> PathBuf {
        self.dumps.join(format!("snapshot-{id}.img"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20) {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("rime serve did not stop on SIGTERM");
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(f) = &self.fuse_dir {
            let _ = sh_status("fusermount3", &["-u", "-z", f.to_str().unwrap()]);
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(f) = &self.fuse_dir {
            let _ = sh_status("fusermount3", &["-u", "-z", f.to_str().unwrap()]);
        }
    }
}

/// A background process killed on drop (`fio`, a writer loop).
pub struct Bg(pub Option<Child>, pub &'static str);

impl Bg {
    pub fn spawn(program: &'static str, args: &[String]) -> Bg {
        let c = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        Bg(Some(c), program)
    }

    /// Still running (a writer that died early would make the test meaningless).
    pub fn assert_running(&mut self) {
        let c = self.0.as_mut().unwrap();
        if let Some(st) = c.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("{} exited early ({st}): {err}", self.1);
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `rime backup --json` of `volume` with extra arguments, in the background.
pub fn spawn_backup(repo: &Path, volume: &Path, extra: &[&str]) -> Child {
    rime_command()
        .arg("--repo")
        .arg(repo)
        .arg("backup")
        .arg("--json")
        .arg(volume)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rime backup")
}

/// Continuous random 4 KiB writes through NBD with `fio`, in bursts of `burst` writes separated
/// by `pause_ms` (0: no pauses at all).
pub fn fio_nbd(uri: &str, size_mib: u64, burst: u64, pause_ms: u64, seconds: u64) -> Bg {
    let mut args = vec![
        "--name=hot-nbd".to_string(),
        "--thread".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--size={size_mib}M"),
        "--iodepth=4".into(),
        "--time_based".into(),
        format!("--runtime={seconds}"),
        "--randrepeat=0".into(),
    ];
    if pause_ms > 0 {
        args.push(format!("--thinktime={}ms", pause_ms));
        args.push(format!("--thinktime_blocks={burst}"));
    }
    Bg::spawn("fio", &args)
}

/// Continuous random 4 KiB writes into a file of a mounted filesystem, with an fsync every
/// 16 writes so that they reach the volume.
pub fn fio_fs(dir: &Path, size_mib: u64, seconds: u64) -> Bg {
    let args = vec![
        "--name=hot-fs".to_string(),
        "--thread".into(),
        format!("--directory={}", dir.display()),
        "--ioengine=psync".into(),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--size={size_mib}M"),
        "--fsync=16".into(),
        "--time_based".into(),
        format!("--runtime={seconds}"),
        "--randrepeat=0".into(),
    ];
    Bg::spawn("fio", &args)
}

/// Runs `qemu-io -f raw -c CMD ... URI`; fails the test unless every command succeeds.
pub fn qemu_io(uri: &str, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.to_string());
    let out = Command::new("qemu-io").args(&args).output().expect("run qemu-io");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("error"), "qemu-io: {text}");
}

/// The names of the writers of `kind` a backup's `consistency` record says were held.
pub fn held_writers(consistency: &Value, kind: &str) -> Vec<String> {
    let writers = consistency["writers"].as_array().unwrap_or_else(|| panic!("no writers in {consistency}"));
    writers.iter().filter(|w| w["kind"] == kind).map(|w| w["name"].as_str().unwrap().to_string()).collect()
}
