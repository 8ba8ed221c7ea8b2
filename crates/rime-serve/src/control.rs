//! The control server of a protected volume: takes snapshots for backups over the typed
//! protocol of [`crate::protocol`] (see there for the wire format and snapshot ownership).
//!
//! Invariants: a snapshot is owned by the connection that began it and is aborted when that
//! connection closes or its backup stays silent for the backup timeout; no `read` larger than
//! [`MAX_READ`] is served; every bitmap is checked against the volume's block count.

use crate::protocol::{encode, ErrorKind, Reply, Request, WireBitmap, MAX_READ, PROTOCOL_VERSION};
use rime_snapshot::engine::{Engine, SnapshotLimits};
use rime_snapshot::{Bitmap, SnapshotError};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub struct ControlServer {
    engine: Arc<Engine>,
    defaults: SnapshotLimits,
    fuse_file: Option<PathBuf>,
    /// A snapshot whose backup asks nothing for this long is aborted.
    pub backup_timeout: Duration,
}

/// Default for [`ControlServer::backup_timeout`]: many pings (every 2 s) missed in a row.
pub const DEFAULT_BACKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a backup may hold the write gate closed (writers of the volume wait meanwhile),
/// whatever it asks.
pub const MAX_HOLD_MS: u64 = 60_000;

impl ControlServer {
    pub fn new(engine: Arc<Engine>, defaults: SnapshotLimits, fuse_file: Option<PathBuf>) -> Arc<ControlServer> {
        Arc::new(ControlServer { engine, defaults, fuse_file, backup_timeout: DEFAULT_BACKUP_TIMEOUT })
    }

    pub fn with_backup_timeout(
        engine: Arc<Engine>,
        defaults: SnapshotLimits,
        fuse_file: Option<PathBuf>,
        timeout: Duration,
    ) -> Arc<ControlServer> {
        Arc::new(ControlServer { engine, defaults, fuse_file, backup_timeout: timeout })
    }

