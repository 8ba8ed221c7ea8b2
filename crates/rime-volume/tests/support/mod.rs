//! Helpers shared by the filesystem map tests (`btrfs_map.rs`, `xfs_map.rs`, `fat_map.rs`,
//! `ntfs_map.rs`): running programs, reproducible random data, image files and mounts released
//! on drop.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const MIB: u64 = 1 << 20;

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a program (stdin closed; `MTOOLS_SKIP_CHECK` set for mtools); panics with its output
/// unless it succeeds. Returns stdout.
#[track_caller]
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// xorshift64*: fast reproducible bytes without extra crates.
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

/// A new all-zero (sparse) image file of `size_mib` MiB, replacing any old one.
pub fn new_image(img: &Path, size_mib: u64) {
    let _ = fs::remove_file(img);
    fs::File::create(img).unwrap().set_len(size_mib * MIB).unwrap();
}

/// A mounted image, unmounted on drop.
/// `.1`: for an ntfs-3g mount, the image, which ntfs-3g finishes writing and closes a moment
/// after `umount` returns (a FUSE mount of a plain file is not `fuseblk`, so the kernel does not
/// wait for the daemon); dropping waits for that too.
pub struct Mounted(pub PathBuf, Option<PathBuf>);

impl Mounted {
    /// A loop mount with extra mount options `opts` (may be empty).
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
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success()) {
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
