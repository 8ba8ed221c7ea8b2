//! Image explorer on btrfs: `rime ls` and `rime extract` read files straight from the
//! repository. The image is written by the kernel (zstd, LZO and zlib compression, subvolumes,
//! a snapshot, reflinks, holes, preallocated ranges, inline files, hard links, symlinks, a fifo,
//! a device node, owners, modes, nanosecond times, xattrs), and the reference is the kernel's
//! own read-only loop mount of the same image.

use crate::common::*;
use crate::explorer_util::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn remount(dir: &Path, opts: &str) {
    sh("mount", &["-o", &format!("remount,{opts}"), dir.to_str().unwrap()]);
}

/// Text that compresses well, different for every seed.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    rng.text(len).into_bytes()
}

/// Writes a compressible tree of `files` files (small ones inline, larger ones in extents)
/// under `dir`.
fn compressible_tree(dir: &Path, seed: u64, files: usize) {
    let mut rng = Rng::new(seed);
    for i in 0..files {
        let sub = dir.join(format!("d{:02}", i % 16));
        fs::create_dir_all(&sub).unwrap();
        let len = match i % 5 {
            0 => 40 + i % 300,     // inline
            1 => 1500 + i % 500,   // inline (compressed) or a small extent
            2 => 9_000 + i * 7,    // one compressed extent
            3 => 300_000 + i * 13, // several 128 KiB compressed extents
            _ => 4096,             // exactly one sector
        };
        fs::write(sub.join(format!("f{i:04}.txt")), text(&mut rng, len)).unwrap();
    }
}

