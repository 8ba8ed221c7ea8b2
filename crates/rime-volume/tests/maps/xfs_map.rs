//! The XFS used-block map against real filesystems made by mkfs.xfs (filled through a loop mount,
//! or through a protofile where the kernel cannot mount the format), and against damaged ones.
//!
//! Needs xfsprogs; the mounted variants need root, loop devices and `filefrag` (e2fsprogs).

use rime_volume::fs::xfs::XfsMap;
use rime_volume::{UsedMap, Volume};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::support::*;

const PROBE: Probe = |r| Ok(XfsMap::probe(r)?.map(|m| Box::new(m) as Box<dyn UsedMap>));

fn mkfs_xfs(img: &Path, size_mib: u64, args: &[&str]) {
    new_image(img, size_mib);
    let mut all = vec!["-q", "-f"];
    all.extend(args);
    all.push(s(img));
    run("mkfs.xfs", &all);
}

/// Byte ranges of the volume that hold `file`'s data (FIEMAP through filefrag).
fn physical_extents(file: &Path, block_size: u64) -> Vec<Range<u64>> {
    let out = run("filefrag", &["-v", &format!("-b{block_size}"), s(file)]);
    let mut v = Vec::new();
    for line in out.lines() {
        let fields: Vec<&str> = line.split(':').map(str::trim).collect();
        if fields.len() < 4 || fields[0].parse::<u64>().is_err() {
            continue;
        }
        let phys: Vec<&str> = fields[2].split("..").map(str::trim).collect();
        let (a, b) = (phys[0].parse::<u64>().unwrap(), phys[1].parse::<u64>().unwrap());
        v.push(a * block_size..(b + 1) * block_size);
    }
    v
}

