//! Helpers shared by the filesystem map tests (`btrfs_map.rs`, `xfs_map.rs`, `fat_map.rs`,
//! `ntfs_map.rs`, `jbd2_replay.rs`): the shared test kit (programs, reproducible data, mounts
//! released on drop) and image files.

#![allow(dead_code, unused_imports)]

pub use rime_testkit::{run, s, Mounted, Rng, MIB};
pub use rime_testkit::{run_status, wait_until_closed, write_random};
use std::fs;
use std::path::Path;

/// A new all-zero (sparse) image file of `size_mib` MiB, replacing any old one.
pub fn new_image(img: &Path, size_mib: u64) {
    let _ = fs::remove_file(img);
    fs::File::create(img).unwrap().set_len(size_mib * MIB).unwrap();
}

/// A used-block map probe of one filesystem, boxed.
pub type Probe = fn(&rime_volume::Region) -> anyhow::Result<Option<Box<dyn rime_volume::UsedMap>>>;

/// Probes the image at `path` and walks its whole map; must not panic. True when refused.
pub fn refused_by(path: &Path, probe: Probe) -> bool {
    let vol = rime_volume::Volume::open(path, false).unwrap();
    match probe(&vol.region()) {
        Ok(Some(mut map)) => {
            let mut ranges = Vec::new();
            let mut off = 0;
            while off < vol.size {
                if map.used_ranges(off, 64 * 1024, &mut ranges).is_err() {
                    return true;
                }
                off += 64 * 1024;
            }
            false
        }
        Ok(None) | Err(_) => true,
    }
}

/// A copy of an image that is damaged in place and repaired after each probe, so that hundreds
/// of variants cost no more than the bytes they change.
pub struct Scratch {
    pub path: std::path::PathBuf,
    pub good: Vec<u8>,
    probe: Probe,
}

impl Scratch {
    pub fn new(dir: &Path, good: Vec<u8>, probe: Probe) -> Scratch {
        let path = dir.join("bad.img");
        fs::write(&path, &good).unwrap();
        Scratch { path, good, probe }
    }

    /// A copy of the undamaged bytes `[at, at + len)`.
    pub fn bytes<T: TryInto<usize>>(&self, at: T, len: T) -> Vec<u8>
    where
        T::Error: std::fmt::Debug,
    {
        let (at, len) = (at.try_into().unwrap(), len.try_into().unwrap());
        self.good[at..at + len].to_vec()
    }

    /// Writes each (offset, bytes), probes, restores the original bytes. True when refused.
    pub fn refused<T: Copy + TryInto<usize>>(&self, edits: &[(T, Vec<u8>)]) -> bool
    where
        T::Error: std::fmt::Debug,
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&self.path).unwrap();
        for (at, b) in edits {
            f.write_all_at(b, (*at).try_into().unwrap() as u64).unwrap();
        }
        let r = refused_by(&self.path, self.probe);
        for (at, b) in edits {
            let at: usize = (*at).try_into().unwrap();
            f.write_all_at(&self.good[at..at + b.len()], at as u64).unwrap();
        }
        r
    }
}
