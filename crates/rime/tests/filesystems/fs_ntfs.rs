//! Backup and restore of NTFS image files through the `rime` binary.
//!
//! Every image is made with `mkntfs -Q` (which leaves the old contents in place) on a file
//! pre-filled with random garbage, then filled about half through an ntfs-3g FUSE mount, so its
//! free clusters hold data a used-blocks backup must leave out. The restore must pass
//! `ntfsfix -n`, hold the same files (read through a read-only ntfs-3g mount), and equal the
//! original with exactly the map's unused bytes zeroed.
//!
//! Needs ntfs-3g, FUSE and root (for the mounts).

use rime_volume::fs::ntfs::NtfsMap;
use rime_volume::Volume;
use serde_json::Value;
use std::path::Path;

use crate::fsmap_util::*;

/// Writes mixed files (tiny resident ones, a big directory, a fragmented file, a sparse file,
/// large ones) totalling about `total` bytes; returns (relative path, contents).
fn fill(mnt: &Path, seed: u64, total: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng(seed | 1);
    let mut files = Vec::new();
    let put = |files: &mut Vec<(String, Vec<u8>)>, rel: &str, data: Vec<u8>| {
        let p = mnt.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
        files.push((rel.to_string(), data));
    };
    put(&mut files, "hello.txt", b"hello, NTFS\n".to_vec());
    put(&mut files, "Sub/Deeper/Long Name.bin", rng.bytes(777_777));
    for i in 0..200 {
        put(&mut files, &format!("Many/n{i:03}.txt"), format!("{i}\n").into_bytes());
    }
    let mut frag = Vec::new();
    for i in 0..40 {
        use std::io::Write;
        let piece = rng.bytes(8192);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(mnt.join("frag.bin")).unwrap();
        f.write_all(&piece).unwrap();
        drop(f);
        frag.extend_from_slice(&piece);
        put(&mut files, &format!("Spacers/s{i:02}"), rng.bytes(8192));
    }
    files.push(("frag.bin".into(), frag));
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(mnt.join("sparse.bin")).unwrap();
        f.seek(SeekFrom::Start(3 * MIB)).unwrap();
        let tail = rng.bytes(5000);
        f.write_all(&tail).unwrap();
        let mut data = vec![0u8; 3 * MIB as usize];
        data.extend_from_slice(&tail);
        files.push(("sparse.bin".into(), data));
    }
    let mut written: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    let mut i = 0;
    while written < total {
        let size = if i % 3 == 0 { rng.next_u64() % 50_000 } else { (rng.next_u64() % (4 * MIB)).min(total - written) };
        let dir = if i % 2 == 0 { "" } else { "Sub/" };
        put(&mut files, &format!("{dir}f{i:03}.dat"), rng.bytes(size as usize));
        written += size;
        i += 1;
    }
    files
}

/// `ntfscluster -i`: (bytes in the volume's clusters, free bytes).
fn ntfs_counts(img: &Path) -> (u64, u64) {
    let out = run("ntfscluster", &["-i", s(img)]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in ntfscluster output:\n{out}"))
    };
    (field("bytes per volume"), field("bytes of free space"))
}

fn expected_restore(img: &Path, to: &Path) {
    let vol = Volume::open(img, false).unwrap();
    let mut map = NtfsMap::probe(&vol.region()).unwrap().unwrap();
    write_masked(img, &mut map, to);
}

