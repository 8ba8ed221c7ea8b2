//! Loop devices and mounts, always released on drop (retrying while the kernel still holds
//! them busy, then lazily).

use crate::{run, s};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Retries `program args` for up to 5 s until it succeeds.
fn retry(program: &str, args: &[&Path]) -> bool {
    for _ in 0..50 {
        if Command::new(program).args(args).stderr(Stdio::null()).status().is_ok_and(|st| st.success()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn unmount_or_detach(dir: &Path) -> bool {
    if retry("umount", &[dir]) {
        return true;
    }
    let _ = Command::new("umount").arg("-l").arg(dir).status();
    false
}

/// A loop device attached to a file; detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    #[track_caller]
    pub fn attach(file: &Path) -> LoopDev {
        let out = run("losetup", &["--find", "--show", s(file)]);
        assert!(out.trim().starts_with("/dev/loop"), "losetup printed {out:?}");
        LoopDev { dev: PathBuf::from(out.trim()) }
    }

    pub fn path(&self) -> &str {
        s(&self.dev)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if !retry("losetup", &[Path::new("-d"), &self.dev]) {
            eprintln!("warning: could not detach {}", self.dev.display());
        }
    }
}

/// A block device mounted at a directory; unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts `dev` at a new directory `dir` with mount options `opts`.
    #[track_caller]
    pub fn new(dev: &Path, dir: &Path, opts: &[&str]) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let joined = opts.join(",");
        let mut args = Vec::new();
        if !opts.is_empty() {
            args.extend(["-o", joined.as_str()]);
        }
        args.extend([s(dev), s(dir)]);
        run("mount", &args);
        Mount { dir: dir.to_path_buf(), mounted: true }
    }

    /// Unmounts now, retrying for up to 5 s while the kernel still calls it busy (a writer
    /// thread's last close, say); panics if it cannot.
    #[track_caller]
    pub fn unmount(mut self) {
        if !retry("umount", &[self.dir.as_path()]) {
            run("umount", &[s(&self.dir)]); // once more, for the error message (Drop then detaches)
        }
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            unmount_or_detach(&self.dir);
        }
    }
}

/// An image file mounted at `.0` (a loop mount, or ntfs-3g's FUSE mount); unmounted on drop.
///
/// `.1`, for an ntfs-3g mount, is the image: ntfs-3g finishes writing and closes it a moment
/// *after* `umount` returns (a FUSE mount of a plain file is not `fuseblk`, so the kernel does not
/// wait for the daemon). Until then the image is incomplete and open for writing (and Rime
/// rightly refuses it as in use), so unmounting also waits until no process holds it.
pub struct Mounted(pub PathBuf, Option<PathBuf>);

impl Mounted {
    /// `mount -o loop[,opts] img dir`.
    #[track_caller]
    pub fn new(img: &Path, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let o = if opts.is_empty() { "loop".to_string() } else { format!("loop,{opts}") };
        run("mount", &["-o", &o, s(img), s(dir)]);
        Mounted(dir.to_path_buf(), None)
    }

    /// An ntfs-3g FUSE mount (the kernel here has no NTFS driver).
    #[track_caller]
    pub fn ntfs3g(img: &Path, dir: &Path, read_only: bool) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
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
        out.lines().nth(1).and_then(|l| l.trim().parse().ok()).expect("df prints the used bytes")
    }

    /// Unmounts now, retrying for up to 5 s while the kernel calls it busy (as [`Mount::unmount`]
    /// does), and waits for a FUSE daemon to close its image; panics if it cannot.
    #[track_caller]
    pub fn unmount(mut self) {
        if !retry("umount", &[self.0.as_path()]) {
            run("umount", &[s(&self.0)]); // once more, for the error message (Drop then detaches)
        }
        if let Some(image) = self.1.take() {
            assert!(wait_until_closed(&image), "{} is still open 10 s after umount", image.display());
        }
        self.0 = PathBuf::new();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.0.as_os_str().is_empty() {
            return;
        }
        if unmount_or_detach(&self.0) {
            if let Some(image) = &self.1 {
                wait_until_closed(image);
            }
        }
    }
}

/// Waits up to 10 s until no process has `file` open (read from `/proc/*/fd`); false on timeout.
pub fn wait_until_closed(file: &Path) -> bool {
    let Ok(file) = std::fs::canonicalize(file) else { return true };
    let open_anywhere = || {
        let Ok(procs) = std::fs::read_dir("/proc") else { return false };
        procs.flatten().any(|proc| {
            let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else { return false };
            fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == file))
        })
    };
    for _ in 0..200 {
        if !open_anywhere() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
