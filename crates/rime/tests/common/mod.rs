//! Shared helpers for the `rime` integration tests: running the binary, making real ext2/3/4
//! images with e2fsprogs, loop devices and mounts (always released in `Drop`), and comparing
//! images and file trees.
//!
//! The tests need root (loop devices, mount) and e2fsprogs, zerofree and util-linux.

#![allow(dead_code, unused_imports)]

pub use rime_testkit::{dir_bytes, run as sh, wait_until_closed, write_random_file, LoopDev, Mount, Mounted, Rng, MIB};

use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

// ---------------------------------------------------------------------------------------------
// Running rime
// ---------------------------------------------------------------------------------------------

/// The result of one `rime` run.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "rime {}\n  exit: {:?}\n  stdout: {}\n  stderr: {}",
            self.args.join(" "),
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Asserts success; returns self.
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "expected success:\n{}", self.describe());
        self
    }

    /// Asserts a non-zero exit with exactly one non-empty line on stderr; returns that line.
    #[track_caller]
    pub fn fails(self) -> String {
        assert!(self.code.is_some() && self.code != Some(0), "expected failure:\n{}", self.describe());
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected a one-line reason on stderr:\n{}", self.describe());
        lines[0].to_string()
    }

    /// Parses stdout as one JSON document.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", self.describe()))
    }
}

/// A `Command` for the rime binary with a clean environment (no RIME_REPO, no RIME_LOG).
pub fn rime_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rime"));
    c.env_remove("RIME_REPO").env_remove("RIME_LOG").stdin(Stdio::null());
    c
}

/// Runs rime with the given arguments (no `--repo` added).
pub fn rime_raw<S: AsRef<str>>(args: &[S]) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let out = rime_command().args(&args).output().expect("run rime");
    to_run(args, out)
}

