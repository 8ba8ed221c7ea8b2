//! An NBD server for one [`Export`]: fixed newstyle handshake (`NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_INFO`, `NBD_OPT_GO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`), simple replies, and the
//! commands read, write (with FUA), flush, trim, write-zeroes and disconnect. For an export that
//! reports its zero ranges ([`Export::reports_zeros`]) also structured replies and the
//! `base:allocation` context with `NBD_CMD_BLOCK_STATUS` (reads are then answered with
//! structured replies, as the protocol requires). Listens on TCP or on a unix socket, one thread
//! per connection.
//!
//! Invariants: no request outside `0..export.size()` reaches the export (reads and trims get
//! EINVAL, writes ENOSPC); no payload above [`MAX_PAYLOAD`] is read into memory; a read-only
//! export ([`Export::read_only`]) is advertised with `NBD_FLAG_READ_ONLY` and never sees a
//! write, trim or write-zeroes (each gets EPERM); a failed read is an error reply to that
//! request, and the connection goes on.
//!
//! Protocol facts from the NBD protocol document (`doc/proto.md` of the NBD project).

use crate::proto::*;
use crate::wire::{read_u32, read_u64};
use crate::Export;
use anyhow::{Context, Result};
use std::io::{BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

/// Largest read or write payload accepted (the protocol's customary 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Where to listen: `HOST:PORT` (TCP) or a unix socket path (`unix:PATH` or a path with a `/`).
#[derive(Clone, Debug)]
pub enum Address {
    Tcp(String),
    Unix(PathBuf),
}

impl Address {
    pub fn parse(s: &str) -> Address {
        if let Some(p) = s.strip_prefix("unix:") {
            Address::Unix(p.into())
        } else if s.contains('/') {
            Address::Unix(s.into())
        } else {
            Address::Tcp(s.to_string())
        }
    }
}

pub struct NbdServer {
    export: Arc<dyn Export>,
    name: String,
}

trait Stream: Read + Write + Send {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>>;
}
impl Stream for std::net::TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}
impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl NbdServer {
    /// `name` is the export's name; the default (empty) name is accepted too.
    pub fn new(export: Arc<dyn Export>, name: String) -> Arc<NbdServer> {
        Arc::new(NbdServer { export, name })
    }

    /// Binds and serves in background threads, one per connection.
    pub fn listen(self: &Arc<Self>, addr: &Address) -> Result<()> {
        match addr {
            Address::Tcp(a) => {
                let l = TcpListener::bind(a).with_context(|| format!("listen for NBD on {a}"))?;
                let me = self.clone();
                std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
                    for s in l.incoming().flatten() {
                        let _ = s.set_nodelay(true);
                        me.spawn_conn(Box::new(s));
                    }
                })?;
            }
            Address::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).with_context(|| format!("listen for NBD on {}", p.display()))?;
                let me = self.clone();
                std::thread::Builder::new().name("nbd-accept".into()).spawn(move || {
                    for s in l.incoming().flatten() {
                        me.spawn_conn(Box::new(s));
                    }
                })?;
            }
        }
        Ok(())
    }

    fn spawn_conn(self: &Arc<Self>, s: Box<dyn Stream>) {
        let me = self.clone();
        let _ = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
            if let Err(e) = me.serve(s) {
                tracing::debug!("NBD connection ended: {e:#}");
            }
        });
    }

    fn serve(&self, s: Box<dyn Stream>) -> Result<()> {
        let mut w = s.try_clone_box()?;
        let mut r = BufReader::with_capacity(256 << 10, s);
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        w.write_all(&hello)?;
        let client_flags = read_u32(&mut r)?;
        let no_zeroes = client_flags & FLAG_NO_ZEROES as u32 != 0;
        let mut conn = Conn::default();
        if !self.negotiate(&mut r, w.as_mut(), no_zeroes, &mut conn)? {
            return Ok(());
        }
        self.transmission(&mut r, w.as_mut(), &conn)
    }

    fn tflags(&self) -> u16 {
        if self.export.read_only() {
            return TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        }
        TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
    }

    fn known(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    /// Option haggling; true when the client moves on to transmission.
    fn negotiate(&self, r: &mut impl Read, w: &mut dyn Stream, no_zeroes: bool, conn: &mut Conn) -> Result<bool> {
        loop {
            let magic = read_u64(r)?;
            anyhow::ensure!(magic == IHAVEOPT, "bad option magic");
            let opt = read_u32(r)?;
            let len = read_u32(r)?;
            anyhow::ensure!(len <= 1 << 20, "option too long");
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    if !self.known(&name) {
                        anyhow::bail!("unknown export {name:?}");
                    }
                    let mut out = Vec::new();
                    out.extend_from_slice(&self.export.size().to_be_bytes());
                    out.extend_from_slice(&self.tflags().to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    w.write_all(&out)?;
                    return Ok(true);
                }
                OPT_ABORT => {
                    let _ = reply(w, opt, REP_ACK, &[]);
                    return Ok(false);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let mut d = Vec::new();
                    d.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(self.name.as_bytes());
                    d.extend_from_slice(self.export.description().as_bytes());
                    reply(w, opt, REP_SERVER, &d)?;
                    reply(w, opt, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let parsed = (|| {
                        let nlen = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
                        let name = String::from_utf8_lossy(data.get(4..4 + nlen)?).into_owned();
                        let n = u16::from_be_bytes(data.get(4 + nlen..6 + nlen)?.try_into().ok()?) as usize;
                        let reqs = data.get(6 + nlen..6 + nlen + 2 * n)?;
                        (reqs.len() == 2 * n && data.len() == 6 + nlen + 2 * n).then_some((name, reqs.to_vec()))
                    })();
                    let Some((name, reqs)) = parsed else {
                        reply(w, opt, REP_ERR_INVALID, b"malformed request")?;
                        continue;
                    };
                    if !self.known(&name) {
                        reply(w, opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                        continue;
                    }
                    let mut info = Vec::new();
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&self.export.size().to_be_bytes());
                    info.extend_from_slice(&self.tflags().to_be_bytes());
                    reply(w, opt, REP_INFO, &info)?;
                    for kind in reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])) {
                        let mut d = kind.to_be_bytes().to_vec();
                        match kind {
                            INFO_NAME => d.extend_from_slice(self.name.as_bytes()),
                            INFO_DESCRIPTION => d.extend_from_slice(self.export.description().as_bytes()),
                            INFO_BLOCK_SIZE => {
                                d.extend_from_slice(&1u32.to_be_bytes());
                                d.extend_from_slice(&4096u32.to_be_bytes());
                                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                            }
                            _ => continue,
                        }
                        reply(w, opt, REP_INFO, &d)?;
                    }
                    reply(w, opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(true);
                    }
                }
                OPT_STRUCTURED_REPLY if self.export.reports_zeros() => {
                    if !data.is_empty() {
                        reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                    } else {
                        conn.structured = true;
                        reply(w, opt, REP_ACK, &[])?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT if self.export.reports_zeros() => {
                    if !conn.structured {
                        reply(w, opt, REP_ERR_INVALID, b"negotiate structured replies first")?;
                        continue;
                    }
                    let Some((name, queries)) = parse_meta_request(&data) else {
                        reply(w, opt, REP_ERR_INVALID, b"malformed request")?;
                        continue;
                    };
                    if !self.known(&name) {
                        reply(w, opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                        continue;
                    }
                    let listing = opt == OPT_LIST_META_CONTEXT;
                    let wanted = queries
                        .iter()
                        .any(|q| q == CONTEXT_BASE_ALLOCATION || (listing && (q == "base:" || q.is_empty())))
                        || (listing && queries.is_empty());
                    if !listing {
                        conn.allocation = wanted;
                    }
                    if wanted {
                        let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                        reply(w, opt, REP_META_CONTEXT, &d)?;
                    }
                    reply(w, opt, REP_ACK, &[])?;
                }
                _ => reply(w, opt, REP_ERR_UNSUP, b"option not supported")?,
            }
        }
    }

    fn transmission(&self, r: &mut impl Read, w: &mut dyn Stream, conn: &Conn) -> Result<()> {
        let mut hdr = [0u8; 28];
        let mut buf: Vec<u8> = Vec::new();
        loop {
            r.read_exact(&mut hdr)?;
            let magic = u32::from_be_bytes(hdr[0..4].try_into().unwrap());
            anyhow::ensure!(magic == REQUEST_MAGIC, "bad request magic {magic:#x}");
            let flags = u16::from_be_bytes(hdr[4..6].try_into().unwrap());
            let cmd = u16::from_be_bytes(hdr[6..8].try_into().unwrap());
            let handle: [u8; 8] = hdr[8..16].try_into().unwrap();
            let offset = u64::from_be_bytes(hdr[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(hdr[24..28].try_into().unwrap());
            let fua = flags & CMD_FLAG_FUA != 0;
            let in_range = offset.checked_add(len as u64).is_some_and(|e| e <= self.export.size());
            let errno = |e: std::io::Error| e.raw_os_error().map(|n| n as u32).unwrap_or(EIO);
            let read_only = self.export.read_only();
            match cmd {
                CMD_READ if conn.structured => {
                    if len > MAX_PAYLOAD || !in_range {
                        error_chunk(w, EINVAL, handle)?;
                        continue;
                    }
                    // Header (20), offset (8), data.
                    buf.resize(28 + len as usize, 0);
                    match self.export.read(offset, &mut buf[28..]) {
                        Ok(()) => {
                            let head = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + len);
                            buf[0..20].copy_from_slice(&head);
                            buf[20..28].copy_from_slice(&offset.to_be_bytes());
                            w.write_all(&buf)?;
                        }
                        Err(e) => error_chunk(w, errno(e), handle)?,
                    }
                }
                CMD_READ => {
                    if len > MAX_PAYLOAD || !in_range {
                        simple_reply(w, EINVAL, handle, &[])?;
                        continue;
                    }
                    buf.resize(16 + len as usize, 0);
                    match self.export.read(offset, &mut buf[16..]) {
                        Ok(()) => {
                            buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                            buf[4..8].copy_from_slice(&0u32.to_be_bytes());
                            buf[8..16].copy_from_slice(&handle);
                            w.write_all(&buf)?;
                        }
                        Err(e) => simple_reply(w, errno(e), handle, &[])?,
                    }
                }
                CMD_BLOCK_STATUS if conn.structured => {
                    if !conn.allocation || !in_range || len == 0 {
                        error_chunk(w, EINVAL, handle)?;
                        continue;
                    }
                    match self.export.zero_extents(offset, len as u64) {
                        Ok(runs) => {
                            let mut runs: Vec<(u64, bool)> = runs.into_iter().filter(|(l, _)| *l > 0).collect();
                            if runs.is_empty() {
                                runs.push((len as u64, false));
                            }
                            if flags & CMD_FLAG_REQ_ONE != 0 {
                                runs.truncate(1);
                            }
                            let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                            let mut covered = 0u64;
                            for (l, zero) in runs {
                                let l = l.min(len as u64 - covered);
                                if l == 0 {
                                    break;
                                }
                                covered += l;
                                d.extend_from_slice(&(l as u32).to_be_bytes());
                                let state = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
                                d.extend_from_slice(&state.to_be_bytes());
                            }
                            let mut out =
                                chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, d.len() as u32).to_vec();
                            out.extend_from_slice(&d);
                            w.write_all(&out)?;
                        }
                        Err(e) => error_chunk(w, errno(e), handle)?,
                    }
                }
                CMD_WRITE => {
                    anyhow::ensure!(len <= MAX_PAYLOAD, "write of {len} bytes is too large");
                    buf.resize(len as usize, 0);
                    r.read_exact(&mut buf)?;
                    let err = if read_only {
                        EPERM
                    } else if !in_range {
                        ENOSPC
                    } else {
                        self.export.write(offset, &buf, fua).err().map(errno).unwrap_or(0)
                    };
                    simple_reply(w, err, handle, &[])?;
                }
                CMD_FLUSH => {
                    let err = self.export.flush().err().map(errno).unwrap_or(0);
                    simple_reply(w, err, handle, &[])?;
                }
                CMD_TRIM => {
                    let err = if read_only {
                        EPERM
                    } else if !in_range {
                        EINVAL
                    } else {
                        let mut e = self.export.trim(offset, len as u64).err().map(errno).unwrap_or(0);
                        if e == 0 && fua {
                            e = self.export.flush().err().map(errno).unwrap_or(0);
                        }
                        e
                    };
                    simple_reply(w, err, handle, &[])?;
                }
                CMD_WRITE_ZEROES => {
                    let err = if read_only {
                        EPERM
                    } else if !in_range {
                        ENOSPC
                    } else {
                        self.export
                            .write_zeroes(offset, len as u64, fua, flags & CMD_FLAG_NO_HOLE == 0)
                            .err()
                            .map(errno)
                            .unwrap_or(0)
                    };
                    simple_reply(w, err, handle, &[])?;
                }
                CMD_DISC => {
                    let _ = self.export.flush();
                    return Ok(());
                }
                _ => simple_reply(w, ENOTSUP, handle, &[])?,
            }
        }
    }
}