fn roundtrip(size: u64, opts: &[&str]) {
    let dir = tempfile::Builder::new().prefix("rime-ntfs-").tempdir().unwrap();
    let d = dir.path();
    let img = d.join("ntfs.img");
    std::fs::write(&img, Rng(0x1F5 ^ size).bytes(size as usize)).unwrap();
    let mut args = vec!["-F", "-Q"];
    args.extend(opts);
    args.push(s(&img));
    run("mkntfs", &args);
    let files = {
        let m = Mounted::ntfs3g(&img, &d.join("mnt"), false);
        fill(&m.0, size, size / 2)
    };
    run("ntfsfix", &["-n", s(&img)]);
    let (fs_bytes, free) = ntfs_counts(&img);
    let fs_used = fs_bytes - free;

    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let (v, _, _) = backup(&repo, &img);
    let vol = &v["manifest"]["volumes"][0];
    assert_eq!(vol["filesystem"], "ntfs", "{vol}");
    let num = |k: &str| vol[k].as_u64().unwrap_or_else(|| panic!("no {k} in {vol}"));
    let (used, read, added) = (num("used_bytes"), num("read_bytes"), num("added_bytes"));
    let tail = size - fs_bytes;
    assert_eq!(
        used,
        fs_used + tail,
        "{opts:?}: map marks {used} bytes; ntfscluster counts {fs_used} used + {tail} after the clusters"
    );
    assert!(read >= used && read < size * 7 / 10, "{opts:?}: read {read} of {size} bytes (used {used})");
    assert!(added < size * 7 / 10, "{opts:?}: the free garbage must not be stored (added {added} of {size})");

    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    run("ntfsfix", &["-n", s(&restored)]);
    let expected = d.join("expected.img");
    expected_restore(&img, &expected);
    let got = std::fs::read(&restored).unwrap();
    assert!(got == std::fs::read(&expected).unwrap(), "{opts:?}: restore differs from the masked original");
    assert!(got != std::fs::read(&img).unwrap(), "{opts:?}: the free garbage should not come back");
    drop(got);
    let m = Mounted::ntfs3g(&restored, &d.join("mnt-restored"), true);
    for (rel, data) in &files {
        let got = std::fs::read(m.0.join(rel)).unwrap_or_else(|e| panic!("{opts:?}: {rel}: {e}"));
        assert!(got == *data, "{opts:?}: {rel} differs after restore");
    }
    let listed = run("find", &[s(&m.0), "-type", "f"]).lines().count();
    assert_eq!(listed, files.len(), "{opts:?}: the restored volume holds other files than the original");
    drop(m);
    rime(&repo, &["verify"]);
}

#[test]
fn ntfs_backup_restore() {
    roundtrip(64 * MIB, &[]);
}

#[test]
fn ntfs_small_clusters_backup_restore() {
    roundtrip(48 * MIB, &["-c", "512"]);
}

#[test]
fn ntfs_4k_sectors_backup_restore() {
    roundtrip(64 * MIB, &["-s", "4096", "-c", "8192"]);
}

/// A torn $Bitmap record: the backup still succeeds, imaging all non-zero blocks, says so on
/// stderr, and the restore is bit-exact.
#[test]
fn damaged_ntfs_falls_back_to_all_blocks() {
    let dir = tempfile::Builder::new().prefix("rime-ntfs-").tempdir().unwrap();
    let d = dir.path();
    let img = d.join("bad.img");
    std::fs::write(&img, Rng(9).bytes(16 * MIB as usize)).unwrap();
    run("mkntfs", &["-F", "-Q", s(&img)]);
    let mut bytes = std::fs::read(&img).unwrap();
    let cb = u16::from_le_bytes([bytes[11], bytes[12]]) as usize * bytes[13] as usize;
    let mft = u64::from_le_bytes(bytes[0x30..0x38].try_into().unwrap()) as usize * cb;
    let rb = 1usize << -(bytes[0x40] as i8 as i32);
    bytes[mft + 6 * rb + 510] ^= 0xFF; // record 6's first sector no longer ends with its USN
    std::fs::write(&img, &bytes).unwrap();
    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let (out, err, _) = rime(&repo, &["backup", s(&img), "--json"]);
    assert!(err.contains("NTFS") && err.contains("damaged"), "stderr should warn: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["manifest"]["volumes"][0]["filesystem"].is_null(), "{v}");
    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    assert!(std::fs::read(&restored).unwrap() == bytes, "fallback restore must be bit-exact");
}
