//! Image explorer on ext2/3/4: `rime ls` and `rime extract` read files straight from the
//! repository. The reference is the kernel's own view of the same image (loop-mounted
//! read-only), so contents, modes, owners, nanosecond times, symlinks, hard links, holes and
//! xattrs are all checked against what Linux itself reads.

use crate::common::*;
use crate::explorer_util::*;
use std::fs;
use std::path::{Path, PathBuf};

/// An ext image made with `mkfs -d` from a populated tree plus metadata cases, then loop-mounted
/// once to add xattrs (small in-inode ones, a large one in an xattr block, trusted.* and
/// security.*). Returns the image.
fn rich_image(env: &Env, name: &str, program: &str, opts: &[&str], size_mib: u64) -> PathBuf {
    let src = env.path(&format!("{name}-src"));
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 7, 3 * MIB);
    add_metadata_cases(&src);
    let image = env.path(&format!("{name}.img"));
    mkfs(program, opts, size_mib, Some(&src), &image);
    with_mounted(env, &image, &format!("{name}-xattr"), |m| {
        set_xattr(&m.join("docs/readme.txt"), "user.comment", b"read me first");
        set_xattr(&m.join("docs/readme.txt"), "user.empty", b"");
        set_xattr(&m.join("bin/odd-size.bin"), "user.big", &vec![b'x'; 900]);
        set_xattr(&m.join("bin/odd-size.bin"), "trusted.rime", b"trusted value");
        set_xattr(&m.join("meta"), "user.dir-attr", b"on a directory");
        set_xattr(&m.join("meta/private"), "security.rime", b"label");
        // Hard-linked file with an xattr: the links share it.
        set_xattr(&m.join("hard/a"), "user.linked", b"shared");
    });
    image
}

/// Loop-mounts `image` read-only for the duration of `f`.
fn with_ro<R>(env: &Env, image: &Path, tag: &str, f: impl FnOnce(&Path) -> R) -> R {
    let lo = LoopDev::attach(image);
    let m = Mount::new(&lo.dev, &env.path(&format!("ro-{tag}")), &["ro"]);
    let r = f(&m.dir);
    m.unmount();
    drop(lo);
    r
}

#[test]
fn ls_lists_root_and_subdirectories_like_the_kernel() {
    let env = Env::new();
    let image = rich_image(&env, "vol", "mkfs.ext4", &["-b", "4096", "-I", "256"], 64);
    let snap = env.backup(&[image.to_str().unwrap()]);

    with_ro(&env, &image, "ls", |m| {
        let root = ls_json(&env, &[&snap]);
        assert_eq!(root["filesystem"], "ext4");
        assert_eq!(root["volume"], "vol.img");
        assert_eq!(root["directory"], true);
        assert_listing_matches(&root, m);
        for dir in ["docs", "docs/deep", "meta", "meta/owned", "hard", "empty-dir", "docs/deep/er/and/deeper"] {
            let l = ls_json(&env, &[&snap, &format!("/{dir}")]);
            assert_listing_matches(&l, &m.join(dir));
        }
        // A file lists as itself; `latest` and the volume name work.
        let one = ls_json(&env, &["latest", "/docs/readme.txt", "--volume", "vol.img"]);
        assert_eq!(one["directory"], false);
        assert_eq!(one["entries"][0]["name"], "readme.txt");
        assert_eq!(one["entries"][0]["size"].as_u64(), Some(fs::metadata(m.join("docs/readme.txt")).unwrap().len()));
        // Hard links share an inode number and count their links.
        let hard = ls_json(&env, &[&snap, "/hard"]);
        let e = hard["entries"].as_array().unwrap();
        assert_eq!(e[0]["inode"], e[1]["inode"]);
        assert_eq!(e[0]["nlink"].as_u64(), Some(3));
    });

    // Human output: plain names, and `-l` with permissions and symlink targets.
    let plain = env.rime(&["ls", &snap, "/"]).ok().stdout;
    assert!(plain.lines().any(|l| l == "readme-link"), "{plain}");
    let long = env.rime(&["ls", &snap, "/meta", "-l"]).ok().stdout;
    assert!(long.lines().any(|l| l.starts_with("-rwsr-x--x") && l.ends_with("setuid-tool")), "{long}");
    assert!(long.lines().any(|l| l.starts_with("drwxrwxrwt") && l.contains("4321") && l.ends_with("owned")), "{long}");
    assert!(long.contains("up-link -> ../docs/readme.txt"), "{long}");
    assert!(long.lines().any(|l| l.starts_with("prw-r-----") && l.ends_with("fifo")), "{long}");
}

