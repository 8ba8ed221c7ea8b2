//! An NBD client over a unix socket, enough to read the exports of `qemu-nbd` and of QEMU's
//! pull-mode backups (libvirt `backup-begin`): fixed newstyle handshake, a named or the default
//! export (`NBD_OPT_GO`), structured replies (`NBD_OPT_STRUCTURED_REPLY`) when the server has
//! them and simple replies when it does not, and metadata contexts
//! (`NBD_OPT_SET_META_CONTEXT`, `NBD_CMD_BLOCK_STATUS`) such as `base:allocation` and
//! `qemu:dirty-bitmap:NAME`.
//!
//! Invariants:
//! - One request is in flight at a time: the connection's mutex is held from sending a request
//!   until its whole reply has been consumed, so the stream is always at a reply boundary when
//!   the next request is sent.
//! - No request leaves the client outside `0..size()`; reads go out in pieces of at most
//!   [`MAX_READ`] bytes, block status queries of at most [`MAX_STATUS`] bytes.
//! - The server is not trusted: every reply's magic, cookie, type and length are checked
//!   before its payload is read; a data chunk is read straight into the caller's buffer, and
//!   only once its range is known to lie inside the request and to overlap no earlier chunk.
//!   A read succeeds only when its chunks cover the request exactly once. No allocation is
//!   sized by the server beyond the fixed caps below, and nothing the server sends can panic.
//! - Block status results cover exactly the range asked for, in order, with no empty extent:
//!   the client asks again from where a short answer ended, and clamps an extent that runs
//!   past the end.
//! - An error the server reports for a request (an error chunk, or a simple reply with an
//!   error) fails that request only, as an [`std::io::Error`] carrying a [`ServerError`]. A
//!   reply that breaks the protocol, or an I/O error in the middle of one, ends the connection
//!   (a hard disconnect), and so does `NBD_ESHUTDOWN` (after `NBD_CMD_DISC`): that call and
//!   every later one fail.
//! - A metadata context asked for at connection time and not granted by the server fails the
//!   connection, naming the context (for a dirty bitmap: the bitmap is not there).
//!
//! Protocol facts from the NBD protocol document (`doc/proto.md` of the NBD project); the
//! dirty-bitmap context is QEMU's (`docs/interop/nbd.txt` of QEMU).

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::proto::*;
use crate::wire::{read_u16, read_u32, read_u64};

/// Largest single read request; servers must accept at least 32 MiB.
pub const MAX_READ: usize = 4 << 20;
/// Largest single block status request (the request's length field is 32 bits).
pub const MAX_STATUS: u64 = 1 << 30;
/// Longest string the protocol allows (export names, context names, messages).
const MAX_STRING: usize = 4096;
/// Most metadata contexts asked for on one connection.
const MAX_CONTEXTS: usize = 256;
/// Longest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most replies accepted to one option.
const MAX_OPTION_REPLIES: usize = 4096;
/// Longest error chunk accepted (a message of at most 4096 bytes plus fixed fields).
const MAX_ERROR_CHUNK: u32 = 64 << 10;
/// Most descriptors in one block status chunk (servers should send at most 2^20).
const MAX_CHUNK_EXTENTS: u32 = 1 << 20;
/// Most extents one [`NbdClient::block_status`] call returns; ask for less at a time beyond.
const MAX_CALL_EXTENTS: usize = 1 << 24;
/// Most disjoint pieces one read reply may arrive in (in-order chunks merge into one).
const MAX_READ_PIECES: usize = 1 << 16;

/// A range of the export and its status flags in one metadata context (for `base:allocation`
/// [`STATE_HOLE`] and [`STATE_ZERO`], for `qemu:dirty-bitmap:*` [`STATE_DIRTY`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

