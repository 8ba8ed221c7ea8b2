//! Image explorer on XFS: `rime ls` and `rime extract` read files straight from the repository.
//! v5 images are made and filled through the kernel and compared with the kernel's own
//! read-only view of the same image; `xfs_db` confirms that the directory formats (short-form,
//! block, leaf, node, B-tree), bmbt files, unwritten extents and remote symlinks the tests claim
//! to cover are really on disk. The kernel no longer mounts v4 (`crc=0`) filesystems, so v4
//! images are built by `mkfs.xfs -p` from a prototype file and compared with the tree the
//! prototype was written from. Damaged images (garbage in a directory block, a bmbt block and
//! an inode, a directory entry pointing at an ancestor, a bmbt with a repeated pointer) are
//! reported per node, never a crash, and nothing lands outside `--to`.

use crate::common::*;
use crate::explorer_util::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directory address space offsets (bytes) of the leaf and free-index segments.
const LEAF_SEGMENT: u64 = 32 << 30;
const FREE_SEGMENT: u64 = 64 << 30;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn xfs_db(image: &Path, cmds: &[&str]) -> String {
    let mut args = vec!["-r"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(image));
    sh("xfs_db", &args)
}

fn xfs_db_write(image: &Path, cmds: &[&str]) -> String {
    let mut args = vec!["-x"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(image));
    sh("xfs_db", &args)
}

/// One field of the inode at `path` (`core.format`, `core.nextents`, ...), as printed.
fn inode_field(image: &Path, path: &str, name: &str) -> String {
    let out = xfs_db(image, &[&format!("path {path}"), &format!("print {name}")]);
    out.split_once(" = ").unwrap_or_else(|| panic!("xfs_db: {out}")).1.trim().to_string()
}

/// The data fork format number (1 local, 2 extents, 3 btree).
fn fork_format(image: &Path, path: &str) -> u32 {
    inode_field(image, path, "core.format").split(' ').next().unwrap().parse().unwrap()
}

/// The data fork mapping from `xfs_db bmap`: (file block, blocks, unwritten).
fn bmap(image: &Path, path: &str) -> Vec<(u64, u64, bool)> {
    let out = xfs_db(image, &[&format!("path {path}"), "bmap"]);
    out.lines()
        .filter(|l| l.starts_with("data offset"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = |k: &str| w[w.iter().position(|x| *x == k).unwrap() + 1].parse::<u64>().unwrap();
            (at("offset"), at("count"), at("flag") == 1)
        })
        .collect()
}

/// Which of the five directory formats XFS uses for the directory at `path`.
fn dir_format(image: &Path, path: &str) -> &'static str {
    let bs: u64 = xfs_db(image, &["sb 0", "print blocksize"]).split(" = ").nth(1).unwrap().trim().parse().unwrap();
    let (leaf, free) = (LEAF_SEGMENT / bs, FREE_SEGMENT / bs);
    match fork_format(image, path) {
        1 => "shortform",
        3 => "btree",
        2 => {
            let map = bmap(image, path);
            if map.iter().any(|e| e.0 >= free) {
                "node"
            } else if map.iter().any(|e| e.0 >= leaf) {
                "leaf"
            } else {
                "block"
            }
        }
        f => panic!("{path}: data fork format {f}"),
    }
}

/// Directories meant to reach every format: (name, entries, name length).
const DIRS: &[(&str, usize, usize)] =
    &[("shortform", 8, 6), ("block", 50, 8), ("leaf", 300, 12), ("node", 1000, 12), ("btree", 10000, 60)];

fn entry_name(i: usize, len: usize) -> String {
    let s = format!("e{i:05}-");
    format!("{s}{}", "n".repeat(len.saturating_sub(s.len())))
}

/// Fills `dirs/<format>` directories; every 97th entry has a little content, one is a directory.
fn make_dirs(root: &Path, dirs: &[(&str, usize, usize)]) {
    for (name, n, len) in dirs {
        let d = root.join("dirs").join(name);
        fs::create_dir_all(&d).unwrap();
        for i in 0..*n {
            let path = d.join(entry_name(i, *len));
            if i == 3 {
                fs::create_dir(&path).unwrap();
                fs::write(path.join("inside"), format!("inside {name}\n")).unwrap();
            } else if i % 97 == 0 {
                fs::write(&path, format!("entry {i} of {name}\n").repeat(i % 7 + 1)).unwrap();
            } else {
                fs::File::create(&path).unwrap();
            }
        }
    }
}