#[test]
fn extract_single_files_and_whole_tree_bit_exact_with_metadata() {
    let env = Env::new();
    let image = rich_image(&env, "vol", "mkfs.ext4", &["-b", "4096", "-I", "256"], 64);
    let snap = env.backup(&[image.to_str().unwrap()]);
    let out = env.path("out");
    let one = env.path("one");

    let r = env.rime(&["extract", "--json", &snap, "/", "--to", out.to_str().unwrap()]).ok().json();
    assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["warnings"].as_array().unwrap().len(), 0, "{r}");
    assert!(r["hardlinks"].as_u64().unwrap() >= 2, "{r}");
    let s = env
        .rime(&[
            "extract",
            "--json",
            &snap,
            "/meta/sparse.img",
            "/docs/readme.txt",
            "/hard",
            "--to",
            one.to_str().unwrap(),
        ])
        .ok()
        .json();
    assert_eq!(s["files"].as_u64(), Some(3), "{s}"); // sparse.img, readme.txt, hard/a (hard/b is a link)
    assert_eq!(s["hardlinks"].as_u64(), Some(1), "{s}");

    with_ro(&env, &image, "extract", |m| {
        assert_same_tree(m, &out, &Compare::all(), &["lost+found"]);
        assert_same_tree(&m.join("hard"), &one.join("hard"), &Compare::all(), &[]);
        for f in ["sparse.img", "readme.txt"] {
            let orig = if f == "sparse.img" { m.join("meta").join(f) } else { m.join("docs").join(f) };
            assert!(fs::read(&orig).unwrap() == fs::read(one.join(f)).unwrap(), "{f} differs");
            assert_eq!(facts(&orig), facts(&one.join(f)), "{f} metadata");
            assert_eq!(xattrs(&orig), xattrs(&one.join(f)), "{f} xattrs");
        }
    });
    // The sparse file stays sparse: 8 MiB long, a few blocks allocated.
    use std::os::unix::fs::MetadataExt;
    let sm = fs::metadata(one.join("sparse.img")).unwrap();
    assert_eq!(sm.len(), 8 << 20);
    assert!(sm.blocks() * 512 < 256 * 1024, "sparse file allocates {} bytes", sm.blocks() * 512);
    assert_eq!(fs::metadata(out.join("meta/all-hole")).unwrap().blocks(), 0);
    assert_eq!(xattrs(&out.join("bin/odd-size.bin")).get("user.big").map(|v| v.len()), Some(900));
}

#[test]
fn extract_refuses_to_overwrite_unless_asked() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 3, 32, MIB);
    let snap = env.backup(&[image.to_str().unwrap()]);
    let out = env.path("out");
    let to = out.to_str().unwrap();
    env.rime(&["extract", &snap, "/docs", "--to", to]).ok();
    let readme = out.join("docs/readme.txt");
    let original = fs::read(&readme).unwrap();
    fs::write(&readme, b"changed locally").unwrap();

    // Again without --overwrite: exit status 2, every existing file reported and left alone.
    let again = env.rime(&["extract", "--json", &snap, "/docs", "--to", to]);
    assert_eq!(again.code, Some(2), "{again:?}");
    let skipped = again.json()["skipped"].as_array().unwrap().clone();
    assert!(
        skipped
            .iter()
            .any(|s| s["path"] == "/docs/readme.txt" && s["reason"].as_str().unwrap().contains("--overwrite")),
        "{skipped:?}"
    );
    assert!(again.stderr.contains("skipped /docs/readme.txt"), "{}", again.stderr);
    assert_eq!(fs::read(&readme).unwrap(), b"changed locally");

    env.rime(&["extract", &snap, "/docs", "--to", to, "--overwrite"]).ok();
    assert_eq!(fs::read(&readme).unwrap(), original);
}

#[test]
fn extracting_one_small_file_reads_a_small_fraction_of_the_repository() {
    let env = Env::new();
    let (_src, image) = make_ext(&env, "big", "mkfs.ext4", &[], 256, 11, 160 * MIB, false);
    let snap = env.backup(&[image.to_str().unwrap()]);
    let repo = env.repo_bytes();
    let r = env
        .rime(&["extract", "--json", &snap, "/docs/readme.txt", "--to", env.path("out").to_str().unwrap()])
        .ok()
        .json();
    let read = r["repo_bytes_read"].as_u64().unwrap();
    assert!(read > 0);
    assert!(read * 20 < repo, "extracting a 40 KB file read {read} of {repo} repository bytes (>= 5 %)");
    // Listing the root reads even less than that.
    let l = env.rime(&["ls", "--json", &snap]).ok().json();
    assert!(l["repo_bytes_read"].as_u64().unwrap() * 20 < repo, "{l}");
    // Whole-tree extraction reads every file once (about the data size), not the free space.
    let all = env.rime(&["extract", "--json", &snap, "/", "--to", env.path("all").to_str().unwrap()]).ok().json();
    let pack = all["pack_bytes_read"].as_u64().unwrap();
    assert!(pack < repo + MIB, "{all}");
}

