//! `rime extract`: restore files and folder trees from inside a backed-up volume.
//!
//! Each PATH is restored into `--to DIR` under its own name (`/etc/ssh` → `DIR/ssh/...`; `/`
//! restores the whole volume's tree into DIR). Contents are bit-exact; modes, ownership (when
//! run as root), timestamps (directories after their children, symlinks without following
//! them), symlinks, hard links (as links), holes of sparse files and extended attributes are
//! kept where the source filesystem has them.
//!
//! Safety against hostile images: every file is created relative to an open directory
//! ([`rime_os::dirfd`]: `openat`/`mkdirat`/`symlinkat`/`linkat` with `O_NOFOLLOW`), so nothing
//! inside the target is ever followed — a symlink from the image (even one pointing at `/etc` or `../..`)
//! is created as a symlink and never walked through. Names that are empty, `.`, `..`, or
//! contain `/` or NUL are refused; a directory met twice (a loop, or a hard-linked directory)
//! is restored once. Refused items are reported and skipped; the rest is restored.

use crate::explorer::Explorer;
use crate::snapshot_reader::ReadStats;
use anyhow::{bail, Context, Result};
use rime_explore::{FileTree, Kind, NodeId, Stat};
use rime_os::dirfd::{self, Dir, Entry, Special};
use rime_repo::Repository;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct ExtractOptions {
    pub snapshot: String,
    pub paths: Vec<String>,
    pub to: PathBuf,
    pub volume: Option<String>,
    pub overwrite: bool,
    pub cache_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtractSummary {
    pub snapshot: String,
    pub volume: String,
    pub filesystem: String,
    pub to: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub special: u64,
    /// Bytes of file data written (holes excluded).
    pub bytes: u64,
    pub skipped: Vec<Skipped>,
    /// Metadata that could not be applied (an xattr the target filesystem refuses, ...).
    pub warnings: Vec<String>,
    pub seconds: f64,
    #[serde(flatten)]
    pub stats: ReadStats,
}

const COPY_BUF: usize = 1 << 20;

fn cstr(b: &[u8]) -> Result<CString> {
    CString::new(b).context("name contains NUL")
}

/// Why a name from the image cannot be a file name here, if it cannot.
pub fn unsafe_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name == b"." || name == b".." {
        Some("name is '.' or '..'")
    } else if name.contains(&b'/') {
        Some("name contains '/'")
    } else if name.contains(&0) {
        Some("name contains NUL")
    } else if name.len() > 255 {
        Some("name longer than 255 bytes")
    } else {
        None
    }
}

fn time(t: rime_explore::Time) -> dirfd::Time {
    dirfd::Time { sec: t.sec, nsec: t.nsec }
}

struct Extractor<'a> {
    fs: &'a dyn FileTree,
    overwrite: bool,
    root: bool,
    summary: ExtractSummary,
    /// Regular files with several links: source node → path (from --to) of the first copy.
    links: HashMap<NodeId, Vec<CString>>,
    /// Directories entered so far (loops and hard-linked directories are restored once).
    dirs_seen: HashSet<NodeId>,
    buf: Vec<u8>,
}

impl<'a> Extractor<'a> {
    fn skip(&mut self, path: &str, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::debug!("skip {path}: {reason}");
        self.summary.skipped.push(Skipped { path: path.to_string(), reason });
    }

    fn warn(&mut self, path: &str, what: impl std::fmt::Display) {
        self.summary.warnings.push(format!("{path}: {what}"));
    }

    /// Removes an existing non-directory `name` when overwriting; says whether the name is free.
    fn make_room(&mut self, dir: &Dir, name: &CString, path: &str) -> bool {
        match dir.entry(name) {
            Entry::Nothing => return true,
            Entry::Directory => {
                self.skip(path, "a directory exists where a non-directory would go");
                return false;
            }
            Entry::Other => {}
        }
        if !self.overwrite {
            self.skip(path, "exists (use --overwrite to replace it)");
            return false;
        }
        if let Err(e) = dir.unlink(name) {
            self.skip(path, format!("cannot replace: {e}"));
            return false;
        }
        true
    }