/// An error the NBD server reported for one request: its NBD error value (`NBD_EIO`, ...,
/// numerically the Linux errno), the message it sent (may be empty) and, for
/// `NBD_REPLY_TYPE_ERROR_OFFSET`, where the error is. It is the inner error of the
/// [`std::io::Error`] a request returns; its kind follows the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.errno {
            EPERM => "EPERM: operation not permitted",
            EIO => "EIO: input/output error",
            ENOMEM => "ENOMEM: cannot allocate memory",
            EINVAL => "EINVAL: invalid argument",
            ENOSPC => "ENOSPC: no space left on device",
            EOVERFLOW => "EOVERFLOW: value too large",
            ENOTSUP => "ENOTSUP: operation not supported",
            ESHUTDOWN => "ESHUTDOWN: server is shutting down",
            _ => "unknown error value",
        };
        write!(f, "NBD server error {} ({name})", self.errno)?;
        if let Some(o) = self.offset {
            write!(f, " at offset {o}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

fn server_error(errno: u32, message: String, offset: Option<u64>) -> std::io::Error {
    use std::io::ErrorKind;
    let kind = match errno {
        EPERM => ErrorKind::PermissionDenied,
        ENOMEM => ErrorKind::OutOfMemory,
        EINVAL => ErrorKind::InvalidInput,
        ENOSPC => ErrorKind::StorageFull,
        ENOTSUP => ErrorKind::Unsupported,
        _ => ErrorKind::Other,
    };
    std::io::Error::new(kind, ServerError { errno, message, offset })
}

fn is_shutdown(e: &std::io::Error) -> bool {
    e.get_ref().and_then(|i| i.downcast_ref::<ServerError>()).is_some_and(|se| se.errno == ESHUTDOWN)
}

/// A reply that breaks the protocol: the connection is dropped.
fn violation(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("NBD protocol violation by the server: {what}"))
}

/// The result of one request: the outer error ends the connection (the stream is no longer at
/// a reply boundary, or the server broke the protocol); the inner one is the server's answer.
type Reply<T> = std::io::Result<std::io::Result<T>>;

struct Conn {
    r: BufReader<UnixStream>,
    next_cookie: u64,
    /// Why the connection was dropped, once it was.
    broken: Option<String>,
}

pub struct NbdClient {
    conn: Mutex<Conn>,
    size: u64,
    export: String,
    structured: bool,
    /// Metadata contexts the server granted, with the ids it gave them.
    contexts: Vec<(String, u32)>,
}

impl NbdClient {
    /// Connects to the default export of the server on a unix socket, with no metadata contexts.
    pub fn connect_unix(socket: &Path) -> Result<NbdClient> {
        NbdClient::connect_unix_export(socket, "", &[])
    }

    /// Connects to the export named `export` ("" for the default one) of the server on a unix
    /// socket, negotiating structured replies when the server has them and the metadata
    /// contexts `meta_contexts` (which need them). Fails, naming it, if the server does not
    /// grant one of the contexts, and if it has no such export.
    pub fn connect_unix_export(socket: &Path, export: &str, meta_contexts: &[&str]) -> Result<NbdClient> {
        ensure!(export.len() <= MAX_STRING && !export.contains('\0'), "invalid NBD export name {export:?}");
        ensure!(meta_contexts.len() <= MAX_CONTEXTS, "too many NBD metadata contexts");
        for c in meta_contexts {
            ensure!(
                !c.is_empty() && c.len() <= MAX_STRING && !c.contains('\0') && c.contains(':'),
                "invalid NBD metadata context name {c:?}"
            );
        }
        let mut s =
            UnixStream::connect(socket).with_context(|| format!("connect to NBD socket {}", socket.display()))?;
        match handshake(&mut s, export, meta_contexts) {
            Ok(n) => Ok(NbdClient {
                conn: Mutex::new(Conn { r: BufReader::with_capacity(64 << 10, s), next_cookie: 1, broken: None }),
                size: n.size,
                export: export.to_string(),
                structured: n.structured,
                contexts: n.contexts,
            }),
            Err(e) => {
                // Giving up on the negotiation: a soft disconnect, as the protocol asks (the
                // server's reply is not waited for).
                let _ = send_option(&mut s, OPT_ABORT, &[]);
                let _ = s.shutdown(Shutdown::Both);
                Err(e.context(format!("NBD server on {}", socket.display())))
            }
        }
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's name as asked for ("" for the default export).
    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// Whether the server agreed to structured replies.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether the server granted the metadata context `name` on this connection.
    pub fn has_context(&self, name: &str) -> bool {
        self.context_id(name).is_some()
    }

    fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(n, _)| n == name).map(|&(_, id)| id)
    }

    /// Runs one request on the connection; drops the connection when the request fails at
    /// the connection level.
    fn transact<T>(&self, f: impl FnOnce(&mut Conn) -> Reply<T>) -> std::io::Result<T> {
        let mut guard = match self.conn.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g: MutexGuard<Conn> = poisoned.into_inner();
                if g.broken.is_none() {
                    g.broken = Some("a request was interrupted by a panic".into());
                    let _ = g.r.get_ref().shutdown(Shutdown::Both);
                }
                g
            }
        };
        if let Some(why) = &guard.broken {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("NBD connection was dropped earlier: {why}"),
            ));
        }
        match f(&mut guard) {
            Ok(Err(e)) if is_shutdown(&e) => {
                // The protocol asks for a soft disconnect when the server is shutting down.
                let _ = send_request(&mut guard, 0, CMD_DISC, 0, 0);
                guard.broken = Some(e.to_string());
                let _ = guard.r.get_ref().shutdown(Shutdown::Both);
                Err(e)
            }
            Ok(answer) => answer,
            Err(e) => {
                guard.broken = Some(e.to_string());
                let _ = guard.r.get_ref().shutdown(Shutdown::Both);
                Err(e)
            }
        }
    }

    fn check_range(&self, offset: u64, len: u64, what: &str) -> std::io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{what} of {len} bytes at {offset} is past the NBD export's end ({} bytes)", self.size),
            ));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, in pieces the server must accept.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check_range(offset, buf.len() as u64, "read")?;
        let mut done = 0;
        while done < buf.len() {
            let n = MAX_READ.min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            let at = offset + done as u64;
            self.transact(|c| {
                let cookie = send_request(c, 0, CMD_READ, at, n as u32)?;
                if self.structured {
                    read_structured(c, cookie, piece, at)
                } else {
                    read_simple(c, cookie, piece)
                }
            })?;
            done += n;
        }
        Ok(())
    }

    /// The extents of `[offset, offset + len)` in the metadata context `context` (granted at
    /// connection time), in order, covering exactly that range. Adjacent extents with the
    /// same flags are merged.
    pub fn block_status(&self, context: &str, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        let id = self.context_id(context).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("NBD metadata context {context:?} was not negotiated on this connection"),
            )
        })?;
        self.check_range(offset, len, "block status")?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(MAX_STATUS);
            let extents = self.transact(|c| {
                let cookie = send_request(c, 0, CMD_BLOCK_STATUS, pos, n as u32)?;
                read_block_status(c, cookie, &self.contexts, id, pos, n)
            })?;
            // read_block_status returns at least one extent, contiguous from pos, non-empty,
            // and ending no later than pos + n; check anyway that the loop makes progress.
            let mut next = pos;
            for e in extents {
                if e.offset != next || e.len == 0 || e.offset + e.len > pos + n {
                    return Err(violation("block status extents do not follow each other"));
                }
                next = e.offset + e.len;
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.offset + last.len == e.offset => last.len += e.len,
                    _ => out.push(e),
                }
            }
            if next == pos {
                return Err(violation("block status made no progress"));
            }
            if out.len() > MAX_CALL_EXTENTS {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_CALL_EXTENTS} extents in block status; ask for a smaller range"
                )));
            }
            pos = next;
        }
        Ok(out)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Ok(mut c) = self.conn.lock() {
            if c.broken.is_none() {
                let _ = send_request(&mut c, 0, CMD_DISC, 0, 0);
            }
            let _ = c.r.get_ref().shutdown(Shutdown::Both);
        }
    }
}