/// A file with every other 4 KiB block written (thousands of extents: a bmbt B-tree).
fn write_fragmented(path: &Path, blocks: u64) {
    let f = fs::File::create(path).unwrap();
    for b in (0..blocks).step_by(2) {
        f.write_all_at(&[(b % 251) as u8 + 1; 4096], b * 4096).unwrap();
    }
    f.sync_all().unwrap();
}

/// XFS-specific cases, made through the kernel: a bmbt file, preallocated (unwritten) extents,
/// preallocation past the end, a large sparse file, a remote symlink, device nodes, times past
/// 2038 and before 1970, and xattrs in every attribute fork layout.
fn add_xfs_cases(m: &Path) {
    let x = m.join("xfs");
    fs::create_dir_all(&x).unwrap();
    write_fragmented(&x.join("frag.bin"), 10240);
    write_fragmented(&x.join("frag-small.bin"), 1200);
    sh(
        "xfs_io",
        &[
            "-f",
            "-c",
            "falloc 0 4m",
            "-c",
            "pwrite -S 0x5a 1m 64k",
            "-c",
            "pwrite -S 0x6b 3m 4k",
            p(&x.join("prealloc.bin")),
        ],
    );
    sh("xfs_io", &["-f", "-c", "pwrite -S 0x11 0 8k", "-c", "falloc -k 8k 1m", p(&x.join("falloc-past-eof.bin"))]);
    let big = fs::File::create(x.join("big-sparse.bin")).unwrap();
    big.set_len(100 * MIB).unwrap();
    big.write_all_at(b"in the middle", 50 * MIB + 123).unwrap();
    drop(big);
    let long_target = format!("{}/end", "long/target".repeat(60));
    std::os::unix::fs::symlink(&long_target, x.join("remote-link")).unwrap();
    std::os::unix::fs::symlink("short", x.join("local-link")).unwrap();
    sh("mknod", &[p(&x.join("char-dev")), "c", "1", "3"]);
    sh("mknod", &[p(&x.join("block-dev")), "b", "7", "200"]);
    fs::write(x.join("future"), b"past 2038\n").unwrap();
    set_times(&x.join("future"), 5_000_000_000, 987_654_321);
    fs::write(x.join("past"), b"before 1970\n").unwrap();
    set_times(&x.join("past"), -1_000_000_000, 1);
    fs::set_permissions(x.join("past"), fs::Permissions::from_mode(0o2755)).unwrap();
    chown(&x.join("past"), 4000, 5000);
    // Xattrs: short-form, leaf (many), remote values.
    set_xattr(&m.join("docs/readme.txt"), "user.comment", b"read me on xfs");
    set_xattr(&m.join("docs/readme.txt"), "trusted.rime", b"trusted");
    set_xattr(&m.join("meta/private"), "security.rime", b"label");
    for i in 0..20 {
        set_xattr(
            &m.join("docs/deep"),
            &format!("user.attr-{i:02}"),
            format!("value {i}").repeat(i % 5 + 2).as_bytes(),
        );
    }
    // Too large for a leaf block entry: stored in its own (remote) block.
    set_xattr(&m.join("bin/odd-size.bin"), "user.big", &vec![b'r'; 3000]);
}

/// A 320 MiB XFS v5 image: `populate_tree`, the metadata cases, `dirs` and the XFS cases.
fn v5_image(env: &Env, name: &str, dirs: &[(&str, usize, usize)]) -> PathBuf {
    v5_image_with(env, name, dirs, &[])
}

/// [`v5_image`] made with extra `mkfs.xfs` options.
fn v5_image_with(env: &Env, name: &str, dirs: &[(&str, usize, usize)], mkfs_opts: &[&str]) -> PathBuf {
    let src = env.path(&format!("{name}-src"));
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 17, 3 * MIB);
    add_metadata_cases(&src);
    let image = env.path(&format!("{name}.img"));
    fs::File::create(&image).unwrap().set_len(320 * MIB).unwrap();
    let mut args = vec!["-q"];
    args.extend_from_slice(mkfs_opts);
    args.push(p(&image));
    sh("mkfs.xfs", &args);
    with_mounted(env, &image, name, |m| {
        sh("cp", &["-a", &format!("{}/.", src.display()), p(m)]);
        make_dirs(m, dirs);
        add_xfs_cases(m);
    });
    image
}

