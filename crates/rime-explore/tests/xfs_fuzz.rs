//! The XFS reader against damaged metadata: real images (v4 made by `mkfs.xfs -p`, v5 filled
//! through the kernel with a bmbt file, xattrs and every directory format) get random bytes
//! changed in their metadata blocks (inodes, directory, bmbt, symlink and attribute blocks; on
//! v5 with the CRCs recomputed so the damage reaches the parsers), and the whole tree is walked
//! through the reader directly — not through the explorer's panic guard. Every call must return
//! (an error is fine) without a panic, an overflow or an endless loop. Needs root and xfsprogs;
//! skipped (with a message) otherwise. `FUZZ_DEBUG=1` prints the failing calls of a walk.

use rime_explore::xfs::XfsTree;
use rime_explore::{FileTree, Kind, NodeId};
use rime_volume::{BlockSource, Region};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const BS: u64 = 4096;

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
}

fn must(program: &str, args: &[&str]) {
    let o = Command::new(program).args(args).output().unwrap();
    assert!(o.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// An image file with some 4 KiB blocks replaced.
struct Patched {
    file: File,
    blocks: HashMap<u64, Vec<u8>>,
}

impl BlockSource for Patched {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)?;
        let end = offset + buf.len() as u64;
        for (&b, data) in &self.blocks {
            let (s, e) = (b * BS, (b + 1) * BS);
            if e <= offset || s >= end {
                continue;
            }
            let (a, z) = (s.max(offset), e.min(end));
            buf[(a - offset) as usize..(z - offset) as usize]
                .copy_from_slice(&data[(a - s) as usize..(z - s) as usize]);
        }
        Ok(())
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn crc_fix(buf: &mut [u8], at: usize) {
    buf[at..at + 4].fill(0);
    let c = crc32c::crc32c(buf);
    buf[at..at + 4].copy_from_slice(&c.to_le_bytes());
}

/// Recomputes the CRCs of the v5 structures in one 4 KiB block, recognised by their magic.
fn fix_v5(block: &mut [u8], inode_size: usize) {
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    if &block[0..2] == b"IN" {
        for ino in block.chunks_mut(inode_size) {
            if &ino[0..2] == b"IN" {
                crc_fix(ino, 100);
            }
        }
        return;
    }
    match be32(block, 0) {
        0x5844_4233 | 0x5844_4433 | 0x5844_4633 => crc_fix(block, 4), // XDB3, XDD3, XDF3
        0x424D_4133 => crc_fix(block, 64),                            // BMA3
        0x5853_4C4D | 0x5841_524D => crc_fix(block, 12),              // XSLM, XARM
        _ => {
            let m = u16::from_be_bytes([block[8], block[9]]);
            if matches!(m, 0x3BEE | 0x3EBE | 0x3DF1 | 0x3FF1) {
                crc_fix(block, 12); // attr leaf, da node, dir3 leaf1/leafn
            }
        }
    }
}

/// Blocks holding metadata the file reader parses.
fn metadata_blocks(image: &Path) -> Vec<u64> {
    let f = File::open(image).unwrap();
    let len = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        FileExt::read_exact_at(&f, &mut buf[..n], at).unwrap();
        for (i, b) in buf[..n].chunks(BS as usize).enumerate() {
            let m = u32::from_be_bytes(b[0..4].try_into().unwrap());
            let m16 = u16::from_be_bytes([b[8], b[9]]);
            let known = &b[0..2] == b"IN"
                || matches!(
                    m,
                    0x5844_3242 | 0x5844_3244 | 0x5844_4233 | 0x5844_4433 | 0x424D_4150 | 0x424D_4133 | 0x5853_4C4D
                )
                || matches!(m16, 0xFBEE | 0x3BEE | 0xFEBE | 0x3EBE);
            if known {
                out.push(at / BS + i as u64);
            }
        }
        at += n as u64;
    }
    out
}

/// Walks everything reachable, bounded; returns the nodes visited and the calls that failed.
fn walk(fs: &dyn FileTree) -> (usize, usize) {
    let mut errors = 0;
    let mut seen = HashSet::new();
    let mut stack: Vec<NodeId> = vec![fs.root()];
    let mut buf = vec![0u8; 256 * 1024];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) || seen.len() > 50_000 {
            continue;
        }
        let Ok(st) = fs.stat(id).inspect_err(|e| {
            if std::env::var("FUZZ_DEBUG").is_ok() {
                eprintln!("stat {id}: {e:#}")
            }
        }) else {
            errors += 1;
            continue;
        };
        errors += fs.xattrs(id).is_err() as usize;
        match st.kind {
            Kind::Dir => match fs.read_dir(id) {
                Ok(entries) => stack.extend(entries.iter().map(|e| e.id)),
                Err(_) => errors += 1,
            },
            Kind::Symlink => {
                errors += fs
                    .read_link(id)
                    .inspect_err(|e| {
                        if std::env::var("FUZZ_DEBUG").is_ok() {
                            eprintln!("link {id}: {e:#}")
                        }
                    })
                    .is_err() as usize;
            }
            Kind::File => {
                match fs.data_ranges(id) {
                    Ok(ranges) => {
                        for r in ranges.iter().take(64) {
                            let n = ((r.end - r.start) as usize).min(buf.len());
                            errors += fs.read_at(id, r.start, &mut buf[..n]).is_err() as usize;
                        }
                    }
                    Err(_) => errors += 1,
                }
                let _ = fs.read_at(id, st.size.saturating_sub(10), &mut buf[..4096]);
            }
            _ => {}
        }
    }
    (seen.len(), errors)
}