/// The kernel-written btrfs image described at the top; returns it unmounted.
fn rich_btrfs(env: &Env) -> PathBuf {
    let image = env.path("btrfs.img");
    fs::File::create(&image).unwrap().set_len(768 * MIB).unwrap();
    sh("mkfs.btrfs", &["-q", "-f", image.to_str().unwrap()]);
    let lo = LoopDev::attach(&image);
    let m = Mount::new(&lo.dev, &env.path("mnt"), &["compress=zstd"]);
    let d = m.dir.clone();
    let p = |s: &str| d.join(s);
    let ps = |s: &str| d.join(s).to_str().unwrap().to_string();

    // zstd: the common tree, thousands of files, a large compressible file.
    populate_tree(&d, 17, 3 * MIB);
    add_metadata_cases(&d);
    compressible_tree(&p("many"), 1, 2400);
    let mut rng = Rng::new(99);
    fs::write(p("big-text.txt"), text(&mut rng, 5 << 20)).unwrap();
    // Incompressible data (stored uncompressed), reflinked, then partly overwritten so the
    // copies reference ranges inside larger disk extents.
    write_random_file(&p("random.bin"), 5, 20 * MIB);
    sh("cp", &["--reflink=always", &ps("random.bin"), &ps("random-reflink.bin")]);
    sh("cp", &["--reflink=always", &ps("big-text.txt"), &ps("text-reflink.txt")]);
    sh("sync", &[]);
    let f = fs::OpenOptions::new().write(true).open(p("random-reflink.bin")).unwrap();
    f.write_all_at(&[0x5A; 8192], 7 * MIB + 1234).unwrap();
    drop(f);
    let f = fs::OpenOptions::new().write(true).open(p("text-reflink.txt")).unwrap();
    f.write_all_at(b"overwritten in the middle of a compressed extent", (1 << 20) + 70_000).unwrap();
    drop(f);
    // Preallocated ranges: a whole file, one between data, one past the end of file.
    sh("fallocate", &["-l", "3M", &ps("prealloc-all")]);
    fs::write(p("prealloc-mid"), text(&mut rng, 1 << 20)).unwrap();
    sh("fallocate", &["-o", "1M", "-l", "2M", &ps("prealloc-mid")]);
    let f = fs::OpenOptions::new().write(true).open(p("prealloc-mid")).unwrap();
    f.write_all_at(&text(&mut rng, 100_000), 3 << 20).unwrap();
    drop(f);
    fs::write(p("prealloc-tail"), b"short file with room reserved after it\n").unwrap();
    sh("fallocate", &["-n", "-o", "0", "-l", "4M", &ps("prealloc-tail")]);
    // A hole at the start, data at the end, of a sparse file larger than its data.
    let f = fs::File::create(p("hole-first")).unwrap();
    f.write_all_at(b"after a 50 MiB hole", 50 * MIB).unwrap();
    drop(f);
    sh("mknod", &[&ps("meta/char-dev"), "c", "1", "3"]);
    set_xattr(&p("docs/readme.txt"), "user.comment", b"btrfs xattr");
    set_xattr(&p("docs/readme.txt"), "user.big", &vec![b'y'; 3000]);
    set_xattr(&p("docs"), "user.on-dir", b"dir");
    set_times(&p("big-text.txt"), 1_600_000_000, 987_654_321);

    // Subvolumes: one with files, a snapshot of it (then the original changes), a nested one
    // created after the snapshot, and one inside a plain directory.
    sh("btrfs", &["-q", "subvolume", "create", &ps("sub")]);
    compressible_tree(&p("sub/tree"), 2, 300);
    fs::write(p("sub/changes"), b"before the snapshot\n").unwrap();
    fs::hard_link(p("sub/changes"), p("sub/changes-link")).unwrap();
    sh("btrfs", &["-q", "subvolume", "snapshot", &ps("sub"), &ps("snap")]);
    sh("btrfs", &["-q", "subvolume", "snapshot", "-r", &ps("sub"), &ps("snap-ro")]);
    fs::write(p("sub/changes"), b"after the snapshot, longer than before\n").unwrap();
    fs::remove_file(p("sub/tree/d00/f0000.txt")).unwrap();
    sh("btrfs", &["-q", "subvolume", "create", &ps("sub/inner")]);
    fs::write(p("sub/inner/deep.txt"), text(&mut rng, 50_000)).unwrap();
    fs::create_dir_all(p("plain/dir")).unwrap();
    sh("btrfs", &["-q", "subvolume", "create", &ps("plain/dir/sv")]);
    fs::write(p("plain/dir/sv/in-sv"), b"in a subvolume under a plain directory\n").unwrap();
    chown(&p("plain/dir/sv"), 1000, 1000);

    // LZO, then zlib: the same kind of tree under each.
    remount(&d, "compress=lzo");
    compressible_tree(&p("lzo"), 3, 400);
    fs::write(p("lzo/big.txt"), text(&mut rng, 3 << 20)).unwrap();
    remount(&d, "compress=zlib");
    compressible_tree(&p("zlib"), 4, 400);
    fs::write(p("zlib/big.txt"), text(&mut rng, 3 << 20)).unwrap();
    sh("sync", &[]);
    m.unmount();
    drop(lo);
    image
}

/// Every compression type appears in both an inline and a regular extent of the image.
fn assert_all_compressions_present(image: &Path) {
    let dump = sh("btrfs", &["inspect-internal", "dump-tree", image.to_str().unwrap()]);
    for (n, name) in [(1, "zlib"), (2, "lzo"), (3, "zstd")] {
        assert!(
            dump.lines().any(|l| l.contains("inline extent data size") && l.contains(&format!("compression {n} "))),
            "no inline {name} extent in the image"
        );
        assert!(dump.contains(&format!("extent compression {n} ({name})")), "no regular {name} extent in the image");
    }
    // Preallocated and reflinked (offset inside a larger extent) extents too.
    assert!(dump.contains("(prealloc)"), "no preallocated extent");
    assert!(
        dump.lines().any(|l| l.trim_start().starts_with("extent data offset ") && !l.contains("offset 0 ")),
        "no extent referencing the middle of a disk extent"
    );
}

