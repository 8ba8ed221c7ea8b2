//! The NTFS used-block map and `file_extents` against real filesystems made by mkntfs and
//! filled through an ntfs-3g FUSE mount (the kernel has no ntfs driver), and against damaged ones.
//!
//! Needs ntfs-3g (mkntfs, ntfs-3g, ntfsfix, ntfscluster), FUSE and root for the mounts.

use rime_volume::fs::ntfs::{default_exclusions, NtfsMap};
use rime_volume::{UsedMap, Volume};
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::support::*;

/// The files written into every test volume: path -> contents.
struct Tree {
    files: Vec<(String, Vec<u8>)>,
}

/// Fills a mounted volume with mixed files: tiny (resident) ones, odd sizes, nested directories,
/// a directory big enough to need an index allocation, a fragmented file, a sparse file, and
/// a "pagefile.sys"; about `total` bytes in all. `fragment`: make hundreds of small files to
/// fragment two files (one into an attribute list).
fn fill(mnt: &Path, seed: u64, total: u64, fragment: bool) -> Tree {
    let mut rng = Rng(seed | 1);
    let mut files = Vec::new();
    let put = |files: &mut Vec<(String, Vec<u8>)>, rel: &str, data: Vec<u8>| {
        let p = mnt.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
        files.push((rel.to_string(), data));
    };
    put(&mut files, "tiny.txt", b"hello, NTFS\n".to_vec());
    put(&mut files, "empty", Vec::new());
    put(&mut files, "Docs/Deep/Deeper/a long name with spaces.dat", rng.bytes(12345));
    put(&mut files, "Mixed Case Dir/ReadMe.TXT", b"case is kept\n".to_vec());
    put(&mut files, "pagefile.sys", rng.bytes(3 * MIB as usize + 17));
    for i in 0..300 {
        put(&mut files, &format!("Many/entry-{i:04}.txt"), format!("file number {i}\n").into_bytes());
    }
    // (With 64 KiB clusters, hundreds of small files would fill the volume on their own.)
    let rounds = if fragment { (48, 500) } else { (4, 4) };
    // Fragmentation: grow a file by appends (open, write, close), with other files written in
    // between; ntfs-3g then places each append elsewhere.
    let mut b = Vec::new();
    for i in 0..rounds.0 {
        use std::io::Write;
        let piece = rng.bytes(16 * 1024);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(mnt.join("frag-b")).unwrap();
        f.write_all(&piece).unwrap();
        drop(f);
        b.extend_from_slice(&piece);
        put(&mut files, &format!("Spacers/sp-{i:02}"), rng.bytes(16 * 1024));
    }
    files.push(("frag-b".into(), b));
    // So fragmented that its runs spill into extension records through an $ATTRIBUTE_LIST.
    let mut v = Vec::new();
    for i in 0..rounds.1 {
        use std::io::Write;
        let piece = rng.bytes(4096);
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(mnt.join("Docs/very-frag")).unwrap();
        f.write_all(&piece).unwrap();
        drop(f);
        v.extend_from_slice(&piece);
        put(&mut files, &format!("Spacers/small-{i:03}"), rng.bytes(4096));
    }
    files.push(("Docs/very-frag".into(), v));
    put(&mut files, "Docs/fills-the-holes.bin", rng.bytes(1536 * 1024));
    // Sparse: a hole then data.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(mnt.join("sparse.bin")).unwrap();
        f.seek(SeekFrom::Start(2 * MIB)).unwrap();
        let tail = rng.bytes(100_000);
        f.write_all(&tail).unwrap();
        let mut data = vec![0u8; 2 * MIB as usize];
        data.extend_from_slice(&tail);
        files.push(("sparse.bin".into(), data));
    }
    let mut written: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    let mut i = 0;
    while written < total {
        let size = match i % 3 {
            0 => rng.next_u64() % 100_000,
            _ => (rng.next_u64() % (3 * MIB)).min(total - written),
        };
        let dir = ["", "Docs/", "Docs/Deep/"][i % 3];
        put(&mut files, &format!("{dir}file-{i:03}.bin"), rng.bytes(size as usize));
        written += size;
        i += 1;
    }
    Tree { files }
}

