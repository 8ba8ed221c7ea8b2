//! The backup's side of a protected volume's control socket, and a `BlockSource` over a
//! snapshot view that the ordinary backup pipeline reads.

use crate::bitmap::Bitmap;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct ControlClient {
    r: BufReader<UnixStream>,
    w: UnixStream,
    pub socket: PathBuf,
}

impl ControlClient {
    pub fn connect(socket: &Path) -> Result<ControlClient> {
        let s = UnixStream::connect(socket)
            .with_context(|| format!("cannot reach the rime serve control socket {}", socket.display()))?;
        Ok(ControlClient { r: BufReader::new(s.try_clone()?), w: s, socket: socket.to_path_buf() })
    }

    /// Sends one request; returns the reply (an error reply becomes an `Err`).
    pub fn call(&mut self, req: &Value) -> Result<Value> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.w.write_all(&line).context("control socket closed")?;
        let mut reply = String::new();
        if self.r.read_line(&mut reply).context("control socket")? == 0 {
            bail!("the rime serve process closed the control socket");
        }
        let v: Value = serde_json::from_str(reply.trim()).context("bad reply on the control socket")?;
        if v["ok"] != json!(true) {
            bail!("{}", v["error"].as_str().unwrap_or("rime serve refused the request"));
        }
        Ok(v)
    }

    /// A `read` request: the reply and then its payload into `buf`.
    pub fn read(&mut self, id: u64, offset: u64, buf: &mut [u8], archive: bool) -> Result<(u64, u64)> {
        let v = self.call(&json!({"op": "read", "id": id, "offset": offset, "len": buf.len(), "archive": archive}))?;
        self.r.read_exact(buf).context("control socket closed during a read")?;
        Ok((v["store_bytes"].as_u64().unwrap_or(0), v["store_cap"].as_u64().unwrap_or(u64::MAX)))
    }

    pub fn status(&mut self) -> Result<Value> {
        self.call(&json!({"op": "status"}))
    }
}

/// An active snapshot, as the backup sees it. Reading it is a [`rime_volume::BlockSource`].
/// Dropping it without [`SnapshotSource::finish`] aborts the snapshot (closing the socket does
/// too, even if the process dies).
pub struct SnapshotSource {
    client: Arc<Mutex<ControlClient>>,
    /// Stops the keepalive thread.
    alive: Arc<AtomicBool>,
    pub id: u64,
    pub size: u64,
    pub block_size: u32,
    pub taken_at: f64,
    pub volume: PathBuf,
    pub info: Value,
    archiving: AtomicBool,
    /// Blocks read early because the difference store was filling: their snapshot contents,
    /// kept in a local temporary file until the pipeline gets to them.
    early: Mutex<Early>,
    spill_dir: PathBuf,
    last_store: AtomicU64,
    store_cap: AtomicU64,
    pub early_blocks: AtomicU64,
    ended: AtomicBool,
}

#[derive(Default)]
struct Early {
    file: Option<File>,
    slots: HashMap<u64, u64>,
    next: u64,
}

/// Above this share of its cap, the backup reads saved blocks first.
const PRESSURE: f64 = 0.5;