    fn set_owner(&mut self, dir: &Dir, name: &CString, st: &Stat, path: &str) {
        if !self.root {
            return;
        }
        if let Err(e) = dir.chown(name, st.uid, st.gid) {
            self.warn(path, format!("chown: {e}"));
        }
    }

    fn set_mode(&mut self, fd: impl AsFd, st: &Stat, path: &str) {
        if let Err(e) = dirfd::set_mode(fd, st.mode) {
            self.warn(path, format!("chmod: {e}"));
        }
    }

    fn set_times(&mut self, dir: &Dir, name: &CString, st: &Stat, path: &str) {
        if let Err(e) = dir.set_times(name, time(st.atime), time(st.mtime)) {
            self.warn(path, format!("set times: {e}"));
        }
    }

    fn set_xattrs(&mut self, fd: Option<std::os::fd::BorrowedFd>, dir: &Dir, name: &CString, id: NodeId, path: &str) {
        let xattrs = match self.fs.xattrs(id) {
            Ok(x) => x,
            Err(e) => {
                self.warn(path, format!("read xattrs: {e:#}"));
                return;
            }
        };
        for x in xattrs {
            let Ok(xname) = CString::new(x.name.clone()) else {
                continue;
            };
            let r = match fd {
                Some(fd) => dirfd::set_xattr(fd, &xname, &x.value),
                // A symlink or special file: set on the entry itself, never following it.
                None => dir.set_xattr_nofollow(name, &xname, &x.value),
            };
            if let Err(e) = r {
                self.warn(path, format!("xattr {}: {e}", String::from_utf8_lossy(&x.name)));
            }
        }
    }

    /// Opens the directory at `components` below `root`, never following symlinks.
    fn walk(&self, root: &Dir, components: &[CString]) -> std::io::Result<Dir> {
        let mut cur = root.try_clone()?;
        for c in components {
            cur = cur.open_dir(c)?;
        }
        Ok(cur)
    }