fn extract_all(env: &Env, snap: &str, volume: Option<&str>, to: &Path) -> Run {
    let mut args = vec!["extract", "--json", snap, "/", "--to", p(to)];
    if let Some(v) = volume {
        args.extend(["--volume", v]);
    }
    env.rime(&args)
}

#[test]
fn v5_tree_with_every_directory_format_extracts_like_the_kernel_reads_it() {
    let env = Env::new();
    let image = v5_image(&env, "vol", DIRS);

    // The image really holds what this test claims to cover.
    let version = xfs_db(&image, &["version"]);
    assert!(version.contains("CRC") && version.contains("FTYPE") && version.contains("BIGTIME"), "{version}");
    for (name, _, _) in DIRS {
        assert_eq!(dir_format(&image, &format!("/dirs/{name}")), *name, "format of /dirs/{name}");
    }
    assert_eq!(fork_format(&image, "/xfs/frag.bin"), 3, "frag.bin has a bmbt");
    assert_eq!(inode_field(&image, "/xfs/frag.bin", "u3.bmbt.level"), "2", "a two-level bmbt");
    assert_eq!(inode_field(&image, "/xfs/frag-small.bin", "u3.bmbt.level"), "1", "a one-level bmbt");
    assert!(bmap(&image, "/xfs/frag.bin").len() > 1000);
    assert!(bmap(&image, "/xfs/prealloc.bin").iter().any(|e| e.2), "prealloc.bin has unwritten extents");
    assert!(bmap(&image, "/xfs/falloc-past-eof.bin").iter().any(|e| e.0 >= 2), "preallocated past EOF");
    assert_eq!(fork_format(&image, "/xfs/remote-link"), 2, "the long symlink is remote");
    assert_eq!(fork_format(&image, "/xfs/local-link"), 1, "the short symlink is local");
    assert_eq!(inode_field(&image, "/docs/deep", "core.aformat").split(' ').next(), Some("2"), "leaf xattrs");
    assert_eq!(inode_field(&image, "/docs/readme.txt", "core.aformat").split(' ').next(), Some("1"));

    let snap = env.backup(&[p(&image)]);
    let out = env.path("out");
    let r = extract_all(&env, &snap, None, &out).ok().json();
    assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "{r}");
    assert!(r["hardlinks"].as_u64().unwrap() >= 2, "{r}");

    let (_lo, m) = loop_ro(&image, &env.path("ro"));
    assert_same_tree(&m.dir, &out, &Compare::all(), &[]);
    for (name, n, _) in DIRS {
        assert_eq!(fs::read_dir(out.join("dirs").join(name)).unwrap().count(), *n, "entries of {name}");
    }
    for dev in ["char-dev", "block-dev"] {
        let (a, b) =
            (fs::symlink_metadata(m.dir.join("xfs").join(dev)), fs::symlink_metadata(out.join("xfs").join(dev)));
        assert_eq!(a.unwrap().rdev(), b.unwrap().rdev(), "device number of {dev}");
    }
    // Unwritten extents and holes come out as holes.
    let alloc = |f: &str| fs::metadata(out.join("xfs").join(f)).unwrap().blocks() * 512;
    assert!(alloc("prealloc.bin") <= 128 * 1024, "prealloc.bin allocates {}", alloc("prealloc.bin"));
    assert!(alloc("big-sparse.bin") <= 64 * 1024, "big-sparse.bin allocates {}", alloc("big-sparse.bin"));
    assert!(alloc("frag.bin") <= 21 * MIB, "frag.bin allocates {}", alloc("frag.bin"));
    assert_eq!(fs::metadata(out.join("xfs/future")).unwrap().mtime(), 5_000_000_000);
    assert_eq!(fs::metadata(out.join("xfs/past")).unwrap().mtime(), -1_000_000_000);
    assert_eq!(xattrs(&out.join("bin/odd-size.bin")).get("user.big").map(|v| v.len()), Some(3000));
    assert_eq!(xattrs(&out.join("docs/deep")).len(), 20);
    m.unmount();
}