/// An image of `size` bytes full of random garbage, formatted with `mkntfs -Q` and filled.
fn make_ntfs(dir: &Path, name: &str, size: u64, opts: &[&str], fill_bytes: u64, seed: u64) -> (PathBuf, Tree) {
    let fragment = !opts.contains(&"65536");
    let img = dir.join(name);
    std::fs::write(&img, Rng(seed ^ size).bytes(size as usize)).unwrap();
    let mut args = vec!["-F", "-Q"];
    args.extend(opts);
    args.push(s(&img));
    run("mkntfs", &args);
    let tree = {
        let m = Mounted::ntfs3g(&img, &dir.join(format!("mnt-{name}")), false);
        let t = if fill_bytes > 0 { fill(&m.0, seed, fill_bytes, fragment) } else { Tree { files: Vec::new() } };
        run("sync", &[]);
        t
    };
    (img, tree)
}

/// Walks the whole image in 64 KiB steps, as the backup does; checks every answer.
fn walk(map: &mut dyn UsedMap, size: u64, chunk: u64) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = Vec::new();
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        out.clear();
        map.used_ranges(off, len, &mut out).unwrap();
        let mut prev = off;
        for r in &out {
            assert!(
                r.start >= prev && r.start < r.end && r.end <= off + len,
                "range {r:?} out of order or outside chunk at {off}"
            );
            prev = r.end;
        }
        for r in out.drain(..) {
            match all.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => all.push(r),
            }
        }
        off += len;
    }
    all
}

fn total(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
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

fn masked_copy(img: &Path, ranges: &[Range<u64>], to: &Path) {
    let data = std::fs::read(img).unwrap();
    let mut out = vec![0u8; data.len()];
    for r in ranges {
        out[r.start as usize..r.end as usize].copy_from_slice(&data[r.start as usize..r.end as usize]);
    }
    std::fs::write(to, out).unwrap();
}

#[test]
fn map_covers_exactly_the_used_clusters_and_keeps_every_file() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (size, opts)) in [
        (64 * MIB, vec![]),
        (48 * MIB, vec!["-c", "512"]),
        (96 * MIB, vec!["-c", "65536"]),
        (64 * MIB, vec!["-s", "4096", "-c", "8192"]),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("mkntfs {opts:?}");
        let name = format!("fs{i}.img");
        let (img, tree) = make_ntfs(dir.path(), &name, size, &opts, size * 45 / 100, 100 + i as u64);
        let vol = Volume::open(&img, false).unwrap();
        let mut map =
            NtfsMap::probe(&vol.region()).unwrap_or_else(|e| panic!("{what}: {e:#}")).expect("NTFS recognised");
        assert_eq!(map.filesystem(), Some("ntfs"));
        let ranges = walk(&mut map, vol.size, 64 * 1024);
        let mapped = total(&ranges);
        let (fs_bytes, free) = ntfs_counts(&img);
        let fs_used = fs_bytes - free;
        let tail = vol.size - fs_bytes;
        assert_eq!(mapped, fs_used + tail, "{what}: map {mapped} vs ntfscluster's used {fs_used} + tail {tail}");
        assert!(tail >= 512, "{what}: the backup boot sector lies past the clusters and is kept");
        assert!(
            mapped < vol.size * 6 / 10 && mapped > vol.size * 4 / 10,
            "{what}: {mapped} of {} bytes mapped",
            vol.size
        );

        // The image with the unused bytes zeroed passes ntfsfix and holds the same files.
        let masked = dir.path().join("masked.img");
        masked_copy(&img, &ranges, &masked);
        assert_ne!(
            std::fs::read(&img).unwrap(),
            std::fs::read(&masked).unwrap(),
            "{what}: free garbage should be gone"
        );
        run("ntfsfix", &["-n", s(&masked)]);
        let m = Mounted::ntfs3g(&masked, &dir.path().join("mnt-masked"), true);
        for (rel, data) in &tree.files {
            let got = std::fs::read(m.0.join(rel)).unwrap_or_else(|e| panic!("{what}: {rel}: {e}"));
            assert!(got == *data, "{what}: {rel} differs after masking");
        }
        drop(m);
        std::fs::remove_file(&img).unwrap();
    }
}