fn to_run(args: Vec<String>, out: Output) -> Run {
    Run {
        args,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A temporary working directory with a repository path inside it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
}

impl Env {
    /// A fresh directory and an initialised repository at `<dir>/repo`.
    pub fn new() -> Env {
        let env = Env::without_repo();
        env.rime(&["init"]).ok();
        env
    }

    /// A fresh directory; the repository path does not exist yet.
    pub fn without_repo() -> Env {
        let dir = tempfile::Builder::new().prefix("rime-test-").tempdir().expect("tempdir");
        let repo = dir.path().join("repo");
        Env { dir, repo }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `rime --repo REPO ARGS...`.
    pub fn rime<S: AsRef<str>>(&self, args: &[S]) -> Run {
        let mut all = vec!["--repo".to_string(), self.repo.display().to_string()];
        all.extend(args.iter().map(|a| a.as_ref().to_string()));
        rime_raw(&all)
    }

    /// Starts `rime --repo REPO ARGS...` in the background, output captured.
    pub fn spawn<S: AsRef<str>>(&self, args: &[S]) -> Child {
        rime_command()
            .arg("--repo")
            .arg(&self.repo)
            .args(args.iter().map(|a| a.as_ref()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rime")
    }

    /// `rime backup --json ARGS...`; asserts success; returns the snapshot id.
    #[track_caller]
    pub fn backup<S: AsRef<str>>(&self, args: &[S]) -> String {
        self.backup_json(args)["snapshot"].as_str().expect("backup --json has \"snapshot\"").to_string()
    }

    /// `rime backup --json ARGS...`; asserts success; returns the JSON document.
    #[track_caller]
    pub fn backup_json<S: AsRef<str>>(&self, args: &[S]) -> Value {
        let mut all = vec!["backup".to_string(), "--json".to_string()];
        all.extend(args.iter().map(|a| a.as_ref().to_string()));
        let v = self.rime(&all).ok().json();
        assert!(v["snapshot"].is_string(), "backup --json lacks \"snapshot\": {v}");
        v
    }

    /// `rime restore SNAPSHOT TARGET [extra...]`; asserts success.
    #[track_caller]
    pub fn restore(&self, snapshot: &str, target: &Path, extra: &[&str]) {
        let mut all = vec!["restore".to_string(), snapshot.to_string(), target.display().to_string()];
        all.extend(extra.iter().map(|a| a.to_string()));
        self.rime(&all).ok();
    }

    /// `rime snapshots --json`, as a list.
    #[track_caller]
    pub fn snapshots(&self) -> Vec<Value> {
        let v = self.rime(&["snapshots", "--json"]).ok().json();
        v.as_array().unwrap_or_else(|| panic!("snapshots --json is not a list: {v}")).clone()
    }

    /// Ids of all snapshots.
    #[track_caller]
    pub fn snapshot_ids(&self) -> Vec<String> {
        self.snapshots().iter().map(|s| s["id"].as_str().expect("snapshot has an id").to_string()).collect()
    }

    /// `rime verify [SNAPSHOT] --json`: (exit code, report).
    pub fn verify(&self, snapshot: Option<&str>) -> (Option<i32>, Value, Run) {
        let mut args = vec!["verify", "--json"];
        if let Some(s) = snapshot {
            args.push(s);
        }
        let run = self.rime(&args);
        let v = run.json();
        (run.code, v, run)
    }

    /// Asserts that `rime verify` (all snapshots) passes.
    #[track_caller]
    pub fn assert_verify_clean(&self) {
        let run = self.rime(&["verify"]);
        assert_eq!(run.code, Some(0), "verify should pass:\n{}", run.describe());
    }

    /// Apparent size of every file in the repository.
    pub fn repo_bytes(&self) -> u64 {
        dir_bytes(&self.repo)
    }
}

/// All regular files under `dir` (recursively).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                out.extend(files_under(&p));
            } else if m.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The manifest entry of the (first) volume in a backup's JSON.
pub fn first_volume(backup_json: &Value) -> &Value {
    &backup_json["manifest"]["volumes"][0]
}

/// Sum of `added_bytes` over the volumes of a backup's JSON.
pub fn added_bytes(backup_json: &Value) -> u64 {
    backup_json["manifest"]["volumes"]
        .as_array()
        .expect("manifest.volumes is a list")
        .iter()
        .map(|v| v["added_bytes"].as_u64().expect("added_bytes is a number"))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Running other programs
// ---------------------------------------------------------------------------------------------

/// Runs a program; returns (success, stdout + stderr).
pub fn sh_status(program: &str, args: &[&str]) -> (bool, String) {
    let (ok, out, err) = rime_testkit::run_status(program, args);
    (ok, out + &err)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// Writes random bytes at `offset` into an existing file.
pub fn write_random_at(path: &Path, seed: u64, offset: u64, len: u64) {
    let mut rng = Rng::new(seed);
    let f = OpenOptions::new().write(true).open(path).expect("open for write");
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all_at(&buf[..n], offset + pos).expect("write_at");
        pos += n as u64;
    }
}

/// Fills a directory with a file tree exercising the interesting cases: text, random binary
/// (`random_bytes` in total), an odd-sized and an empty file, nested directories, relative,
/// absolute and directory symlinks, and hard links (`hard/a` and `hard/b` share an inode).
pub fn populate_tree(dir: &Path, seed: u64, random_bytes: u64) {
    let mut rng = Rng::new(seed);
    let nested = dir.join("docs/deep/er/and/deeper");
    fs::create_dir_all(&nested).unwrap();
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("hard")).unwrap();
    fs::create_dir_all(dir.join("empty-dir")).unwrap();
    fs::write(dir.join("docs/readme.txt"), rng.text(40_000)).unwrap();
    fs::write(dir.join("docs/notes with spaces.txt"), rng.text(3_000)).unwrap();
    fs::write(dir.join("docs/ünïcödé.txt"), "snow ❄ and ice\n").unwrap();
    fs::write(nested.join("bottom.txt"), rng.text(200_000)).unwrap();
    for i in 0..20 {
        fs::write(dir.join(format!("docs/deep/small-{i:02}.txt")), rng.text(500 + i * 37)).unwrap();
    }
    // Random binaries: a few files sharing `random_bytes`.
    let parts = 3u64;
    for i in 0..parts {
        let len = random_bytes / parts + i * 4099;
        write_random_file(&dir.join(format!("bin/random-{i}.bin")), seed * 100 + i, len);
    }
    fs::write(dir.join("bin/odd-size.bin"), rng.bytes(12_345)).unwrap();
    fs::write(dir.join("bin/empty"), b"").unwrap();
    // Symlinks: relative, absolute (dangling inside the image), to a directory.
    std::os::unix::fs::symlink("docs/readme.txt", dir.join("readme-link")).unwrap();
    std::os::unix::fs::symlink("/etc/nonexistent/target", dir.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("docs/deep", dir.join("deep-dir-link")).unwrap();
    // A long symlink target (stored in a block, not in the inode).
    let long_target = format!("docs/{}", "x".repeat(100));
    std::os::unix::fs::symlink(&long_target, dir.join("long-link")).unwrap();
    // Hard links.
    fs::write(dir.join("hard/a"), rng.text(10_000)).unwrap();
    fs::hard_link(dir.join("hard/a"), dir.join("hard/b")).unwrap();
    fs::hard_link(dir.join("hard/a"), dir.join("docs/third-name-of-a")).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// Makes an ext image of `size_mib` MiB at `image` with `mkfs_program` (mkfs.ext4, mkfs.ext2,
/// ...), extra options `opts`, filled from `src` when given. An existing file at `image` is
/// reused without discarding its contents (`-E nodiscard`), so whatever it held stays in the
/// free blocks, as on a reused disk.
#[track_caller]
pub fn mkfs(mkfs_program: &str, opts: &[&str], size_mib: u64, src: Option<&Path>, image: &Path) {
    let mut args: Vec<String> = vec!["-q".into(), "-F".into(), "-E".into(), "nodiscard".into()];
    args.extend(opts.iter().map(|s| s.to_string()));
    if let Some(src) = src {
        args.push("-d".into());
        args.push(p(src).into());
    }
    args.push(p(image).into());
    args.push(format!("{size_mib}M"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    sh(mkfs_program, &argv);
}

/// Writes `len` bytes from /dev/urandom to a new file (fast, not reproducible).
pub fn urandom_file(path: &Path, len: u64) {
    let mut src = File::open("/dev/urandom").expect("open /dev/urandom");
    let mut f = File::create(path).expect("create file");
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        src.read_exact(&mut buf[..n]).expect("read /dev/urandom");
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
}

/// A populated ext image made by `program` with `opts`: returns (source tree, image). With
/// `garbage`, the image file is filled with random bytes before mkfs, so its free blocks hold
/// garbage that a used-blocks backup must leave out (and that `zerofree` zeroes).
#[allow(clippy::too_many_arguments)]
pub fn make_ext(
    env: &Env,
    name: &str,
    program: &str,
    opts: &[&str],
    size_mib: u64,
    seed: u64,
    random_bytes: u64,
    garbage: bool,
) -> (PathBuf, PathBuf) {
    let src = env.path(&format!("{name}-src"));
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, seed, random_bytes);
    let image = env.path(&format!("{name}.img"));
    let _ = fs::remove_file(&image);
    if garbage {
        urandom_file(&image, size_mib * MIB);
    }
    mkfs(program, opts, size_mib, Some(&src), &image);
    (src, image)
}

/// A populated ext4 image (default features) whose free blocks hold garbage.
pub fn ext4_with_files(env: &Env, name: &str, seed: u64, size_mib: u64, random_bytes: u64) -> (PathBuf, PathBuf) {
    make_ext(env, name, "mkfs.ext4", &[], size_mib, seed, random_bytes, true)
}

/// Used bytes of an ext filesystem per its superblock: (block count - free blocks) x block size.
pub fn ext_used_bytes(image: &Path) -> u64 {
    let out = sh("dumpe2fs", &["-h", p(image)]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>().unwrap()))
            .unwrap_or_else(|| panic!("dumpe2fs -h has no {name}"))
    };
    (field("Block count:") - field("Free blocks:")) * field("Block size:")
}

/// A copy of an ext image with every free block zeroed by `zerofree`: what a used-blocks
/// restore must reproduce byte for byte.
///
/// zerofree also rewrites the primary superblock on close (last-write time, kbytes written,
/// checksum: bytes 1024..2048); the copy gets the original superblock back, since that is what
/// was backed up.
#[track_caller]
pub fn zerofreed_copy(image: &Path, copy: &Path) {
    fs::copy(image, copy).expect("copy image");
    sh("zerofree", &[p(copy)]);
    let mut sb = vec![0u8; 1024];
    File::open(image).unwrap().read_exact_at(&mut sb, 1024).unwrap();
    OpenOptions::new().write(true).open(copy).unwrap().write_all_at(&sb, 1024).unwrap();
}

/// Where two files first differ, or None when they are byte-identical.
pub fn first_difference(a: &Path, b: &Path) -> Option<String> {
    let (la, lb) = (byte_len(a), byte_len(b));
    if la != lb {
        return Some(format!("{} is {la} bytes, {} is {lb} bytes", a.display(), b.display()));
    }
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB as usize], vec![0u8; 4 * MIB as usize]);
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        if n != m {
            return Some(format!("short read at {pos}"));
        }
        if n == 0 {
            return None;
        }
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            let bad_bytes = (0..n).filter(|&i| ba[i] != bb[i]).count();
            return Some(format!(
                "{} and {} differ first at byte {} ({} differing bytes in that 4 MiB window)",
                a.display(),
                b.display(),
                pos + i as u64,
                bad_bytes
            ));
        }
        pos += n as u64;
    }
}