/// What one connection negotiated.
#[derive(Default)]
struct Conn {
    /// Structured replies (then reads are answered with structured replies).
    structured: bool,
    /// The `base:allocation` context was selected.
    allocation: bool,
}

/// The id the server gives `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

/// The export name and the queries of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let u32_at = |at: usize| Some(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize);
    let nlen = u32_at(0)?;
    let name = String::from_utf8_lossy(data.get(4..4 + nlen)?).into_owned();
    let count = u32_at(4 + nlen)?;
    let mut at = 8 + nlen;
    let mut queries = Vec::new();
    for _ in 0..count {
        let qlen = u32_at(at)?;
        queries.push(String::from_utf8_lossy(data.get(at + 4..at + 4 + qlen)?).into_owned());
        at += 4 + qlen;
    }
    (at == data.len()).then_some((name, queries))
}

fn chunk_header(flags: u16, kind: u16, handle: [u8; 8], len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle);
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

/// A structured reply that is one error chunk (no message).
fn error_chunk(w: &mut dyn Stream, error: u32, handle: [u8; 8]) -> Result<()> {
    let mut out = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6).to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    w.write_all(&out)?;
    Ok(())
}

fn reply(w: &mut dyn Stream, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)?;
    Ok(())
}

fn simple_reply(w: &mut dyn Stream, error: u32, handle: [u8; 8], data: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle);
    out.extend_from_slice(data);
    w.write_all(&out)?;
    Ok(())
}
