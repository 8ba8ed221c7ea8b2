//! The copy-on-write engine of a protected volume.
//!
//! Every write to the volume goes through [`Engine::write`] (or `write_zeroes`/`trim`). While a
//! snapshot is active, the first write to a block of the protection area copies the block's old
//! contents to the difference store before the new data reaches the volume; a read of the
//! snapshot view takes saved blocks from the store and everything else from the volume. Blocks
//! that the backup has archived leave the protection area and their saved copies are freed.
//!
//! Ordering that makes snapshot reads correct without holding a lock during I/O: a protected
//! block is saved (under the snapshot lock) *before* the write that changes it starts, so a
//! snapshot read that reads the volume first and then, under the lock, replaces every block that
//! has a saved copy, never returns new data for a protected block.
//!
//! Taking the snapshot: wait for a write-inactivity period (writes go on meanwhile) within the
//! snapshot time limit, then close the write gate and wait for in-flight writes to drain within
//! the drain limit; the snapshot instant is while the gate is closed. Writers wait at the gate
//! for at most the drain limit; they never wait for the difference store: at its cap the
//! snapshot is aborted and the write goes ahead.
//!
//! A *held* snapshot ([`Engine::begin_snapshot_held`]) leaves the gate closed after its instant,
//! so that a backup of several volumes (several engines, several processes) can take every
//! snapshot while all their gates are closed: then no write that depends on a write left out of
//! one snapshot is in another (docs/CONSISTENCY.md has the argument). The gate opens at
//! [`Engine::release_gate`], when the snapshot ends or is aborted, or when the hold limit
//! passes ([`Engine::expire_held_gate`]); in that last case the snapshot is aborted, since it
//! can no longer be coherent with the others.

use crate::bitmap::Bitmap;
use crate::cbt::Cbt;
use crate::error::{Result, SnapshotError};
use crate::store::{DiffStore, StoreError, StoreLimits};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Default write-inactivity period; see docs/SNAPSHOTS.md for why.
pub const DEFAULT_WIP: Duration = Duration::from_millis(200);
pub const DEFAULT_SNAPSHOT_LIMIT: Duration = Duration::from_secs(60);
pub const DEFAULT_DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub block_size: u32,
    pub store: StoreLimits,
    /// Folder for the changed-block map.
    pub state_dir: PathBuf,
    /// Test aid: write a copy of the whole volume at each snapshot instant into this folder.
    pub dump_dir: Option<PathBuf>,
}

