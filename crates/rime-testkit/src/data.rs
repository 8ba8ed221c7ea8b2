//! Reproducible data: one small PRNG (splitmix64) for every test, and files of its bytes.

use std::io::Write;
use std::path::Path;

/// splitmix64: reproducible "random" data without extra crates. `Rng(seed)` and
/// [`Rng::new`] both work.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }

    /// Compressible English-like text of about `len` bytes.
    pub fn text(&mut self, len: usize) -> String {
        const WORDS: &[&str] = &[
            "the",
            "volume",
            "backup",
            "block",
            "restore",
            "snapshot",
            "chunk",
            "repository",
            "filesystem",
            "inode",
            "bitmap",
            "group",
            "journal",
            "extent",
            "server",
            "virtual",
            "machine",
            "disk",
            "image",
            "verify",
            "prune",
            "retention",
            "daily",
            "weekly",
            "and",
            "of",
            "to",
            "a",
            "in",
            "is",
            "with",
            "for",
        ];
        let mut s = String::with_capacity(len + 16);
        let mut col = 0;
        while s.len() < len {
            let w = WORDS[self.below(WORDS.len() as u64) as usize];
            s.push_str(w);
            col += w.len() + 1;
            if col > 72 {
                s.push('\n');
                col = 0;
            } else {
                s.push(' ');
            }
        }
        s
    }
}

/// Writes `len` bytes of `rng` to a new file.
pub fn write_random(path: &Path, rng: &mut Rng, len: u64) {
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut buf = vec![0u8; crate::MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(crate::MIB) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// Writes `len` deterministic random bytes (from `seed`) to a new file.
pub fn write_random_file(path: &Path, seed: u64, len: u64) {
    write_random(path, &mut Rng::new(seed), len)
}

/// Bytes of the regular files under `dir` (recursively; symlinks not followed).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else { continue };
        if m.is_dir() {
            total += dir_bytes(&e.path());
        } else if m.is_file() {
            total += m.len();
        }
    }
    total
}
