//! Helpers for the filesystem end-to-end tests (`fs_xfs.rs`, `fs_btrfs.rs`, `fs_fat.rs`,
//! `fs_ntfs.rs`): running rime and other programs, loop and ntfs-3g mounts released on drop,
//! a mixed file tree, and the check that a restore equals the original with exactly the
//! used-block map's unused bytes zeroed.

#![allow(dead_code, unused_imports)]

pub use rime_testkit::{dir_bytes, run, run_status, s, wait_until_closed, write_random, Mounted, Rng, MIB};

use rime_volume::{UsedMap, Volume};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `rime --repo REPO ARGS`; asserts success; returns (stdout, stderr, elapsed).
#[track_caller]
pub fn rime(repo: &Path, args: &[&str]) -> (String, String, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rime"))
        .env_remove("RIME_REPO")
        .env_remove("RIME_LOG")
        .arg("--repo")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rime");
    let elapsed = t.elapsed();
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "rime {args:?} failed: {o}{e}");
    (o, e, elapsed)
}

/// `rime backup IMG --json`: (the JSON document, stderr, elapsed).
#[track_caller]
pub fn backup(repo: &Path, img: &Path) -> (Value, String, Duration) {
    let (out, err, t) = rime(repo, &["backup", s(img), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("backup --json printed {out:?}: {e}"));
    assert!(v["snapshot"].is_string(), "{v}");
    (v, err, t)
}

/// A new image file of `size` bytes full of random garbage, as on a reused disk: whatever the
/// filesystem leaves free must not reach the repository.
pub fn garbage_image(path: &Path, size: u64, seed: u64) {
    write_random(path, &mut Rng(seed | 1), size);
}

/// A mixed file tree of about `target` bytes under `dir`: big random files, many small ones,
/// compressible text, a sparse file, an empty file and directory, nested directories, names
/// with spaces and non-ASCII, relative/absolute/directory symlinks and hard links.
pub fn populate(dir: &Path, seed: u64, target: u64) {
    let mut rng = Rng(seed | 1);
    for d in ["docs/deep/er", "bin", "hard", "empty-dir", "many"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let text: String =
        (0..60_000).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog\n")).collect();
    fs::write(dir.join("docs/readme.txt"), &text).unwrap();
    fs::write(dir.join("docs/notes with spaces.txt"), &text[..5000]).unwrap();
    fs::write(dir.join("docs/ünïcödé.txt"), "snow ❄ and ice\n").unwrap();
    fs::write(dir.join("docs/deep/er/bottom.txt"), &text[..200_000]).unwrap();
    fs::write(dir.join("bin/empty"), b"").unwrap();
    fs::write(dir.join("bin/odd-size.bin"), rng.bytes(12_345)).unwrap();
    {
        use std::io::{Seek, SeekFrom};
        let mut f = fs::File::create(dir.join("bin/sparse.bin")).unwrap();
        f.seek(SeekFrom::Start(5 * MIB)).unwrap();
        f.write_all(&rng.bytes(7000)).unwrap();
    }
    let mut written = text.len() as u64 + 220_000;
    for i in 0..1500u64 {
        let len = 1 + rng.next_u64() % 20_000;
        fs::write(dir.join(format!("many/file-{i:04}")), rng.bytes(len as usize)).unwrap();
        written += len;
    }
    std::os::unix::fs::symlink("docs/readme.txt", dir.join("readme-link")).unwrap();
    std::os::unix::fs::symlink("/etc/nonexistent/target", dir.join("absolute-link")).unwrap();
    std::os::unix::fs::symlink("docs/deep", dir.join("deep-dir-link")).unwrap();
    std::os::unix::fs::symlink(format!("docs/{}", "x".repeat(200)), dir.join("long-link")).unwrap();
    fs::write(dir.join("hard/a"), &text[..10_000]).unwrap();
    fs::hard_link(dir.join("hard/a"), dir.join("hard/b")).unwrap();
    fs::hard_link(dir.join("hard/a"), dir.join("docs/third-name-of-a")).unwrap();
    let big = target.saturating_sub(written) / 5;
    for i in 0..5 {
        write_random(&dir.join(format!("bin/random-{i}.bin")), &mut rng, big + i * 4099);
    }
}

/// Copies `src`'s tree into the mounted filesystem at `mnt` (hard links, symlinks, sparseness kept).
pub fn copy_tree(src: &Path, mnt: &Path) {
    run("cp", &["-a", "--sparse=always", &format!("{}/.", s(src)), s(mnt)]);
    run("sync", &[]);
}

/// Asserts that the tree at `mnt` equals `src` (contents, symlink targets, structure) and that
/// hard links survived.
#[track_caller]
pub fn assert_same_tree(src: &Path, mnt: &Path) {
    let (ok, out, err) = run_status("diff", &["-r", "--no-dereference", s(src), s(mnt)]);
    assert!(ok, "files differ between {} and {}:\n{out}{err}", src.display(), mnt.display());
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| fs::symlink_metadata(mnt.join(p)).unwrap().ino();
    assert_eq!(ino("hard/a"), ino("hard/b"), "hard/a and hard/b should be one inode");
    assert_eq!(ino("hard/a"), ino("docs/third-name-of-a"), "docs/third-name-of-a should be hard/a");
    assert_eq!(fs::symlink_metadata(mnt.join("hard/a")).unwrap().nlink(), 3);
}

/// The used ranges of `img` per the map rime would pick for it.
pub fn used_ranges(img: &Path) -> Vec<Range<u64>> {
    let vol = Volume::open(img, false).unwrap();
    let mut detected = rime_volume::fs::detect(&vol.region());
    assert!(detected.warning.is_none(), "{:?}", detected.warning);
    let map: &mut dyn UsedMap = detected.map.as_mut();
    let mut ranges = Vec::new();
    let mut off = 0;
    while off < vol.size {
        let len = (64 * 1024).min(vol.size - off);
        map.used_ranges(off, len, &mut ranges).unwrap();
        off += len;
    }
    ranges
}

/// Writes `img` to `to` with every byte `map` leaves out zeroed: what a restore must equal.
pub fn write_masked(img: &Path, map: &mut dyn UsedMap, to: &Path) {
    let data = fs::read(img).unwrap();
    let mut out = vec![0u8; data.len()];
    let mut ranges = Vec::new();
    map.used_ranges(0, data.len() as u64, &mut ranges).unwrap();
    for r in ranges {
        out[r.start as usize..r.end as usize].copy_from_slice(&data[r.start as usize..r.end as usize]);
    }
    fs::write(to, out).unwrap();
}

/// Asserts that `restored` equals `original` on the used ranges and is zero elsewhere.
#[track_caller]
pub fn assert_restore_is_masked_original(original: &Path, restored: &Path) {
    let ranges = used_ranges(original);
    let (mut a, mut b) = (fs::File::open(original).unwrap(), fs::File::open(restored).unwrap());
    let size = fs::metadata(original).unwrap().len();
    assert_eq!(size, fs::metadata(restored).unwrap().len(), "restored size");
    let step = 4 * MIB as usize;
    let (mut ba, mut bb) = (vec![0u8; step], vec![0u8; step]);
    let mut pos = 0u64;
    let mut ri = 0;
    let mut garbage_left_out = false;
    while pos < size {
        let n = step.min((size - pos) as usize);
        a.read_exact(&mut ba[..n]).unwrap();
        b.read_exact(&mut bb[..n]).unwrap();
        // Mask the original: keep the used ranges, zero the rest.
        let mut masked = vec![0u8; n];
        while ri < ranges.len() && ranges[ri].end <= pos {
            ri += 1;
        }
        let mut j = ri;
        while j < ranges.len() && ranges[j].start < pos + n as u64 {
            let (s0, s1) = (ranges[j].start.max(pos) - pos, ranges[j].end.min(pos + n as u64) - pos);
            masked[s0 as usize..s1 as usize].copy_from_slice(&ba[s0 as usize..s1 as usize]);
            j += 1;
        }
        if let Some(i) = (0..n).find(|&i| masked[i] != bb[i]) {
            panic!("{} differs from the masked original at byte {}", restored.display(), pos + i as u64);
        }
        garbage_left_out |= masked[..] != ba[..n];
        pos += n as u64;
    }
    assert!(garbage_left_out, "the original's free space should have held garbage that the restore leaves out");
}

/// Figures for docs/PERFORMANCE.md: backs `img` up with rime and with `partclone.<fs> | zstd
/// -T0`, page cache dropped before each, and prints one table row.
pub fn print_figures_next_to_partclone(work: &Path, fs: &str, img: &Path, size: u64, df_used: u64) {
    run("sync", &[]);
    run("sh", &["-c", "echo 3 > /proc/sys/vm/drop_caches"]);
    let repo = work.join("repo");
    rime(&repo, &["init"]);
    let before = dir_bytes(&repo);
    let (v, _, t) = backup(&repo, img);
    let repo_added = dir_bytes(&repo) - before;
    let vol = &v["manifest"]["volumes"][0];
    run("sh", &["-c", "echo 3 > /proc/sys/vm/drop_caches"]);
    let out = work.join("partclone.zst");
    let pt = rime_testkit::peers::partclone_zstd(fs, img, &out);
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "| {fs} | {} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} s | {:.1} MiB | {:.2} s |",
        size / MIB,
        mib(df_used),
        mib(vol["used_bytes"].as_u64().unwrap()),
        mib(vol["read_bytes"].as_u64().unwrap()),
        mib(repo_added),
        t.as_secs_f64(),
        mib(fs::metadata(&out).unwrap().len()),
        pt.as_secs_f64()
    );
}

/// Churn on a mounted filesystem: files written and deleted leave fragmented free space behind.
/// The survivors are copied into `src` (the tree the restore is compared with).
pub fn churn(mnt: &Path, src: &Path) {
    let mut rng = Rng(5);
    for i in 0..400 {
        write_random(&mnt.join(format!("churn-{i}")), &mut rng, 4096 + i * 512);
    }
    run("sync", &[]);
    for i in (0..400).step_by(2) {
        fs::remove_file(mnt.join(format!("churn-{i}"))).unwrap();
    }
    for i in (1..400).step_by(2) {
        fs::copy(mnt.join(format!("churn-{i}")), src.join(format!("churn-{i}"))).unwrap();
    }
    run("sync", &[]);
}

/// Backs up `img` (a `size`-byte image of `fs` about half full, `df_used` bytes in use) into a
/// new repository under `d` and checks the map: quiet, recognised, covering what df counts, and
/// neither reading nor storing the free garbage. Returns the repository.
pub fn backup_with_used_map(d: &Path, img: &Path, fs: &str, size: u64, df_used: u64, what: &str) -> PathBuf {
    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let (v, err, _) = backup(&repo, img);
    assert!(err.trim().is_empty(), "a clean {fs} backup should print nothing on stderr: {err}");
    let vol = &v["manifest"]["volumes"][0];
    assert_eq!(vol["filesystem"], fs, "{vol}");
    let num = |k: &str| vol[k].as_u64().unwrap_or_else(|| panic!("no {k} in {vol}"));
    let (used, read, added) = (num("used_bytes"), num("read_bytes"), num("added_bytes"));
    assert!(used >= df_used, "{what}: map marks {used} bytes, df says {df_used} are used");
    assert!(read >= used, "{what}: read {read} < used {used}");
    assert!(read < size * 7 / 10, "{what}: read {read} of a {size} byte image about half full");
    assert!(added < size * 7 / 10, "{what}: the free garbage must not be stored (added {added} of {size})");
    repo
}

/// A damaged image (`bytes` written to `img`): the backup still succeeds, imaging all non-zero
/// blocks, warns on stderr naming `fs`, and the restore is bit-exact.
pub fn assert_damaged_falls_back(d: &Path, img: &Path, bytes: &[u8], fs: &str) {
    fs::write(img, bytes).unwrap();
    let repo = d.join("repo");
    rime(&repo, &["init"]);
    let (v, err, _) = backup(&repo, img);
    assert!(err.contains(fs) && err.contains("damaged"), "stderr should warn: {err}");
    assert!(v["manifest"]["volumes"][0]["filesystem"].is_null(), "{v}");
    let restored = d.join("restored.img");
    rime(&repo, &["restore", "latest", s(&restored)]);
    assert!(fs::read(&restored).unwrap() == bytes, "fallback restore must be bit-exact");
}