/// Fills a mounted filesystem to about `target` bytes with big and small random files, then
/// deletes every other small file so that free space is fragmented (multi-level free-space
/// btrees). Returns the data extents of the files that remain.
fn fill_mounted(
    img: &Path,
    mnt: &Path,
    seed: u64,
    target: u64,
    small_files: usize,
    block_size: u64,
) -> Vec<Range<u64>> {
    let m = Mounted::new(img, mnt, "");
    let mut rng = Rng(seed | 1);
    let dirs = ["a", "b/c", "d/e/f"];
    for d in dirs {
        fs::create_dir_all(mnt.join(d)).unwrap();
    }
    let mut small_total = 0u64;
    for i in 0..small_files {
        let len = 1 + rng.next_u64() % (3 * block_size);
        write_random(&mnt.join(dirs[i % 3]).join(format!("small-{i}")), &mut rng, len);
        small_total += len;
    }
    let big = target.saturating_sub(small_total) / 4;
    for i in 0..4 {
        write_random(&mnt.join(format!("big-{i}.bin")), &mut rng, big + i * 12345);
    }
    std::os::unix::fs::symlink("a/small-0", mnt.join("link")).unwrap();
    run("sync", &[]);
    for i in (1..small_files).step_by(2) {
        fs::remove_file(mnt.join(dirs[i % 3]).join(format!("small-{i}"))).unwrap();
    }
    run("sync", &[]);
    let mut extents = Vec::new();
    for entry in walk(mnt) {
        extents.extend(physical_extents(&entry, block_size));
    }
    drop(m);
    extents
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// Used ranges of the whole image through the map, in 64 KiB steps as the backup asks.
fn map_ranges(img: &Path) -> (Vec<Range<u64>>, u64) {
    let vol = Volume::open(img, false).unwrap();
    let mut map =
        XfsMap::probe(&vol.region()).unwrap_or_else(|e| panic!("{}: {e:#}", img.display())).expect("XFS recognised");
    assert_eq!(map.filesystem(), Some("xfs"));
    let reported = map.reported_used_bytes().unwrap();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut off = 0;
    while off < vol.size {
        let len = (64 * 1024).min(vol.size - off);
        let before = ranges.len();
        map.used_ranges(off, len, &mut ranges).unwrap();
        for r in &ranges[before..] {
            assert!(r.start >= off && r.end <= off + len && r.start < r.end, "range {r:?} outside chunk at {off}");
        }
        off += len;
    }
    for w in ranges.windows(2) {
        assert!(w[0].end <= w[1].start, "ranges out of order: {:?} {:?}", w[0], w[1]);
    }
    (ranges, reported)
}

fn total(r: &[Range<u64>]) -> u64 {
    r.iter().map(|r| r.end - r.start).sum()
}

fn covered(ranges: &[Range<u64>], e: &Range<u64>) -> bool {
    let i = ranges.partition_point(|r| r.end <= e.start);
    // Merged ranges: a covered extent lies within consecutive ranges without gaps.
    let mut pos = e.start;
    for r in &ranges[i..] {
        if r.start > pos {
            return false;
        }
        pos = pos.max(r.end);
        if pos >= e.end {
            return true;
        }
    }
    false
}

/// Fields of `xfs_db -r -c CMD... IMG` output of the form `name = value`.
fn xfs_db_field(img: &Path, cmds: &[&str], name: &str) -> Vec<u64> {
    let mut args = vec!["-r"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run("xfs_db", &args)
        .lines()
        .filter_map(|l| {
            l.split_once(" = ").filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().parse::<u64>().unwrap())
        })
        .collect()
}

/// Sum of the AGFs' free-extent counts and the deepest free-space btree, per xfs_db.
fn agf_summary(img: &Path) -> (u64, u64, u64, u64) {
    let agcount = xfs_db_field(img, &["sb 0", "print agcount"], "agcount")[0];
    let dblocks = xfs_db_field(img, &["sb 0", "print dblocks"], "dblocks")[0];
    let bs = xfs_db_field(img, &["sb 0", "print blocksize"], "blocksize")[0];
    let mut cmds = Vec::new();
    for ag in 0..agcount {
        cmds.push(format!("agf {ag}"));
        cmds.push("print freeblks bnolevel".to_string());
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let free: u64 = xfs_db_field(img, &cmds, "freeblks").iter().sum();
    let depth = *xfs_db_field(img, &cmds, "bnolevel").iter().max().unwrap();
    (dblocks, free, bs, depth)
}

/// Bytes of the internal log.
fn log_bytes(img: &Path) -> u64 {
    let f = |n| xfs_db_field(img, &["sb 0", &format!("print {n}")], n)[0];
    f("logblocks") * f("blocksize")
}

/// Checks the map of a populated image against xfs_db and the files' own extents.
fn check_image(img: &Path, file_extents: &[Range<u64>], what: &str) -> u64 {
    let (ranges, reported) = map_ranges(img);
    let used = total(&ranges);
    let size = fs::metadata(img).unwrap().len();
    let (dblocks, free, bs, _) = agf_summary(img);
    // Used is exactly what the free-space btrees leave: the AGFs' free counts, as xfs_db reads them.
    assert_eq!(used, (dblocks - free) * bs + (size - dblocks * bs), "{what}: map vs AGF free counts");
    assert!(used >= reported, "{what}: map {used} < reported used {reported}");
    assert!(used < reported + 8 * MIB, "{what}: map {used} far above reported used {reported}");
    for e in file_extents {
        assert!(covered(&ranges, e), "{what}: file data at {e:?} is not in the used map");
    }
    used
}

#[test]
fn mounted_filesystems_map_every_file_block_and_leave_free_space_out() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (args, small, block)) in [
        (vec![], 6000, 4096u64),
        (vec!["-b", "size=1024"], 5000, 1024),
        (vec!["-s", "size=4096", "-m", "rmapbt=1,reflink=1", "-d", "agcount=3"], 3000, 4096),
        (vec!["-i", "sparse=1,size=1024", "-m", "finobt=1"], 3000, 4096),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("x{i}.img"));
        mkfs_xfs(&img, 320, &args);
        let mnt = dir.path().join(format!("mnt{i}"));
        let extents = fill_mounted(&img, &mnt, 7 + i as u64, 120 * MIB, small, block);
        assert!(extents.len() > small / 2, "{args:?}: files have extents");
        let used = check_image(&img, &extents, &format!("{args:?}"));
        let data: u64 = extents.iter().map(|e| e.end - e.start).sum();
        let log = log_bytes(&img);
        assert!(used >= data + log, "{args:?}: map {used} < file data {data} + log {log}");
        assert!(used < data + log + 24 * MIB, "{args:?}: map {used} for file data {data} + log {log}");
        assert!(used < 240 * MIB, "{args:?}: a half-full 320 MiB filesystem maps {used} bytes as used");
        if i == 1 {
            let (_, _, _, depth) = agf_summary(&img);
            assert!(depth >= 2, "1 KiB blocks with fragmented free space should give a multi-level free-space btree");
        }
    }
}

