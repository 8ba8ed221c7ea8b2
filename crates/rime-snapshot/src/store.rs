//! The difference store: old contents of blocks written after a snapshot was taken.
//!
//! Saved blocks live in a memory buffer up to a configured size, then spill to one temporary
//! file (already unlinked, so nothing is left behind by a crash) in a configured folder. The
//! total is capped: an insert past the cap fails and the engine aborts the snapshot.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct StoreLimits {
    /// Bytes kept in memory before spilling to a temporary file.
    pub memory: u64,
    /// Total bytes (memory and spill file) after which the snapshot is aborted.
    pub cap: u64,
    /// Folder of the spill file.
    pub spill_dir: PathBuf,
}

enum Slot {
    Mem(Box<[u8]>),
    File(u64),
}

#[derive(Debug)]
pub enum StoreError {
    /// The cap would be exceeded.
    Full {
        cap: u64,
    },
    Io(std::io::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full { cap } => {
                write!(f, "the difference store reached its cap of {cap} bytes")
            }
            StoreError::Io(e) => write!(f, "difference store I/O error: {e}"),
        }
    }
}

pub struct DiffStore {
    block: usize,
    limits: StoreLimits,
    slots: HashMap<u64, Slot>,
    mem_bytes: u64,
    spill: Option<File>,
    spill_slots: u64,
    free: Vec<u64>,
    bytes: u64,
    peak: u64,
    spilled_total: u64,
}

impl DiffStore {
    pub fn new(block: usize, limits: StoreLimits) -> DiffStore {
        DiffStore {
            block,
            limits,
            slots: HashMap::new(),
            mem_bytes: 0,
            spill: None,
            spill_slots: 0,
            free: Vec::new(),
            bytes: 0,
            peak: 0,
            spilled_total: 0,
        }
    }

    pub fn contains(&self, block: u64) -> bool {
        self.slots.contains_key(&block)
    }

    /// Saves one block (exactly `block` bytes).
    pub fn insert(&mut self, block: u64, data: &[u8]) -> Result<(), StoreError> {
        debug_assert_eq!(data.len(), self.block);
        if self.slots.contains_key(&block) {
            return Ok(());
        }
        let n = self.block as u64;
        if self.bytes + n > self.limits.cap {
            return Err(StoreError::Full { cap: self.limits.cap });
        }
        let slot = if self.mem_bytes + n <= self.limits.memory {
            self.mem_bytes += n;
            Slot::Mem(data.into())
        } else {
            if self.spill.is_none() {
                std::fs::create_dir_all(&self.limits.spill_dir).map_err(StoreError::Io)?;
                self.spill = Some(tempfile::tempfile_in(&self.limits.spill_dir).map_err(StoreError::Io)?);
            }
            let index = self.free.pop().unwrap_or_else(|| {
                self.spill_slots += 1;
                self.spill_slots - 1
            });
            let f = self.spill.as_ref().expect("spill file");
            f.write_all_at(data, index * n).map_err(StoreError::Io)?;
            self.spilled_total += n;
            Slot::File(index)
        };
        self.slots.insert(block, slot);
        self.bytes += n;
        self.peak = self.peak.max(self.bytes);
        Ok(())
    }

    /// Copies a saved block into `out` (exactly `block` bytes); false if it is not saved.
    pub fn get(&self, block: u64, out: &mut [u8]) -> std::io::Result<bool> {
        match self.slots.get(&block) {
            None => Ok(false),
            Some(Slot::Mem(b)) => {
                out.copy_from_slice(b);
                Ok(true)
            }
            Some(Slot::File(i)) => {
                let f = self.spill.as_ref().expect("spill file");
                f.read_exact_at(out, i * self.block as u64)?;
                Ok(true)
            }
        }
    }

    /// Frees a saved block.
    pub fn remove(&mut self, block: u64) {
        match self.slots.remove(&block) {
            None => return,
            Some(Slot::Mem(_)) => self.mem_bytes -= self.block as u64,
            Some(Slot::File(i)) => self.free.push(i),
        }
        self.bytes -= self.block as u64;
    }

    /// Saved blocks, at most `max`, lowest first.
    pub fn blocks(&self, max: usize) -> Vec<u64> {
        let mut all: Vec<u64> = self.slots.keys().copied().collect();
        all.sort_unstable();
        all.truncate(max);
        all
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn peak(&self) -> u64 {
        self.peak
    }
    pub fn cap(&self) -> u64 {
        self.limits.cap
    }
    pub fn spilled_total(&self) -> u64 {
        self.spilled_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiffStore::new(4, StoreLimits { memory: 8, cap: 16, spill_dir: dir.path().into() });
        for b in 0..4u64 {
            s.insert(b, &[b as u8; 4]).unwrap();
        }
        assert!(matches!(s.insert(9, &[9; 4]), Err(StoreError::Full { .. })));
        let mut out = [0u8; 4];
        for b in 0..4u64 {
            assert!(s.get(b, &mut out).unwrap());
            assert_eq!(out, [b as u8; 4]);
        }
        assert_eq!((s.bytes(), s.peak(), s.spilled_total()), (16, 16, 8));
        s.remove(3);
        s.insert(7, &[7; 4]).unwrap();
        assert!(s.get(7, &mut out).unwrap() && out == [7; 4]);
        assert!(!s.get(3, &mut out).unwrap());
        assert_eq!(s.blocks(10), vec![0, 1, 2, 7]);
    }
}
