//! Changed-block tracking: which blocks were written since the last successful backup.
//!
//! The map lives in memory (one bit per block, set lock-free by writers) and is persisted to a
//! state file, crash-safely (temporary file, fsync, rename, fsync of the folder), whenever a
//! backup completes and at a clean shutdown. While the server runs, a `running` marker file
//! exists; finding it at start means the last run did not shut down cleanly, so writes may have
//! reached the volume that the persisted map does not show: then every block counts as changed
//! (and the next backup is a full one). For image files, the file's size and modification time
//! at shutdown are recorded too: a change made while the volume was not served also makes
//! everything count as changed.
//!
//! State file: `"RIMECBT1"`, u32 version, u32 block size, u64 volume size, u64 block count,
//! u8 flags (1 = has a used map), u8 base-id length, 64 bytes of base id (the snapshot the map
//! is relative to), i64 mtime seconds, u32 mtime nanoseconds, zero padding to 128 bytes; the
//! changed bitmap; the used bitmap of the base snapshot (if flagged); 32-byte BLAKE3 of all of it.

use crate::bitmap::Bitmap;
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"RIMECBT1";
const HEADER: usize = 128;

/// Why the map says what it says, for status output and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CbtOrigin {
    /// Loaded after a clean shutdown.
    Clean,
    /// No state yet: never backed up while served.
    New,
    /// The last run ended without a clean shutdown: everything counts as changed.
    Unclean,
    /// The image file changed while it was not served: everything counts as changed.
    ChangedWhileStopped,
}

pub struct Cbt {
    state: PathBuf,
    marker: PathBuf,
    volume: PathBuf,
    pub block_size: u32,
    pub blocks: u64,
    size: u64,
    /// Blocks written since the base snapshot's instant.
    pub changed: Bitmap,
    meta: Mutex<Meta>,
    pub origin: CbtOrigin,
}

struct Meta {
    base: Option<String>,
    used: Option<Bitmap>,
}

/// What an incremental backup needs: the base snapshot, the blocks changed since it and the
/// blocks its backup imaged.
pub struct CbtView {
    pub base: Option<String>,
    pub used: Option<Bitmap>,
}

fn file_name_for(volume: &Path) -> String {
    let canonical = std::fs::canonicalize(volume).unwrap_or_else(|_| volume.to_path_buf());
    let digest = blake3::hash(canonical.as_os_str().as_encoded_bytes());
    let stem = volume.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    format!("{stem}-{}", &digest.to_hex()[..16])
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", dir.display()))
}

fn mtime(volume: &Path) -> Option<(i64, u32)> {
    let m = std::fs::metadata(volume).ok()?;
    m.is_file().then(|| (m.mtime(), m.mtime_nsec() as u32))
}

impl Cbt {
    /// Opens (or starts) the map of `volume` in `dir` and marks the server as running.
    pub fn open(dir: &Path, volume: &Path, size: u64, block_size: u32) -> Result<Cbt> {
        std::fs::create_dir_all(dir).with_context(|| format!("create state folder {}", dir.display()))?;
        let name = file_name_for(volume);
        let state = dir.join(format!("{name}.cbt"));
        let marker = dir.join(format!("{name}.running"));
        let blocks = size.div_ceil(block_size as u64);
        let mut origin = CbtOrigin::New;
        let mut meta = Meta { base: None, used: None };
        let changed = Bitmap::full(blocks);
        if marker.exists() {
            origin = CbtOrigin::Unclean;
        } else if state.exists() {
            match load(&state, size, block_size) {
                Ok(l) if l.mtime.is_some() && l.mtime != mtime(volume) => origin = CbtOrigin::ChangedWhileStopped,
                Ok(l) => {
                    changed.clear_all();
                    changed.or_with(&l.changed);
                    meta = Meta { base: l.base, used: l.used };
                    origin = CbtOrigin::Clean;
                }
                Err(e) => {
                    tracing::warn!("ignoring the changed-block map {}: {e:#}", state.display());
                }
            }
        }
        let cbt = Cbt {
            state,
            marker,
            volume: volume.to_path_buf(),
            block_size,
            blocks,
            size,
            changed,
            meta: Mutex::new(meta),
            origin,
        };
        // Until the marker is durable no write is accepted.
        let mut f = File::create(&cbt.marker).with_context(|| format!("create {}", cbt.marker.display()))?;
        writeln!(f, "{}", std::process::id())?;
        f.sync_all()?;
        sync_dir(dir)?;
        if cbt.origin != CbtOrigin::Clean {
            // The old base is meaningless now: persist that, so a later clean start agrees.
            cbt.persist(false)?;
        }
        Ok(cbt)
    }

    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let bs = self.block_size as u64;
        self.changed.set_range(offset / bs, (offset + len).div_ceil(bs));
    }

    pub fn view(&self) -> CbtView {
        let m = self.meta.lock().unwrap();
        CbtView { base: m.base.clone(), used: m.used.as_ref().map(Bitmap::copy) }
    }

    /// A backup of the snapshot whose changes were taken out of the map succeeded: the map
    /// is now relative to it.
    pub fn set_base(&self, base: String, used: Option<Bitmap>) -> Result<()> {
        {
            let mut m = self.meta.lock().unwrap();
            m.base = Some(base);
            m.used = used;
        }
        self.persist(false)
    }

    /// Writes the state file crash-safely. `with_mtime` records the image file's modification
    /// time (only at a clean shutdown, when no more writes come).
    pub fn persist(&self, with_mtime: bool) -> Result<()> {
        let m = self.meta.lock().unwrap();
        let mut buf = vec![0u8; HEADER];
        buf[0..8].copy_from_slice(MAGIC);
        buf[8..12].copy_from_slice(&1u32.to_le_bytes());
        buf[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        buf[16..24].copy_from_slice(&self.size.to_le_bytes());
        buf[24..32].copy_from_slice(&self.blocks.to_le_bytes());
        buf[32] = m.used.is_some() as u8 | if with_mtime { 2 } else { 0 };
        let base = m.base.as_deref().unwrap_or("").as_bytes();
        let base = &base[..base.len().min(64)];
        buf[33] = base.len() as u8;
        buf[34..34 + base.len()].copy_from_slice(base);
        if with_mtime {
            if let Some((s, ns)) = mtime(&self.volume) {
                buf[98..106].copy_from_slice(&s.to_le_bytes());
                buf[106..110].copy_from_slice(&ns.to_le_bytes());
            }
        }
        buf.extend_from_slice(&self.changed.to_bytes());
        if let Some(u) = &m.used {
            buf.extend_from_slice(&u.to_bytes());
        }
        let digest = blake3::hash(&buf);
        buf.extend_from_slice(digest.as_bytes());
        drop(m);
        let tmp = self.state.with_extension("cbt.tmp");
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.state)?;
        sync_dir(self.state.parent().unwrap_or(Path::new(".")))
    }

    /// Clean shutdown: persist, then remove the running marker.
    pub fn close_clean(&self) -> Result<()> {
        self.persist(true)?;
        std::fs::remove_file(&self.marker)?;
        sync_dir(self.marker.parent().unwrap_or(Path::new(".")))
    }

    pub fn state_path(&self) -> &Path {
        &self.state
    }
}