/// Writes a mkfs.xfs protofile describing `files` (name, source file) in the root directory.
fn protofile(dir: &Path, files: &[(String, PathBuf)]) -> PathBuf {
    let mut s = String::from("/dev/null\n0 0\nd--755 0 0\n");
    s.push_str("sub d--755 0 0\n");
    for (name, src) in files.iter().skip(1) {
        s.push_str(&format!("{name} ---644 0 0 {}\n", src.display()));
    }
    s.push_str("$\n");
    s.push_str(&format!("{} ---644 0 0 {}\n", files[0].0, files[0].1.display()));
    s.push_str("link l--777 0 0 sub/x\n$\n");
    let path = dir.join("proto");
    fs::write(&path, s).unwrap();
    path
}

#[test]
fn protofile_filesystems_v4_and_large_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng(99);
    let mut files = Vec::new();
    for i in 0..40u64 {
        let f = src.join(format!("f{i}"));
        write_random(&f, &mut rng, if i % 4 == 0 { 12 * MIB + i } else { 1 + i * 3000 });
        files.push((format!("f{i}"), f));
    }
    let proto = protofile(dir.path(), &files);
    let data: u64 = files.iter().map(|(_, f)| fs::metadata(f).unwrap().len()).sum();
    for (i, args) in [
        vec!["-m", "crc=0"],
        vec!["-m", "crc=0", "-b", "size=512", "-l", "size=64m"],
        vec!["-b", "size=65536"],
        vec!["-b", "size=2048", "-s", "size=2048"],
        vec!["-m", "crc=0", "-s", "size=4096", "-l", "version=2,sunit=8"],
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("p{i}.img"));
        let mut all = args.clone();
        all.extend(["-p", s(&proto)]);
        mkfs_xfs(&img, 320, &all);
        let used = check_image(&img, &[], &format!("{args:?}"));
        let log = log_bytes(&img);
        assert!(used >= data + log, "{args:?}: map {used} below the {data} bytes of file data + {log} of log");
        assert!(used < data + log + 24 * MIB, "{args:?}: map {used} for {data} bytes of data + {log} of log");
    }
}

