//! Helpers for the image-explorer tests (`explorer_*.rs`): extra tree contents, xattrs through
//! libc, and a strict comparison of two file trees (contents, types, modes, owners, mtimes,
//! symlink targets, hard-link groups, holes, xattrs).

#![allow(dead_code)]

use crate::common::{rime_command, sh, Env, LoopDev, Mount};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs;
use std::io::BufRead;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// Sets an xattr on `path` (not following symlinks).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and value slice.
    let r = unsafe { libc::lsetxattr(c(path).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {name} on {}: {}", path.display(), std::io::Error::last_os_error());
}

/// All xattrs of `path` (not following symlinks), sorted by name.
pub fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = c(path);
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid buffer.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        // SAFETY: valid buffer.
        let m = unsafe { libc::lgetxattr(p.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        if m >= 0 {
            val.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), val);
        }
    }
    out
}

/// Sets mtime and atime with nanoseconds (not following symlinks).
pub fn set_times(path: &Path, sec: i64, nsec: i64) {
    let t = [libc::timespec { tv_sec: sec, tv_nsec: nsec }, libc::timespec { tv_sec: sec, tv_nsec: nsec }];
    // SAFETY: valid path and times.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(path).as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

pub fn chown(path: &Path, uid: u32, gid: u32) {
    // SAFETY: valid path.
    let r = unsafe { libc::lchown(c(path).as_ptr(), uid, gid) };
    assert_eq!(r, 0, "lchown {}", path.display());
}

pub fn mkfifo(path: &Path) {
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c(path).as_ptr(), 0o640) }, 0);
}

/// Adds what `common::populate_tree` lacks: a sparse file, odd modes, owners, nanosecond times,
/// a fifo, a hard link across directories.
pub fn add_metadata_cases(dir: &Path) {
    fs::create_dir_all(dir.join("meta/owned")).unwrap();
    // Sparse: 8 MiB with 3 islands of data, one at the very end.
    let sparse = dir.join("meta/sparse.img");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xAB; 5000], 4096 * 10).unwrap();
    f.write_all_at(&[0xCD; 70000], 3 << 20).unwrap();
    f.write_all_at(b"tail", (8 << 20) - 4).unwrap();
    drop(f);
    // A file that is all hole.
    fs::File::create(dir.join("meta/all-hole")).unwrap().set_len(1 << 20).unwrap();
    fs::write(dir.join("meta/setuid-tool"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(dir.join("meta/setuid-tool"), fs::Permissions::from_mode(0o4751)).unwrap();
    fs::write(dir.join("meta/private"), b"secret\n").unwrap();
    fs::set_permissions(dir.join("meta/private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(dir.join("meta/owned"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(dir.join("meta/owned/file"), b"owned by someone\n").unwrap();
    chown(&dir.join("meta/owned/file"), 1234, 5678);
    chown(&dir.join("meta/owned"), 4321, 8765);
    mkfifo(&dir.join("meta/fifo"));
    std::os::unix::fs::symlink("../docs/readme.txt", dir.join("meta/up-link")).unwrap();
    chown(&dir.join("meta/up-link"), 77, 88);
    set_times(&dir.join("meta/private"), 1_500_000_000, 123_456_789);
    set_times(&dir.join("meta/up-link"), 1_400_000_000, 5);
    set_times(&dir.join("meta/owned/file"), 1_000_000_000, 999_999_999);
    set_times(&dir.join("meta/owned"), 1_234_567_890, 42);
}

/// Kind letter, mode bits, owner, size, mtime (s, ns) and symlink target of one node.
#[derive(Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub target: Option<PathBuf>,
}

pub fn facts(path: &Path) -> NodeFacts {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_file() {
        '-'
    } else {
        '?'
    };
    NodeFacts {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if kind == 'd' { 0 } else { m.size() },
        mtime: (m.mtime(), m.mtime_nsec()),
        target: if kind == 'l' { Some(fs::read_link(path).unwrap()) } else { None },
    }
}

/// Relative paths of everything below `dir` (not following symlinks), sorted.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(dir.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

pub struct Compare {
    /// Compare directory mtimes too.
    pub dir_times: bool,
    /// Compare xattrs.
    pub xattrs: bool,
    /// Compare owners.
    pub owners: bool,
    /// Check holes: the copy allocates no more than the original (+ one 64 KiB slack).
    pub holes: bool,
    /// Compare modes.
    pub modes: bool,
    /// Compare mtimes of non-directories.
    pub times: bool,
}

impl Compare {
    pub fn all() -> Compare {
        Compare { dir_times: true, xattrs: true, owners: true, holes: true, modes: true, times: true }
    }
}

/// Asserts that `copy` holds exactly what `orig` holds (names in `skip` are ignored at any depth).
#[track_caller]
pub fn assert_same_tree(orig: &Path, copy: &Path, how: &Compare, skip: &[&str]) {
    let keep = |p: &PathBuf| !p.components().any(|c| skip.iter().any(|s| c.as_os_str() == *s));
    let a: Vec<PathBuf> = walk(orig).into_iter().filter(keep).collect();
    let b: Vec<PathBuf> = walk(copy).into_iter().filter(keep).collect();
    assert_eq!(a, b, "different names under {} and {}", orig.display(), copy.display());
    // Hard-link groups: paths sharing an inode must share one in the copy too.
    let mut groups_a: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut groups_b: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for rel in &a {
        let (pa, pb) = (orig.join(rel), copy.join(rel));
        let (fa, fb) = (facts(&pa), facts(&pb));
        assert_eq!(fa.kind, fb.kind, "type of {}", rel.display());
        assert_eq!(fa.target, fb.target, "symlink target of {}", rel.display());
        if how.modes && fa.kind != 'l' {
            assert_eq!(format!("{:o}", fa.mode), format!("{:o}", fb.mode), "mode of {}", rel.display());
        }
        if how.owners {
            assert_eq!((fa.uid, fa.gid), (fb.uid, fb.gid), "owner of {}", rel.display());
        }
        if fa.kind != 'd' {
            assert_eq!(fa.size, fb.size, "size of {}", rel.display());
        }
        if (fa.kind != 'd' && how.times) || (fa.kind == 'd' && how.dir_times) {
            assert_eq!(fa.mtime, fb.mtime, "mtime of {}", rel.display());
        }
        if fa.kind == '-' {
            assert!(fs::read(&pa).unwrap() == fs::read(&pb).unwrap(), "contents of {} differ", rel.display());
            let (ma, mb) = (fs::metadata(&pa).unwrap(), fs::metadata(&pb).unwrap());
            if how.holes {
                assert!(
                    mb.blocks() * 512 <= ma.blocks() * 512 + 65536,
                    "{} allocates {} bytes in the copy but {} in the original (holes lost)",
                    rel.display(),
                    mb.blocks() * 512,
                    ma.blocks() * 512
                );
            }
            if ma.nlink() > 1 {
                groups_a.entry((ma.dev(), ma.ino())).or_default().push(rel.clone());
                groups_b.entry((mb.dev(), mb.ino())).or_default().push(rel.clone());
            }
        }
        if how.xattrs && fa.kind != 'l' {
            assert_eq!(xattrs(&pa), xattrs(&pb), "xattrs of {}", rel.display());
        }
    }
    let mut ga: Vec<Vec<PathBuf>> = groups_a.into_values().collect();
    let mut gb: Vec<Vec<PathBuf>> = groups_b.into_values().collect();
    ga.iter_mut().for_each(|g| g.sort());
    gb.iter_mut().for_each(|g| g.sort());
    ga.sort();
    gb.sort();
    assert_eq!(ga, gb, "hard-link groups differ");
}

/// A running `rime mount`, killed on drop if still running, with the mount point lazily unmounted.
pub struct MountProcess {
    pub child: Option<std::process::Child>,
    pub dir: PathBuf,
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount").arg("-u").arg("-z").arg(&self.dir).stderr(Stdio::null()).status();
            let _ = Command::new("umount").arg("-l").arg(&self.dir).stderr(Stdio::null()).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `dir` is a mount point (per /proc/self/mounts).
pub fn is_mounted(dir: &Path) -> bool {
    let canon = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(canon.to_str().unwrap()))
}

/// Starts `rime mount` and waits for its "mounted" line.
pub fn start_mount(env: &Env, snap: &str, dir: &Path) -> MountProcess {
    fs::create_dir_all(dir).unwrap();
    let mut child = rime_command()
        .arg("--repo")
        .arg(&env.repo)
        .args(["mount", snap])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut proc = MountProcess { child: Some(child), dir: dir.to_path_buf() };
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
        let mut c = proc.child.take().unwrap();
        let _ = c.kill();
        let out = c.wait_with_output().unwrap();
        panic!("rime mount did not report being mounted: {}", String::from_utf8_lossy(&out.stderr))
    });
    assert!(line.starts_with("mounted snapshot"), "{line}");
    assert!(is_mounted(dir), "{} should be a mount point", dir.display());
    proc
}