#[test]
fn ext2_ext3_block_maps_and_small_blocks_extract_exactly() {
    for (n, (program, opts)) in [
        ("mkfs.ext2", &["-b", "1024"][..]),
        ("mkfs.ext3", &[][..]),
        ("mkfs.ext4", &["-b", "1024", "-I", "256", "-O", "^metadata_csum,inline_data"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let env = Env::new();
        let name = format!("v{n}");
        let image = rich_image(&env, &name, program, opts, 48);
        let snap = env.backup(&[image.to_str().unwrap()]);
        let out = env.path("out");
        let r = env.rime(&["extract", "--json", &snap, "/", "--to", out.to_str().unwrap()]).ok().json();
        assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{program} {opts:?}: {r}");
        with_ro(&env, &image, &name, |m| {
            // ext2/3 block maps allocate indirect blocks, so compare holes loosely there.
            assert_same_tree(m, &out, &Compare::all(), &["lost+found"]);
        });
    }
}

#[test]
fn clear_one_line_errors() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 5, 32, MIB);
    let raw = env.path("raw.img");
    write_random_file(&raw, 9, 4 * MIB);
    let snap = env.backup(&[image.to_str().unwrap(), raw.to_str().unwrap()]);
    let to = env.path("out");
    let to = to.to_str().unwrap();

    let e = env.rime(&["ls", &snap, "/no/such/file", "--volume", "vol.img"]).fails();
    assert!(e.contains("/no/such/file") && e.contains("no such file"), "{e}");
    let e = env.rime(&["extract", &snap, "/docs/readme.txt", "/missing", "--volume", "vol.img", "--to", to]).fails();
    assert!(e.contains("/missing") && e.contains("no such file"), "{e}");
    assert!(!Path::new(to).join("readme.txt").exists(), "nothing is extracted when a path is missing");
    let e = env.rime(&["ls", &snap]).fails();
    assert!(e.contains("--volume") && e.contains("vol.img") && e.contains("raw.img"), "{e}");
    let e = env.rime(&["ls", &snap, "/", "--volume", "nope"]).fails();
    assert!(e.contains("no volume 'nope'"), "{e}");
    let e = env.rime(&["ls", &snap, "/", "--volume", "raw.img"]).fails();
    assert!(e.contains("raw.img") && e.contains("no filesystem Rime can read"), "{e}");
    let e = env.rime(&["ls", &snap, "/", "--volume", "vol.img:2"]).fails();
    assert!(e.contains("no partition table"), "{e}");
    let e = env.rime(&["ls", "ffffffff", "/"]).fails();
    assert!(e.contains("no snapshot"), "{e}");
}

#[test]
fn partitions_of_a_whole_disk_are_browsable() {
    let env = Env::new();
    // A GPT disk: partition 1 ext4 (from a tree), partition 2 FAT.
    let disk = env.path("disk.img");
    fs::File::create(&disk).unwrap().set_len(96 * MIB).unwrap();
    let table = "label: gpt\nstart=2048, size=81920, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\nstart=86016, size=81920, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n";
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", disk.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(table.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let src = env.path("p1-src");
    fs::create_dir_all(&src).unwrap();
    populate_tree(&src, 21, MIB);
    let p1 = env.path("p1.img");
    mkfs("mkfs.ext4", &[], 40, Some(&src), &p1);
    let p2 = env.path("p2.img");
    fs::File::create(&p2).unwrap().set_len(40 * MIB).unwrap();
    sh("mkfs.vfat", &[p2.to_str().unwrap()]);
    fs::write(env.path("note.txt"), b"on the FAT partition\n").unwrap();
    sh("mcopy", &["-i", p2.to_str().unwrap(), env.path("note.txt").to_str().unwrap(), "::/NOTE.TXT"]);
    for (img, seek) in [(&p1, 2048), (&p2, 86016)] {
        sh(
            "dd",
            &[
                &format!("if={}", img.display()),
                &format!("of={}", disk.display()),
                "bs=512",
                &format!("seek={seek}"),
                "conv=notrunc",
                "status=none",
            ],
        );
    }
    let snap = env.backup(&[disk.to_str().unwrap()]);

    let e = env.rime(&["ls", &snap]).fails();
    assert!(e.contains("disk.img:1") && e.contains("disk.img:2") && e.contains("--volume"), "{e}");
    let l1 = ls_json(&env, &[&snap, "/docs", "--volume", "disk.img:1"]);
    assert_eq!(l1["volume"], "disk.img:1");
    assert_eq!(l1["filesystem"], "ext4");
    assert!(l1["entries"].as_array().unwrap().iter().any(|e| e["name"] == "readme.txt"), "{l1}");
    let l2 = ls_json(&env, &[&snap, "/", "--volume", "disk.img:2"]);
    assert!(l2["filesystem"].as_str().unwrap().starts_with("fat"), "{l2}");
    let out = env.path("out");
    env.rime(&["extract", &snap, "/docs/readme.txt", "--volume", "disk.img:1", "--to", out.to_str().unwrap()]).ok();
    assert_eq!(fs::read(out.join("readme.txt")).unwrap(), fs::read(src.join("docs/readme.txt")).unwrap());
    let e = env.rime(&["ls", &snap, "/", "--volume", "disk.img:7"]).fails();
    assert!(e.contains("no partition 7"), "{e}");
}