#[test]
fn not_xfs_is_not_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero.img");
    fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let vol = Volume::open(&img, false).unwrap();
    assert!(XfsMap::probe(&vol.region()).unwrap().is_none());
    let tiny = dir.path().join("tiny.img");
    fs::write(&tiny, b"XFSB").unwrap();
    let vol = Volume::open(&tiny, false).unwrap();
    assert!(XfsMap::probe(&vol.region()).unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Damage
// ---------------------------------------------------------------------------------------------

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

/// Re-stamps the CRC of the v5 structure `buf[at..at+len]` whose checksum lives at `crc_off`.
fn fix_crc(buf: &mut [u8], at: usize, len: usize, crc_off: usize) {
    buf[at + crc_off..at + crc_off + 4].fill(0);
    let c = crc32c(&buf[at..at + len]);
    buf[at + crc_off..at + crc_off + 4].copy_from_slice(&c.to_le_bytes());
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// Layout facts of a small test image: (block size, sector size, AG blocks, AG 1's bnobt root).
fn layout(img: &[u8]) -> (usize, usize, usize, usize) {
    let bs = be32(img, 4) as usize;
    let ss = u16::from_be_bytes([img[102], img[103]]) as usize;
    let agblocks = be32(img, 84) as usize;
    let agf1 = agblocks * bs + ss;
    let root = be32(img, agf1 + 16) as usize;
    (bs, ss, agblocks, agblocks * bs + root * bs)
}

#[test]
fn damaged_filesystems_are_refused_or_mapped_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    for (variant, args) in [vec![], vec!["-m", "crc=0"], vec!["-b", "size=1024"]].into_iter().enumerate() {
        let img = dir.path().join("good.img");
        mkfs_xfs(&img, 300, &args);
        let scratch = Scratch::new(dir.path(), fs::read(&img).unwrap(), PROBE);
        let v5 = !args.contains(&"crc=0");
        let (bs, ss, agblocks, root1) = layout(&scratch.good);
        assert!(!scratch.refused::<u64>(&[]), "{args:?}: the undamaged image is refused");
        let mut rng = Rng(0x1234_5678 + variant as u64);
        let mut rejected = 0;
        for round in 0..200 {
            // Superblock, AGF of AG 0 or 1, or AG 1's free-space btree root.
            let (at, len, crc_off) = match round % 4 {
                0 => (0, ss, 224),
                1 => (ss, ss, 216),
                2 => (agblocks * bs + ss, ss, 216),
                _ => (root1, bs, 52),
            };
            let mut b = scratch.bytes(at, len);
            // Within the structure's fields (the rest of the sector is padding).
            let span = if round % 4 == 3 { len } else { 264.min(len) };
            for _ in 0..1 + rng.next_u64() % 4 {
                let pos = (rng.next_u64() % span as u64) as usize;
                b[pos] = rng.next_u64() as u8;
            }
            // Half the time make the CRC match again, so the structural checks are exercised.
            if v5 && round % 8 >= 4 {
                fix_crc(&mut b, 0, len, crc_off);
            }
            if scratch.refused(&[(at, b)]) {
                rejected += 1;
            }
        }
        // v5 CRCs catch every unrepaired corruption; on v4 many bytes are padding or fields the
        // map does not need.
        let expected = if v5 { 100 } else { 25 };
        assert!(rejected > expected, "{args:?}: only {rejected} of 200 corruptions were detected");
    }
}

#[test]
fn targeted_damage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("good.img");
    mkfs_xfs(&img, 300, &["-b", "size=1024"]);
    // Fragment free space so that some AG's bnobt has a node level.
    fill_mounted(&img, &dir.path().join("mnt"), 5, 40 * MIB, 5000, 1024);
    let scratch = Scratch::new(dir.path(), fs::read(&img).unwrap(), PROBE);
    let good = &scratch.good;
    let (bs, ss, agblocks, _) = layout(good);
    let agcount = be32(good, 88) as usize;
    let ag = (0..agcount)
        .find(|ag| be32(good, ag * agblocks * bs + ss + 28) >= 2)
        .expect("an AG with a two-level free-space btree");
    let agf = ag * agblocks * bs + ss;
    let root = be32(good, agf + 16) as usize;
    let root_at = ag * agblocks * bs + root * bs;
    let ptrs = 56 + ((bs - 56) / 12) * 8;
    let leaf = be32(good, root_at + ptrs) as usize;
    let leaf_at = ag * agblocks * bs + leaf * bs;
    let set32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    // Edits of the superblock, the AGF, the root node and its first leaf, CRCs re-stamped.
    let sb = |f: &dyn Fn(&mut [u8])| {
        let mut b = scratch.bytes(0, ss);
        f(&mut b);
        fix_crc(&mut b, 0, ss, 224);
        (0, b)
    };
    let agf_edit = |f: &dyn Fn(&mut [u8])| {
        let mut b = scratch.bytes(agf, ss);
        f(&mut b);
        fix_crc(&mut b, 0, ss, 216);
        (agf, b)
    };
    let block = |at: usize, f: &dyn Fn(&mut [u8])| {
        let mut b = scratch.bytes(at, bs);
        f(&mut b);
        fix_crc(&mut b, 0, bs, 52);
        (at, b)
    };
    type Edits = Vec<(usize, Vec<u8>)>;
    let cases: Vec<(&str, Edits)> = vec![
        (
            "a filesystem larger than the volume",
            vec![sb(&|b| {
                let dblocks = u64::from_be_bytes(b[8..16].try_into().unwrap()) + agblocks as u64;
                b[8..16].copy_from_slice(&dblocks.to_be_bytes());
                let n = be32(b, 88);
                set32(b, 88, n + 1);
            })],
        ),
        ("a wrong AG count", vec![sb(&|b| set32(b, 88, 1))]),
        ("a bad block size", vec![sb(&|b| set32(b, 4, 3000))]),
        ("a bnobt depth of 40", vec![agf_edit(&|b| set32(b, 28, 40))]),
        ("a bnobt root outside the AG", vec![agf_edit(&|b| set32(b, 16, 0x7fff_fff0))]),
        (
            "a wrong AGF free count",
            vec![agf_edit(&|b| {
                let free = be32(b, 52);
                set32(b, 52, free + 1);
            })],
        ),
        ("a bnobt node pointing at itself", vec![block(root_at, &|b| set32(b, ptrs, root as u32))]),
        (
            "a bnobt node pointing twice at one leaf",
            vec![block(root_at, &|b| {
                let first = be32(b, ptrs);
                set32(b, ptrs + 4, first);
            })],
        ),
        ("a bnobt child pointer past the AG", vec![block(root_at, &|b| set32(b, ptrs + 4, agblocks as u32 + 5))]),
        (
            "a record count larger than the block",
            vec![block(root_at, &|b| b[6..8].copy_from_slice(&5000u16.to_be_bytes()))],
        ),
        (
            "a free extent covering the AG headers",
            vec![block(root_at, &|b| set32(b, 56, 0)), block(leaf_at, &|b| set32(b, 56, 0))],
        ),
        ("a leaf with a broken sibling link", vec![block(leaf_at, &|b| set32(b, 12, leaf as u32))]),
    ];
    for (what, edits) in cases {
        assert!(scratch.refused(&edits), "{what} was not refused");
    }
    assert!(!scratch.refused::<u64>(&[]), "the undamaged image is refused");
}