// ---- handshake ----

/// What the handshake settled.
struct Negotiated {
    size: u64,
    structured: bool,
    contexts: Vec<(String, u32)>,
}

fn handshake(s: &mut UnixStream, export: &str, meta_contexts: &[&str]) -> Result<Negotiated> {
    ensure!(read_u64(s)? == NBDMAGIC, "not an NBD server");
    ensure!(read_u64(s)? == IHAVEOPT, "NBD server does not speak the newstyle protocol");
    let server_flags = read_u16(s)?;
    ensure!(server_flags & FLAG_FIXED_NEWSTYLE != 0, "NBD server does not support fixed newstyle");
    let client_flags = (FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)) as u32;
    s.write_all(&client_flags.to_be_bytes())?;

    // Structured replies first: metadata contexts need them.
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, data) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = match kind {
        REP_ACK => true,
        k if k & REP_FLAG_ERROR != 0 => {
            if !meta_contexts.is_empty() {
                bail!(
                    "NBD server refused structured replies, which metadata contexts {meta_contexts:?} need ({})",
                    option_error(k, &data)
                );
            }
            false
        }
        k => bail!("unexpected reply {k} to NBD_OPT_STRUCTURED_REPLY"),
    };

    let mut contexts: Vec<(String, u32)> = Vec::new();
    if !meta_contexts.is_empty() {
        let mut queries: Vec<&str> = Vec::new();
        for c in meta_contexts {
            if !queries.contains(c) {
                queries.push(c);
            }
        }
        let mut d = Vec::new();
        put_string(&mut d, export);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for c in &queries {
            put_string(&mut d, c);
        }
        send_option(s, OPT_SET_META_CONTEXT, &d)?;
        let mut replies = 0;
        loop {
            replies += 1;
            ensure!(replies <= MAX_OPTION_REPLIES, "too many replies to NBD_OPT_SET_META_CONTEXT");
            let (kind, data) = read_option_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT => {
                    ensure!(data.len() >= 4, "short NBD_REP_META_CONTEXT reply");
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    let name = std::str::from_utf8(&data[4..]).context("NBD metadata context name is not UTF-8")?;
                    ensure!(
                        contexts.iter().all(|(n, i)| *i != id && n != name),
                        "NBD server granted metadata context {name:?} (id {id}) twice or under a used id"
                    );
                    contexts.push((name.to_string(), id));
                }
                REP_ACK => break,
                k if k & REP_FLAG_ERROR != 0 => {
                    if k == REP_ERR_UNKNOWN {
                        bail!("NBD server has no export named {export:?} ({})", option_error(k, &data));
                    }
                    bail!("NBD server refused metadata contexts {meta_contexts:?} ({})", option_error(k, &data));
                }
                k => bail!("unexpected reply {k} to NBD_OPT_SET_META_CONTEXT"),
            }
        }
        for want in meta_contexts {
            if !contexts.iter().any(|(n, _)| n == want) {
                let hint = if want.starts_with(CONTEXT_QEMU_DIRTY_BITMAP) {
                    ": the export has no such dirty bitmap"
                } else {
                    ""
                };
                bail!("NBD server did not grant metadata context {want:?} on export {export:?}{hint}");
            }
        }
    }

    // NBD_OPT_GO with no information requests.
    let mut d = Vec::new();
    put_string(&mut d, export);
    d.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, OPT_GO, &d)?;
    let mut size = None;
    let mut replies = 0;
    loop {
        replies += 1;
        ensure!(replies <= MAX_OPTION_REPLIES, "too many replies to NBD_OPT_GO");
        let (kind, data) = read_option_reply(s, OPT_GO)?;
        match kind {
            REP_INFO => {
                ensure!(data.len() >= 2, "short NBD_REP_INFO reply");
                if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                    ensure!(data.len() == 12, "NBD_INFO_EXPORT of {} bytes", data.len());
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
            }
            REP_ACK => break,
            REP_ERR_UNKNOWN => {
                bail!("NBD server has no export named {export:?} ({})", option_error(kind, &data))
            }
            k if k & REP_FLAG_ERROR != 0 => {
                bail!("NBD server refused the export {export:?}: {}", option_error(k, &data))
            }
            _ => {} // other replies are ignored, as the protocol asks
        }
    }
    let size = size.context("NBD server sent no export size")?;
    Ok(Negotiated { size, structured, contexts })
}