    pub fn listen(self: &Arc<Self>, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        let l = UnixListener::bind(path).with_context(|| format!("listen on control socket {}", path.display()))?;
        // Only root (and the socket's owner) may take snapshots and read the volume.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let (engine, timeout) = (self.engine.clone(), self.backup_timeout);
        // Held gates are checked often (writers wait behind them), silent backups less so.
        std::thread::Builder::new().name("backup-watchdog".into()).spawn(move || {
            for tick in 0u64.. {
                std::thread::sleep(Duration::from_millis(50));
                engine.expire_held_gate();
                if tick % 10 == 0 {
                    engine.abort_if_idle(timeout);
                }
            }
        })?;
        let me = self.clone();
        std::thread::Builder::new().name("control-accept".into()).spawn(move || {
            for s in l.incoming().flatten() {
                let me = me.clone();
                let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || me.serve(s));
            }
        })?;
        Ok(())
    }

    fn serve(&self, s: UnixStream) {
        let Ok(mut w) = s.try_clone() else { return };
        let mut r = BufReader::new(s);
        let mut owned: Vec<u64> = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let mut payload = None;
            let reply = match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => self.handle(req, &mut owned, &mut payload).unwrap_or_else(|e| e.into_reply()),
                Err(e) => {
                    Failure::bad(format!("not a request of protocol version {PROTOCOL_VERSION}: {e}")).into_reply()
                }
            };
            let mut out = encode(&reply);
            if let Some(p) = payload {
                out.extend_from_slice(&p);
            }
            if w.write_all(&out).is_err() {
                break;
            }
        }
        for id in owned {
            tracing::info!("snapshot {id}: the backup went away; aborting it");
            self.engine.abort_snapshot(id, "the backup disconnected");
        }
    }

    fn bitmap(&self, b: &WireBitmap) -> Result<Bitmap, Failure> {
        let blocks = self.engine.size().div_ceil(self.engine.block_size() as u64);
        b.to_bitmap(blocks).map_err(Failure::bad)
    }

    fn handle(&self, req: Request, owned: &mut Vec<u64>, payload: &mut Option<Vec<u8>>) -> Result<Reply, Failure> {
        match req {
            Request::Status => Ok(Reply::Status {
                protocol: PROTOCOL_VERSION,
                status: self.engine.status(),
                volume: self.engine.path().to_path_buf(),
                fuse_file: self.fuse_file.clone(),
                pid: std::process::id(),
            }),
            Request::Begin { wip_ms, limit_ms, drain_ms, hold_ms } => {
                let ms = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
                let limits = SnapshotLimits {
                    wip: ms(wip_ms, self.defaults.wip),
                    limit: ms(limit_ms, self.defaults.limit),
                    drain: ms(drain_ms, self.defaults.drain),
                };
                let snapshot = match hold_ms {
                    Some(hold) => {
                        self.engine.begin_snapshot_held(limits, Duration::from_millis(hold.min(MAX_HOLD_MS)))?
                    }
                    None => self.engine.begin_snapshot(limits)?,
                };
                owned.push(snapshot.id);
                Ok(Reply::Snapshot { snapshot })
            }
            Request::Release { id } => Ok(Reply::Released { release: self.engine.release_gate(id)? }),
            Request::Read { id, offset, len, archive } => {
                if len > MAX_READ {
                    return Err(Failure::bad(format!("read of {len} bytes is larger than {MAX_READ}")));
                }
                let mut buf = vec![0u8; len as usize];
                self.engine.snap_read(id, offset, &mut buf, archive)?;
                let st = self.engine.store_status(id)?;
                *payload = Some(buf);
                Ok(Reply::Read { len, store_bytes: st.bytes, store_cap: st.cap })
            }
            Request::Protect { id, area } => {
                self.engine.protect_only(id, &self.bitmap(&area)?)?;
                Ok(Reply::Done)
            }
            Request::Archived { id, offset, len } => {
                self.engine.mark_archived(id, offset, len)?;
                Ok(Reply::Done)
            }
            Request::Buffered { id, max } => {
                Ok(Reply::Buffered { blocks: self.engine.buffered_blocks(id, max.min(1 << 20) as usize)? })
            }
            Request::Changes { id } => {
                let (base, changed, used) = self.engine.snapshot_changes(id)?;
                Ok(Reply::Changes { base, changed: (&changed).into(), used: used.as_ref().map(WireBitmap::from) })
            }
            Request::End { id, backup, used, partial } => {
                let used = used.map(|u| self.bitmap(&u)).transpose()?;
                let partial = partial.map(|p| self.bitmap(&p)).transpose()?;
                let result = self.engine.end_snapshot(id, backup.map(|b| (b, used)));
                owned.retain(|&o| o != id);
                result?;
                if let Some(p) = partial {
                    // Partly used blocks are re-read next time.
                    self.engine.cbt.changed.or_with(&p);
                }
                Ok(Reply::Done)
            }
            Request::Abort { id } => {
                self.engine.abort_snapshot(id, "aborted by the backup");
                owned.retain(|&o| o != id);
                Ok(Reply::Done)
            }
            Request::Ping { id } => {
                self.engine.touch(id)?;
                Ok(Reply::Done)
            }
            Request::Cbt => {
                let st = self.engine.status();
                Ok(Reply::Cbt {
                    base: st.cbt_base,
                    changed_blocks: st.changed_blocks,
                    origin: st.cbt_origin,
                    changed: (&self.engine.cbt.changed).into(),
                })
            }
        }
    }
}

/// A request that failed: its kind and message, for [`Reply::Error`].
struct Failure {
    kind: ErrorKind,
    message: String,
}

impl Failure {
    fn bad(message: impl Into<String>) -> Failure {
        Failure { kind: ErrorKind::BadRequest, message: message.into() }
    }

    fn into_reply(self) -> Reply {
        Reply::Error { kind: self.kind, message: self.message }
    }
}

impl From<SnapshotError> for Failure {
    fn from(e: SnapshotError) -> Failure {
        Failure { kind: ErrorKind::of(&e), message: e.to_string() }
    }
}