/// A copy of a mounted filesystem is trusted only when its log is clean or merely covered (as
/// freezing leaves it): otherwise recent allocations may exist only in the log, and the on-disk
/// free-space btrees would call freshly written blocks free.
#[test]
fn only_clean_or_covered_logs_are_trusted() {
    let dir = tempfile::tempdir().unwrap();
    // (The kernel here no longer mounts v4 filesystems.)
    for (i, args) in [vec![], vec!["-s", "size=4096", "-l", "su=32k"]].into_iter().enumerate() {
        let img = dir.path().join(format!("live{i}.img"));
        mkfs_xfs(&img, 320, &args);
        let (frozen, dirty) = (dir.path().join("frozen.img"), dir.path().join("dirty.img"));
        let mnt = dir.path().join(format!("live-mnt{i}"));
        let before;
        {
            let _m = Mounted::new(&img, &mnt, "");
            let mut rng = Rng(3 + i as u64);
            for k in 0..50 {
                write_random(&mnt.join(format!("f{k}")), &mut rng, 100_000 + k * 999);
            }
            run("sync", &[]);
            run("fsfreeze", &["-f", s(&mnt)]);
            fs::copy(&img, &frozen).unwrap();
            run("fsfreeze", &["-u", s(&mnt)]);
            before = walk(&mnt).iter().flat_map(|f| physical_extents(f, 4096)).collect::<Vec<_>>();
            for k in 50..80 {
                write_random(&mnt.join(format!("f{k}")), &mut rng, 100_000 + k * 999);
            }
            run("sync", &[]);
            fs::copy(&img, &dirty).unwrap();
        }
        // Frozen: covered log; the map holds every file written before the freeze.
        let (ranges, _) = map_ranges(&frozen);
        for e in &before {
            assert!(covered(&ranges, e), "{args:?}: frozen copy: file data at {e:?} is not in the used map");
        }
        // Written after the freeze and synced, but not unmounted: refused — unless the kernel
        // happened to cover the log between the sync and the copy, which xfs_logprint shows.
        let logprint = run("xfs_logprint", &["-t", s(&dirty)]);
        let pending = logprint.contains("INODE")
            || logprint.lines().any(|l| l.contains("start blkno:") && !l.contains("start blkno:0x0 "));
        let vol = Volume::open(&dirty, false).unwrap();
        match XfsMap::probe(&vol.region()) {
            Err(err) => assert!(format!("{err:#}").contains("changes metadata"), "{args:?}: {err:#}"),
            Ok(_) => assert!(!pending, "{args:?}: a log with pending metadata changes was trusted:\n{logprint}"),
        }
        // Unmounted: clean.
        map_ranges(&img);
    }
}