    /// Restores node `id` as `name` inside `dir`. `rel` is the path from --to (for hard links)
    /// and `shown` the path inside the image (for messages).
    #[allow(clippy::too_many_arguments)]
    fn node(&mut self, root: &Dir, dir: &Dir, rel: &[CString], name: &[u8], id: NodeId, shown: &str, depth: usize) {
        if let Some(why) = unsafe_name(name) {
            self.skip(shown, format!("unsafe name ({why})"));
            return;
        }
        let cname = match cstr(name) {
            Ok(c) => c,
            Err(e) => return self.skip(shown, format!("{e:#}")),
        };
        let st = match self.fs.stat(id) {
            Ok(st) => st,
            Err(e) => return self.skip(shown, format!("cannot read: {e:#}")),
        };
        let result = match st.kind {
            Kind::Dir => self.dir(root, dir, rel, &cname, &st, shown, depth),
            Kind::File => self.file(root, dir, rel, &cname, &st, shown),
            Kind::Symlink => self.symlink(dir, &cname, &st, shown),
            Kind::Fifo | Kind::CharDev | Kind::BlockDev => self.special(dir, &cname, &st, shown),
            Kind::Socket => {
                self.skip(shown, "sockets are not restored");
                Ok(())
            }
        };
        if let Err(e) = result {
            self.skip(shown, format!("{e:#}"));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dir(
        &mut self,
        root: &Dir,
        parent: &Dir,
        rel: &[CString],
        name: &CString,
        st: &Stat,
        shown: &str,
        depth: usize,
    ) -> Result<()> {
        if depth > 4096 {
            bail!("directory tree deeper than 4096 levels");
        }
        if !self.dirs_seen.insert(st.id) {
            bail!("directory already restored from another path (a loop or a hard-linked directory in the image)");
        }
        // Owner-only until its metadata is applied.
        if parent.mkdir(name, 0o700).map_err(|e| anyhow::anyhow!("mkdir: {e}"))? {
            self.summary.dirs += 1;
        }
        // Entering never follows a symlink: an existing symlink here is refused (ELOOP/ENOTDIR).
        let fd = parent.open_dir(name).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
                anyhow::anyhow!("a non-directory exists where a directory would go")
            } else {
                anyhow::anyhow!("open directory: {e}")
            }
        })?;
        let entries = self.fs.read_dir(st.id).context("read directory")?;
        let mut child_rel = rel.to_vec();
        child_rel.push(name.clone());
        for e in entries {
            let shown_child = format!("{}/{}", shown.trim_end_matches('/'), String::from_utf8_lossy(&e.name));
            self.node(root, &fd, &child_rel, &e.name, e.id, &shown_child, depth + 1);
        }
        // Metadata after the children, so their creation does not change the times.
        self.set_owner(parent, name, st, shown);
        self.set_mode(&fd, st, shown);
        self.set_xattrs(Some(fd.as_fd()), parent, name, st.id, shown);
        self.set_times(parent, name, st, shown);
        Ok(())
    }

    fn file(&mut self, root: &Dir, dir: &Dir, rel: &[CString], name: &CString, st: &Stat, shown: &str) -> Result<()> {
        if st.nlink > 1 {
            if let Some(first) = self.links.get(&st.id).cloned() {
                if !self.make_room(dir, name, shown) {
                    return Ok(());
                }
                let (first_name, first_dir) = first.split_last().expect("a path has a name");
                let from = self.walk(root, first_dir).context("reach the first link")?;
                dir.link(&from, first_name, name).map_err(|e| anyhow::anyhow!("link: {e}"))?;
                self.summary.hardlinks += 1;
                return Ok(());
            }
        }
        if !self.make_room(dir, name, shown) {
            return Ok(());
        }
        // Never opens an existing file or link.
        let file = dir.create_file(name, 0o600).map_err(|e| anyhow::anyhow!("create: {e}"))?;
        let ranges = self.fs.data_ranges(st.id).context("read the file's extents")?;
        for r in ranges {
            let mut pos = r.start;
            while pos < r.end {
                let n = ((r.end - pos) as usize).min(self.buf.len());
                let got = self.fs.read_at(st.id, pos, &mut self.buf[..n]).context("read")?;
                if got == 0 {
                    break;
                }
                std::os::unix::fs::FileExt::write_all_at(&file, &self.buf[..got], pos).context("write")?;
                self.summary.bytes += got as u64;
                pos += got as u64;
            }
        }
        // Trailing holes: the size without writing zeros.
        file.set_len(st.size).context("set size")?;
        self.summary.files += 1;
        self.set_owner(dir, name, st, shown);
        self.set_mode(&file, st, shown);
        self.set_xattrs(Some(file.as_fd()), dir, name, st.id, shown);
        self.set_times(dir, name, st, shown);
        if st.nlink > 1 {
            let mut path = rel.to_vec();
            path.push(name.clone());
            self.links.insert(st.id, path);
        }
        Ok(())
    }

    fn symlink(&mut self, dir: &Dir, name: &CString, st: &Stat, shown: &str) -> Result<()> {
        let target = self.fs.read_link(st.id).context("read symlink")?;
        let target = cstr(&target).context("symlink target")?;
        if !self.make_room(dir, name, shown) {
            return Ok(());
        }
        dir.symlink(&target, name).map_err(|e| anyhow::anyhow!("symlink: {e}"))?;
        self.summary.symlinks += 1;
        self.set_owner(dir, name, st, shown);
        self.set_xattrs(None, dir, name, st.id, shown);
        self.set_times(dir, name, st, shown);
        Ok(())
    }

    fn special(&mut self, dir: &Dir, name: &CString, st: &Stat, shown: &str) -> Result<()> {
        let kind = match (st.kind, st.rdev) {
            (Kind::Fifo, _) => Special::Fifo,
            (Kind::CharDev, Some((major, minor))) if self.root => Special::CharDevice { major, minor },
            (Kind::BlockDev, Some((major, minor))) if self.root => Special::BlockDevice { major, minor },
            _ => {
                self.skip(shown, "device nodes are restored only by root");
                return Ok(());
            }
        };
        if !self.make_room(dir, name, shown) {
            return Ok(());
        }
        dir.mknod(name, kind, 0o600).map_err(|e| anyhow::anyhow!("mknod: {e}"))?;
        self.summary.special += 1;
        self.set_owner(dir, name, st, shown);
        // A device or fifo node, never a symlink.
        if let Err(e) = dir.chmod(name, st.mode) {
            self.warn(shown, format!("chmod: {e}"));
        }
        self.set_xattrs(None, dir, name, st.id, shown);
        self.set_times(dir, name, st, shown);
        Ok(())
    }
}