/// Asserts that two files are byte-identical, reporting the first difference.
#[track_caller]
pub fn assert_same_bytes(a: &Path, b: &Path) {
    if let Some(d) = first_difference(a, b) {
        panic!("{d}");
    }
}

/// True when two files are byte-identical.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    first_difference(a, b).is_none()
}

/// Size of a file or block device.
pub fn byte_len(path: &Path) -> u64 {
    use std::io::{Seek, SeekFrom};
    File::open(path).unwrap().seek(SeekFrom::End(0)).unwrap()
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Asserts `e2fsck -fn` finds the filesystem clean.
#[track_caller]
pub fn assert_fsck_clean(image: &Path) {
    let (ok, out) = sh_status("e2fsck", &["-fn", p(image)]);
    assert!(ok, "e2fsck -fn {} reports problems:\n{out}", image.display());
}

/// Dumps an ext image's file tree with `debugfs rdump` and asserts it equals `src` (contents,
/// symlink targets, directory structure), and that `hard/a`, `hard/b` and `docs/third-name-of-a`
/// are one inode with three links.
#[track_caller]
pub fn assert_same_files(image: &Path, src: &Path, scratch: &Path) {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch).unwrap();
    sh("debugfs", &["-R", &format!("rdump / {}", p(scratch)), p(image)]);
    let (ok, out) = sh_status("diff", &["-r", "--no-dereference", "-x", "lost+found", p(src), p(scratch)]);
    assert!(ok, "files in {} differ from {}:\n{out}", image.display(), src.display());
    if src.join("hard/a").exists() {
        let inode = |path: &str| -> (String, String) {
            let stat = sh("debugfs", &["-R", &format!("stat {path}"), p(image)]);
            let field = |name: &str| {
                stat.split_whitespace()
                    .skip_while(|w| *w != name)
                    .nth(1)
                    .unwrap_or_else(|| panic!("no {name} in debugfs stat {path}:\n{stat}"))
                    .to_string()
            };
            (field("Inode:"), field("Links:"))
        };
        let a = inode("/hard/a");
        assert_eq!(a.1, "3", "hard/a should have 3 links");
        assert_eq!(inode("/hard/b"), a, "hard/b should be the same inode as hard/a");
        assert_eq!(inode("/docs/third-name-of-a"), a, "docs/third-name-of-a should be hard/a's inode");
    }
    let _ = fs::remove_dir_all(scratch);
}

