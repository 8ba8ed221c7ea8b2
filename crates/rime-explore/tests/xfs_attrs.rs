//! The XFS reader against the kernel, on what the extract tests cannot carry through an ext4
//! scratch directory: attribute forks in every layout (short-form, one leaf, a node with many
//! leaves, remote values spanning blocks, `trusted.*` and `security.*`) and creation times. A
//! v5 image is filled through the kernel, the reader opens the image file directly, and every
//! answer is compared with what the kernel reports for the same files. Needs root and xfsprogs;
//! skipped (with a message) otherwise.

use rime_explore::xfs::XfsTree;
use rime_explore::{resolve, FileTree};
use rime_volume::Region;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn must(program: &str, args: &[&str]) -> String {
    let o = Command::new(program).args(args).output().unwrap();
    assert!(o.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn set(path: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and value buffer.
    let r = unsafe { libc::lsetxattr(c(path).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
}

/// The kernel's xattrs of `path`.
fn kernel_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let p = c(path);
    let mut names = vec![0u8; 1 << 20];
    // SAFETY: valid buffer.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0);
    let mut out = BTreeMap::new();
    for name in names[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 1 << 17];
        // SAFETY: valid buffer.
        let m = unsafe { libc::lgetxattr(p.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        assert!(m >= 0);
        val.truncate(m as usize);
        out.insert(name.to_vec(), val);
    }
    out
}

/// Birth time (sec, nsec) from statx.
fn btime(path: &Path) -> (i64, u32) {
    // SAFETY: zeroed statx is a valid output buffer.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer.
    let r =
        unsafe { libc::statx(libc::AT_FDCWD, c(path).as_ptr(), libc::AT_SYMLINK_NOFOLLOW, libc::STATX_BTIME, &mut st) };
    assert_eq!(r, 0);
    assert!(st.stx_mask & libc::STATX_BTIME != 0, "no birth time from the kernel");
    (st.stx_btime.tv_sec, st.stx_btime.tv_nsec)
}

#[test]
fn xattrs_in_every_fork_layout_and_birth_times_match_the_kernel() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("mkfs.xfs").arg("-V").output().is_err() {
        eprintln!("skipped: needs root and mkfs.xfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("v5.img");
    File::create(&image).unwrap().set_len(320 << 20).unwrap();
    must("mkfs.xfs", &["-q", image.to_str().unwrap()]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    must("mount", &["-o", "loop", image.to_str().unwrap(), mnt.to_str().unwrap()]);
    let names = ["short", "leaf", "node", "remote", "dir", "link"];
    for n in &names[..4] {
        std::fs::write(mnt.join(n), n.as_bytes()).unwrap();
    }
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::os::unix::fs::symlink("short", mnt.join("link")).unwrap();
    set(&mnt.join("short"), "user.a", b"1");
    set(&mnt.join("short"), "trusted.t", b"trusted value");
    set(&mnt.join("short"), "security.s", b"label");
    set(&mnt.join("short"), "user.empty", b"");
    for i in 0..30 {
        set(&mnt.join("leaf"), &format!("user.leaf-{i}"), format!("{i}").repeat(i + 1).as_bytes());
    }
    for i in 0..600 {
        set(
            &mnt.join("node"),
            &format!("user.node-attribute-{i:04}"),
            format!("value {i} ").repeat(i % 9 + 1).as_bytes(),
        );
    }
    set(&mnt.join("node"), "user.node-remote", &vec![b'n'; 10_000]);
    set(&mnt.join("remote"), "user.r1", &vec![b'x'; 3000]);
    set(&mnt.join("remote"), "user.r2", &(0..65536u32).map(|i| (i % 253) as u8).collect::<Vec<_>>());
    set(&mnt.join("dir"), "user.on-dir", b"directory attribute");
    set(&mnt.join("link"), "trusted.on-link", b"symlink attribute");
    let expected: Vec<_> = names.iter().map(|n| (kernel_xattrs(&mnt.join(n)), btime(&mnt.join(n)))).collect();
    must("umount", &[mnt.to_str().unwrap()]);
    let aformat = |n: &str| {
        let out =
            must("xfs_db", &["-r", "-c", &format!("path /{n}"), "-c", "print core.aformat", image.to_str().unwrap()]);
        out.split(" = ").nth(1).unwrap().trim().split(' ').next().unwrap().to_string()
    };
    assert_eq!(aformat("short"), "1", "short-form attribute fork");
    assert_eq!(aformat("leaf"), "2");
    let node_block0 = must(
        "xfs_db",
        &["-r", "-c", "path /node", "-c", "ablock 0", "-c", "print hdr.info.hdr.magic", image.to_str().unwrap()],
    );
    assert!(node_block0.contains("0x3ebe"), "the attribute fork of /node starts with a node: {node_block0}");

    let len = File::open(&image).unwrap().metadata().unwrap().len();
    let region = Region::from_source(Arc::new(File::open(&image).unwrap()), &image, len);
    let fs = XfsTree::open(region).unwrap().expect("XFS");
    for (n, (xattrs, birth)) in names.iter().zip(&expected) {
        let id = resolve(&fs, n).unwrap().unwrap();
        let got: BTreeMap<Vec<u8>, Vec<u8>> = fs.xattrs(id).unwrap().into_iter().map(|x| (x.name, x.value)).collect();
        assert_eq!(got.keys().collect::<Vec<_>>(), xattrs.keys().collect::<Vec<_>>(), "xattr names of {n}");
        assert!(&got == xattrs, "xattr values of {n}");
        let st = fs.stat(id).unwrap();
        let cr = st.crtime.expect("v5 inodes have a creation time");
        assert_eq!((cr.sec, cr.nsec), *birth, "creation time of {n}");
    }
}