fn put_string(d: &mut Vec<u8>, s: &str) {
    d.extend_from_slice(&(s.len() as u32).to_be_bytes());
    d.extend_from_slice(s.as_bytes());
}

fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
}

/// One option reply: its type and data.
fn read_option_reply(s: &mut UnixStream, opt: u32) -> Result<(u32, Vec<u8>)> {
    ensure!(read_u64(s)? == REPLY_MAGIC, "bad NBD option reply magic");
    let echoed = read_u32(s)?;
    ensure!(echoed == opt, "NBD option reply for option {echoed}, not {opt}");
    let kind = read_u32(s)?;
    let len = read_u32(s)?;
    ensure!(len <= MAX_OPTION_REPLY, "NBD option reply of {len} bytes is too long");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((kind, data))
}

/// An option error reply, for humans.
fn option_error(kind: u32, data: &[u8]) -> String {
    let name = match kind {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "forbidden by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not supported on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "too big",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(&data[..data.len().min(MAX_STRING)]);
    if msg.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {msg}")
    }
}

// ---- transmission ----

fn send_request(c: &mut Conn, flags: u16, cmd: u16, offset: u64, len: u32) -> std::io::Result<u64> {
    let cookie = c.next_cookie;
    c.next_cookie = c.next_cookie.wrapping_add(1);
    let mut req = [0u8; 28];
    req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req[4..6].copy_from_slice(&flags.to_be_bytes());
    req[6..8].copy_from_slice(&cmd.to_be_bytes());
    req[8..16].copy_from_slice(&cookie.to_be_bytes());
    req[16..24].copy_from_slice(&offset.to_be_bytes());
    req[24..28].copy_from_slice(&len.to_be_bytes());
    c.r.get_mut().write_all(&req)?;
    Ok(cookie)
}

