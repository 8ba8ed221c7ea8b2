//! The used-block map of each disk at each checkpoint a live backup completed, kept on the host
//! beside the checkpoint it belongs to (`/var/lib/rime/vm-checkpoints/<uuid>/<checkpoint>/<disk>`,
//! or under `RIME_STATE_DIR`).
//!
//! An incremental backup reuses a chunk of the previous snapshot only when the blocks it holds
//! are the blocks used now ([`crate::incremental::Reuse`]); the dirty bitmap says what was
//! written, this map what was imaged. Like the checkpoint itself it is host state: when it is
//! missing or damaged, the disk gets a full (used-block) backup and the snapshot says why.
//!
//! File: magic `RIMEUSED1\n`, block size and bit count (u64 LE), the BLAKE3 of the payload, then
//! the payload (the bitmap's words, zstd-compressed). Written to a temporary name, fsync'd,
//! renamed, the folder fsync'd: a crash leaves the old map or the new one, never half of one.

use anyhow::{Context, Result};
use rime_snapshot::Bitmap;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 10] = b"RIMEUSED1\n";
/// Longest payload accepted (a 1 PiB disk at 4 KiB blocks, compressed, is far below this).
const MAX_PAYLOAD: u64 = 1 << 32;

pub struct UsedMaps {
    root: PathBuf,
}

impl UsedMaps {
    pub fn open() -> UsedMaps {
        let state = std::env::var_os("RIME_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/lib/rime".into());
        UsedMaps { root: state.join("vm-checkpoints") }
    }

    fn folder(&self, uuid: &str, checkpoint: &str) -> PathBuf {
        // Both are names libvirt accepted; keep them to one path component each.
        let safe = |s: &str| s.replace(['/', '\0'], "_");
        self.root.join(safe(uuid)).join(safe(checkpoint))
    }

    pub fn save(&self, uuid: &str, checkpoint: &str, disk: &str, block: u64, used: &Bitmap) -> Result<()> {
        let folder = self.folder(uuid, checkpoint);
        std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
        let payload = zstd::bulk::compress(&used.to_bytes(), 3).context("compressing a used-block map")?;
        let mut data = Vec::with_capacity(payload.len() + 58);
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&block.to_le_bytes());
        data.extend_from_slice(&used.len().to_le_bytes());
        data.extend_from_slice(blake3::hash(&payload).as_bytes());
        data.extend_from_slice(&payload);
        let path = folder.join(disk.replace(['/', '\0'], "_"));
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&folder)?.sync_all()?;
        Ok(())
    }

    /// The map saved for `disk` at `checkpoint`, if it is there, sound, and of this size.
    pub fn load(&self, uuid: &str, checkpoint: &str, disk: &str, block: u64, bits: u64) -> Result<Option<Bitmap>> {
        let path = self.folder(uuid, checkpoint).join(disk.replace(['/', '\0'], "_"));
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(parse(&data, block, bits))
    }

    /// Forgets every map kept for `checkpoint` (deleted, or never completed).
    pub fn forget(&self, uuid: &str, checkpoint: &str) {
        let _ = std::fs::remove_dir_all(self.folder(uuid, checkpoint));
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn parse(data: &[u8], block: u64, bits: u64) -> Option<Bitmap> {
    let rest = data.strip_prefix(MAGIC)?;
    if rest.len() < 48 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(rest[i..i + 8].try_into().unwrap());
    if word(0) != block || word(8) != bits {
        return None;
    }
    let (digest, payload) = rest[16..].split_at(32);
    if blake3::hash(payload).as_bytes() != digest || payload.len() as u64 > MAX_PAYLOAD {
        return None;
    }
    let bytes = zstd::bulk::decompress(payload, (bits.div_ceil(64) * 8) as usize).ok()?;
    Bitmap::from_bytes(bits, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_map_reads_back_and_damage_reads_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let maps = UsedMaps { root: dir.path().to_path_buf() };
        let used = Bitmap::new(1000);
        used.set_range(10, 300);
        used.set(999);
        maps.save("u", "c1", "vda", 4096, &used).unwrap();
        let back = maps.load("u", "c1", "vda", 4096, 1000).unwrap().unwrap();
        assert_eq!(back.to_bytes(), used.to_bytes());
        assert!(maps.load("u", "c1", "vda", 4096, 1001).unwrap().is_none(), "another size");
        assert!(maps.load("u", "c1", "vda", 512, 1000).unwrap().is_none(), "another block size");
        assert!(maps.load("u", "c2", "vda", 4096, 1000).unwrap().is_none(), "another checkpoint");
        let path = dir.path().join("u/c1/vda");
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert!(maps.load("u", "c1", "vda", 4096, 1000).unwrap().is_none(), "a flipped bit");
        maps.forget("u", "c1");
        assert!(!dir.path().join("u/c1").exists());
    }
}