/// Reads the bytes of `ranges` from the image, in order, cut to `size`.
fn gather(img: &Path, size: u64, ranges: &[Range<u64>]) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut out = Vec::new();
    for r in ranges {
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        f.read_exact_at(&mut buf, r.start).unwrap();
        out.extend_from_slice(&buf);
    }
    out.truncate(size as usize);
    out
}

#[test]
fn file_extents_hold_the_files_contents() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [vec![], vec!["-c", "512"]].into_iter().enumerate() {
        let (img, tree) = make_ntfs(dir.path(), &format!("f{i}.img"), 64 * MIB, &opts, 20 * MIB, 7 + i as u64);
        let vol = Volume::open(&img, false).unwrap();
        let mut map = NtfsMap::probe(&vol.region()).unwrap().unwrap();
        let cb = map.geometry().cluster_bytes;
        let content = |rel: &str| &tree.files.iter().find(|f| f.0 == rel).unwrap().1;
        for (path, rel) in [
            ("/pagefile.sys", "pagefile.sys"),
            ("/PAGEFILE.SYS", "pagefile.sys"),
            ("/frag-b", "frag-b"),
            ("/docs/very-frag", "Docs/very-frag"),
            ("/Docs/fills-the-holes.bin", "Docs/fills-the-holes.bin"),
            ("/docs/deep/DEEPER/A Long Name With Spaces.dat", "Docs/Deep/Deeper/a long name with spaces.dat"),
            ("/Many/entry-0299.txt", "Many/entry-0299.txt"),
            ("/many/ENTRY-0000.TXT", "Many/entry-0000.txt"),
            ("//Docs//Deep/file-002.bin", "Docs/Deep/file-002.bin"),
        ] {
            let (size, ranges) = fx(&mut map, path)
                .unwrap_or_else(|e| panic!("{opts:?} {path}: {e:#}"))
                .unwrap_or_else(|| panic!("{path} not found"));
            let data = content(rel);
            assert_eq!(size, data.len() as u64, "{path}: size");
            if data.len() > 1024 {
                assert!(!ranges.is_empty(), "{path}: a non-resident file has extents");
            }
            for r in &ranges {
                assert!(
                    r.start % cb == 0 && r.end % cb == 0 && r.end <= vol.size && r.start < r.end,
                    "{path}: extent {r:?}"
                );
            }
            if !ranges.is_empty() {
                assert!(gather(&img, size, &ranges) == *data, "{opts:?} {path}: extents do not hold the file's bytes");
                let clusters: u64 = ranges.iter().map(|r| r.end - r.start).sum();
                assert!(
                    clusters >= size && clusters < size + cb,
                    "{path}: {clusters} bytes of clusters for {size} bytes"
                );
            }
        }
        // With 4 KiB clusters ntfs-3g places the appends apart: the fragmented file really is
        // fragmented, and its pieces came back in file order above.
        let (_, frag) = fx(&mut map, "/frag-b").unwrap().unwrap();
        assert!(i != 0 || frag.len() > 1, "{opts:?}: frag-b should have several extents: {frag:?}");
        let (_, very) = fx(&mut map, "/Docs/very-frag").unwrap().unwrap();
        assert!(
            i != 0 || very.len() > 150,
            "{opts:?}: very-frag should have its runs in several records: {} extents",
            very.len()
        );
        // Resident files: their size, no extents.
        assert_eq!(fx(&mut map, "/tiny.txt").unwrap(), Some((12, vec![])));
        assert_eq!(
            fx(&mut map, "/Many/entry-0042.txt").unwrap(),
            Some((content("Many/entry-0042.txt").len() as u64, vec![]))
        );
        assert_eq!(fx(&mut map, "/empty").unwrap(), Some((0, vec![])));
        // The sparse file: only its data clusters, no hole.
        let (size, sparse) = fx(&mut map, "/sparse.bin").unwrap().unwrap();
        assert_eq!(size, 2 * MIB + 100_000);
        assert!(total(&sparse) < 200_000, "sparse.bin's hole holds no clusters: {sparse:?}");
        // Missing files and paths through files are not there; directories are not files.
        assert_eq!(fx(&mut map, "/hiberfil.sys").unwrap(), None);
        assert_eq!(fx(&mut map, "/Docs/nope").unwrap(), None);
        assert_eq!(fx(&mut map, "/nodir/pagefile.sys").unwrap(), None);
        assert_eq!(fx(&mut map, "/tiny.txt/below").unwrap(), None);
        assert!(fx(&mut map, "/Docs").is_err());
        assert!(fx(&mut map, "/").is_err());
        // The map still works after the lookups.
        assert!(total(&walk(&mut map, vol.size, 8 * MIB)) > 20 * MIB);
    }
    assert_eq!(default_exclusions(), &["/pagefile.sys", "/hiberfil.sys", "/swapfile.sys"]);
    assert_eq!(NtfsMap::default_exclusions(), default_exclusions());
}