impl EngineConfig {
    pub fn new(state_dir: PathBuf) -> EngineConfig {
        EngineConfig {
            block_size: 4096,
            store: StoreLimits { memory: 64 << 20, cap: 4 << 30, spill_dir: std::env::temp_dir() },
            state_dir,
            dump_dir: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct SnapshotLimits {
    pub wip: Duration,
    pub limit: Duration,
    pub drain: Duration,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        SnapshotLimits { wip: DEFAULT_WIP, limit: DEFAULT_SNAPSHOT_LIMIT, drain: DEFAULT_DRAIN_LIMIT }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub id: u64,
    pub size: u64,
    pub block_size: u32,
    /// Seconds since the Unix epoch at the snapshot instant.
    pub taken_at: f64,
    /// How long it waited for the write-inactivity period, and for writes to drain.
    pub waited_ms: u64,
    pub drained_ms: u64,
    /// Copy of the volume at the snapshot instant (test aid), if configured.
    pub dump: Option<PathBuf>,
    /// Seconds since the Unix epoch when the write gate closed (before the drain).
    #[serde(default)]
    pub gate_closed_at: f64,
    /// Milliseconds the gate was closed (for a held snapshot: until the instant, so far).
    #[serde(default)]
    pub gate_closed_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreStatus {
    pub bytes: u64,
    pub peak: u64,
    pub cap: u64,
    pub spilled: u64,
    pub protected_blocks: u64,
}

/// Where the engine is in a snapshot's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineState {
    Idle,
    /// Waiting for a write-inactivity period, or for writes to drain.
    Waiting,
    Active,
    /// The last snapshot was aborted; its backup has not ended it yet.
    Aborted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub state: EngineState,
    pub snapshot: Option<u64>,
    pub aborted: Option<String>,
    pub store: StoreStatus,
    /// Largest difference store of any snapshot since the server started.
    pub peak_store: u64,
    pub size: u64,
    pub block_size: u32,
    pub changed_blocks: u64,
    pub cbt_origin: crate::cbt::CbtOrigin,
    pub cbt_base: Option<String>,
    pub writes: u64,
    pub cow_blocks: u64,
}

struct Gate {
    closed: bool,
    inflight: u32,
    /// A held snapshot keeping the gate closed after its instant.
    held: Option<HeldGate>,
}

struct HeldGate {
    snapshot: u64,
    closed_since: Instant,
    limit: Duration,
}

/// When a held gate reopened, from [`Engine::release_gate`] (with
/// [`SnapshotInfo::gate_closed_at`]: how long it was closed).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct GateRelease {
    /// Seconds since the Unix epoch when it reopened.
    pub opened_at: f64,
}

/// Now, in seconds since the Unix epoch (the unit of every instant in snapshot metadata).
pub fn epoch_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

struct Snap {
    id: u64,
    protect: Bitmap,
    store: DiffStore,
    /// Changed-block map up to the snapshot instant (merged back if the backup fails).
    delta: Bitmap,
    /// When the backup last asked anything about this snapshot.
    touched: Instant,
}

enum SnapState {
    Idle,
    Waiting,
    Active(Box<Snap>),
    Aborted { id: u64, reason: String },
}

pub struct Engine {
    file: File,
    path: PathBuf,
    is_file: bool,
    size: u64,
    bs: u64,
    cfg: EngineConfig,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    started: Instant,
    last_write: AtomicU64,
    active: AtomicBool,
    snap: Mutex<SnapState>,
    next_id: AtomicU64,
    pub cbt: Cbt,
    peak_store: AtomicU64,
    writes: AtomicU64,
    cow_blocks: AtomicU64,
    /// Test aid: runs after the write-inactivity period is found, just before the write gate
    /// closes, where a write that slips in must be drained within the drain limit.
    before_gate: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

fn io_err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

impl Engine {
    /// Opens a block device or image file read-write for serving.
    pub fn open(path: &Path, cfg: EngineConfig) -> anyhow::Result<Engine> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot open volume {}", path.display()))?;
        let is_file = meta.is_file();
        if !is_file && !meta.file_type().is_block_device() {
            bail!("{} is neither a block device nor a regular file", path.display());
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if !is_file {
            std::os::unix::fs::OpenOptionsExt::custom_flags(&mut opts, libc::O_EXCL);
        }
        let file = opts.open(path).with_context(|| format!("cannot open volume {} for writing", path.display()))?;
        let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let size = {
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0))?
        };
        if size == 0 {
            bail!("{} is empty", path.display());
        }
        let bs = cfg.block_size as u64;
        let cbt = Cbt::open(&cfg.state_dir, path, size, cfg.block_size)?;
        Ok(Engine {
            file,
            path: path.to_path_buf(),
            is_file,
            size,
            bs,
            cfg,
            gate: Mutex::new(Gate { closed: false, inflight: 0, held: None }),
            gate_cv: Condvar::new(),
            started: Instant::now(),
            last_write: AtomicU64::new(0),
            active: AtomicBool::new(false),
            snap: Mutex::new(SnapState::Idle),
            next_id: AtomicU64::new(1),
            cbt,
            peak_store: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            cow_blocks: AtomicU64::new(0),
            before_gate: Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn block_size(&self) -> u32 {
        self.cfg.block_size
    }

    fn check(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// Writes that have passed the gate and not finished.
    pub fn writes_in_flight(&self) -> u32 {
        self.gate.lock().unwrap().inflight
    }

    /// Test aid: `hook` runs each time a snapshot is about to close the write gate.
    #[doc(hidden)]
    pub fn set_before_gate_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.before_gate.lock().unwrap() = Some(Box::new(hook));
    }

    /// Reads the live volume.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn enter_write(&self) {
        let mut g = self.gate.lock().unwrap();
        while g.closed {
            g = self.gate_cv.wait(g).unwrap();
        }
        g.inflight += 1;
    }

    fn exit_write(&self) {
        self.last_write.store(self.now_ns(), Ordering::Relaxed);
        let mut g = self.gate.lock().unwrap();
        g.inflight -= 1;
        if g.inflight == 0 && g.closed {
            self.gate_cv.notify_all();
        }
    }

    /// Runs one modification of `[offset, offset+len)` through the gate, the copy-on-write
    /// step and the changed-block map.
    fn modify(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        op: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.enter_write();
        self.last_write.store(self.now_ns(), Ordering::Relaxed);
        let result = (|| {
            if self.active.load(Ordering::Acquire) {
                self.copy_before_write(offset, len);
            }
            self.cbt.mark(offset, len);
            op()?;
            if fua {
                self.sync()?;
            }
            Ok(())
        })();
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.exit_write();
        result
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.modify(offset, data.len() as u64, fua, || self.file.write_all_at(data, offset))
    }

    /// Writes zeros: a hole in an image file where the filesystem can and `may_punch`,
    /// allocated zeros otherwise.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_punch: bool) -> std::io::Result<()> {
        self.modify(offset, len, fua, || {
            if self.is_file && may_punch && self.punch_hole(offset, len).is_ok() {
                return Ok(());
            }
            let zeros = vec![0u8; (1 << 20).min(len) as usize];
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], offset + pos)?;
                pos += n as u64;
            }
            Ok(())
        })
    }

    /// Discards a range: a hole in an image file; advisory (nothing) on a block device.
    pub fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if !self.is_file {
            return self.check(offset, len);
        }
        self.modify(offset, len, false, || {
            // Punching a hole is best effort: trim is advisory.
            let _ = self.punch_hole(offset, len);
            Ok(())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        rime_os::files::punch_hole(&self.file, offset, len)
    }

    /// Flush: everything written so far reaches stable storage.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Saves the old contents of the protected blocks in `[offset, offset+len)`.
    fn copy_before_write(&self, offset: u64, len: u64) {
        let mut st = self.snap.lock().unwrap();
        let SnapState::Active(snap) = &mut *st else {
            return;
        };
        let (first, end) = (offset / self.bs, (offset + len).div_ceil(self.bs));
        let mut b = first;
        let mut buf = Vec::new();
        let mut failure = None;
        while b < end && failure.is_none() {
            if !snap.protect.get(b) {
                b += 1;
                continue;
            }
            let mut run_end = b + 1;
            while run_end < end && snap.protect.get(run_end) {
                run_end += 1;
            }
            let n = ((run_end - b) * self.bs) as usize;
            buf.clear();
            buf.resize(n, 0);
            let avail = (self.size - b * self.bs).min(n as u64) as usize;
            if let Err(e) = self.file.read_exact_at(&mut buf[..avail], b * self.bs) {
                failure = Some(format!("reading a block's old contents failed: {e}"));
                break;
            }
            for (i, blk) in (b..run_end).enumerate() {
                let data = &buf[i * self.bs as usize..(i + 1) * self.bs as usize];
                match snap.store.insert(blk, data) {
                    Ok(()) => {
                        snap.protect.clear(blk);
                        self.cow_blocks.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e @ StoreError::Full { .. }) => {
                        failure = Some(format!(
                            "{e} ({} MiB) while the backup still needed {} blocks; raise --store-cap or back up when the volume is quieter",
                            snap.store.cap() >> 20,
                            snap.protect.count()
                        ));
                        break;
                    }
                    Err(e) => {
                        failure = Some(e.to_string());
                        break;
                    }
                }
            }
            b = run_end;
        }
        self.peak_store.fetch_max(snap.store.peak(), Ordering::Relaxed);
        if let Some(reason) = failure {
            tracing::warn!("snapshot {} aborted: {reason}", snap.id);
            self.abort_locked(&mut st, reason);
        }
    }

    /// Ends the snapshot in `st` as aborted: frees the store, merges its changed blocks back.
    fn abort_locked(&self, st: &mut MutexGuard<'_, SnapState>, reason: String) {
        if let SnapState::Active(snap) = std::mem::replace(&mut **st, SnapState::Idle) {
            self.active.store(false, Ordering::Release);
            self.cbt.changed.or_with(&snap.delta);
            **st = SnapState::Aborted { id: snap.id, reason };
        }
    }

    /// Takes a snapshot: waits for a write-inactivity period of `limits.wip` (within
    /// `limits.limit`), then drains in-flight writes (within `limits.drain`).
    pub fn begin_snapshot(&self, limits: SnapshotLimits) -> Result<SnapshotInfo> {
        self.begin(limits, None)
    }

    /// Like [`Engine::begin_snapshot`], but the write gate stays closed after the snapshot
    /// instant until [`Engine::release_gate`] (or for at most `hold`, after which the gate opens
    /// and the snapshot is aborted).
    pub fn begin_snapshot_held(&self, limits: SnapshotLimits, hold: Duration) -> Result<SnapshotInfo> {
        self.begin(limits, Some(hold))
    }

    fn begin(&self, limits: SnapshotLimits, hold: Option<Duration>) -> Result<SnapshotInfo> {
        {
            let mut st = self.snap.lock().unwrap();
            match &*st {
                SnapState::Active(_) | SnapState::Waiting => return Err(SnapshotError::Busy),
                _ => *st = SnapState::Waiting,
            }
        }
        let result = self.take_snapshot(limits, hold);
        if result.is_err() {
            let mut st = self.snap.lock().unwrap();
            if matches!(*st, SnapState::Waiting) {
                *st = SnapState::Idle;
            }
        }
        result
    }

    fn take_snapshot(&self, limits: SnapshotLimits, hold: Option<Duration>) -> Result<SnapshotInfo> {
        let begin = Instant::now();
        let wip_ns = limits.wip.as_nanos() as u64;
        loop {
            let inflight = self.gate.lock().unwrap().inflight;
            let now = self.now_ns();
            let quiet = now.saturating_sub(self.last_write.load(Ordering::Relaxed));
            if inflight == 0 && (quiet >= wip_ns || self.last_write.load(Ordering::Relaxed) == 0 && now >= wip_ns) {
                break;
            }
            if begin.elapsed() >= limits.limit {
                return Err(SnapshotError::NoQuietPeriod { wip: limits.wip, limit: limits.limit });
            }
            let wait_more = Duration::from_nanos(wip_ns.saturating_sub(if inflight == 0 { quiet } else { 0 }));
            std::thread::sleep(wait_more.clamp(Duration::from_micros(500), Duration::from_millis(20)));
        }
        let waited = begin.elapsed();

        if let Some(hook) = self.before_gate.lock().unwrap().as_ref() {
            hook();
        }
        // Close the gate and drain.
        let drain_start = Instant::now();
        let gate_closed_at = epoch_now();
        let mut g = self.gate.lock().unwrap();
        g.closed = true;
        let (mut g, timeout) = self.gate_cv.wait_timeout_while(g, limits.drain, |g| g.inflight > 0).unwrap();
        if timeout.timed_out() {
            g.closed = false;
            self.gate_cv.notify_all();
            return Err(SnapshotError::DrainTimeout(limits.drain));
        }
        // The snapshot instant: nothing is being written.
        let drained = drain_start.elapsed();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let blocks = self.size.div_ceil(self.bs);
        let snap = Snap {
            id,
            protect: Bitmap::full(blocks),
            store: DiffStore::new(self.bs as usize, self.cfg.store.clone()),
            delta: self.cbt.changed.take(),
            touched: Instant::now(),
        };
        let taken_at = epoch_now();
        let dump = self.cfg.dump_dir.as_ref().map(|d| d.join(format!("snapshot-{id}.img")));
        let dump_result = dump.as_ref().map(|p| self.dump(p)).transpose();
        *self.snap.lock().unwrap() = SnapState::Active(Box::new(snap));
        self.active.store(true, Ordering::Release);
        match hold {
            Some(limit) => g.held = Some(HeldGate { snapshot: id, closed_since: drain_start, limit }),
            None => {
                g.closed = false;
                self.gate_cv.notify_all();
            }
        }
        drop(g);
        let gate_closed_ms = drain_start.elapsed().as_secs_f64() * 1000.0;
        if let Err(e) = dump_result {
            tracing::warn!("could not dump the snapshot: {e:#}");
        }
        tracing::info!("snapshot {id} taken after {} ms (drain {} ms)", waited.as_millis(), drained.as_millis());
        Ok(SnapshotInfo {
            id,
            size: self.size,
            block_size: self.cfg.block_size,
            taken_at,
            waited_ms: waited.as_millis() as u64,
            drained_ms: drained.as_millis() as u64,
            dump,
            gate_closed_at,
            gate_closed_ms,
        })
    }

    /// Opens the gate that snapshot `id` holds. Fails if it holds none: the hold limit passed
    /// (the snapshot was aborted, its reason says so) or the snapshot is not active.
    pub fn release_gate(&self, id: u64) -> Result<GateRelease> {
        if self.open_held_gate(id) {
            return Ok(GateRelease { opened_at: epoch_now() });
        }
        self.with_snap(id, |_| Err(SnapshotError::NotHeld(id)))
    }

    /// Opens the gate if snapshot `id` holds it; whether it did.
    fn open_held_gate(&self, id: u64) -> bool {
        let mut g = self.gate.lock().unwrap();
        if g.held.take_if(|h| h.snapshot == id).is_none() {
            return false;
        }
        g.closed = false;
        self.gate_cv.notify_all();
        true
    }

    /// Opens a gate held past its limit, and aborts its snapshot (writes went through, so it
    /// is no longer coherent with the other volumes of its backup). Called by the watchdog.
    pub fn expire_held_gate(&self) -> Option<u64> {
        let (id, limit) = {
            let g = self.gate.lock().unwrap();
            let h = g.held.as_ref().filter(|h| h.closed_since.elapsed() >= h.limit)?;
            (h.snapshot, h.limit)
        };
        if !self.open_held_gate(id) {
            return None;
        }
        let reason = format!(
            "its write gate was held for the other volumes of the backup for more than the hold limit of {} s, so writes were let through",
            limit.as_secs_f64()
        );
        tracing::warn!("snapshot {id} aborted: {reason}");
        let mut st = self.snap.lock().unwrap();
        if matches!(&*st, SnapState::Active(s) if s.id == id) {
            self.abort_locked(&mut st, reason);
        }
        Some(id)
    }

    fn dump(&self, to: &Path) -> std::io::Result<()> {
        let out = File::create(to)?;
        let mut buf = vec![0u8; 4 << 20];
        let mut pos = 0;
        while pos < self.size {
            let n = (self.size - pos).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..n], pos)?;
            out.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        out.sync_all()?;
        Ok(())
    }

    fn with_snap<R>(&self, id: u64, f: impl FnOnce(&mut Snap) -> Result<R>) -> Result<R> {
        let mut st = self.snap.lock().unwrap();
        match &mut *st {
            SnapState::Active(s) if s.id == id => {
                s.touched = Instant::now();
                f(s)
            }
            SnapState::Aborted { id: a, reason } if *a == id => Err(SnapshotError::Aborted(reason.clone())),
            _ => Err(SnapshotError::NotActive(id)),
        }
    }

    /// Reads the snapshot view. With `archive`, the blocks wholly inside the range leave the
    /// protection area and their saved copies are freed.
    pub fn snap_read(&self, id: u64, offset: u64, buf: &mut [u8], archive: bool) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.with_snap(id, |_| Ok(()))?;
        self.file.read_exact_at(buf, offset)?;
        self.with_snap(id, |snap| {
            let end = offset + buf.len() as u64;
            let mut block = vec![0u8; self.bs as usize];
            for b in offset / self.bs..end.div_ceil(self.bs) {
                if snap.store.get(b, &mut block)? {
                    let (bs, be) = (b * self.bs, (b + 1) * self.bs);
                    let (from, to) = (bs.max(offset), be.min(end));
                    buf[(from - offset) as usize..(to - offset) as usize]
                        .copy_from_slice(&block[(from - bs) as usize..(to - bs) as usize]);
                }
            }
            if archive {
                for b in offset.div_ceil(self.bs)..end / self.bs + (end == self.size) as u64 {
                    snap.protect.clear(b);
                    snap.store.remove(b);
                }
            }
            Ok(())
        })
    }

    /// Archived without being read (or read earlier): leaves the protection area.
    pub fn mark_archived(&self, id: u64, offset: u64, len: u64) -> Result<()> {
        self.with_snap(id, |snap| {
            let end = (offset + len).min(self.size);
            for b in offset.div_ceil(self.bs)..end / self.bs + (end == self.size) as u64 {
                snap.protect.clear(b);
                snap.store.remove(b);
            }
            Ok(())
        })
    }

    /// Narrows the protection area to `area` (for example the used blocks minus exclusions,
    /// minus what an incremental backup reuses); saved copies outside it are freed.
    pub fn protect_only(&self, id: u64, area: &Bitmap) -> Result<()> {
        self.with_snap(id, |snap| {
            if area.len() != snap.protect.len() {
                return Err(SnapshotError::WrongSize {
                    what: "protection area",
                    got: area.len(),
                    want: snap.protect.len(),
                });
            }
            snap.protect.and_with(area);
            for b in snap.store.blocks(usize::MAX) {
                if !area.get(b) {
                    snap.store.remove(b);
                }
            }
            Ok(())
        })
    }

    /// Blocks with saved copies (what the backup should read first when the store fills).
    pub fn buffered_blocks(&self, id: u64, max: usize) -> Result<Vec<u64>> {
        self.with_snap(id, |snap| Ok(snap.store.blocks(max)))
    }

    pub fn store_status(&self, id: u64) -> Result<StoreStatus> {
        self.with_snap(id, |snap| Ok(self.store_status_of(snap)))
    }

    fn store_status_of(&self, snap: &Snap) -> StoreStatus {
        StoreStatus {
            bytes: snap.store.bytes(),
            peak: snap.store.peak(),
            cap: snap.store.cap(),
            spilled: snap.store.spilled_total(),
            protected_blocks: snap.protect.count(),
        }
    }

    /// The blocks changed between the changed-block map's base and this snapshot's instant.
    pub fn snapshot_changes(&self, id: u64) -> Result<(Option<String>, Bitmap, Option<Bitmap>)> {
        let view = self.cbt.view();
        self.with_snap(id, |snap| Ok((view.base, snap.delta.copy(), view.used)))
    }

    /// Ends a snapshot. On success, the changed-block map becomes relative to `backup`
    /// (whose imaged blocks are `used`); otherwise the snapshot's changes are merged back.
    pub fn end_snapshot(&self, id: u64, success: Option<(String, Option<Bitmap>)>) -> Result<()> {
        self.open_held_gate(id);
        let mut st = self.snap.lock().unwrap();
        match std::mem::replace(&mut *st, SnapState::Idle) {
            SnapState::Active(snap) if snap.id == id => {
                self.active.store(false, Ordering::Release);
                self.peak_store.fetch_max(snap.store.peak(), Ordering::Relaxed);
                drop(st);
                match success {
                    Some((backup, used)) => self.cbt.set_base(backup, used).map_err(SnapshotError::ChangedBlockMap)?,
                    None => self.cbt.changed.or_with(&snap.delta),
                }
                Ok(())
            }
            SnapState::Aborted { id: a, reason } if a == id => {
                if success.is_some() {
                    return Err(SnapshotError::Aborted(reason));
                }
                Ok(())
            }
            other => {
                *st = other;
                Err(SnapshotError::NotActive(id))
            }
        }
    }

    /// The backup is alive and holds snapshot `id`.
    pub fn touch(&self, id: u64) -> Result<()> {
        self.with_snap(id, |_| Ok(()))
    }

    /// Aborts the active snapshot if its backup has asked nothing for `limit` (it hangs).
    pub fn abort_if_idle(&self, limit: Duration) -> Option<u64> {
        let mut st = self.snap.lock().unwrap();
        let id = match &*st {
            SnapState::Active(s) if s.touched.elapsed() >= limit => s.id,
            _ => return None,
        };
        let reason = format!("the backup made no request for {} s", limit.as_secs_f64());
        tracing::warn!("snapshot {id} aborted: {reason}");
        self.abort_locked(&mut st, reason);
        drop(st);
        self.open_held_gate(id);
        Some(id)
    }

    /// Aborts snapshot `id` (the backup failed or went away).
    pub fn abort_snapshot(&self, id: u64, reason: &str) {
        self.open_held_gate(id);
        let mut st = self.snap.lock().unwrap();
        match &*st {
            SnapState::Active(s) if s.id == id => {
                self.abort_locked(&mut st, reason.to_string());
                *st = SnapState::Idle;
            }
            SnapState::Aborted { id: a, .. } if *a == id => *st = SnapState::Idle,
            _ => {}
        }
    }

    pub fn status(&self) -> Status {
        let st = self.snap.lock().unwrap();
        let (state, snapshot, aborted, store) = match &*st {
            SnapState::Idle => (EngineState::Idle, None, None, StoreStatus::default()),
            SnapState::Waiting => (EngineState::Waiting, None, None, StoreStatus::default()),
            SnapState::Active(s) => (EngineState::Active, Some(s.id), None, self.store_status_of(s)),
            SnapState::Aborted { id, reason } => {
                (EngineState::Aborted, Some(*id), Some(reason.clone()), StoreStatus::default())
            }
        };
        Status {
            state,
            snapshot,
            aborted,
            store,
            peak_store: self.peak_store.load(Ordering::Relaxed),
            size: self.size,
            block_size: self.cfg.block_size,
            changed_blocks: self.cbt.changed.count(),
            cbt_origin: self.cbt.origin.clone(),
            cbt_base: self.cbt.view().base,
            writes: self.writes.load(Ordering::Relaxed),
            cow_blocks: self.cow_blocks.load(Ordering::Relaxed),
        }
    }

    /// Clean shutdown: no more writes are accepted; data and the changed-block map reach disk.
    pub fn shutdown(&self) -> anyhow::Result<()> {
        let mut g = self.gate.lock().unwrap();
        g.closed = true;
        let (_g, _) = self.gate_cv.wait_timeout_while(g, Duration::from_secs(30), |g| g.inflight > 0).unwrap();
        {
            let mut st = self.snap.lock().unwrap();
            self.abort_locked(&mut st, "the server is shutting down".into());
        }
        self.sync()?;
        self.cbt.close_clean()
    }
}

impl rime_volume::BlockSource for Engine {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read(offset, buf).map_err(|e| io_err(e.to_string()))
    }
}
