//! The backup's side of a protected volume's control socket ([`ControlClient`], typed
//! requests and replies of [`crate::protocol`]), and [`SnapshotSource`], a `BlockSource` over a
//! snapshot view that the ordinary backup pipeline reads.
//!
//! Invariants: a snapshot source that is dropped without [`SnapshotSource::finish`] ends its
//! snapshot unsuccessfully (and the server aborts it anyway when the socket closes); blocks read
//! early under store pressure are returned from the local spill file exactly once.

use crate::protocol::{encode, ErrorKind, Reply, Request, WireBitmap, PROTOCOL_VERSION};
use rime_snapshot::engine::{GateRelease, SnapshotInfo, Status};
use rime_snapshot::Bitmap;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the rime serve control socket {}: {source}", .path.display())]
    Unreachable { path: PathBuf, source: std::io::Error },
    #[error("the rime serve process closed the control socket")]
    Closed,
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad reply on the control socket: {0}")]
    BadReply(String),
    #[error(
        "rime serve speaks control protocol version {server}, this rime version {PROTOCOL_VERSION}: run the same rime on both sides"
    )]
    Version { server: u32 },
    /// The server refused the request.
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
}

type Result<T, E = ControlError> = std::result::Result<T, E>;

/// What [`ControlClient::status`] reports.
#[derive(Clone, Debug)]
pub struct ServerStatus {
    pub status: Status,
    pub volume: PathBuf,
    pub fuse_file: Option<PathBuf>,
    pub pid: u32,
}

pub struct ControlClient {
    r: BufReader<UnixStream>,
    w: UnixStream,
    pub socket: PathBuf,
}

impl ControlClient {
    pub fn connect(socket: &Path) -> Result<ControlClient> {
        let s = UnixStream::connect(socket)
            .map_err(|source| ControlError::Unreachable { path: socket.to_path_buf(), source })?;
        Ok(ControlClient { r: BufReader::new(s.try_clone()?), w: s, socket: socket.to_path_buf() })
    }