pub fn extract(repo: Repository, opts: &ExtractOptions) -> Result<ExtractSummary> {
    let started = Instant::now();
    if opts.paths.is_empty() {
        bail!("name at least one path inside the image to extract (/ for everything)");
    }
    let explorer = Explorer::open(repo, &opts.snapshot, opts.cache_bytes)?;
    let vol = explorer.open_volume(opts.volume.as_deref())?;
    let fs = vol.file_tree()?;
    let label = vol.selection.label();

    // Every path must exist before anything is written.
    let mut wanted = Vec::new();
    for p in &opts.paths {
        match rime_explore::resolve(fs.as_ref(), p)? {
            Some(id) => wanted.push((p.clone(), id)),
            None => {
                return Err(crate::error::CommandError::PathNotFound(format!(
                    "{p}: no such file or directory in snapshot {} volume {label}",
                    &explorer.manifest.id
                ))
                .into())
            }
        }
    }

    std::fs::create_dir_all(&opts.to).with_context(|| format!("create {}", opts.to.display()))?;
    let root_fd = Dir::open(&opts.to).map_err(|e| anyhow::anyhow!("{} is not a directory: {e}", opts.to.display()))?;

    let mut ex = Extractor {
        fs: fs.as_ref(),
        overwrite: opts.overwrite,
        root: rime_os::process::is_root(),
        summary: ExtractSummary::default(),
        links: HashMap::new(),
        dirs_seen: HashSet::new(),
        buf: vec![0u8; COPY_BUF],
    };
    for (path, id) in wanted {
        let parts = rime_explore::path_components(&path)?;
        match parts.last() {
            // The root: its entries go straight into --to; --to itself keeps its metadata.
            None => {
                ex.dirs_seen.insert(id);
                let entries = fs.read_dir(id).context("read the root directory")?;
                for e in entries {
                    let shown = format!("/{}", String::from_utf8_lossy(&e.name));
                    ex.node(&root_fd, &root_fd, &[], &e.name, e.id, &shown, 1);
                }
            }
            Some(name) => {
                let shown = format!("/{}", parts.join("/"));
                ex.node(&root_fd, &root_fd, &[], name.as_bytes(), id, &shown, 1);
            }
        }
    }
    let mut summary = ex.summary;
    summary.snapshot = explorer.manifest.id.clone();
    summary.volume = label;
    summary.filesystem = fs.fs_type().to_string();
    summary.to = opts.to.display().to_string();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.stats = explorer.counter.stats();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::unsafe_name;

    #[test]
    fn hostile_names_are_refused() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/etc/passwd", b"a\0b", &[b'x'; 256][..]] {
            assert!(unsafe_name(bad).is_some(), "{bad:?}");
        }
        for good in [&b"a"[..], b"...", b"..a", b".hidden", "ünï".as_bytes(), &[b'x'; 255][..]] {
            assert!(unsafe_name(good).is_none(), "{good:?}");
        }
    }
}