#[test]
fn small_blocks_large_directory_blocks_and_large_extent_counts_extract_like_the_kernel() {
    let env = Env::new();
    // 1 KiB blocks, 8 KiB directory blocks (a directory block spans 8 filesystem blocks and
    // may span extents), inodes with 64-bit extent counters.
    let dirs = [("shortform", 8, 6), ("block", 150, 8), ("leaf", 900, 12), ("node", 3000, 12), ("btree", 6000, 60)];
    let image = v5_image_with(&env, "small", &dirs, &["-b", "size=1024", "-n", "size=8192", "-i", "nrext64=1"]);
    let version = xfs_db(&image, &["version"]);
    assert!(version.contains("NREXT64"), "{version}");
    assert_eq!(xfs_db(&image, &["sb 0", "print dirblklog"]).trim(), "dirblklog = 3");
    let formats: BTreeSet<&str> =
        dirs.iter().map(|(name, _, _)| dir_format(&image, &format!("/dirs/{name}"))).collect();
    assert_eq!(formats, BTreeSet::from(["shortform", "block", "leaf", "node", "btree"]));
    assert_eq!(fork_format(&image, "/xfs/frag.bin"), 3);
    let snap = env.backup(&[p(&image)]);
    let out = env.path("out");
    let r = extract_all(&env, &snap, None, &out).ok().json();
    assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "{r}");
    let (_lo, m) = loop_ro(&image, &env.path("ro"));
    assert_same_tree(&m.dir, &out, &Compare::all(), &[]);
    m.unmount();
}

#[test]
fn ls_json_of_subdirectories_matches_the_kernel() {
    let env = Env::new();
    let image = v5_image(&env, "vol", &DIRS[..3]);
    with_mounted(&env, &image, "sock", |m| {
        let sock = std::os::unix::net::UnixListener::bind(m.join("xfs/socket")).unwrap();
        drop(sock);
    });
    let snap = env.backup(&[p(&image)]);
    let (_lo, m) = loop_ro(&image, &env.path("ro"));
    let root = env.rime(&["ls", "--json", &snap]).ok().json();
    assert_eq!(root["filesystem"], "xfs");
    for dir in ["/", "/dirs/leaf", "/dirs/block", "/meta", "/xfs", "/hard", "/empty-dir"] {
        let l: Value = env.rime(&["ls", "--json", &snap, dir]).ok().json();
        let entries = l["entries"].as_array().expect("entries");
        let kernel = m.dir.join(dir.trim_start_matches('/'));
        let expected: BTreeSet<String> =
            fs::read_dir(&kernel).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let got: BTreeSet<String> = entries.iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
        assert_eq!(got, expected, "names in {dir}");
        for e in entries {
            let name = e["name"].as_str().unwrap();
            let md = fs::symlink_metadata(kernel.join(name)).unwrap();
            use std::os::unix::fs::FileTypeExt;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_char_device() {
                "char-device"
            } else if ft.is_block_device() {
                "block-device"
            } else {
                "file"
            };
            assert_eq!(e["type"], kind, "type of {dir}/{name}");
            assert_eq!(e["inode"].as_u64(), Some(md.ino()), "inode of {dir}/{name}");
            assert_eq!(e["nlink"].as_u64(), Some(md.nlink()), "links of {dir}/{name}");
            assert_eq!(e["mode"].as_u64(), Some((md.mode() & 0o7777) as u64), "mode of {dir}/{name}");
            assert_eq!((e["uid"].as_u64(), e["gid"].as_u64()), (Some(md.uid() as u64), Some(md.gid() as u64)));
            assert_eq!((e["mtime"].as_i64(), e["mtime_nsec"].as_i64()), (Some(md.mtime()), Some(md.mtime_nsec())));
            if kind != "dir" {
                assert_eq!(e["size"].as_u64(), Some(md.size()), "size of {dir}/{name}");
            }
            if kind == "symlink" {
                let t = fs::read_link(kernel.join(name)).unwrap();
                assert_eq!(e["target"].as_str(), Some(t.to_str().unwrap()), "target of {dir}/{name}");
            }
        }
    }
    m.unmount();
}

