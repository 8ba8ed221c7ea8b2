//! Helpers for the filesystem end-to-end tests (`fs_xfs.rs`, `fs_btrfs.rs`, `fs_fat.rs`,
//! `fs_ntfs.rs`): running rime and other programs, loop and ntfs-3g mounts released on drop,
//! a mixed file tree, and the check that a restore equals the original with exactly the
//! used-block map's unused bytes zeroed.

#![allow(dead_code)]

use rime_volume::{UsedMap, Volume};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a program; panics with its output unless it succeeds. Returns stdout.
#[track_caller]
pub fn run(program: &str, args: &[&str]) -> String {
    let (ok, out, err) = run_status(program, args);
    assert!(ok, "{program} {args:?} failed: {out}{err}");
    out
}

/// Runs a program (stdin closed; `MTOOLS_SKIP_CHECK` set for mtools): (success, stdout, stderr).
pub fn run_status(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `rime --repo REPO ARGS`; asserts success; returns (stdout, stderr, elapsed).
#[track_caller]
pub fn rime(repo: &Path, args: &[&str]) -> (String, String, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rime"))
        .env_remove("RIME_REPO")
        .env_remove("RIME_LOG")
        .arg("--repo")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rime");
    let elapsed = t.elapsed();
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "rime {args:?} failed: {o}{e}");
    (o, e, elapsed)
}

