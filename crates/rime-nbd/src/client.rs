//! A minimal NBD client (fixed newstyle handshake, `NBD_OPT_GO`, simple replies): enough to
//! read a disk image that `qemu-nbd` serves as the guest sees it. Reads are bounds-checked
//! against the export size before they are sent; one request is in flight at a time.
//!
//! Protocol facts from the NBD protocol document (`doc/proto.md` of the NBD project).

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

use crate::proto::*;
use crate::wire::{read_u16, read_u32, read_u64};

/// Largest single read request; servers must accept at least 32 MiB.
const MAX_READ: usize = 4 << 20;

pub struct NbdClient {
    stream: Mutex<(UnixStream, u64)>,
    size: u64,
}

impl NbdClient {
    /// Connects to the default export of the server on a unix socket.
    pub fn connect_unix(socket: &Path) -> Result<NbdClient> {
        let mut s =
            UnixStream::connect(socket).with_context(|| format!("connect to NBD socket {}", socket.display()))?;
        ensure!(read_u64(&mut s)? == NBDMAGIC, "not an NBD server");
        ensure!(read_u64(&mut s)? == IHAVEOPT, "NBD server does not speak the newstyle protocol");
        let server_flags = read_u16(&mut s)?;
        ensure!(server_flags & FLAG_FIXED_NEWSTYLE != 0, "NBD server does not support fixed newstyle");
        let client_flags = (FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)) as u32;
        s.write_all(&client_flags.to_be_bytes())?;

        // NBD_OPT_GO with the default export name and no information requests.
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&6u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes()); // name length
        opt.extend_from_slice(&0u16.to_be_bytes()); // info requests
        s.write_all(&opt)?;

        let mut size = None;
        loop {
            ensure!(read_u64(&mut s)? == REPLY_MAGIC, "bad NBD option reply");
            let _option = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            ensure!(len <= 1 << 20, "NBD option reply too long");
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            if kind & 0x8000_0000 != 0 {
                bail!("NBD server refused the export: {}", String::from_utf8_lossy(&data));
            }
            match kind {
                REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_ACK => break,
                _ => {}
            }
        }
        let size = size.context("NBD server sent no export size")?;
        Ok(NbdClient { stream: Mutex::new((s, 1)), size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn read_piece(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut guard = self.stream.lock().unwrap();
        let (s, next_handle) = &mut *guard;
        let handle = *next_handle;
        *next_handle += 1;
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        req[8..16].copy_from_slice(&handle.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&(buf.len() as u32).to_be_bytes());
        s.write_all(&req)?;
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply)?;
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        if u32::from_be_bytes(reply[0..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad NBD reply magic".into()));
        }
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        if u64::from_be_bytes(reply[8..16].try_into().unwrap()) != handle {
            return Err(bad("NBD reply for another request".into()));
        }
        if error != 0 {
            return Err(std::io::Error::from_raw_os_error(error as i32));
        }
        s.read_exact(buf)
    }
}

impl NbdClient {
    /// Reads `buf.len()` bytes at `offset`, in pieces the server must accept.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > self.size) {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the NBD export's end"));
        }
        let mut done = 0;
        while done < buf.len() {
            let n = MAX_READ.min(buf.len() - done);
            self.read_piece(&mut buf[done..done + n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.stream.lock() {
            let mut req = [0u8; 28];
            req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
            let _ = guard.0.write_all(&req);
        }
    }
}