struct Loaded {
    changed: Bitmap,
    used: Option<Bitmap>,
    base: Option<String>,
    mtime: Option<(i64, u32)>,
}

fn load(path: &Path, size: u64, block_size: u32) -> Result<Loaded> {
    let data = std::fs::read(path)?;
    if data.len() < HEADER + 32 || &data[0..8] != MAGIC {
        bail!("not a changed-block map");
    }
    let (body, digest) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != digest {
        bail!("checksum mismatch");
    }
    let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().unwrap());
    if u32_at(8) != 1 {
        bail!("unsupported version {}", u32_at(8));
    }
    if u32_at(12) != block_size || u64_at(16) != size {
        bail!("recorded for another volume size or block size");
    }
    let blocks = u64_at(24);
    let bytes = blocks.div_ceil(64) as usize * 8;
    let flags = body[32];
    let base_len = body[33] as usize;
    let base = (base_len > 0).then(|| String::from_utf8_lossy(&body[34..34 + base_len]).into_owned());
    let mtime = (flags & 2 != 0).then(|| (u64_at(98) as i64, u32_at(106)));
    let want = HEADER + bytes * if flags & 1 != 0 { 2 } else { 1 };
    if body.len() != want {
        bail!("truncated");
    }
    let changed = Bitmap::from_bytes(blocks, &body[HEADER..HEADER + bytes]).context("bitmap")?;
    let used = if flags & 1 != 0 {
        Some(Bitmap::from_bytes(blocks, &body[HEADER + bytes..]).context("bitmap")?)
    } else {
        None
    };
    Ok(Loaded { changed, used, base, mtime })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_and_unclean_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol.img");
        std::fs::write(&vol, vec![0u8; 1 << 20]).unwrap();
        let state = dir.path().join("state");
        let c = Cbt::open(&state, &vol, 1 << 20, 4096).unwrap();
        assert_eq!(c.origin, CbtOrigin::New);
        assert_eq!(c.changed.count(), 256);
        c.changed.clear_all();
        c.set_base("abc".into(), Some(Bitmap::full(256))).unwrap();
        c.mark(4096 * 10 + 1, 5000);
        c.close_clean().unwrap();
        drop(c);
        let c = Cbt::open(&state, &vol, 1 << 20, 4096).unwrap();
        assert_eq!(c.origin, CbtOrigin::Clean);
        assert_eq!(c.changed.ones_from(0, 10), vec![10, 11]);
        assert_eq!(c.view().base.as_deref(), Some("abc"));
        // Killed: the marker stays.
        drop(c);
        let c = Cbt::open(&state, &vol, 1 << 20, 4096).unwrap();
        assert_eq!(c.origin, CbtOrigin::Unclean);
        assert_eq!(c.changed.count(), 256);
        assert_eq!(c.view().base, None);
    }
}