fn fuzz(image: &Path, v5: bool, inode_size: usize, rounds: u64, seed: u64) {
    let clean = Region::from_source(
        Arc::new(File::open(image).unwrap()),
        image,
        File::open(image).unwrap().metadata().unwrap().len(),
    );
    let fs = XfsTree::open(clean.clone()).unwrap().expect("an XFS filesystem");
    let (nodes, errors) = walk(&fs);
    assert!(nodes > 1000 && errors == 0, "the clean image walks {nodes} nodes with {errors} errors");
    let mut damaged_rounds = 0;
    let meta = metadata_blocks(image);
    assert!(meta.len() > 20, "{} metadata blocks", meta.len());
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let mut blocks = HashMap::new();
        for _ in 0..1 + rng.below(3) {
            let b = meta[rng.below(meta.len() as u64) as usize];
            let mut data = vec![0u8; BS as usize];
            FileExt::read_exact_at(&File::open(image).unwrap(), &mut data, b * BS).unwrap();
            for _ in 0..1 + rng.below(16) {
                // Headers and inode cores are where the interesting fields are.
                let pos = if rng.below(2) == 0 { rng.below(256) } else { rng.below(BS) } as usize;
                let pos = if &data[0..2] == b"IN" && rng.below(2) == 0 {
                    (rng.below(BS / inode_size as u64) as usize) * inode_size + rng.below(176) as usize
                } else {
                    pos
                };
                data[pos] = match rng.below(4) {
                    0 => 0,
                    1 => 0xFF,
                    _ => rng.next() as u8,
                };
            }
            if v5 {
                fix_v5(&mut data, inode_size);
            }
            blocks.insert(b, data);
        }
        let which: Vec<u64> = blocks.keys().copied().collect();
        let source = Patched { file: File::open(image).unwrap(), blocks };
        let region = Region::from_source(Arc::new(source), image, clean.len);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match XfsTree::open(region) {
            Ok(Some(fs)) => walk(&fs),
            _ => (0, 1),
        }));
        let (n, e) = r.unwrap_or_else(|_| panic!("round {round} (seed {seed}, blocks {which:?}) panicked"));
        if e > 0 || n != nodes {
            damaged_rounds += 1;
        }
    }
    // The damage reaches the parsers (most rounds hit a field that is checked).
    assert!(damaged_rounds * 3 > rounds, "only {damaged_rounds} of {rounds} rounds noticed the damage");
}