#[test]
fn a_large_sparse_volume_maps_little_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 30).unwrap();
    run("mkntfs", &["-F", "-Q", s(&img)]);
    let vol = Volume::open(&img, false).unwrap();
    let mut map = NtfsMap::probe(&vol.region()).unwrap().unwrap();
    let mapped = total(&walk(&mut map, vol.size, 16 * MIB));
    let (fs_bytes, free) = ntfs_counts(&img);
    assert_eq!(mapped, fs_bytes - free + (vol.size - fs_bytes));
    assert!(mapped < 128 * MIB, "an empty 64 GiB NTFS maps {mapped} bytes");
}

#[test]
fn other_content_is_not_ntfs_and_detection_picks_ntfs() {
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.img");
    std::fs::write(&zero, vec![0u8; MIB as usize]).unwrap();
    assert!(NtfsMap::probe(&Volume::open(&zero, false).unwrap().region()).unwrap().is_none());
    let fat = dir.path().join("fat.img");
    std::fs::write(&fat, vec![0u8; 16 * MIB as usize]).unwrap();
    run("mkfs.vfat", &[s(&fat)]);
    assert!(NtfsMap::probe(&Volume::open(&fat, false).unwrap().region()).unwrap().is_none());
    let (img, _) = make_ntfs(dir.path(), "n.img", 16 * MIB, &[], 0, 1);
    let d = rime_volume::fs::detect(&Volume::open(&img, false).unwrap().region());
    assert_eq!(d.map.filesystem(), Some("ntfs"));
    assert!(d.warning.is_none());
}

/// Offsets of MFT records 0, 5 and 6 and the record size, from the boot sector (the test's own
/// reading, for aiming corruptions).
fn record_offsets(img: &[u8]) -> (usize, usize) {
    let bps = u16::from_le_bytes([img[11], img[12]]) as usize;
    let cb = bps * img[13] as usize;
    let mft = u64::from_le_bytes(img[0x30..0x38].try_into().unwrap()) as usize * cb;
    let raw = img[0x40] as i8;
    let rb = if raw > 0 { raw as usize * cb } else { 1 << -(raw as i32) };
    (mft, rb)
}

/// Offset within record `rec` (at `at`) of its unnamed $DATA attribute.
fn data_attr(img: &[u8], at: usize) -> usize {
    let mut off = at + u16::from_le_bytes([img[at + 0x14], img[at + 0x15]]) as usize;
    loop {
        let ty = u32::from_le_bytes(img[off..off + 4].try_into().unwrap());
        assert_ne!(ty, 0xFFFF_FFFF, "no $DATA");
        if ty == 0x80 && img[off + 9] == 0 {
            return off;
        }
        off += u32::from_le_bytes(img[off + 4..off + 8].try_into().unwrap()) as usize;
    }
}

