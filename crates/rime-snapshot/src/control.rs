//! The control socket of a protected volume: one JSON object per line in each direction.
//! A `read` reply line is followed by exactly `len` raw bytes of the snapshot view.
//!
//! | request | reply |
//! |---|---|
//! | `{"op":"status"}` | `{"ok":true,"status":{...},"volume":PATH,"fuse_file":PATH?}` |
//! | `{"op":"begin","wip_ms":N?,"limit_ms":N?,"drain_ms":N?}` | `{"ok":true,"snapshot":{"id":N,"size":N,"block_size":N,"taken_at":T,...}}` |
//! | `{"op":"read","id":N,"offset":N,"len":N,"archive":B}` | `{"ok":true,"len":N,"store_bytes":N,"store_cap":N}` + bytes |
//! | `{"op":"protect","id":N,"area":HEX}` | `{"ok":true}`: the protection area becomes `area` (a bitmap) |
//! | `{"op":"archived","id":N,"offset":N,"len":N}` | `{"ok":true}` |
//! | `{"op":"buffered","id":N,"max":N}` | `{"ok":true,"blocks":[N,...]}` (blocks with saved copies) |
//! | `{"op":"changes","id":N}` | `{"ok":true,"base":ID?,"changed":HEX,"used":HEX?}` |
//! | `{"op":"end","id":N,"backup":ID?,"used":HEX?,"partial":HEX?}` | `{"ok":true}`; with `backup`, the changed-block map becomes relative to it |
//! | `{"op":"abort","id":N}` | `{"ok":true}` |
//! | `{"op":"ping","id":N}` | `{"ok":true}`: the backup is alive (it sends one every 2 s) |
//! | `{"op":"cbt"}` | `{"ok":true,"base":ID?,"changed_blocks":N,"origin":S,"changed":HEX}` |
//!
//! Failures reply `{"ok":false,"error":"..."}`. A snapshot belongs to the connection that began
//! it: when that connection closes (the backup ended or died), the snapshot is aborted at once;
//! when the backup asks nothing for the backup timeout (it hangs), the snapshot is aborted too.

use crate::bitmap::Bitmap;
use crate::engine::{Engine, SnapshotLimits};
use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
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

    pub fn listen(self: &Arc<Self>, path: &Path) -> Result<()> {
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        let l = UnixListener::bind(path).with_context(|| format!("listen on control socket {}", path.display()))?;
        // Only root (and the socket's owner) may take snapshots and read the volume.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let (engine, timeout) = (self.engine.clone(), self.backup_timeout);
        std::thread::Builder::new().name("backup-watchdog".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            engine.abort_if_idle(timeout);
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
            let req: Value = match serde_json::from_str(line.trim()) {
                Ok(v) => v,
                Err(e) => {
                    let _ = send(&mut w, &json!({"ok": false, "error": format!("bad request: {e}")}), None);
                    continue;
                }
            };
            let mut payload = None;
            let reply = match self.handle(&req, &mut owned, &mut payload) {
                Ok(v) => v,
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            };
            if send(&mut w, &reply, payload.as_deref()).is_err() {
                break;
            }
        }
        for id in owned {
            tracing::info!("snapshot {id}: the backup went away; aborting it");
            self.engine.abort_snapshot(id, "the backup disconnected");
        }
    }

    fn handle(&self, req: &Value, owned: &mut Vec<u64>, payload: &mut Option<Vec<u8>>) -> Result<Value> {
        let op = req["op"].as_str().ok_or_else(|| anyhow!("request without \"op\""))?;
        let num = |k: &str| req[k].as_u64().ok_or_else(|| anyhow!("request without \"{k}\""));
        let blocks = self.engine.size().div_ceil(self.engine.block_size() as u64);
        let bitmap = |k: &str| -> Result<Option<Bitmap>> {
            match req[k].as_str() {
                None => Ok(None),
                Some(h) => Bitmap::from_hex(blocks, h)
                    .map(Some)
                    .ok_or_else(|| anyhow!("\"{k}\" is not a bitmap of {blocks} blocks")),
            }
        };
        match op {
            "status" => Ok(json!({
                "ok": true,
                "status": self.engine.status(),
                "volume": self.engine.path(),
                "fuse_file": self.fuse_file,
                "pid": std::process::id(),
            })),
            "begin" => {
                let ms = |k: &str, d: Duration| req[k].as_u64().map(Duration::from_millis).unwrap_or(d);
                let limits = SnapshotLimits {
                    wip: ms("wip_ms", self.defaults.wip),
                    limit: ms("limit_ms", self.defaults.limit),
                    drain: ms("drain_ms", self.defaults.drain),
                };
                let info = self.engine.begin_snapshot(limits)?;
                owned.push(info.id);
                Ok(json!({"ok": true, "snapshot": info}))
            }
            "read" => {
                let (id, offset, len) = (num("id")?, num("offset")?, num("len")?);
                anyhow::ensure!(len <= 64 << 20, "read of {len} bytes is too large");
                let mut buf = vec![0u8; len as usize];
                self.engine.snap_read(id, offset, &mut buf, req["archive"].as_bool().unwrap_or(false))?;
                let st = self.engine.store_status(id)?;
                *payload = Some(buf);
                Ok(json!({"ok": true, "len": len, "store_bytes": st.bytes, "store_cap": st.cap}))
            }
            "protect" => {
                let area = bitmap("area")?.ok_or_else(|| anyhow!("request without \"area\""))?;
                self.engine.protect_only(num("id")?, &area)?;
                Ok(json!({"ok": true}))
            }
            "archived" => {
                self.engine.mark_archived(num("id")?, num("offset")?, num("len")?)?;
                Ok(json!({"ok": true}))
            }
            "buffered" => {
                let blocks = self.engine.buffered_blocks(num("id")?, req["max"].as_u64().unwrap_or(1024) as usize)?;
                Ok(json!({"ok": true, "blocks": blocks}))
            }
            "changes" => {
                let (base, changed, used) = self.engine.snapshot_changes(num("id")?)?;
                Ok(json!({"ok": true, "base": base, "changed": changed.to_hex(), "used": used.map(|u| u.to_hex())}))
            }
            "end" => {
                let id = num("id")?;
                let success = match req["backup"].as_str() {
                    Some(b) => Some((b.to_string(), bitmap("used")?)),
                    None => None,
                };
                let partial = bitmap("partial")?;
                let result = self.engine.end_snapshot(id, success);
                owned.retain(|&o| o != id);
                result?;
                if let Some(p) = partial {
                    // Partly used blocks are re-read next time.
                    self.engine.cbt.changed.or_with(&p);
                }
                Ok(json!({"ok": true}))
            }
            "abort" => {
                let id = num("id")?;
                self.engine.abort_snapshot(id, "aborted by the backup");
                owned.retain(|&o| o != id);
                Ok(json!({"ok": true}))
            }
            "ping" => {
                self.engine.touch(num("id")?)?;
                Ok(json!({"ok": true}))
            }
            "cbt" => {
                let st = self.engine.status();
                Ok(json!({
                    "ok": true,
                    "base": st.cbt_base,
                    "changed_blocks": st.changed_blocks,
                    "origin": st.cbt_origin,
                    "changed": self.engine.cbt.changed.to_hex(),
                }))
            }
            other => Err(anyhow!("unknown op {other:?}")),
        }
    }
}

fn send(w: &mut UnixStream, v: &Value, payload: Option<&[u8]>) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(v).expect("json");
    out.push(b'\n');
    if let Some(p) = payload {
        out.extend_from_slice(p);
    }
    w.write_all(&out)
}