    /// Sends one request; returns the reply (an error reply becomes [`ControlError::Refused`]).
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        self.w.write_all(&encode(req)).map_err(|_| ControlError::Closed)?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(ControlError::Closed);
        }
        match serde_json::from_str::<Reply>(line.trim()) {
            Ok(Reply::Error { kind, message }) => Err(ControlError::Refused { kind, message }),
            Ok(reply) => Ok(reply),
            Err(e) => Err(ControlError::BadReply(e.to_string())),
        }
    }

    /// A request whose only answer is [`Reply::Done`].
    pub fn call_done(&mut self, req: &Request) -> Result<()> {
        match self.call(req)? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// A `read` request: the reply and then its payload into `buf`. Returns the difference
    /// store's (bytes, cap).
    pub fn read(&mut self, id: u64, offset: u64, buf: &mut [u8], archive: bool) -> Result<(u64, u64)> {
        let req = Request::Read { id, offset, len: buf.len() as u64, archive };
        match self.call(&req)? {
            Reply::Read { len, store_bytes, store_cap } if len == buf.len() as u64 => {
                self.r.read_exact(buf).map_err(|_| ControlError::Closed)?;
                Ok((store_bytes, store_cap))
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Who serves what; refuses a server of another protocol version.
    pub fn status(&mut self) -> Result<ServerStatus> {
        match self.call(&Request::Status)? {
            Reply::Status { protocol, status, volume, fuse_file, pid } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(ControlError::Version { server: protocol });
                }
                Ok(ServerStatus { status, volume, fuse_file, pid })
            }
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(reply: &Reply) -> ControlError {
    ControlError::BadReply(format!("unexpected reply {}", String::from_utf8_lossy(&encode(reply)).trim()))
}

fn bitmap(b: &WireBitmap, blocks: u64) -> Result<Bitmap> {
    b.to_bitmap(blocks).map_err(ControlError::BadReply)
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
    pub info: SnapshotInfo,
    archiving: AtomicBool,
    /// Blocks read early because the difference store was filling: their snapshot contents,
    /// kept in a local temporary file until the pipeline gets to them.
    early: Mutex<Early>,
    spill_dir: PathBuf,
    last_store: AtomicU64,
    store_cap: AtomicU64,
    pub early_blocks: AtomicU64,
    ended: AtomicBool,
    /// Writes the engine had counted just before the snapshot was requested.
    pub writes_before: u64,
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
    /// Takes a snapshot through the server's control socket (its default limits).
    pub fn begin(
        socket: &Path,
        wip: Option<Duration>,
        limit: Option<Duration>,
        drain: Option<Duration>,
    ) -> anyhow::Result<SnapshotSource> {
        SnapshotSource::begin_with(socket, wip, limit, drain, None)
    }

    /// Takes a snapshot and, with `hold`, leaves the server's write gate closed after its
    /// instant until [`SnapshotSource::release_gate`] (at most `hold`).
    pub fn begin_with(
        socket: &Path,
        wip: Option<Duration>,
        limit: Option<Duration>,
        drain: Option<Duration>,
        hold: Option<Duration>,
    ) -> anyhow::Result<SnapshotSource> {
        use anyhow::Context;
        let mut c = ControlClient::connect(socket)?;
        let before = c.status()?;
        let (volume, writes_before) = (before.volume, before.status.writes);
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let req = Request::Begin { wip_ms: ms(wip), limit_ms: ms(limit), drain_ms: ms(drain), hold_ms: ms(hold) };
        let info = match c.call(&req).with_context(|| format!("taking a snapshot of {}", volume.display()))? {
            Reply::Snapshot { snapshot } => snapshot,
            other => return Err(unexpected(&other).into()),
        };
        let id = info.id;
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
                if c2.lock().unwrap().call_done(&Request::Ping { id }).is_err() {
                    return;
                }
            }
        })?;
        Ok(SnapshotSource {
            id,
            alive,
            size: info.size,
            block_size: info.block_size,
            taken_at: info.taken_at,
            info,
            client,
            volume,
            archiving: AtomicBool::new(false),
            early: Mutex::new(Early::default()),
            spill_dir: std::env::temp_dir(),
            last_store: AtomicU64::new(0),
            store_cap: AtomicU64::new(u64::MAX),
            early_blocks: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            writes_before,
        })
    }

    /// Writes the engine has counted so far (with [`SnapshotSource::writes_before`]: how many
    /// reached the volume around the snapshot).
    pub fn writes_now(&self) -> Result<u64> {
        Ok(self.client.lock().unwrap().status()?.status.writes)
    }

    /// Opens the write gate this held snapshot keeps closed. An error means the gate had
    /// opened already (the hold limit passed and the server aborted the snapshot).
    pub fn release_gate(&self) -> Result<GateRelease> {
        match self.client.lock().unwrap().call(&Request::Release { id: self.id })? {
            Reply::Released { release } => Ok(release),
            other => Err(unexpected(&other)),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size as u64)
    }

    fn call_done(&self, req: Request) -> Result<()> {
        self.client.lock().unwrap().call_done(&req)
    }

    /// From now on every read archives what it read (the pipeline reads each chunk once).
    pub fn start_archiving(&self) {
        self.archiving.store(true, Ordering::SeqCst);
    }

    pub fn protect(&self, area: &Bitmap) -> Result<()> {
        self.call_done(Request::Protect { id: self.id, area: area.into() })
    }

    /// (base backup, blocks changed since it up to the snapshot instant, blocks it imaged)
    pub fn changes(&self) -> Result<(Option<String>, Bitmap, Option<Bitmap>)> {
        let reply = self.client.lock().unwrap().call(&Request::Changes { id: self.id })?;
        let Reply::Changes { base, changed, used } = reply else { return Err(unexpected(&reply)) };
        let n = self.blocks();
        Ok((base, bitmap(&changed, n)?, used.map(|u| bitmap(&u, n)).transpose()?))
    }

    /// The backup `backup` of this snapshot succeeded (`used`: blocks it imaged whole;
    /// `partial`: blocks it imaged in part).
    pub fn finish(&self, backup: &str, used: &Bitmap, partial: &Bitmap) -> Result<()> {
        self.ended.store(true, Ordering::SeqCst);
        self.call_done(Request::End {
            id: self.id,
            backup: Some(backup.to_string()),
            used: Some(used.into()),
            partial: Some(partial.into()),
        })
    }

    pub fn abort(&self) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            let _ = self.call_done(Request::End { id: self.id, backup: None, used: None, partial: None });
        }
    }

    /// When the difference store is filling, read the blocks it holds now (archiving them on
    /// the server, which frees them) into a local file.
    fn relieve_pressure(&self, c: &mut ControlClient) -> Result<()> {
        let (bytes, cap) = (self.last_store.load(Ordering::Relaxed), self.store_cap.load(Ordering::Relaxed));
        if (bytes as f64) < cap as f64 * PRESSURE {
            return Ok(());
        }
        let reply = c.call(&Request::Buffered { id: self.id, max: 4096 })?;
        let Reply::Buffered { blocks } = reply else { return Err(unexpected(&reply)) };
        let bs = self.block_size as u64;
        let mut early = self.early.lock().unwrap();
        if early.file.is_none() {
            early.file = Some(tempfile::tempfile_in(&self.spill_dir)?);
        }
        let mut buf = vec![0u8; bs as usize];
        for b in blocks {
            // Defensive: the server names blocks of this volume only.
            let Some(left) = self.size.checked_sub(b.saturating_mul(bs)).filter(|&l| l > 0) else {
                return Err(ControlError::BadReply(format!("buffered block {b} is outside the volume")));
            };
            let len = bs.min(left) as usize;
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
        self.read_view(buf, offset).map_err(std::io::Error::other)
    }
}

impl Drop for SnapshotSource {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.abort();
    }
}