#[test]
fn kernel_written_btrfs_extracts_exactly_as_the_kernel_reads_it() {
    let env = Env::new();
    let image = rich_btrfs(&env);
    assert_all_compressions_present(&image);
    let snap = env.backup(&[image.to_str().unwrap()]);
    let out = env.path("out");
    let r = env.rime(&["extract", "--json", &snap, "/", "--to", out.to_str().unwrap()]).ok().json();
    assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "{r}");
    assert!(r["files"].as_u64().unwrap() > 3000, "{r}");

    let (lo, m) = loop_ro(&image, &env.path("ro"));
    assert_same_tree(&m.dir, &out, &Compare::all(), &[]);
    // Subvolumes are directories at their paths; the snapshot kept what the original had then.
    for dir in ["sub", "snap", "snap-ro", "sub/inner", "plain/dir/sv"] {
        assert!(out.join(dir).is_dir(), "{dir}");
    }
    assert_eq!(fs::read(out.join("snap/changes")).unwrap(), b"before the snapshot\n");
    assert!(out.join("snap/tree/d00/f0000.txt").exists() && !out.join("sub/tree/d00/f0000.txt").exists());
    // Holes and preallocated ranges are not written: the copies stay sparse.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(out.join("prealloc-all")).unwrap().blocks(), 0);
    assert!(fs::metadata(out.join("hole-first")).unwrap().blocks() * 512 <= 64 * 1024);
    assert!(fs::metadata(out.join("prealloc-mid")).unwrap().blocks() * 512 < (2 << 20));
    m.unmount();
    drop(lo);
}

#[test]
fn ls_of_directories_and_subvolumes_matches_the_kernel() {
    let env = Env::new();
    let image = rich_btrfs(&env);
    let snap = env.backup(&[image.to_str().unwrap()]);
    let (lo, m) = loop_ro(&image, &env.path("ro"));
    let root = ls_json(&env, &[&snap]);
    assert_eq!(root["filesystem"], "btrfs");
    assert_eq!(root["directory"], true);
    assert_listing_matches(&root, &m.dir);
    for dir in [
        "docs",
        "meta",
        "hard",
        "many/d03",
        "lzo/d01",
        "zlib/d15",
        "sub",
        "sub/tree/d00",
        "snap",
        "snap-ro/tree/d00",
        "sub/inner",
        "plain/dir",
        "plain/dir/sv",
    ] {
        let l = ls_json(&env, &[&snap, &format!("/{dir}")]);
        assert_listing_matches(&l, &m.dir.join(dir));
    }
    // Hard links share a node; a snapshot's copy of an inode is another node.
    let sub = ls_json(&env, &[&snap, "/sub"]);
    let snapped = ls_json(&env, &[&snap, "/snap"]);
    let inode = |l: &Value, name: &str| {
        l["entries"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap()["inode"].as_u64().unwrap()
    };
    assert_eq!(inode(&sub, "changes"), inode(&sub, "changes-link"));
    assert_ne!(inode(&sub, "changes-link"), inode(&snapped, "changes-link"));
    m.unmount();
    drop(lo);
}

/// Every leaf of the top-level subvolume's tree, per `btrfs inspect-internal dump-tree`: its
/// logical address and the lowest and highest objectid keyed in it.
fn fs_tree_leaves(image: &Path) -> Vec<(u64, u64, u64)> {
    let dump = sh("btrfs", &["inspect-internal", "dump-tree", "-t", "5", image.to_str().unwrap()]);
    let mut leaves: Vec<(u64, u64, u64)> = Vec::new();
    let mut in_leaf = false;
    for l in dump.lines() {
        // "leaf N items ..." opens a leaf; "leaf N flags ..." follows it.
        if let Some(rest) = l.strip_prefix("leaf ").filter(|r| r.contains(" items ")) {
            in_leaf = true;
            leaves.push((rest.split(' ').next().unwrap().parse().unwrap(), u64::MAX, 0));
        } else if l.starts_with("node ") && l.contains(" items ") {
            in_leaf = false;
        } else if let (true, Some(key)) = (in_leaf, l.split(" key (").nth(1)) {
            let id: u64 = key.split(' ').next().unwrap().parse().unwrap();
            let last = leaves.last_mut().unwrap();
            (last.1, last.2) = (last.1.min(id), last.2.max(id));
        }
    }
    assert!(leaves.len() > 1, "the fs tree should have several leaves:\n{}", &dump[..dump.len().min(2000)]);
    leaves
}

/// Each regular file under `root` (relative path) with the inode numbers of the root, every
/// directory on its way and the file itself.
fn files_with_inode_paths(root: &Path) -> Vec<(PathBuf, Vec<u64>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![(PathBuf::new(), vec![fs::metadata(root).unwrap().ino()])];
    while let Some((rel, inos)) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(root.join(&rel)).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let meta = e.metadata().unwrap();
            let (path, mut chain) = (rel.join(e.file_name()), inos.clone());
            chain.push(meta.ino());
            if meta.is_dir() {
                stack.push((path, chain));
            } else if meta.is_file() {
                out.push((path, chain));
            }
        }
    }
    out
}