/// The header of a reply message.
enum Header {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, len: u32 },
}

fn read_header(c: &mut Conn, cookie: u64) -> std::io::Result<Header> {
    let r = &mut c.r;
    let magic = read_u32(r)?;
    let header = match magic {
        SIMPLE_REPLY_MAGIC => {
            let error = read_u32(r)?;
            let got = read_u64(r)?;
            if got != cookie {
                return Err(violation(format!("reply for cookie {got}, expected {cookie}")));
            }
            Header::Simple { error }
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = read_u16(r)?;
            let kind = read_u16(r)?;
            let got = read_u64(r)?;
            if got != cookie {
                return Err(violation(format!("reply chunk for cookie {got}, expected {cookie}")));
            }
            let len = read_u32(r)?;
            Header::Chunk { flags, kind, len }
        }
        m => return Err(violation(format!("bad reply magic {m:#x}"))),
    };
    Ok(header)
}

/// A simple reply to a read: an error, or exactly `buf.len()` bytes.
fn read_simple(c: &mut Conn, cookie: u64, buf: &mut [u8]) -> Reply<()> {
    match read_header(c, cookie)? {
        Header::Simple { error: 0 } => {
            c.r.read_exact(buf)?;
            Ok(Ok(()))
        }
        Header::Simple { error } => Ok(Err(server_error(error, String::new(), None))),
        Header::Chunk { .. } => Err(violation("structured reply chunk without NBD_OPT_STRUCTURED_REPLY")),
    }
}