/// Writes a prototype file for `mkfs.xfs -p` describing `src` (no hard links, names without
/// spaces), with uid/gid and modes taken from the tree.
fn write_proto(src: &Path, proto: &Path) {
    fn mode_str(md: &fs::Metadata, t: char) -> String {
        let m = md.mode();
        format!(
            "{t}{}{}{:03o}",
            if m & 0o4000 != 0 { 'u' } else { '-' },
            if m & 0o2000 != 0 { 'g' } else { '-' },
            m & 0o777
        )
    }
    fn dir(path: &Path, depth: usize, out: &mut String) {
        let mut names: Vec<_> = fs::read_dir(path).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for n in names {
            let child = path.join(&n);
            let name = n.to_str().unwrap();
            let md = fs::symlink_metadata(&child).unwrap();
            let ind = " ".repeat(depth);
            use std::os::unix::fs::FileTypeExt;
            let ft = md.file_type();
            let (uid, gid) = (md.uid(), md.gid());
            if ft.is_dir() {
                out.push_str(&format!("{ind}{name} {} {uid} {gid}\n", mode_str(&md, 'd')));
                dir(&child, depth + 1, out);
                out.push_str(&format!("{ind}$\n"));
            } else if ft.is_symlink() {
                let t = fs::read_link(&child).unwrap();
                out.push_str(&format!("{ind}{name} {} {uid} {gid} {}\n", mode_str(&md, 'l'), t.display()));
            } else if ft.is_fifo() {
                out.push_str(&format!("{ind}{name} {} {uid} {gid}\n", mode_str(&md, 'p')));
            } else if ft.is_char_device() || ft.is_block_device() {
                let t = if ft.is_char_device() { 'c' } else { 'b' };
                let (maj, min) = (libc::major(md.rdev()), libc::minor(md.rdev()));
                out.push_str(&format!("{ind}{name} {} {uid} {gid} {maj} {min}\n", mode_str(&md, t)));
            } else {
                out.push_str(&format!("{ind}{name} {} {uid} {gid} {}\n", mode_str(&md, '-'), child.display()));
            }
        }
    }
    let mut s = String::from("/dev/null\n0 0\nd--755 0 0\n");
    dir(src, 1, &mut s);
    s.push_str("$\n");
    fs::write(proto, s).unwrap();
}