impl SnapshotSource {
    /// Takes a snapshot through the server's control socket.
    pub fn begin(
        socket: &Path,
        wip: Option<Duration>,
        limit: Option<Duration>,
        drain: Option<Duration>,
    ) -> Result<SnapshotSource> {
        let mut c = ControlClient::connect(socket)?;
        let st = c.status()?;
        let volume = PathBuf::from(st["volume"].as_str().unwrap_or("volume"));
        let mut req = json!({"op": "begin"});
        if let Some(w) = wip {
            req["wip_ms"] = json!(w.as_millis() as u64);
        }
        if let Some(l) = limit {
            req["limit_ms"] = json!(l.as_millis() as u64);
        }
        if let Some(d) = drain {
            req["drain_ms"] = json!(d.as_millis() as u64);
        }
        let v = c.call(&req).with_context(|| format!("taking a snapshot of {}", volume.display()))?;
        let s = &v["snapshot"];
        let num = |k: &str| s[k].as_u64().ok_or_else(|| anyhow!("snapshot reply without {k}"));
        let id = num("id")?;
        let client = Arc::new(Mutex::new(c));
        let alive = Arc::new(AtomicBool::new(true));
        // Keepalive: the server aborts a snapshot whose backup stops asking (hangs).
        let (c2, a2) = (client.clone(), alive.clone());
        std::thread::Builder::new().name("snapshot-keepalive".into()).spawn(move || {
            while a2.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    std::thread::sleep(Duration::from_millis(100));
                    if !a2.load(Ordering::SeqCst) {
                        return;
                    }
                }
                if c2.lock().unwrap().call(&json!({"op": "ping", "id": id})).is_err() {
                    return;
                }
            }
        })?;
        Ok(SnapshotSource {
            id,
            alive,
            size: num("size")?,
            block_size: num("block_size")? as u32,
            taken_at: s["taken_at"].as_f64().unwrap_or(0.0),
            info: s.clone(),
            client,
            volume,
            archiving: AtomicBool::new(false),
            early: Mutex::new(Early::default()),
            spill_dir: std::env::temp_dir(),
            last_store: AtomicU64::new(0),
            store_cap: AtomicU64::new(u64::MAX),
            early_blocks: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        })
    }

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size as u64)
    }

    pub fn call(&self, req: Value) -> Result<Value> {
        self.client.lock().unwrap().call(&req)
    }

    /// From now on every read archives what it read (the pipeline reads each chunk once).
    pub fn start_archiving(&self) {
        self.archiving.store(true, Ordering::SeqCst);
    }

    pub fn protect(&self, area: &Bitmap) -> Result<()> {
        self.call(json!({"op": "protect", "id": self.id, "area": area.to_hex()}))?;
        Ok(())
    }

    /// (base backup, blocks changed since it up to the snapshot instant, blocks it imaged)
    pub fn changes(&self) -> Result<(Option<String>, Bitmap, Option<Bitmap>)> {
        let v = self.call(json!({"op": "changes", "id": self.id}))?;
        let n = self.blocks();
        let changed = Bitmap::from_hex(n, v["changed"].as_str().unwrap_or("")).context("bad changed-block map")?;
        let used = v["used"].as_str().and_then(|h| Bitmap::from_hex(n, h));
        Ok((v["base"].as_str().map(str::to_string), changed, used))
    }

    /// The backup `backup` of this snapshot succeeded (`used`: blocks it imaged whole;
    /// `partial`: blocks it imaged in part).
    pub fn finish(&self, backup: &str, used: &Bitmap, partial: &Bitmap) -> Result<()> {
        self.ended.store(true, Ordering::SeqCst);
        self.call(
            json!({"op": "end", "id": self.id, "backup": backup, "used": used.to_hex(), "partial": partial.to_hex()}),
        )?;
        Ok(())
    }

    pub fn abort(&self) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            let _ = self.call(json!({"op": "end", "id": self.id}));
        }
    }

    /// When the difference store is filling, read the blocks it holds now (archiving them on
    /// the server, which frees them) into a local file.
    fn relieve_pressure(&self, c: &mut ControlClient) -> Result<()> {
        let (bytes, cap) = (self.last_store.load(Ordering::Relaxed), self.store_cap.load(Ordering::Relaxed));
        if (bytes as f64) < cap as f64 * PRESSURE {
            return Ok(());
        }
        let v = c.call(&json!({"op": "buffered", "id": self.id, "max": 4096}))?;
        let blocks: Vec<u64> =
            v["blocks"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
        let bs = self.block_size as u64;
        let mut early = self.early.lock().unwrap();
        if early.file.is_none() {
            early.file = Some(tempfile::tempfile_in(&self.spill_dir).context("temporary file for early-read blocks")?);
        }
        let mut buf = vec![0u8; bs as usize];
        for b in blocks {
            let len = bs.min(self.size - b * bs) as usize;
            let (bytes, cap) = c.read(self.id, b * bs, &mut buf[..len], true)?;
            self.last_store.store(bytes, Ordering::Relaxed);
            self.store_cap.store(cap, Ordering::Relaxed);
            let slot = early.next;
            early.next += 1;
            early.file.as_ref().unwrap().write_all_at(&buf[..len], slot * bs)?;
            early.slots.insert(b, slot);
            self.early_blocks.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn read_view(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let archive = self.archiving.load(Ordering::SeqCst);
        let mut c = self.client.lock().unwrap();
        if archive {
            self.relieve_pressure(&mut c)?;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(16 << 20);
            let (bytes, cap) = c.read(self.id, offset + done as u64, &mut buf[done..done + n], archive)?;
            self.last_store.store(bytes, Ordering::Relaxed);
            self.store_cap.store(cap, Ordering::Relaxed);
            done += n;
        }
        drop(c);
        let mut early = self.early.lock().unwrap();
        if !early.slots.is_empty() {
            let bs = self.block_size as u64;
            let end = offset + buf.len() as u64;
            for b in offset / bs..end.div_ceil(bs) {
                let Some(&slot) = early.slots.get(&b) else {
                    continue;
                };
                let (from, to) = ((b * bs).max(offset), ((b + 1) * bs).min(end));
                let f = early.file.as_ref().unwrap();
                f.read_exact_at(
                    &mut buf[(from - offset) as usize..(to - offset) as usize],
                    slot * bs + (from - b * bs),
                )?;
                if archive {
                    early.slots.remove(&b);
                }
            }
        }
        Ok(())
    }
}

impl rime_volume::BlockSource for SnapshotSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_view(buf, offset).map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

impl Drop for SnapshotSource {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.abort();
    }
}