fn probe_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<Option<NtfsMap>> {
    std::fs::write(path, bytes).unwrap();
    NtfsMap::probe(&Volume::open(path, false).unwrap().region())
}

#[test]
fn nonsense_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_ntfs(dir.path(), "n.img", 16 * MIB, &[], 2 * MIB, 3);
    let good = std::fs::read(&img).unwrap();
    let (mft, rb) = record_offsets(&good);
    let rec6 = mft + 6 * rb;
    let bad = dir.path().join("bad.img");
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        probe_bytes(&bad, &b)
    };
    assert!(with(&|_| {}).unwrap().is_some());
    let err = |what: &str, r: anyhow::Result<Option<NtfsMap>>| match r {
        Err(_) => {}
        Ok(_) => panic!("{what} should be an error"),
    };
    err("a volume larger than the image", with(&|b| b[0x28..0x30].copy_from_slice(&(1u64 << 40).to_le_bytes())));
    err("bytes per sector 3", with(&|b| b[0x0B..0x0D].copy_from_slice(&3u16.to_le_bytes())));
    err("sectors per cluster 3", with(&|b| b[0x0D] = 3));
    err("MFT record size 0", with(&|b| b[0x40] = 0));
    err("MFT record size 2^30", with(&|b| b[0x40] = (-30i8) as u8));
    err("MFT outside the volume", with(&|b| b[0x30..0x38].copy_from_slice(&(1u64 << 40).to_le_bytes())));
    err("missing signature", with(&|b| b[510] = 0));
    // A torn record: a sector of record 6 not ending with the update sequence number.
    err("torn record 6", with(&|b| b[rec6 + 510] ^= 0xFF));
    err("record 6 magic", with(&|b| b[rec6] = b'X'));
    err("update sequence count", with(&|b| b[rec6 + 6] = 9));
    // $Bitmap's data runs: a run header with a 15-byte length, a run past the volume's end,
    // a run that overlaps $MFT's first run is fine on its own, but a stream whose runs overlap
    // each other is not.
    let d = data_attr(&good, rec6);
    let mp = d + u16::from_le_bytes([good[d + 0x20], good[d + 0x21]]) as usize;
    err("run header 0x0F", with(&|b| b[mp] = 0x0F));
    err(
        "run past the end",
        with(&|b| {
            let (ls, os) = ((b[mp] & 0xF) as usize, (b[mp] >> 4) as usize);
            for k in 0..os {
                b[mp + 1 + ls + k] = if k == os - 1 { 0x7F } else { 0xFF };
            }
        }),
    );
    err(
        "zero-length run",
        with(&|b| {
            let ls = (b[mp] & 0xF) as usize;
            for k in 0..ls {
                b[mp + 1 + k] = 0;
            }
        }),
    );
    err(
        "bitmap too small",
        with(&|b| {
            b[d + 0x30..d + 0x38].copy_from_slice(&16u64.to_le_bytes());
            b[d + 0x38..d + 0x40].copy_from_slice(&16u64.to_le_bytes());
        }),
    );
    err("attribute length 0", with(&|b| b[d + 4..d + 8].copy_from_slice(&0u32.to_le_bytes())));
    // The same two runs twice: overlapping runs within one stream.
    let d0 = data_attr(&good, mft);
    let mp0 = d0 + u16::from_le_bytes([good[d0 + 0x20], good[d0 + 0x21]]) as usize;
    err(
        "$MFT runs that overlap themselves",
        with(&|b| {
            let h = b[mp0];
            let n = 1 + (h & 0xF) as usize + (h >> 4) as usize;
            if b[mp0 + n] == 0 {
                // One run: repeat it with a zero offset (same clusters again).
                let ls = (h & 0xF) as usize;
                b[mp0 + n] = 0x10 | h & 0xF;
                let len: Vec<u8> = b[mp0 + 1..mp0 + 1 + ls].to_vec();
                b[mp0 + n + 1..mp0 + n + 1 + ls].copy_from_slice(&len);
                b[mp0 + n + 1 + ls] = 0;
                b[mp0 + n + 2 + ls] = 0;
                // Highest VCN grows accordingly.
                let hi = u64::from_le_bytes(b[d0 + 0x18..d0 + 0x20].try_into().unwrap());
                b[d0 + 0x18..d0 + 0x20].copy_from_slice(&(2 * hi + 1).to_le_bytes());
            }
        }),
    );
}