pub fn loop_ro(image: &Path, dir: &Path) -> (LoopDev, Mount) {
    let lo = LoopDev::attach_ro(image);
    let m = Mount::new(&lo.dev, dir, &["ro"]);
    (lo, m)
}

pub trait AttachRo {
    fn attach_ro(file: &Path) -> LoopDev;
}

impl AttachRo for LoopDev {
    fn attach_ro(file: &Path) -> LoopDev {
        let out = sh("losetup", &["--find", "--show", "--read-only", file.to_str().unwrap()]);
        LoopDev { dev: PathBuf::from(out.trim()) }
    }
}

/// `rime ls --json ARGS...`.
pub fn ls_json(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["ls", "--json"];
    all.extend_from_slice(args);
    env.rime(&all).ok().json()
}

/// Checks one `ls --json` listing against the kernel's view of the same directory.
#[track_caller]
pub fn assert_listing_matches(listing: &Value, dir: &Path) {
    let entries = listing["entries"].as_array().expect("entries");
    let mut names: Vec<String> = entries.iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    let mut expected: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected, "names in {}", dir.display());
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let f = facts(&dir.join(name));
        let kind = match f.kind {
            'd' => "dir",
            'l' => "symlink",
            'p' => "fifo",
            '-' => "file",
            _ => "char-device",
        };
        assert_eq!(e["type"], kind, "type of {name}");
        if f.kind != 'd' {
            assert_eq!(e["size"].as_u64(), Some(f.size), "size of {name}");
        }
        assert_eq!(e["mode"].as_u64(), Some(f.mode as u64), "mode of {name}");
        assert_eq!((e["uid"].as_u64(), e["gid"].as_u64()), (Some(f.uid as u64), Some(f.gid as u64)), "owner of {name}");
        assert_eq!(
            (e["mtime"].as_i64(), e["mtime_nsec"].as_i64()),
            (Some(f.mtime.0), Some(f.mtime.1)),
            "mtime of {name}"
        );
        match f.target {
            Some(t) => assert_eq!(e["target"].as_str(), Some(t.to_str().unwrap()), "target of {name}"),
            None => assert!(e.get("target").is_none(), "{name} is no symlink: {e}"),
        }
    }
}
