//! Extracting from hostile ext4 images never writes outside `--to`.
//!
//! The image is crafted with debugfs (a directory hard-linked into its own subdirectory, making
//! a loop; symlinks to `/etc` and to `../../..`-style escapes) and by patching directory entries
//! in place (names containing `/`, NUL, `..`, an absolute path, and two entries with one name: a
//! symlink pointing outside and a directory with a file inside, the classic "write through the
//! symlink" attack).

use crate::common::*;
use crate::explorer_util::*;
use std::fs;
use std::path::Path;

/// Replaces `from` by `to` (same length) where it occurs exactly once in the image.
fn patch_once(image: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut d = fs::read(image).unwrap();
    let hits: Vec<usize> = d.windows(from.len()).enumerate().filter(|(_, w)| *w == from).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{} occurs {} times", String::from_utf8_lossy(from), hits.len());
    d[hits[0]..hits[0] + to.len()].copy_from_slice(to);
    fs::write(image, d).unwrap();
}

fn debugfs(image: &Path, cmd: &str) {
    sh("debugfs", &["-w", "-R", cmd, image.to_str().unwrap()]);
}

#[test]
fn hostile_names_links_and_loops_never_escape_the_target() {
    let env = Env::new();
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let out_s = outside.to_str().unwrap().to_string();
    // The escaping names must have the same length as their stand-ins.
    let abs_name = format!("{out_s}/abs");
    let stand_in = abs_name.replace('/', "X");

    let src = env.path("src");
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    fs::create_dir_all(src.join("xlinq")).unwrap();
    fs::write(src.join("dir/file"), b"data\n").unwrap();
    fs::write(src.join("xlinq/passwd"), b"owned\n").unwrap();
    fs::write(src.join("SLASHxNAME"), b"n\n").unwrap();
    fs::write(src.join("NULxxNAME"), b"z\n").unwrap();
    fs::write(src.join("dir/§"), b"dots\n").unwrap();
    fs::write(src.join(&stand_in), b"absolute\n").unwrap();
    fs::write(src.join("good.txt"), b"fine\n").unwrap();
    std::os::unix::fs::symlink(&outside, src.join("xlink")).unwrap();
    let image = env.path("hostile.img");
    // No metadata checksums: the patched directory blocks stay readable to the kernel tools.
    mkfs("mkfs.ext4", &["-O", "^metadata_csum"], 16, Some(&src), &image);
    debugfs(&image, "link /dir /dir/sub/loop");
    debugfs(&image, &format!("symlink /escape ../../../../../../..{out_s}/escaped"));
    debugfs(&image, "symlink /etc /etc");
    patch_once(&image, b"SLASHxNAME", b"SLASH/NAME");
    patch_once(&image, b"NULxxNAME", b"NUL\0xNAME");
    patch_once(&image, "§".as_bytes(), b"..");
    patch_once(&image, stand_in.as_bytes(), abs_name.as_bytes());
    patch_once(&image, b"xlinq", b"xlink");

    let snap = env.backup(&[image.to_str().unwrap()]);
    let to = env.path("to");
    let run = env.rime(&["extract", "--json", &snap, "/", "--to", to.to_str().unwrap()]);
    assert_eq!(run.code, Some(2), "hostile entries are skipped and reported: {run:?}");
    let v = run.json();
    let skipped: Vec<(String, String)> = v["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["path"].as_str().unwrap().to_string(), s["reason"].as_str().unwrap().to_string()))
        .collect();
    let has = |needle: &str, reason: &str| skipped.iter().any(|(p, r)| p.contains(needle) && r.contains(reason));
    assert!(has("SLASH/NAME", "'/'"), "{skipped:?}");
    assert!(has("NUL", "NUL"), "{skipped:?}");
    assert!(has("/dir/..", "'..'"), "{skipped:?}");
    assert!(has("abs", "'/'"), "{skipped:?}");
    assert!(has("/xlink", "non-directory exists"), "{skipped:?}");
    assert!(has("/dir/sub/loop", "loop"), "{skipped:?}");
    for (p, _) in &skipped {
        assert!(run.stderr.contains(&format!("skipped {p}")), "{p} should be reported on stderr: {}", run.stderr);
    }

    // Nothing was written outside --to, and no file appeared anywhere an escape pointed.
    assert!(fs::read_dir(&outside).unwrap().next().is_none(), "something was written outside --to");
    assert!(!Path::new("/etc/passwd-rime-test").exists());
    // What is legitimate was restored: symlinks as symlinks (never followed), regular files.
    assert_eq!(fs::read_link(to.join("etc")).unwrap(), Path::new("/etc"));
    assert_eq!(fs::read_link(to.join("xlink")).unwrap(), outside);
    assert!(fs::read_link(to.join("escape")).unwrap().to_str().unwrap().ends_with("/escaped"));
    assert_eq!(fs::read(to.join("good.txt")).unwrap(), b"fine\n");
    assert_eq!(fs::read(to.join("dir/file")).unwrap(), b"data\n");
    assert!(to.join("dir/sub").is_dir() && !to.join("dir/sub/loop").exists());
    for rel in walk(&to) {
        let name = rel.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.contains("SLASH") && !name.contains("NUL"), "{name} should not have been created");
    }

    // A symlink already in --to where the image has a directory: never followed.
    let to2 = env.path("to2");
    fs::create_dir_all(&to2).unwrap();
    std::os::unix::fs::symlink(&outside, to2.join("dir")).unwrap();
    let run =
        env.rime(&["extract", "--json", &snap, "/dir", "/good.txt", "--to", to2.to_str().unwrap(), "--overwrite"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.json()["skipped"].as_array().unwrap().iter().any(|s| s["path"] == "/dir"), "{}", run.stdout);
    assert!(fs::read_dir(&outside).unwrap().next().is_none(), "extract followed a symlink in --to");
    assert_eq!(fs::read(to2.join("good.txt")).unwrap(), b"fine\n");

    // Listing the hostile image works and shows the raw names (lossily).
    let l = env.rime(&["ls", "--json", &snap, "/"]).ok().json();
    let names: Vec<&str> = l["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"SLASH/NAME") && names.iter().filter(|n| **n == "xlink").count() == 2, "{names:?}");
}

#[test]
fn damaged_images_fail_cleanly() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 4, 32, MIB);
    // Wreck the root directory's inode table entry area: clear the block pointers of inode 2.
    let out = sh("debugfs", &["-R", "stat <2>", image.to_str().unwrap()]);
    assert!(out.contains("EXTENTS") || out.contains("BLOCKS"), "{out}");
    debugfs(&image, "sif <2> block[2] 0xFFFFFFF");
    debugfs(&image, "sif <2> block[3] 0xFFFFFFF");
    debugfs(&image, "sif <2> block[4] 0xFFFFFFF");
    let snap = env.backup(&[image.to_str().unwrap()]);
    let e = env.rime(&["ls", &snap, "/"]).fails();
    assert!(e.starts_with("rime: "), "{e}");
    let e = env.rime(&["extract", &snap, "/", "--to", env.path("o").to_str().unwrap()]).fails();
    assert!(e.starts_with("rime: "), "{e}");
}