fn tools() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !run("mkfs.xfs", &["-V"]) {
        eprintln!("skipped: needs root and mkfs.xfs");
        return false;
    }
    true
}

/// A prototype for `mkfs.xfs -p`: every directory format, files, symlinks of up to
/// `2 * max_link` bytes, fifos and device nodes. (mkfs.xfs 6.1 writes v5 remote symlinks
/// without their block headers — the kernel rejects them too — so v5 images keep them local.)
fn write_tree_proto(dir: &Path, max_link: usize) -> String {
    let mut s = String::from("/dev/null\n0 0\nd--755 0 0\n");
    let file = dir.join("content");
    std::fs::write(&file, "some file content\n".repeat(300)).unwrap();
    for (name, n, len) in [("sf", 5, 4), ("blk", 40, 8), ("leaf", 250, 12), ("node", 800, 12), ("big", 3000, 50)] {
        s.push_str(&format!(" {name} d--755 0 0\n"));
        for i in 0..n {
            let e = format!("e{i:05}{}", "n".repeat(len));
            match i % 5 {
                0 => s.push_str(&format!("  {e} ---644 1 2 {}\n", file.display())),
                1 => s.push_str(&format!("  {e} l--777 0 0 {}\n", "t/".repeat(i % max_link + 1))),
                2 => s.push_str(&format!("  {e} p--600 0 0\n")),
                3 => s.push_str(&format!("  {e} c--600 0 0 1 {i}\n")),
                _ => s.push_str(&format!("  {e} ---600 0 0 /dev/null\n")),
            }
        }
        s.push_str(" $\n");
    }
    s.push_str("$\n");
    s
}

#[test]
fn damaged_v4_metadata_never_panics() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("proto");
    std::fs::write(&proto, write_tree_proto(dir.path(), 300)).unwrap();
    let image = dir.path().join("v4.img");
    File::create(&image).unwrap().set_len(320 << 20).unwrap();
    must("mkfs.xfs", &["-q", "-m", "crc=0", "-i", "size=256", "-p", proto.to_str().unwrap(), image.to_str().unwrap()]);
    fuzz(&image, false, 256, 200, 0x5EED_0004);
}

#[test]
fn damaged_v5_metadata_with_good_crcs_never_panics() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("proto");
    std::fs::write(&proto, write_tree_proto(dir.path(), 140)).unwrap();
    let image = dir.path().join("v5.img");
    File::create(&image).unwrap().set_len(320 << 20).unwrap();
    must("mkfs.xfs", &["-q", "-p", proto.to_str().unwrap(), image.to_str().unwrap()]);
    // Through the kernel: a fragmented file (bmbt) and xattrs (short-form, leaf, remote).
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    must("mount", &["-o", "loop", image.to_str().unwrap(), mnt.to_str().unwrap()]);
    let f = File::create(mnt.join("frag")).unwrap();
    for b in (0..3000u64).step_by(2) {
        f.write_all_at(&[b as u8; 4096], b * 4096).unwrap();
    }
    drop(f);
    for i in 0..20 {
        std::os::unix::fs::symlink("r/".repeat(200 + i * 10), mnt.join(format!("remote-{i}"))).unwrap();
    }
    let attrs = |path: &Path, n: usize, len: usize| {
        use std::os::unix::ffi::OsStrExt;
        let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        for i in 0..n {
            let name = std::ffi::CString::new(format!("user.a{i}")).unwrap();
            let value = vec![b'v'; len];
            // SAFETY: valid C strings and value buffer.
            let r = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
            assert_eq!(r, 0, "setxattr");
        }
    };
    attrs(&mnt.join("sf"), 2, 10);
    attrs(&mnt.join("blk"), 30, 40);
    attrs(&mnt.join("leaf"), 1, 3000);
    let ok = run("umount", &[mnt.to_str().unwrap()]);
    assert!(ok, "umount");
    fuzz(&image, true, 512, 200, 0x5EED_0005);
}