/// Physical offsets of every copy of the tree block at `logical`.
fn mirrors(image: &Path, logical: u64) -> Vec<u64> {
    let out = sh("btrfs-map-logical", &["-l", &logical.to_string(), image.to_str().unwrap()]);
    let phys: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split(" physical ").nth(1))
        .map(|r| r.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(!phys.is_empty(), "{out}");
    phys
}

#[test]
fn damaged_btrfs_trees_give_clear_errors_never_panics_and_stay_inside_the_target() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 23, MIB);
    compressible_tree(&src.join("many"), 5, 600);
    let image = env.path("b.img");
    fs::File::create(&image).unwrap().set_len(256 * MIB).unwrap();
    sh("mkfs.btrfs", &["-q", "--rootdir", src.to_str().unwrap(), image.to_str().unwrap()]);
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();

    // Every regular file with the inode numbers of its path, as the kernel sees them.
    let files = {
        let (lo, m) = loop_ro(&image, &env.path("ro"));
        let files = files_with_inode_paths(&m.dir);
        m.unmount();
        drop(lo);
        files
    };
    // The leaf to damage: one holding files of many/ but none of the root directory's items,
    // and a file none of whose path's items can lie in it, which must still extract. Which
    // inodes share a leaf depends on the order mkfs read the source directories in, so both
    // are chosen from the tree as it came out.
    let leaves = fs_tree_leaves(&image);
    let (leaf, intact) = leaves
        .iter()
        .filter(|(_, first, _)| *first > 256)
        .filter(|(_, first, last)| {
            files.iter().any(|(p, inos)| p.starts_with("many") && (*first..=*last).contains(inos.last().unwrap()))
        })
        .find_map(|&(leaf, first, last)| {
            let outside = files.iter().find(|(_, inos)| inos.iter().all(|i| !(first..=last).contains(i)))?;
            Some((leaf, outside.0.clone()))
        })
        .unwrap_or_else(|| panic!("no leaf of many/ files without the root's items and a file outside it: {leaves:?}"));
    let clean = fs::read(&image).unwrap();

    type Damage = fn(&mut [u8]);
    let cases: [(&str, Damage); 2] = [
        ("garbage", |b| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i as u8).wrapping_mul(31) ^ 0xA5;
            }
        }),
        ("one byte", |b| b[2000] ^= 0x40),
    ];
    for (what, damage) in cases {
        let mut img = clean.clone();
        for phys in mirrors(&image, leaf) {
            let p = phys as usize;
            damage(&mut img[p..p + 16384]);
        }
        let damaged = env.path(&format!("damaged-{}.img", what.replace(' ', "-")));
        fs::write(&damaged, &img).unwrap();
        let snap = env.backup(&[damaged.to_str().unwrap()]);
        let to = env.path(&format!("to-{}", what.replace(' ', "-")));
        let run = env.rime(&["extract", &snap, "/", "--to", to.to_str().unwrap()]);
        assert!(matches!(run.code, Some(1) | Some(2)), "{what}: {run:?}");
        assert!(run.stderr.contains(&format!("tree block {leaf} has a bad checksum")), "{what}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{what}: {}", run.stderr);
        // Everything else was extracted, and nothing outside the target was touched.
        assert_eq!(fs::read(to.join(&intact)).unwrap(), fs::read(src.join(&intact)).unwrap(), "{what}: {intact:?}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // `ls` of the damaged directory says the same in one line.
        let ls = env.rime(&["ls", &snap, "/many/d07"]);
        if ls.code != Some(0) {
            assert!(ls.stderr.contains("bad checksum") && !ls.stderr.contains("panicked"), "{}", ls.stderr);
        }
    }
    // A damaged root tree: the filesystem cannot be opened, and says why.
    let mut img = clean.clone();
    let dump = sh("btrfs", &["inspect-internal", "dump-super", image.to_str().unwrap()]);
    let root: u64 = dump.lines().find_map(|l| l.strip_prefix("root\t\t\t")).unwrap().trim().parse().unwrap();
    for phys in mirrors(&image, root) {
        img[phys as usize + 3000] ^= 1;
    }
    let damaged = env.path("damaged-root.img");
    fs::write(&damaged, &img).unwrap();
    let snap = env.backup(&[damaged.to_str().unwrap()]);
    let run = env.rime(&["extract", &snap, "/", "--to", env.path("to-root").to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(&format!("tree block {root} has a bad checksum")), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn a_pending_log_tree_is_refused_with_a_clear_error() {
    let env = Env::new();
    let image = env.path("live.img");
    fs::File::create(&image).unwrap().set_len(256 * MIB).unwrap();
    sh("mkfs.btrfs", &["-q", "-f", image.to_str().unwrap()]);
    let copy = env.path("crashed.img");
    {
        let lo = LoopDev::attach(&image);
        let m = Mount::new(&lo.dev, &env.path("mnt"), &[]);
        sh("sync", &[]);
        // An fsync writes the file to the log tree and the superblock points at it; copying the
        // image before the next commit is what a crash (or a capture without a freeze) leaves.
        let f = fs::File::create(m.dir.join("fsynced")).unwrap();
        f.write_all_at(b"only in the log", 0).unwrap();
        f.sync_all().unwrap();
        fs::copy(&image, &copy).unwrap();
        drop(f);
        m.unmount();
        drop(lo);
    }
    let sup = sh("btrfs", &["inspect-internal", "dump-super", copy.to_str().unwrap()]);
    let log_root = sup.lines().find_map(|l| l.strip_prefix("log_root\t\t")).unwrap().trim().to_string();
    assert_ne!(log_root, "0", "the copy has no log tree:\n{sup}");

    let snap = env.backup(&[copy.to_str().unwrap()]);
    let run = env.rime(&["extract", &snap, "/", "--to", env.path("to").to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("log tree") && run.stderr.contains("replay"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    let ls = env.rime(&["ls", &snap, "/"]);
    assert_eq!(ls.code, Some(1), "{ls:?}");
    assert!(ls.stderr.contains("log tree"), "{}", ls.stderr);
}

/// CRC-32C (Castagnoli), as btrfs stores it.
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn a_directory_entry_looping_to_its_ancestor_never_hangs_extract() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("top/mid/low")).unwrap();
    fs::write(src.join("top/mid/low/loopme-entry"), b"becomes a link to top\n").unwrap();
    fs::write(src.join("top/mid/file"), b"kept\n").unwrap();
    let image = env.path("loop.img");
    fs::File::create(&image).unwrap().set_len(128 * MIB).unwrap();
    sh("mkfs.btrfs", &["-q", "--rootdir", src.to_str().unwrap(), image.to_str().unwrap()]);
    use std::os::unix::fs::MetadataExt;
    let (top, victim) = {
        let (lo, m) = loop_ro(&image, &env.path("ro"));
        let r = (
            fs::metadata(m.dir.join("top")).unwrap().ino(),
            fs::metadata(m.dir.join("top/mid/low/loopme-entry")).unwrap().ino(),
        );
        m.unmount();
        drop(lo);
        r
    };
    // Point the entry's DIR_ITEM and DIR_INDEX at `top` as a directory, then fix the checksums
    // of the blocks patched (every metadata copy).
    let mut img = fs::read(&image).unwrap();
    let name = b"loopme-entry";
    let mut location = victim.to_le_bytes().to_vec();
    location.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0]);
    let hits: Vec<usize> = img.windows(name.len()).enumerate().filter(|(_, w)| *w == name).map(|(i, _)| i).collect();
    let mut patched = 0;
    for at in hits {
        if at < 30 || img[at - 30..at - 13] != location[..] {
            continue; // the INODE_REF, not a directory item
        }
        img[at - 30..at - 22].copy_from_slice(&top.to_le_bytes());
        img[at - 1] = 2; // BTRFS_FT_DIR
        let block = at / 16384 * 16384;
        let crc = crc32c(&img[block + 0x20..block + 16384]);
        img[block..block + 4].copy_from_slice(&crc.to_le_bytes());
        patched += 1;
    }
    assert!(patched >= 2, "patched {patched} directory items");
    fs::write(&image, &img).unwrap();

    let snap = env.backup(&[image.to_str().unwrap()]);
    let to = env.path("to");
    let (tx, rx) = std::sync::mpsc::channel();
    let (repo, to_s) = (env.repo.clone(), to.to_str().unwrap().to_string());
    std::thread::spawn(move || {
        let out =
            rime_command().arg("--repo").arg(repo).args(["extract", "--json", &snap, "/", "--to", &to_s]).output();
        let _ = tx.send(out);
    });
    let out =
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("extract hangs on a looping directory").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("skipped /top/mid/low/loopme-entry") && stderr.contains("loop"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(fs::read(to.join("top/mid/file")).unwrap(), b"kept\n");
    assert!(!to.join("top/mid/low/loopme-entry").exists());
}

#[test]
fn the_default_subvolume_is_the_root_as_a_mount_shows_it_and_explicit_holes_read_as_holes() {
    let env = Env::new();
    let image = env.path("default.img");
    fs::File::create(&image).unwrap().set_len(256 * MIB).unwrap();
    // Without no-holes: holes are explicit extents (disk_bytenr 0).
    sh("mkfs.btrfs", &["-q", "-f", "-O", "^no-holes", image.to_str().unwrap()]);
    with_mounted(&env, &image, "rw", |m| {
        fs::write(m.join("only-at-top-level"), b"not under the default subvolume\n").unwrap();
        sh("btrfs", &["-q", "subvolume", "create", m.join("home").to_str().unwrap()]);
        populate_tree(&m.join("home"), 31, MIB);
        add_metadata_cases(&m.join("home"));
        sh("btrfs", &["-q", "subvolume", "create", m.join("home/nested").to_str().unwrap()]);
        fs::write(m.join("home/nested/n"), b"nested\n").unwrap();
        sh("btrfs", &["subvolume", "set-default", m.join("home").to_str().unwrap()]);
    });
    let dump = sh("btrfs", &["inspect-internal", "dump-tree", image.to_str().unwrap()]);
    assert!(dump.contains("extent data disk byte 0 nr 0"), "no explicit hole extent");
    let snap = env.backup(&[image.to_str().unwrap()]);
    let out = env.path("out");
    env.rime(&["extract", &snap, "/", "--to", out.to_str().unwrap()]).ok();
    let (lo, m) = loop_ro(&image, &env.path("ro"));
    assert!(!m.dir.join("only-at-top-level").exists(), "the kernel shows the default subvolume");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(out.join("meta/all-hole")).unwrap().blocks(), 0);
    assert_same_tree(&m.dir, &out, &Compare::all(), &[]);
    assert_listing_matches(&ls_json(&env, &[&snap, "/"]), &m.dir);
    assert_listing_matches(&ls_json(&env, &[&snap, "/nested"]), &m.dir.join("nested"));
    m.unmount();
    drop(lo);
}