/// A source tree for v4 images: names a prototype file can carry (no spaces, no hard links).
fn v4_source(dir: &Path) {
    let mut rng = Rng::new(5);
    fs::create_dir_all(dir.join("docs/deep")).unwrap();
    fs::write(dir.join("docs/readme.txt"), rng.text(40_000)).unwrap();
    fs::write(dir.join("docs/deep/bottom.txt"), rng.text(200_000)).unwrap();
    write_random_file(&dir.join("random.bin"), 9, 5 * MIB + 77);
    fs::write(dir.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("docs/readme.txt", dir.join("local-link")).unwrap();
    std::os::unix::fs::symlink(format!("{}/end", "long/target".repeat(40)), dir.join("remote-link")).unwrap();
    mkfifo(&dir.join("fifo"));
    fs::write(dir.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(dir.join("setuid"), fs::Permissions::from_mode(0o4751)).unwrap();
    fs::write(dir.join("owned"), b"owned\n").unwrap();
    chown(&dir.join("owned"), 1234, 5678);
    sh("mknod", &[p(&dir.join("char-dev")), "c", "1", "3"]);
    make_dirs(dir, DIRS);
}

#[test]
fn v4_images_with_and_without_ftype_extract_exactly() {
    let env = Env::new();
    let src = env.path("src");
    v4_source(&src);
    let proto = env.path("proto");
    write_proto(&src, &proto);
    let mut images = Vec::new();
    for (ftype, isize) in [("0", "512"), ("1", "512")] {
        let image = env.path(&format!("v4-ftype{ftype}.img"));
        fs::File::create(&image).unwrap().set_len(320 * MIB).unwrap();
        sh(
            "mkfs.xfs",
            &[
                "-q",
                "-m",
                "crc=0",
                "-n",
                &format!("ftype={ftype}"),
                "-i",
                &format!("size={isize}"),
                "-p",
                p(&proto),
                p(&image),
            ],
        );
        let version = xfs_db(&image, &["version"]);
        assert!(!version.contains("CRC"), "{version}");
        assert_eq!(version.contains("FTYPE"), ftype == "1", "{version}");
        // Which directory ends up in which format depends on the inode size and how mkfs lays
        // the prototype out; all five formats must be there.
        let formats: BTreeSet<&str> =
            DIRS.iter().map(|(name, _, _)| dir_format(&image, &format!("/dirs/{name}"))).collect();
        assert_eq!(formats, BTreeSet::from(["shortform", "block", "leaf", "node", "btree"]), "ftype={ftype}");
        assert_eq!(fork_format(&image, "/remote-link"), 2);
        assert_eq!(fork_format(&image, "/local-link"), 1);
        images.push(image);
    }
    let snap = env.backup(&images.iter().map(|i| p(i)).collect::<Vec<_>>());
    for image in &images {
        let name = image.file_name().unwrap().to_str().unwrap();
        let out = env.path(&format!("out-{name}"));
        let r = extract_all(&env, &snap, Some(name), &out).ok().json();
        assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{name}: {r}");
        // mkfs -p stamps its own times and writes no holes or xattrs.
        let how = Compare { dir_times: false, xattrs: false, owners: true, holes: false, modes: true, times: false };
        assert_same_tree(&src, &out, &how, &[]);
        assert_eq!(
            fs::symlink_metadata(out.join("char-dev")).unwrap().rdev(),
            fs::symlink_metadata(src.join("char-dev")).unwrap().rdev()
        );
    }
}

/// The inode number of `path`.
fn ino_of(image: &Path, path: &str) -> u64 {
    let out = xfs_db(image, &[&format!("path {path}"), "stack"]);
    let line = out.lines().find_map(|l| l.trim().strip_prefix("inode ")).unwrap_or_else(|| panic!("{out}"));
    line.split(',').next().unwrap().trim().parse().unwrap()
}

/// The disk address (512-byte units) of what the xfs_db commands select.
fn daddr(image: &Path, cmds: &[&str]) -> u64 {
    let mut all: Vec<&str> = cmds.to_vec();
    all.push("stack");
    let out = xfs_db(image, &all);
    let line =
        out.lines().find_map(|l| l.trim_start().strip_prefix("buffer block ")).unwrap_or_else(|| panic!("{out}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

fn garbage_at(image: &Path, byte: u64, len: usize) {
    let f = fs::OpenOptions::new().write(true).open(image).unwrap();
    let mut rng = Rng::new(byte);
    f.write_all_at(&rng.bytes(len), byte).unwrap();
}

#[test]
fn damaged_xfs_structures_are_errors_for_their_nodes_never_crashes() {
    let env = Env::new();
    let small = [("block", 50, 8), ("leaf", 300, 12), ("shortform", 8, 6)];
    let base = v5_image(&env, "base", &small);
    let copy = |name: &str| {
        let img = env.path(name);
        sh("cp", &["--sparse=always", p(&base), p(&img)]);
        img
    };
    // 1. Garbage over the block directory's only block.
    let dirblock = copy("dirblock.img");
    garbage_at(&dirblock, daddr(&dirblock, &["path /dirs/block", "dblock 0"]) * 512, 4096);
    // 2. Garbage over a bmbt leaf of the fragmented file.
    let bmbt = copy("bmbt.img");
    assert_eq!(inode_field(&bmbt, "/xfs/frag-small.bin", "u3.bmbt.level"), "1");
    assert!(inode_field(&bmbt, "/xfs/frag-small.bin", "u3.bmbt.numrecs").parse::<u32>().unwrap() >= 2);
    let root_ptr = inode_field(&bmbt, "/xfs/frag-small.bin", "u3.bmbt.ptrs[1]");
    garbage_at(&bmbt, daddr(&bmbt, &[&format!("fsblock {root_ptr}")]) * 512, 4096);
    // 3. Garbage over a file's inode.
    let inode = copy("inode.img");
    let ino = ino_of(&inode, "/docs/readme.txt");
    let byte = xfs_db(&inode, &[&format!("convert ino {ino} byte")]);
    let byte = byte.split_whitespace().nth(1).unwrap().trim_matches(|c| c == '(' || c == ')').parse::<u64>().unwrap();
    garbage_at(&inode, byte, 512);
    // 4. A short-form entry pointing at the root: a directory loop (CRC kept valid by xfs_db).
    let looped = copy("loop.img");
    let root = xfs_db(&looped, &["sb 0", "print rootino"]).split(" = ").nth(1).unwrap().trim().to_string();
    let sf = xfs_db(&looped, &["path /dirs/shortform", "print u3.sfdir3.list[3].name"]);
    assert!(sf.contains(&entry_name(3, 6)), "entry 3 is the subdirectory: {sf}");
    xfs_db_write(&looped, &["path /dirs/shortform", &format!("write u3.sfdir3.list[3].inumber.i4 {root}")]);
    // 5. A bmbt root whose second pointer repeats the first (blocks shared: a loop).
    let shared = copy("shared.img");
    xfs_db_write(&shared, &["path /xfs/frag-small.bin", &format!("write u3.bmbt.ptrs[2] {root_ptr}")]);

    let cases = [
        ("dirblock.img", "/dirs/block"),
        ("bmbt.img", "/xfs/frag-small.bin"),
        ("inode.img", "/docs/readme.txt"),
        ("loop.img", "/dirs/shortform/"),
        ("shared.img", "/xfs/frag-small.bin"),
    ];
    let images: Vec<PathBuf> = cases.iter().map(|(n, _)| env.path(n)).collect();
    let snap = env.backup(&images.iter().map(|i| p(i)).collect::<Vec<_>>());
    let before: BTreeSet<PathBuf> = fs::read_dir(env.dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    for (name, bad) in cases {
        let out = env.path(&format!("out-{name}"));
        let run = extract_all(&env, &snap, Some(name), &out);
        assert!(!run.stderr.contains("panicked"), "{name}: {}", run.stderr);
        assert_eq!(run.code, Some(2), "{name}: damage is reported and the rest extracted: {run:?}");
        let v = run.json();
        let skipped = v["skipped"].as_array().unwrap();
        assert!(
            skipped.iter().any(|s| s["path"].as_str().unwrap().starts_with(bad.trim_end_matches('/'))),
            "{name}: {bad} should be skipped: {skipped:?}"
        );
        assert!(run.stderr.contains("skipped"), "{name}: {}", run.stderr);
        // Everything else came out.
        assert!(out.join("hard/a").exists() || name == "inode.img", "{name}");
        assert!(out.join("bin/odd-size.bin").exists(), "{name}");
        // Listing the damaged node fails with one clear line, no panic.
        if name != "loop.img" {
            let l = env.rime(&["ls", &snap, bad, "--volume", name]);
            assert!(!l.stderr.contains("panicked"), "{name}: {}", l.stderr);
        }
    }
    let reasons = |name: &str| extract_all(&env, &snap, Some(name), &env.path(&format!("again-{name}"))).stdout;
    let r = reasons("dirblock.img");
    assert!(r.contains("/dirs/block") && r.contains("directory block 0: bad magic"), "{r}");
    let r = reasons("bmbt.img");
    assert!(r.contains("/xfs/frag-small.bin") && r.contains("bmbt block") && r.contains("bad magic"), "{r}");
    let r = reasons("inode.img");
    assert!(r.contains("/docs/readme.txt") && r.contains("bad inode magic"), "{r}");
    assert!(reasons("loop.img").contains("loop"), "the looping directory is named as such");
    assert!(reasons("shared.img").contains("reached twice"), "the shared bmbt block is named as such");
    // Nothing written outside the --to directories.
    let after: BTreeSet<PathBuf> = fs::read_dir(env.dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    let new: Vec<&PathBuf> = after.difference(&before).collect();
    assert!(
        new.iter().all(|p| p.file_name().unwrap().to_str().unwrap().starts_with("out-")
            || p.file_name().unwrap().to_str().unwrap().starts_with("again-")),
        "{new:?}"
    );
}

#[test]
fn a_dirty_log_is_refused_with_a_clear_error() {
    let env = Env::new();
    let image = env.path("dirty.img");
    fs::File::create(&image).unwrap().set_len(320 * MIB).unwrap();
    sh("mkfs.xfs", &["-q", p(&image)]);
    // Freeze-less crash copy: write, sync the data, and copy the image while still mounted.
    let crash = env.path("crash.img");
    with_mounted(&env, &image, "dirty", |m| {
        fs::write(m.join("fresh"), b"just written\n").unwrap();
        sh("sync", &[]);
        sh("xfs_io", &["-x", "-c", "shutdown -f", p(m)]);
        sh("cp", &["--sparse=always", p(&image), p(&crash)]);
    });
    let snap = env.backup(&[p(&crash)]);
    let e = env.rime(&["ls", &snap, "/"]).fails();
    assert!(e.contains("log") && e.contains("replay"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}
