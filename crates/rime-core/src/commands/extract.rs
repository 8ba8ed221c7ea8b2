//! `rime extract`: restore files and folder trees from inside a backed-up volume.
//!
//! Each PATH is restored into `--to DIR` under its own name (`/etc/ssh` → `DIR/ssh/...`; `/`
//! restores the whole volume's tree into DIR). Contents are bit-exact; modes, ownership (when
//! run as root), timestamps (directories after their children, symlinks without following
//! them), symlinks, hard links (as links), holes of sparse files and extended attributes are
//! kept where the source filesystem has them.
//!
//! Safety against hostile images: every file is created relative to an open directory
//! descriptor (`openat`/`mkdirat`/`symlinkat`/`linkat` with `O_NOFOLLOW`), so nothing inside the
//! target is ever followed — a symlink from the image (even one pointing at `/etc` or `../..`)
//! is created as a symlink and never walked through. Names that are empty, `.`, `..`, or
//! contain `/` or NUL are refused; a directory met twice (a loop, or a hard-linked directory)
//! is restored once. Refused items are reported and skipped; the rest is restored.

use crate::explorer::Explorer;
use crate::snapshot_reader::ReadStats;
use anyhow::{bail, Context, Result};
use rime_explore::{FileTree, Kind, NodeId, Stat};
use rime_repo::Repository;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
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