#[test]
fn a_dirty_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_ntfs(dir.path(), "dirty.img", 16 * MIB, &[], MIB, 5);
    assert!(NtfsMap::probe(&Volume::open(&img, false).unwrap().region()).unwrap().is_some());
    // ntfsfix schedules a check: it sets the dirty flag.
    run("ntfsfix", &[s(&img)]);
    let err = NtfsMap::probe(&Volume::open(&img, false).unwrap().region()).err().expect("a dirty volume is an error");
    assert!(format!("{err:#}").contains("dirty"), "{err:#}");
}

/// Byte offset of `$LogFile`'s data: its first run, from `ntfsinfo`.
fn logfile_offset(img: &Path) -> u64 {
    let info = run("ntfsinfo", &["-i", "2", "-v", s(img)]);
    let cluster: u64 = run("ntfsinfo", &["-m", s(img)])
        .lines()
        .find_map(|l| l.trim().strip_prefix("Cluster Size:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("cluster size");
    let runs = info.split("Runlist:").nth(1).expect("$LogFile's runlist");
    let lcn = runs.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).expect("first run");
    u64::from_str_radix(lcn.trim_start_matches("0x"), 16).unwrap() * cluster
}

/// A restart page of 4096 bytes as Windows writes it (update sequence array applied), with a
/// restart area naming the client list and flags.
fn restart_page(lsn: u64, client_in_use: u16, flags: u16) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    p[0..4].copy_from_slice(b"RSTR");
    p[4..6].copy_from_slice(&0x1Eu16.to_le_bytes()); // update sequence array offset
    p[6..8].copy_from_slice(&9u16.to_le_bytes()); // 8 sectors + 1
    p[0x10..0x14].copy_from_slice(&4096u32.to_le_bytes()); // system page size
    p[0x14..0x18].copy_from_slice(&4096u32.to_le_bytes()); // log page size
    p[0x18..0x1A].copy_from_slice(&0x30u16.to_le_bytes()); // restart area offset
    p[0x1A..0x1C].copy_from_slice(&1u16.to_le_bytes());
    p[0x1C..0x1E].copy_from_slice(&1u16.to_le_bytes());
    let ra = 0x30;
    p[ra..ra + 8].copy_from_slice(&lsn.to_le_bytes());
    p[ra + 8..ra + 10].copy_from_slice(&1u16.to_le_bytes()); // log clients
    p[ra + 10..ra + 12].copy_from_slice(&0xFFFFu16.to_le_bytes()); // free list
    p[ra + 12..ra + 14].copy_from_slice(&client_in_use.to_le_bytes());
    p[ra + 14..ra + 16].copy_from_slice(&flags.to_le_bytes());
    // Update sequence number 7: the last two bytes of each sector move into the array.
    p[0x1E..0x20].copy_from_slice(&7u16.to_le_bytes());
    for i in 0..8 {
        let end = (i + 1) * 512 - 2;
        let saved = [p[end], p[end + 1]];
        p[0x20 + 2 * i..0x22 + 2 * i].copy_from_slice(&saved);
        p[end..end + 2].copy_from_slice(&7u16.to_le_bytes());
    }
    p
}