/// The full check of a restored ext image: equal to the zerofree'd original byte for byte,
/// clean under `e2fsck -fn`, and holding the files of `src`.
#[track_caller]
pub fn assert_ext_restore_exact(env: &Env, original: &Path, restored: &Path, src: &Path) {
    let zf = env.path("zerofreed-original.img");
    zerofreed_copy(original, &zf);
    assert_same_bytes(&zf, restored);
    fs::remove_file(&zf).unwrap();
    assert_fsck_clean(restored);
    assert_same_files(restored, src, &env.path("rdump"));
}

/// A file of `size` bytes filled with random bytes (a restore target full of garbage).
pub fn garbage_file(path: &Path, seed: u64, size: u64) {
    write_random_file(path, seed, size);
}

// ---------------------------------------------------------------------------------------------
// Loop devices and mounts
// ---------------------------------------------------------------------------------------------

/// Runs `f` with `image` loop-mounted read-write at `<env>/mnt-<tag>`, then unmounts and detaches.
pub fn with_mounted<R>(env: &Env, image: &Path, tag: &str, f: impl FnOnce(&Path) -> R) -> R {
    let lo = LoopDev::attach(image);
    let m = Mount::new(&lo.dev, &env.path(&format!("mnt-{tag}")), &[]);
    let r = f(&m.dir);
    sh("sync", &[]);
    m.unmount();
    drop(lo);
    r
}

/// Kills a child process if it is still running (for background rime runs in tests).
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn take(&mut self) -> Child {
        self.0.take().expect("child already taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Collects a finished child's output as a `Run`.
pub fn wait_run(child: Child, what: &str) -> Run {
    let out = child.wait_with_output().expect("wait for rime");
    to_run(vec![what.to_string()], out)
}
