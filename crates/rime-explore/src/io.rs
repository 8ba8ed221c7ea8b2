//! `std::io` adapters over a `Region`, for filesystem crates that want `Read + Seek`.

use rime_volume::Region;
use std::io::{self, Read, Seek, SeekFrom, Write};

const WINDOW: u64 = 32 * 1024;

/// A read-only cursor over a region. Small reads are served from one aligned 32 KiB window
/// (filesystem crates read directory entries a few dozen bytes at a time). Writes fail: the
/// explorer never changes an image.
pub struct RegionIo {
    region: Region,
    pos: u64,
    window_start: u64,
    window: Vec<u8>,
}

impl RegionIo {
    pub fn new(region: Region) -> RegionIo {
        RegionIo { region, pos: 0, window_start: 0, window: Vec::new() }
    }

    pub fn len(&self) -> u64 {
        self.region.len
    }

    pub fn is_empty(&self) -> bool {
        self.region.len == 0
    }
}

impl Read for RegionIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.region.len || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.region.len - self.pos) as usize;
        if n as u64 >= WINDOW {
            self.region.read_at(self.pos, &mut buf[..n]).map_err(|e| io::Error::other(format!("{e:#}")))?;
            self.pos += n as u64;
            return Ok(n);
        }
        let in_window = self.pos >= self.window_start && self.pos < self.window_start + self.window.len() as u64;
        if !in_window {
            let start = self.pos / WINDOW * WINDOW;
            let len = WINDOW.min(self.region.len - start) as usize;
            self.window.resize(len, 0);
            if let Err(e) = self.region.read_at(start, &mut self.window) {
                self.window.clear();
                return Err(io::Error::other(format!("{e:#}")));
            }
            self.window_start = start;
        }
        let off = (self.pos - self.window_start) as usize;
        let n = n.min(self.window.len() - off);
        buf[..n].copy_from_slice(&self.window[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RegionIo {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.region.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the volume")),
        }
    }
}

impl Write for RegionIo {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "the image explorer is read-only"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