fn open_dir_at(parent: &OwnedFd, name: &CString) -> std::io::Result<OwnedFd> {
    // SAFETY: valid descriptor and NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last_err());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn timespec(t: rime_explore::Time) -> libc::timespec {
    libc::timespec { tv_sec: t.sec as libc::time_t, tv_nsec: t.nsec as libc::c_long }
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
    fn make_room(&mut self, dir: &OwnedFd, name: &CString, path: &str) -> bool {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers; AT_SYMLINK_NOFOLLOW never follows.
        let r = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if r != 0 {
            return true; // nothing there
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            self.skip(path, "a directory exists where a non-directory would go");
            return false;
        }
        if !self.overwrite {
            self.skip(path, "exists (use --overwrite to replace it)");
            return false;
        }
        // SAFETY: unlinks the entry itself (never follows a symlink).
        if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
            let e = last_err();
            self.skip(path, format!("cannot replace: {e}"));
            return false;
        }
        true
    }

    fn set_owner(&mut self, dir: &OwnedFd, name: &CString, st: &Stat, path: &str) {
        if !self.root {
            return;
        }
        // SAFETY: valid descriptor and name; does not follow symlinks.
        if unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), st.uid, st.gid, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            let e = last_err();
            self.warn(path, format!("chown: {e}"));
        }
    }

    fn set_mode(&mut self, fd: &OwnedFd, st: &Stat, path: &str) {
        // SAFETY: valid descriptor.
        if unsafe { libc::fchmod(fd.as_raw_fd(), st.mode as libc::mode_t) } != 0 {
            let e = last_err();
            self.warn(path, format!("chmod: {e}"));
        }
    }

    fn set_times(&mut self, dir: &OwnedFd, name: &CString, st: &Stat, path: &str) {
        let times = [timespec(st.atime), timespec(st.mtime)];
        // SAFETY: valid descriptor, name and two timespecs; does not follow symlinks.
        if unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            let e = last_err();
            self.warn(path, format!("set times: {e}"));
        }
    }

    fn set_xattrs(&mut self, fd: Option<&OwnedFd>, dir: &OwnedFd, name: &CString, id: NodeId, path: &str) {
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
                // SAFETY: valid descriptor, NUL-terminated name, value slice.
                Some(fd) => unsafe {
                    libc::fsetxattr(fd.as_raw_fd(), xname.as_ptr(), x.value.as_ptr().cast(), x.value.len(), 0)
                },
                None => {
                    // A symlink: reach it through its directory's descriptor, never following it.
                    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
                    p.extend_from_slice(name.as_bytes());
                    let Ok(p) = CString::new(p) else { continue };
                    // SAFETY: valid NUL-terminated strings; lsetxattr does not follow the link.
                    unsafe { libc::lsetxattr(p.as_ptr(), xname.as_ptr(), x.value.as_ptr().cast(), x.value.len(), 0) }
                }
            };
            if r != 0 {
                let e = last_err();
                self.warn(path, format!("xattr {}: {e}", String::from_utf8_lossy(&x.name)));
            }
        }
    }

    /// Opens the directory at `components` below `root`, never following symlinks.
    fn walk(&self, root: &OwnedFd, components: &[CString]) -> std::io::Result<OwnedFd> {
        // SAFETY: duplicating a valid descriptor.
        let mut cur = unsafe { OwnedFd::from_raw_fd(libc::fcntl(root.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0)) };
        for c in components {
            cur = open_dir_at(&cur, c)?;
        }
        Ok(cur)
    }

    /// Restores node `id` as `name` inside `dir`. `rel` is the path from --to (for hard links)
    /// and `shown` the path inside the image (for messages).
    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        root: &OwnedFd,
        dir: &OwnedFd,
        rel: &[CString],
        name: &[u8],
        id: NodeId,
        shown: &str,
        depth: usize,
    ) {
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
        root: &OwnedFd,
        parent: &OwnedFd,
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
        // SAFETY: valid descriptor and name. Owner-only until its metadata is applied.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) } != 0 {
            let e = last_err();
            if e.raw_os_error() != Some(libc::EEXIST) {
                bail!("mkdir: {e}");
            }
        } else {
            self.summary.dirs += 1;
        }
        // Entering never follows a symlink: an existing symlink here is refused (ELOOP/ENOTDIR).
        let fd = open_dir_at(parent, name).map_err(|e| {
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
        self.set_xattrs(Some(&fd), parent, name, st.id, shown);
        self.set_times(parent, name, st, shown);
        Ok(())
    }

    fn file(
        &mut self,
        root: &OwnedFd,
        dir: &OwnedFd,
        rel: &[CString],
        name: &CString,
        st: &Stat,
        shown: &str,
    ) -> Result<()> {
        if st.nlink > 1 {
            if let Some(first) = self.links.get(&st.id).cloned() {
                if !self.make_room(dir, name, shown) {
                    return Ok(());
                }
                let (first_name, first_dir) = first.split_last().expect("a path has a name");
                let from = self.walk(root, first_dir).context("reach the first link")?;
                // SAFETY: valid descriptors and names; flags 0 never follows a symlink.
                if unsafe { libc::linkat(from.as_raw_fd(), first_name.as_ptr(), dir.as_raw_fd(), name.as_ptr(), 0) }
                    != 0
                {
                    bail!("link: {}", last_err());
                }
                self.summary.hardlinks += 1;
                return Ok(());
            }
        }
        if !self.make_room(dir, name, shown) {
            return Ok(());
        }
        // SAFETY: valid descriptor and name; O_EXCL|O_NOFOLLOW never opens an existing file or link.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            bail!("create: {}", last_err());
        }
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd.try_clone()?);
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
        self.set_mode(&fd, st, shown);
        self.set_xattrs(Some(&fd), dir, name, st.id, shown);
        self.set_times(dir, name, st, shown);
        if st.nlink > 1 {
            let mut path = rel.to_vec();
            path.push(name.clone());
            self.links.insert(st.id, path);
        }
        Ok(())
    }

    fn symlink(&mut self, dir: &OwnedFd, name: &CString, st: &Stat, shown: &str) -> Result<()> {
        let target = self.fs.read_link(st.id).context("read symlink")?;
        let target = cstr(&target).context("symlink target")?;
        if !self.make_room(dir, name, shown) {
            return Ok(());
        }
        // SAFETY: valid strings and descriptor. The link is created, never followed.
        if unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) } != 0 {
            bail!("symlink: {}", last_err());
        }
        self.summary.symlinks += 1;
        self.set_owner(dir, name, st, shown);
        self.set_xattrs(None, dir, name, st.id, shown);
        self.set_times(dir, name, st, shown);
        Ok(())
    }

    fn special(&mut self, dir: &OwnedFd, name: &CString, st: &Stat, shown: &str) -> Result<()> {
        let (kind, dev) = match (st.kind, st.rdev) {
            (Kind::Fifo, _) => (libc::S_IFIFO, 0),
            (Kind::CharDev, Some((ma, mi))) if self.root => (libc::S_IFCHR, libc::makedev(ma, mi)),
            (Kind::BlockDev, Some((ma, mi))) if self.root => (libc::S_IFBLK, libc::makedev(ma, mi)),
            _ => {
                self.skip(shown, "device nodes are restored only by root");
                return Ok(());
            }
        };
        if !self.make_room(dir, name, shown) {
            return Ok(());
        }
        // SAFETY: valid descriptor and name.
        if unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), kind | 0o600, dev) } != 0 {
            bail!("mknod: {}", last_err());
        }
        self.summary.special += 1;
        self.set_owner(dir, name, st, shown);
        // SAFETY: valid descriptor and name; fchmodat on a device/fifo node (not a symlink).
        if unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), st.mode as libc::mode_t, 0) } != 0 {
            let e = last_err();
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
            None => bail!("{p}: no such file or directory in snapshot {} volume {label}", &explorer.manifest.id),
        }
    }

    std::fs::create_dir_all(&opts.to).with_context(|| format!("create {}", opts.to.display()))?;
    let to = CString::new(opts.to.as_os_str().as_bytes()).context("--to contains NUL")?;
    // SAFETY: NUL-terminated path; the result is checked.
    let root_fd = unsafe { libc::open(to.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if root_fd < 0 {
        bail!("{} is not a directory: {}", opts.to.display(), last_err());
    }
    // SAFETY: fresh descriptor we own.
    let root_fd = unsafe { OwnedFd::from_raw_fd(root_fd) };

    let mut ex = Extractor {
        fs: fs.as_ref(),
        overwrite: opts.overwrite,
        // SAFETY: geteuid has no preconditions.
        root: unsafe { libc::geteuid() } == 0,
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
