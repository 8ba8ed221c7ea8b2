//! Helpers for the crash-consistency tests: a reflink-capable host filesystem whose `cp
//! --reflink` takes instant point-in-time copies of an image file (what a storage snapshot or a
//! crash leaves), a write load that fsyncs and records what it has made durable, and file
//! trees read back from mounts for comparison.

#![allow(dead_code)]

use crate::common::*;
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// An XFS filesystem (reflink on) in an image file, loop-mounted: image files inside it can be
/// copied in an instant with `cp --reflink=always`.
pub struct ReflinkHost {
    pub dir: PathBuf,
    mount: Option<Mount>,
    _lo: LoopDev,
}

impl ReflinkHost {
    pub fn new(env: &Env, size_mib: u64) -> ReflinkHost {
        let img = env.path("reflink-host.img");
        std::fs::File::create(&img).unwrap().set_len(size_mib * MIB).unwrap();
        sh("mkfs.xfs", &["-q", "-m", "reflink=1", img.to_str().unwrap()]);
        let lo = LoopDev::attach(&img);
        let dir = env.path("host");
        let mount = Mount::new(&lo.dev, &dir, &[]);
        ReflinkHost { dir, mount: Some(mount), _lo: lo }
    }

    /// A btrfs loop mount instead (reflink clones and subvolume snapshots).
    pub fn btrfs(env: &Env, size_mib: u64) -> ReflinkHost {
        let img = env.path("btrfs-host.img");
        std::fs::File::create(&img).unwrap().set_len(size_mib * MIB).unwrap();
        sh("mkfs.btrfs", &["-q", img.to_str().unwrap()]);
        let lo = LoopDev::attach(&img);
        let dir = env.path("host");
        let mount = Mount::new(&lo.dev, &dir, &[]);
        ReflinkHost { dir, mount: Some(mount), _lo: lo }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for ReflinkHost {
    fn drop(&mut self) {
        drop(self.mount.take());
    }
}

/// What the writer has made durable and not touched since: path (relative to the mount) →
/// contents. A file leaves the map before it is changed and comes back only after the change
/// is fsync'd (file and directory).
pub type Durable = BTreeMap<String, Vec<u8>>;

/// A background write load on a mounted filesystem: files created, appended, overwritten in
/// place, truncated, renamed and deleted, each change fsync'd with its directory; one
/// directory gets long names so that it grows past one block (and gets an htree index).
pub struct Writer {
    pub durable: Arc<Mutex<Durable>>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

const DIRS: [&str; 4] = ["a", "b", "a/deep", "big"];
const MAX_FILES: usize = 300;

impl Writer {
    pub fn start(root: &Path, seed: u64) -> Writer {
        for d in DIRS {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        sync_dir(root);
        sync_dir(&root.join("a"));
        let durable = Arc::new(Mutex::new(Durable::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (d, s, o, root) = (durable.clone(), stop.clone(), ops.clone(), root.to_path_buf());
        let thread = std::thread::spawn(move || write_load(&root, seed, &d, &s, &o));
        Writer { durable, stop, ops, thread: Some(thread) }
    }

    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the writer panicked");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sync_dir(dir: &Path) {
    std::fs::File::open(dir).unwrap().sync_all().unwrap();
}

fn parent_of(root: &Path, rel: &str) -> PathBuf {
    root.join(rel).parent().unwrap().to_path_buf()
}

fn write_load(root: &Path, seed: u64, durable: &Mutex<Durable>, stop: &AtomicBool, ops: &AtomicU64) {
    let mut rng = Rng::new(seed);
    let mut serial = 0u64;
    let take = |durable: &Mutex<Durable>, rng: &mut Rng| -> Option<(String, Vec<u8>)> {
        let mut d = durable.lock().unwrap();
        if d.is_empty() {
            return None;
        }
        let k = d.keys().nth(rng.below(d.len() as u64) as usize).unwrap().clone();
        d.remove_entry(&k)
    };
    while !stop.load(Ordering::Relaxed) {
        let count = durable.lock().unwrap().len();
        let op = if count < 20 { 0 } else { rng.below(if count >= MAX_FILES { 6 } else { 7 }) };
        match op {
            // Create (twice as likely while there is room).
            0 | 6 => {
                serial += 1;
                let dir = DIRS[rng.below(DIRS.len() as u64) as usize];
                let name = if dir == "big" { format!("{serial:06}-{}", "n".repeat(180)) } else { format!("f{serial}") };
                let rel = format!("{dir}/{name}");
                let len = if rng.below(10) == 0 { 256 * 1024 + rng.below(512 * 1024) } else { rng.below(48 * 1024) };
                let data = rng.bytes(len as usize);
                let mut f = std::fs::File::create(root.join(&rel)).unwrap();
                f.write_all(&data).unwrap();
                f.sync_all().unwrap();
                sync_dir(&parent_of(root, &rel));
                durable.lock().unwrap().insert(rel, data);
            }
            // Append.
            1 => {
                let Some((rel, mut data)) = take(durable, &mut rng) else { continue };
                let n = rng.below(40 * 1024) as usize + 1;
                let more = rng.bytes(n);
                let mut f = std::fs::OpenOptions::new().append(true).open(root.join(&rel)).unwrap();
                f.write_all(&more).unwrap();
                f.sync_all().unwrap();
                data.extend_from_slice(&more);
                durable.lock().unwrap().insert(rel, data);
            }
            // Overwrite in place.
            2 => {
                let Some((rel, mut data)) = take(durable, &mut rng) else { continue };
                if !data.is_empty() {
                    let at = rng.below(data.len() as u64) as usize;
                    let n = (rng.below(8192) as usize + 1).min(data.len() - at);
                    let patch = rng.bytes(n);
                    let f = std::fs::OpenOptions::new().write(true).open(root.join(&rel)).unwrap();
                    f.write_all_at(&patch, at as u64).unwrap();
                    f.sync_all().unwrap();
                    data[at..at + n].copy_from_slice(&patch);
                }
                durable.lock().unwrap().insert(rel, data);
            }
            // Truncate.
            3 => {
                let Some((rel, mut data)) = take(durable, &mut rng) else { continue };
                let len = rng.below(data.len() as u64 + 1) as usize;
                let f = std::fs::OpenOptions::new().write(true).open(root.join(&rel)).unwrap();
                f.set_len(len as u64).unwrap();
                f.sync_all().unwrap();
                data.truncate(len);
                durable.lock().unwrap().insert(rel, data);
            }
            // Rename, possibly to another directory.
            4 => {
                let Some((rel, data)) = take(durable, &mut rng) else { continue };
                serial += 1;
                let dir = DIRS[rng.below(DIRS.len() as u64) as usize];
                let to = if dir == "big" {
                    format!("big/{serial:06}-{}", "r".repeat(180))
                } else {
                    format!("{dir}/r{serial}")
                };
                std::fs::rename(root.join(&rel), root.join(&to)).unwrap();
                sync_dir(&parent_of(root, &to));
                sync_dir(&parent_of(root, &rel));
                durable.lock().unwrap().insert(to, data);
            }
            // Delete.
            _ => {
                let Some((rel, _)) = take(durable, &mut rng) else { continue };
                std::fs::remove_file(root.join(&rel)).unwrap();
                sync_dir(&parent_of(root, &rel));
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Takes an instant copy of `image` (on a reflink host) while the writer's record is held
/// still: every file in the returned record was durable before the copy began.
pub fn crash_copy(writer: &Writer, image: &Path, copy: &Path) -> Durable {
    let durable = writer.durable.lock().unwrap();
    sh("cp", &["--reflink=always", image.to_str().unwrap(), copy.to_str().unwrap()]);
    durable.clone()
}

/// One node of a file tree read from a mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { len: u64, digest: u64 },
    Symlink(PathBuf),
    Other,
}

pub fn digest(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(data);
    h.finish()
}

/// Every node under `root` (relative paths; `lost+found` left out), with file contents digested.
pub fn read_tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            let t = e.file_type().unwrap();
            let node = if t.is_dir() {
                stack.push(path.clone());
                Node::Dir
            } else if t.is_file() {
                let data = std::fs::read(&path).unwrap();
                Node::File { len: data.len() as u64, digest: digest(&data) }
            } else if t.is_symlink() {
                Node::Symlink(std::fs::read_link(&path).unwrap())
            } else {
                Node::Other
            };
            out.insert(rel, node);
        }
    }
    out
}

/// Mounts `image` read-write (replaying its journal or log, as the kernel does), reads its
/// tree, unmounts.
pub fn mounted_tree(image: &Path, dir: &Path, opts: &[&str]) -> BTreeMap<String, Node> {
    let lo = LoopDev::attach(image);
    let m = Mount::new(&lo.dev, dir, opts);
    let tree = read_tree(&m.dir);
    // Dropping retries while the kernel still holds the mount busy for a moment.
    drop(m);
    drop(lo);
    tree
}

/// Asserts that two trees are equal, naming the first few differences.
#[track_caller]
pub fn assert_same_tree(what: &str, expected: &BTreeMap<String, Node>, got: &BTreeMap<String, Node>) {
    let mut diffs = Vec::new();
    for (k, v) in expected {
        match got.get(k) {
            None => diffs.push(format!("missing {k}")),
            Some(g) if g != v => diffs.push(format!("{k}: {g:?}, expected {v:?}")),
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !expected.contains_key(*k)) {
        diffs.push(format!("unexpected {k}"));
    }
    assert!(diffs.is_empty(), "{what}: {} differences, first: {:?}", diffs.len(), &diffs[..diffs.len().min(8)]);
}

/// Asserts that every durable file is in `tree` with its contents.
#[track_caller]
pub fn assert_durable_in(what: &str, durable: &Durable, tree: &BTreeMap<String, Node>) {
    for (rel, data) in durable {
        let want = Node::File { len: data.len() as u64, digest: digest(data) };
        assert_eq!(tree.get(rel), Some(&want), "{what}: fsync'd file {rel} ({} bytes)", data.len());
    }
}

/// Whether the journal of ext image `image` wraps around its end, as `debugfs logdump` shows it
/// (`-c`: the on-disk bitmaps of a crash copy are stale and may fail their checksums).
pub fn ext_log_wraps(image: &Path) -> bool {
    let out = sh("debugfs", &["-c", "-R", "logdump", image.to_str().unwrap()]);
    let blocks: Vec<u64> = out
        .lines()
        .filter(|l| l.starts_with("Found expected sequence"))
        .filter_map(|l| l.rsplit_once(" at block ")?.1.trim().parse().ok())
        .collect();
    blocks.windows(2).any(|w| w[1] < w[0])
}