/// Reads an error chunk's payload (`kind` has bit 15 set) into the error it reports.
fn read_error_chunk(
    c: &mut Conn,
    kind: u16,
    len: u32,
    req_offset: u64,
    req_len: u64,
) -> std::io::Result<std::io::Error> {
    let fixed_tail = if kind == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
    if len < 6 + fixed_tail || len > MAX_ERROR_CHUNK {
        return Err(violation(format!("error chunk of type {kind:#x} with length {len}")));
    }
    let mut p = vec![0u8; len as usize];
    c.r.read_exact(&mut p)?;
    let errno = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
    let mlen = u16::from_be_bytes([p[4], p[5]]) as usize;
    if 6 + mlen + fixed_tail as usize > p.len() {
        return Err(violation(format!("error message of {mlen} bytes in a chunk of {len}")));
    }
    let message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
    let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[6 + mlen..14 + mlen]);
        let o = u64::from_be_bytes(b);
        if o < req_offset || o - req_offset >= req_len {
            return Err(violation(format!("error at offset {o}, outside the request")));
        }
        Some(o)
    } else {
        None
    };
    // An error value of zero is not an error; the protocol asks to treat unexpected values
    // as NBD_EINVAL.
    let errno = if errno == 0 { EINVAL } else { errno };
    Ok(server_error(errno, message, offset))
}

/// Disjoint byte ranges received so far for one read, merged when adjacent.
struct Coverage {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    fn new() -> Coverage {
        Coverage { ranges: BTreeMap::new(), total: 0 }
    }

    /// Adds `[start, end)` (non-empty); an error if it overlaps a range already there.
    fn insert(&mut self, start: u64, end: u64) -> std::io::Result<()> {
        // The ranges are disjoint, so only the last one starting before `end` can overlap.
        let before = self.ranges.range(..end).next_back().map(|(&s, &e)| (s, e));
        if let Some((_, e)) = before {
            if e > start {
                return Err(violation(format!("reply chunks overlap at {start}..{end}")));
            }
        }
        let (mut s, mut e) = (start, end);
        if let Some((ps, pe)) = before {
            if pe == start {
                self.ranges.remove(&ps);
                s = ps;
            }
        }
        if let Some(ne) = self.ranges.remove(&end) {
            e = ne;
        }
        self.ranges.insert(s, e);
        self.total += end - start;
        if self.ranges.len() > MAX_READ_PIECES {
            return Err(violation("read reply split into too many scattered chunks"));
        }
        Ok(())
    }
}

/// The next chunk header of a structured reply to `request`: (flags, type, length).
/// Servers must not answer with a simple reply once structured replies are on; one carrying
/// an error (no payload) as the first answer is still unambiguous, so it is accepted as the
/// whole reply (`Ok(Err)`). An `NBD_REPLY_TYPE_NONE` chunk is checked here.
fn next_chunk(c: &mut Conn, cookie: u64, first: &mut bool, request: &str) -> Reply<(u16, u16, u32)> {
    let header = read_header(c, cookie)?;
    let was_first = std::mem::replace(first, false);
    match header {
        Header::Simple { error } if was_first && error != 0 => Ok(Err(server_error(error, String::new(), None))),
        Header::Simple { .. } => Err(violation(format!("simple reply without an error to {request}"))),
        Header::Chunk { flags, kind, len } => {
            if kind == REPLY_TYPE_NONE && (len != 0 || flags & REPLY_FLAG_DONE == 0) {
                return Err(violation("NBD_REPLY_TYPE_NONE with a payload or not as the last chunk"));
            }
            Ok(Ok((flags, kind, len)))
        }
    }
}

