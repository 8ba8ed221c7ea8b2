//! A snapshot volume as a read-only NBD export (`rime_nbd::Export`), for instant recovery: QEMU
//! reads a disk's backed-up bytes through it, as the backing file of a local overlay.
//!
//! Invariants: the export is read-only (the server refuses writes before they reach it); a read
//! returns exactly the snapshot's bytes or an error for that request, never anything else (a
//! repository that answers slowly makes the read wait; one that fails is retried a few times,
//! then the request fails with EIO, and the next request is tried afresh); a panic inside the
//! reader is caught and becomes EIO, so one bad read never takes the server down. It reports
//! the ranges made of zero-marker chunks as zeros (`base:allocation`), from the volume index
//! alone, so clients skip them; any other range is reported as data.

use crate::snapshot_reader::SnapshotReader;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Attempts per read before it fails, and the pause after each failed attempt.
const ATTEMPTS: u32 = 3;
const BACKOFF: Duration = Duration::from_millis(300);

/// One snapshot volume, served read-only.
pub struct SnapshotExport {
    reader: Arc<SnapshotReader>,
    description: String,
    /// Reads that failed for good (answered with EIO).
    pub failed_reads: AtomicU64,
}

impl SnapshotExport {
    pub fn new(reader: Arc<SnapshotReader>, description: String) -> SnapshotExport {
        SnapshotExport { reader, description, failed_reads: AtomicU64::new(0) }
    }

    fn read_once(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        match catch_unwind(AssertUnwindSafe(|| self.reader.read_at(offset, buf))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the snapshot reader panicked".into()),
        }
    }
}

impl rime_nbd::Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            match self.read_once(offset, buf) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(
                        "{}: read of {} bytes at {offset} failed (attempt {}): {e}",
                        self.description,
                        buf.len(),
                        attempt + 1
                    );
                    last = e;
                    if attempt + 1 < ATTEMPTS {
                        std::thread::sleep(BACKOFF * (attempt + 1));
                    }
                }
            }
        }
        // Whatever a failed attempt left in the buffer is never sent: the reply is an error.
        self.failed_reads.fetch_add(1, Ordering::Relaxed);
        Err(std::io::Error::other(last))
    }

    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool, _may_punch: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }

    fn trim(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn read_only(&self) -> bool {
        true
    }

    fn reports_zeros(&self) -> bool {
        true
    }

    /// Zero-marker chunks read as zeros: a client (QEMU's block copy, `qemu-img convert`)
    /// skips them instead of reading them.
    fn zero_extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        match catch_unwind(AssertUnwindSafe(|| self.reader.zero_runs(offset, len, 1024))) {
            Ok(Ok(runs)) => Ok(runs),
            Ok(Err(e)) => Err(std::io::Error::other(format!("{e:#}"))),
            Err(_) => Err(std::io::Error::other("the snapshot reader panicked")),
        }
    }
}
