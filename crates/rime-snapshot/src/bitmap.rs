//! A fixed-size bitmap over a volume's blocks: one bit per block (32 MiB per TiB at 4 KiB
//! blocks), lock-free to set from many writer threads at once.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub struct Bitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl Bitmap {
    /// All bits clear.
    pub fn new(bits: u64) -> Bitmap {
        Bitmap { words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), bits }
    }

    /// All bits set.
    pub fn full(bits: u64) -> Bitmap {
        let b = Bitmap::new(bits);
        b.fill();
        b
    }

    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize].load(Relaxed) & (1 << (i % 64)) != 0
    }

    pub fn set(&self, i: u64) {
        if i < self.bits {
            self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Relaxed);
        }
    }

    /// Clears bit `i`; returns whether it was set.
    pub fn clear(&self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let mask = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!mask, Relaxed) & mask != 0
    }

    /// Sets bits `[from, to)`.
    pub fn set_range(&self, from: u64, to: u64) {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            if i.is_multiple_of(64) && i + 64 <= to {
                self.words[(i / 64) as usize].store(u64::MAX, Relaxed);
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Whether any bit in `[from, to)` is set.
    pub fn any_in(&self, from: u64, to: u64) -> bool {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            if i.is_multiple_of(64) && i + 64 <= to {
                if self.words[(i / 64) as usize].load(Relaxed) != 0 {
                    return true;
                }
                i += 64;
            } else {
                if self.get(i) {
                    return true;
                }
                i += 1;
            }
        }
        false
    }

    pub fn fill(&self) {
        for (n, w) in self.words.iter().enumerate() {
            let first = n as u64 * 64;
            let valid = (self.bits - first).min(64);
            w.store(if valid == 64 { u64::MAX } else { (1u64 << valid) - 1 }, Relaxed);
        }
    }

    pub fn clear_all(&self) {
        self.words.iter().for_each(|w| w.store(0, Relaxed));
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.load(Relaxed).count_ones() as u64).sum()
    }

    /// ORs `other` (same length) into this map.
    pub fn or_with(&self, other: &Bitmap) {
        for (a, b) in self.words.iter().zip(&other.words) {
            a.fetch_or(b.load(Relaxed), Relaxed);
        }
    }

    /// Keeps only the bits also set in `other` (same length).
    pub fn and_with(&self, other: &Bitmap) {
        for (a, b) in self.words.iter().zip(&other.words) {
            a.fetch_and(b.load(Relaxed), Relaxed);
        }
    }

    /// Moves the contents out, leaving this map clear (bits set meanwhile by other threads
    /// land in either map, never in neither).
    pub fn take(&self) -> Bitmap {
        Bitmap { words: self.words.iter().map(|w| AtomicU64::new(w.swap(0, Relaxed))).collect(), bits: self.bits }
    }

    pub fn copy(&self) -> Bitmap {
        Bitmap { words: self.words.iter().map(|w| AtomicU64::new(w.load(Relaxed))).collect(), bits: self.bits }
    }

    /// Little-endian 64-bit words.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bits: u64, bytes: &[u8]) -> Option<Bitmap> {
        let n = bits.div_ceil(64) as usize;
        if bytes.len() != n * 8 {
            return None;
        }
        let words = bytes.chunks_exact(8).map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap()))).collect();
        let b = Bitmap { words, bits };
        // Bits past the end stay clear.
        if !bits.is_multiple_of(64) {
            let last = &b.words[n - 1];
            last.fetch_and((1u64 << (bits % 64)) - 1, Relaxed);
        }
        Some(b)
    }

    /// Hex of `to_bytes`, for the control protocol.
    pub fn to_hex(&self) -> String {
        hex::encode(self.to_bytes())
    }

    pub fn from_hex(bits: u64, s: &str) -> Option<Bitmap> {
        Bitmap::from_bytes(bits, &hex::decode(s).ok()?)
    }

    /// Indices of set bits, in order, starting at `from`, at most `max` of them.
    pub fn ones_from(&self, from: u64, max: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut i = from;
        while i < self.bits && out.len() < max {
            let w = self.words[(i / 64) as usize].load(Relaxed) >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            i += w.trailing_zeros() as u64;
            if i < self.bits {
                out.push(i);
            }
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_bytes() {
        let b = Bitmap::new(200);
        b.set_range(3, 150);
        assert_eq!(b.count(), 147);
        assert!(b.any_in(0, 4) && !b.any_in(150, 200) && !b.any_in(0, 3));
        assert!(b.clear(3) && !b.clear(3));
        let c = Bitmap::from_hex(200, &b.to_hex()).unwrap();
        assert_eq!(c.count(), 146);
        assert_eq!(Bitmap::full(130).count(), 130);
        assert_eq!(c.ones_from(140, 100), (140..150).collect::<Vec<_>>());
        let t = c.take();
        assert_eq!((t.count(), c.count()), (146, 0));
    }
}