/// `rime backup IMG --json`: (the JSON document, stderr, elapsed).
#[track_caller]
pub fn backup(repo: &Path, img: &Path) -> (Value, String, Duration) {
    let (out, err, t) = rime(repo, &["backup", s(img), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("backup --json printed {out:?}: {e}"));
    assert!(v["snapshot"].is_string(), "{v}");
    (v, err, t)
}

/// xorshift64*: fast reproducible bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Writes `len` reproducible random bytes to a new file.
pub fn write_random(path: &Path, rng: &mut Rng, len: u64) {
    let mut f = fs::File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// A new image file of `size` bytes full of random garbage, as on a reused disk: whatever the
/// filesystem leaves free must not reach the repository.
pub fn garbage_image(path: &Path, size: u64, seed: u64) {
    write_random(path, &mut Rng(seed | 1), size);
}

/// A mixed file tree of about `target` bytes under `dir`: big random files, many small ones,
/// compressible text, a sparse file, an empty file and directory, nested directories, names
/// with spaces and non-ASCII, relative/absolute/directory symlinks and hard links.
pub fn populate(dir: &Path, seed: u64, target: u64) {
    let mut rng = Rng(seed | 1);
    for d in ["docs/deep/er", "bin", "hard", "empty-dir", "many"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let text: String =
        (0..60_000).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog\n")).collect();
    fs::write(dir.join("docs/readme.txt"), &text).unwrap();
    fs::write(dir.join("docs/notes with spaces.txt"), &text[..5000]).unwrap();
    fs::write(dir.join("docs/ünïcödé.txt"), "snow ❄ and ice\n").unwrap();
    fs::write(dir.join("docs/deep/er/bottom.txt"), &text[..200_000]).unwrap();
    fs::write(dir.join("bin/empty"), b"").unwrap();
    fs::write(dir.join("bin/odd-size.bin"), rng.bytes(12_345)).unwrap();
    {
        use std::io::{Seek, SeekFrom};
        let mut f = fs::File::create(dir.join("bin/sparse.bin")).unwrap();
        f.seek(SeekFrom::Start(5 * MIB)).unwrap();
        f.write_all(&rng.bytes(7000)).unwrap();
    }
    let mut written = text.len() as u64 + 220_000;
    for i in 0..1500u64 {
        let len = 1 + rng.next() % 20_000;
        fs::write(dir.join(format!("many/file-{i:04}")), rng.bytes(len as usize)).unwrap();
        written += len;
    }
    std::os::unix::fs::symlink("docs/readme.txt", dir.join("readme-link")).unwrap();
    std::os::unix::fs::symlink("/etc/nonexistent/target", dir.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("docs/deep", dir.join("deep-dir-link")).unwrap();
    std::os::unix::fs::symlink(format!("docs/{}", "x".repeat(200)), dir.join("long-link")).unwrap();
    fs::write(dir.join("hard/a"), &text[..10_000]).unwrap();
    fs::hard_link(dir.join("hard/a"), dir.join("hard/b")).unwrap();
    fs::hard_link(dir.join("hard/a"), dir.join("docs/third-name-of-a")).unwrap();
    let big = target.saturating_sub(written) / 5;
    for i in 0..5 {
        write_random(&dir.join(format!("bin/random-{i}.bin")), &mut rng, big + i * 4099);
    }
}

/// A loop mount, unmounted on drop.
/// `.1`: for an ntfs-3g mount, the image, which ntfs-3g finishes writing and closes a moment
/// after `umount` returns (a FUSE mount of a plain file is not `fuseblk`, so the kernel does not
/// wait for the daemon); dropping waits for that too.
pub struct Mounted(pub PathBuf, Option<PathBuf>);

impl Mounted {
    #[track_caller]
    pub fn new(img: &Path, dir: &Path, opts: &str) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        let o = if opts.is_empty() { "loop".to_string() } else { format!("loop,{opts}") };
        run("mount", &["-o", &o, s(img), s(dir)]);
        Mounted(dir.to_path_buf(), None)
    }

    /// An ntfs-3g FUSE mount (the kernel has no ntfs driver).
    #[track_caller]
    pub fn ntfs3g(img: &Path, dir: &Path, read_only: bool) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        let mut args = vec![s(img), s(dir)];
        if read_only {
            args.extend(["-o", "ro"]);
        }
        run("ntfs-3g", &args);
        Mounted(dir.to_path_buf(), Some(img.to_path_buf()))
    }

    /// Used bytes as `df` reports them.
    pub fn df_used(&self) -> u64 {
        let out = run("df", &["-B1", "--output=used", s(&self.0)]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(&self.0).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
                if let Some(image) = &self.1 {
                    wait_until_closed(image);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Copies `src`'s tree into the mounted filesystem at `mnt` (hard links, symlinks, sparseness kept).
pub fn copy_tree(src: &Path, mnt: &Path) {
    run("cp", &["-a", "--sparse=always", &format!("{}/.", s(src)), s(mnt)]);
    run("sync", &[]);
}

/// Asserts that the tree at `mnt` equals `src` (contents, symlink targets, structure) and that
/// hard links survived.
#[track_caller]
pub fn assert_same_tree(src: &Path, mnt: &Path) {
    let (ok, out, err) = run_status("diff", &["-r", "--no-dereference", s(src), s(mnt)]);
    assert!(ok, "files differ between {} and {}:\n{out}{err}", src.display(), mnt.display());
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| fs::symlink_metadata(mnt.join(p)).unwrap().ino();
    assert_eq!(ino("hard/a"), ino("hard/b"), "hard/a and hard/b should be one inode");
    assert_eq!(ino("hard/a"), ino("docs/third-name-of-a"), "docs/third-name-of-a should be hard/a");
    assert_eq!(fs::symlink_metadata(mnt.join("hard/a")).unwrap().nlink(), 3);
}

/// The used ranges of `img` per the map rime would pick for it.
pub fn used_ranges(img: &Path) -> Vec<Range<u64>> {
    let vol = Volume::open(img, false).unwrap();
    let mut detected = rime_volume::fs::detect(&vol.region());
    assert!(detected.warning.is_none(), "{:?}", detected.warning);
    let map: &mut dyn UsedMap = detected.map.as_mut();
    let mut ranges = Vec::new();
    let mut off = 0;
    while off < vol.size {
        let len = (64 * 1024).min(vol.size - off);
        map.used_ranges(off, len, &mut ranges).unwrap();
        off += len;
    }
    ranges
}

/// Writes `img` to `to` with every byte `map` leaves out zeroed: what a restore must equal.
pub fn write_masked(img: &Path, map: &mut dyn UsedMap, to: &Path) {
    let data = fs::read(img).unwrap();
    let mut out = vec![0u8; data.len()];
    let mut ranges = Vec::new();
    map.used_ranges(0, data.len() as u64, &mut ranges).unwrap();
    for r in ranges {
        out[r.start as usize..r.end as usize].copy_from_slice(&data[r.start as usize..r.end as usize]);
    }
    fs::write(to, out).unwrap();
}

/// Asserts that `restored` equals `original` on the used ranges and is zero elsewhere.
#[track_caller]
pub fn assert_restore_is_masked_original(original: &Path, restored: &Path) {
    let ranges = used_ranges(original);
    let (mut a, mut b) = (fs::File::open(original).unwrap(), fs::File::open(restored).unwrap());
    let size = fs::metadata(original).unwrap().len();
    assert_eq!(size, fs::metadata(restored).unwrap().len(), "restored size");
    let step = 4 * MIB as usize;
    let (mut ba, mut bb) = (vec![0u8; step], vec![0u8; step]);
    let mut pos = 0u64;
    let mut ri = 0;
    let mut garbage_left_out = false;
    while pos < size {
        let n = step.min((size - pos) as usize);
        a.read_exact(&mut ba[..n]).unwrap();
        b.read_exact(&mut bb[..n]).unwrap();
        // Mask the original: keep the used ranges, zero the rest.
        let mut masked = vec![0u8; n];
        while ri < ranges.len() && ranges[ri].end <= pos {
            ri += 1;
        }
        let mut j = ri;
        while j < ranges.len() && ranges[j].start < pos + n as u64 {
            let (s0, s1) = (ranges[j].start.max(pos) - pos, ranges[j].end.min(pos + n as u64) - pos);
            masked[s0 as usize..s1 as usize].copy_from_slice(&ba[s0 as usize..s1 as usize]);
            j += 1;
        }
        if let Some(i) = (0..n).find(|&i| masked[i] != bb[i]) {
            panic!("{} differs from the masked original at byte {}", restored.display(), pos + i as u64);
        }
        garbage_left_out |= masked[..] != ba[..n];
        pos += n as u64;
    }
    assert!(garbage_left_out, "the original's free space should have held garbage that the restore leaves out");
}

/// Waits up to 10 s until no process has `file` open (read from `/proc/*/fd`).
pub fn wait_until_closed(file: &Path) {
    let Ok(file) = fs::canonicalize(file) else { return };
    let open_anywhere = || {
        let Ok(procs) = fs::read_dir("/proc") else { return false };
        procs.flatten().any(|proc| {
            let Ok(fds) = fs::read_dir(proc.path().join("fd")) else { return false };
            fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == file))
        })
    };
    for _ in 0..200 {
        if !open_anywhere() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