/// A `$LogFile` that Windows has not replayed (a crash, fast-startup hibernation) makes the
/// bitmap untrusted; an empty one (what ntfs-3g leaves) or a clean restart area does not.
#[test]
fn an_unclean_logfile_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_ntfs(dir.path(), "log.img", 16 * MIB, &[], MIB, 8);
    let at = logfile_offset(&img);
    let probe = || NtfsMap::probe(&Volume::open(&img, false).unwrap().region());
    assert!(probe().unwrap().is_some(), "an empty $LogFile is clean");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let write = |page: &[u8], second: bool| {
        std::os::unix::fs::FileExt::write_all_at(&f, page, at + if second { 4096 } else { 0 }).unwrap()
    };
    // Clean restart areas: no client in use, or the clean flag.
    write(&restart_page(100, 0xFFFF, 0), false);
    write(&restart_page(90, 0, 0x2), true);
    assert!(probe().unwrap().is_some());
    // The newer page says a client is active and the volume not clean.
    write(&restart_page(200, 0, 0), true);
    let err = probe().err().expect("an unclean $LogFile is not trusted");
    assert!(err.downcast_ref::<rime_volume::fs::Untrusted>().is_some(), "{err:#}");
    assert!(format!("{err:#}").contains("$LogFile"), "{err:#}");
    let d = rime_volume::fs::detect(&Volume::open(&img, false).unwrap().region());
    assert!(d.map.filesystem().is_none() && d.warning.as_deref().is_some_and(|w| w.contains("$LogFile")));
    // An older unclean page does not override a newer clean one.
    write(&restart_page(50, 0, 0), true);
    assert!(probe().unwrap().is_some());
}

#[test]
fn damaged_filesystems_are_rejected_or_mapped_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_ntfs(dir.path(), "good.img", 24 * MIB, &[], 6 * MIB, 11);
    let good = std::fs::read(&img).unwrap();
    let (mft, rb) = record_offsets(&good);
    let bad = dir.path().join("bad.img");
    let mut rng = Rng(0xD1CE_5EED_0000_0001);
    let (mut rejected, mut mapped) = (0, 0);
    for round in 0..240 {
        let mut b = good.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let pos = match round % 4 {
                0 => rng.next_u64() as usize % 512,
                1 => mft + 6 * rb + rng.next_u64() as usize % rb,
                2 if round % 8 == 2 => mft + 3 * rb + rng.next_u64() as usize % rb,
                2 => mft + rng.next_u64() as usize % rb,
                _ => mft + 5 * rb + rng.next_u64() as usize % rb,
            };
            b[pos] = rng.next_u64() as u8;
        }
        match probe_bytes(&bad, &b) {
            Ok(Some(mut map)) => {
                mapped += 1;
                let size = b.len() as u64;
                let mut out = Vec::new();
                let mut off = 0;
                while off < size {
                    out.clear();
                    let len = (64 * 1024).min(size - off);
                    if map.used_ranges(off, len, &mut out).is_err() {
                        break;
                    }
                    assert!(out.iter().all(|r| r.start >= off && r.end <= off + len && r.start < r.end));
                    off += len;
                }
                for p in ["/pagefile.sys", "/Docs/Deep/Deeper/a long name with spaces.dat", "/Many/entry-0007.txt"] {
                    if let Ok(Some((_, ranges))) = fx(&mut map, p) {
                        assert!(ranges.iter().all(|r| r.start < r.end && r.end <= size), "{p}: {ranges:?}");
                    }
                }
            }
            Ok(None) | Err(_) => rejected += 1,
        }
    }
    assert!(rejected > 0, "no corruption was ever detected");
    assert!(mapped > 0, "every corruption was rejected");
}

/// `file_extents` as (size, ranges), checking that file offsets run in order without overlap.
fn fx(map: &mut NtfsMap, path: &str) -> anyhow::Result<Option<(u64, Vec<std::ops::Range<u64>>)>> {
    Ok(map.file_extents(path)?.map(|fe| {
        let mut next = 0;
        for e in &fe.extents {
            assert!(e.file_offset >= next, "{path}: extents out of file order");
            next = e.file_offset + (e.range.end - e.range.start);
        }
        (fe.size, fe.extents.into_iter().map(|e| e.range).collect())
    }))
}