/// A structured reply to a read of `buf.len()` bytes at `offset`.
fn read_structured(c: &mut Conn, cookie: u64, buf: &mut [u8], offset: u64) -> Reply<()> {
    let len = buf.len() as u64;
    let mut covered = Coverage::new();
    let mut error: Option<std::io::Error> = None;
    let mut first = true;
    loop {
        let (flags, kind, clen) = match next_chunk(c, cookie, &mut first, "a read")? {
            Ok(chunk) => chunk,
            Err(e) => return Ok(Err(e)),
        };
        match kind {
            REPLY_TYPE_NONE => {}
            REPLY_TYPE_OFFSET_DATA => {
                if clen < 9 || (clen - 8) as u64 > len {
                    return Err(violation(format!("data chunk of length {clen} for a read of {len} bytes")));
                }
                let dlen = (clen - 8) as u64;
                let at = read_u64(&mut c.r)?;
                let rel = chunk_range(at, dlen, offset, len)?;
                covered.insert(at, at + dlen)?;
                c.r.read_exact(&mut buf[rel..rel + dlen as usize])?;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if clen != 12 {
                    return Err(violation(format!("hole chunk of length {clen}")));
                }
                let at = read_u64(&mut c.r)?;
                let hlen = read_u32(&mut c.r)? as u64;
                if hlen == 0 {
                    return Err(violation("empty hole chunk"));
                }
                let rel = chunk_range(at, hlen, offset, len)?;
                covered.insert(at, at + hlen)?;
                buf[rel..rel + hlen as usize].fill(0);
            }
            k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
                let e = read_error_chunk(c, k, clen, offset, len)?;
                error.get_or_insert(e);
            }
            k => return Err(violation(format!("unexpected chunk type {k} in a read reply"))),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    if let Some(e) = error {
        return Ok(Err(e));
    }
    if covered.total != len {
        return Err(violation(format!("read reply covers {} of {len} bytes", covered.total)));
    }
    Ok(Ok(()))
}

/// Where `[at, at + n)` starts in a request of `len` bytes at `offset`; an error unless it
/// lies inside it.
fn chunk_range(at: u64, n: u64, offset: u64, len: u64) -> std::io::Result<usize> {
    match at.checked_sub(offset) {
        Some(rel) if rel <= len && n <= len - rel => Ok(rel as usize),
        _ => Err(violation(format!("chunk {at}+{n} outside the request {offset}+{len}"))),
    }
}

/// The reply to a block status request of `len` bytes at `offset`: the extents of context
/// `want` (at least one, contiguous from `offset`, the last clamped to `offset + len`).
fn read_block_status(
    c: &mut Conn,
    cookie: u64,
    contexts: &[(String, u32)],
    want: u32,
    offset: u64,
    len: u64,
) -> Reply<Vec<Extent>> {
    let end = offset + len;
    let mut seen: Vec<u32> = Vec::new();
    let mut extents: Option<Vec<Extent>> = None;
    let mut error: Option<std::io::Error> = None;
    let mut first = true;
    loop {
        let (flags, kind, clen) = match next_chunk(c, cookie, &mut first, "a block status request")? {
            Ok(chunk) => chunk,
            Err(e) => return Ok(Err(e)),
        };
        match kind {
            REPLY_TYPE_NONE => {}
            REPLY_TYPE_BLOCK_STATUS => {
                if clen < 12 || (clen - 4) % 8 != 0 || (clen - 4) / 8 > MAX_CHUNK_EXTENTS {
                    return Err(violation(format!("block status chunk of length {clen}")));
                }
                let n = (clen - 4) / 8;
                let id = read_u32(&mut c.r)?;
                if !contexts.iter().any(|&(_, i)| i == id) {
                    return Err(violation(format!("block status for unknown context id {id}")));
                }
                if seen.contains(&id) {
                    return Err(violation(format!("two block status chunks for context id {id}")));
                }
                seen.push(id);
                if id != want {
                    let skip = n as u64 * 8;
                    let got = std::io::copy(&mut (&mut c.r).take(skip), &mut std::io::sink())?;
                    if got != skip {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                } else {
                    let mut out = Vec::new();
                    let mut pos = offset;
                    for _ in 0..n {
                        let elen = read_u32(&mut c.r)? as u64;
                        let eflags = read_u32(&mut c.r)?;
                        if elen == 0 {
                            return Err(violation("empty block status extent"));
                        }
                        if pos >= end {
                            return Err(violation("block status extents past the requested range"));
                        }
                        out.push(Extent { offset: pos, len: elen.min(end - pos), flags: eflags });
                        pos = pos.saturating_add(elen);
                    }
                    extents = Some(out);
                }
            }
            k if k & REPLY_TYPE_FLAG_ERROR != 0 => {
                let e = read_error_chunk(c, k, clen, offset, len)?;
                error.get_or_insert(e);
            }
            k => return Err(violation(format!("unexpected chunk type {k} in a block status reply"))),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    if let Some(e) = error {
        return Ok(Err(e));
    }
    match extents {
        Some(e) => Ok(Ok(e)),
        None => Err(violation("block status reply without the asked context")),
    }
}
