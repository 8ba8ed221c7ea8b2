//! Image explorer on FAT (made with mkfs.vfat + mtools) and NTFS (mkntfs + ntfs-3g): `ls` and
//! `extract` match the source tree (FAT) and ntfs-3g's view (NTFS: symlinks, hard links,
//! sparse files, times).

use crate::common::*;
use crate::explorer_util::*;
use std::fs;
use std::os::unix::fs::MetadataExt;

#[test]
fn fat_ls_and_extract_match_the_source() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("Long Directory Name/nested")).unwrap();
    write_random_file(&src.join("Long Directory Name/nested/a file with a long name.bin"), 1, 1_234_567);
    fs::write(src.join("Long Directory Name/short.txt"), b"short\n").unwrap();
    fs::write(src.join("README.TXT"), b"hello from FAT\n").unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    set_times(&src.join("README.TXT"), 1_600_000_000, 0);
    for fat_bits in ["12", "16", "32"] {
        let image = env.path(&format!("fat{fat_bits}.img"));
        let _ = fs::remove_file(&image);
        let size = if fat_bits == "32" { 64 * MIB } else { 16 * MIB };
        fs::File::create(&image).unwrap().set_len(size).unwrap();
        sh("mkfs.vfat", &["-F", fat_bits, image.to_str().unwrap()]);
        sh(
            "mcopy",
            &["-s", "-m", "-i", image.to_str().unwrap(), &format!("{}/Long Directory Name", src.display()), "::/"],
        );
        for f in ["README.TXT", "empty"] {
            sh("mcopy", &["-m", "-i", image.to_str().unwrap(), src.join(f).to_str().unwrap(), "::/"]);
        }
        let snap = env.backup(&[image.to_str().unwrap()]);
        let l = env.rime(&["ls", "--json", &snap, "/Long Directory Name"]).ok().json();
        assert_eq!(l["filesystem"], format!("fat{fat_bits}"), "{l}");
        let mut names: Vec<(String, u64)> = l["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e["size"].as_u64().unwrap()))
            .collect();
        names.sort();
        assert_eq!(names, [("nested".to_string(), 0), ("short.txt".to_string(), 6)]);
        let root = env.rime(&["ls", "--json", &snap]).ok().json();
        let readme =
            root["entries"].as_array().unwrap().iter().find(|e| e["name"] == "README.TXT").expect("README.TXT").clone();
        // FAT keeps local time at 2 s resolution; tests run in UTC.
        assert!((readme["mtime"].as_i64().unwrap() - 1_600_000_000).abs() <= 2, "{readme}");

        let out = env.path(&format!("out{fat_bits}"));
        let r = env.rime(&["extract", "--json", &snap, "/", "--to", out.to_str().unwrap()]).ok().json();
        assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{r}");
        let how = Compare { dir_times: false, xattrs: false, owners: false, holes: false, modes: false, times: false };
        assert_same_tree(&src, &out, &how, &[]);
    }
}

#[test]
fn ntfs_ls_and_extract_match_ntfs3g() {
    let env = Env::new();
    let image = env.path("ntfs.img");
    fs::File::create(&image).unwrap().set_len(96 * MIB).unwrap();
    sh("mkntfs", &["-q", "-F", "-f", image.to_str().unwrap()]);
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let rw = Mounted::ntfs3g(&image, &mnt, false);
    let fill = std::panic::catch_unwind(|| {
        populate_tree(&mnt, 51, 2 * MIB);
        let f = fs::File::create(mnt.join("sparse.bin")).unwrap();
        f.set_len(16 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[7u8; 100_000], 5 << 20).unwrap();
        drop(f);
        set_times(&mnt.join("docs/readme.txt"), 1_500_000_000, 123_456_700);
    });
    rw.unmount();
    fill.unwrap();
    let snap = env.backup(&[image.to_str().unwrap()]);

    let out = env.path("out");
    let r = env.rime(&["extract", "--json", &snap, "/", "--to", out.to_str().unwrap()]).ok().json();
    assert_eq!(r["filesystem"], "ntfs");
    assert_eq!(r["skipped"].as_array().unwrap().len(), 0, "{r}");
    let l = env.rime(&["ls", "--json", &snap, "/hard"]).ok().json();
    let e = l["entries"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["inode"], e[1]["inode"], "hard links share a file record");
    assert_eq!(e[0]["nlink"].as_u64(), Some(3));

    let ro = Mounted::ntfs3g(&image, &mnt, true);
    let check = std::panic::catch_unwind(|| {
        // ntfs-3g maps no owners or modes by default; compare everything else.
        let how = Compare { dir_times: true, xattrs: false, owners: true, holes: true, modes: false, times: true };
        assert_same_tree(&mnt, &out, &how, &[]);
    });
    ro.unmount();
    check.unwrap();
    let sm = fs::metadata(out.join("sparse.bin")).unwrap();
    assert_eq!(sm.len(), 16 << 20);
    assert!(sm.blocks() * 512 < 1 << 20, "sparse.bin allocates {} bytes", sm.blocks() * 512);
    assert_eq!(fs::read_link(out.join("readme-link")).unwrap().to_str(), Some("docs/readme.txt"));
    assert_eq!(fs::metadata(out.join("docs/readme.txt")).unwrap().mtime_nsec(), 123_456_700);
}

/// Damaged FAT and NTFS images: every command ends with a status (0, 1 or 2), never a crash,
/// and extract still writes only below --to.
#[test]
fn damaged_fat_and_ntfs_images_never_crash() {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    let fat = env.path("fat.img");
    fs::File::create(&fat).unwrap().set_len(16 * MIB).unwrap();
    sh("mkfs.vfat", &[fat.to_str().unwrap()]);
    let payload = env.path("p.bin");
    write_random_file(&payload, 2, 300_000);
    sh("mmd", &["-i", fat.to_str().unwrap(), "::/a", "::/a/b"]);
    for (i, dir) in ["::/", "::/a/", "::/a/b/"].iter().enumerate() {
        sh("mcopy", &["-i", fat.to_str().unwrap(), payload.to_str().unwrap(), &format!("{dir}file{i}.bin")]);
    }
    let ntfs = env.path("ntfs.img");
    fs::File::create(&ntfs).unwrap().set_len(32 * MIB).unwrap();
    sh("mkntfs", &["-q", "-F", "-f", ntfs.to_str().unwrap()]);
    let mut rng = Rng::new(99);
    for round in 0..6 {
        for (name, orig, span) in [("fat", &fat, 256 * 1024u64), ("ntfs", &ntfs, 32 * MIB)] {
            let img = env.path(&format!("{name}-{round}.img"));
            fs::copy(orig, &img).unwrap();
            let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
            for _ in 0..200 {
                // Spare the boot sector so the filesystem is still recognised.
                let at = 512 + rng.below(span - 1024);
                let n = 1 + rng.below(64) as usize;
                f.write_all_at(&rng.bytes(n), at).unwrap();
            }
            drop(f);
            let snap = env.backup(&[img.to_str().unwrap()]);
            let to = env.path(&format!("out-{name}-{round}"));
            for args in
                [vec!["ls", snap.as_str(), "/a"], vec!["extract", snap.as_str(), "/", "--to", to.to_str().unwrap()]]
            {
                let r = env.rime(&args);
                // A clear outcome (an exit code of README's table), never a panic or a signal.
                assert!(matches!(r.code, Some(0..=7)), "{name} round {round}: {r:?}");
                assert!(!r.stderr.contains("panicked at"), "{r:?}");
            }
        }
    }
}
