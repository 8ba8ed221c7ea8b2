//! Volume index: the chunk list of one volume in one snapshot.
//!
//! Fixed-size records make any offset reachable in one read, and let a writer stream the index
//! to disk as the backup runs: a multi-terabyte volume's index never sits in memory.
//!
//! Layout: 64-byte header (`RIMEVIDX`, u32 version, u32 chunk size, u64 volume size, u64 chunk
//! count, zero padding) · one 32-byte chunk id per chunk (all zero = a zero chunk) · BLAKE3 of
//! everything before it.

use crate::backend::{Backend, ObjectReader};
use crate::id::ChunkId;
use anyhow::{ensure, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

pub const VIDX_MAGIC: &[u8; 8] = b"RIMEVIDX";
pub const HEADER_LEN: u64 = 64;
pub const RECORD_LEN: u64 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeIndexHeader {
    pub chunk_size: u32,
    pub volume_size: u64,
    pub chunk_count: u64,
}

impl VolumeIndexHeader {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(VIDX_MAGIC);
        h[8..12].copy_from_slice(&crate::FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.volume_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.chunk_count.to_le_bytes());
        h
    }

    fn decode(h: &[u8]) -> Result<VolumeIndexHeader> {
        ensure!(&h[0..8] == VIDX_MAGIC, "not a volume index");
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        ensure!(version <= crate::FORMAT_VERSION, "volume index version {version} is newer than this rime");
        let header = VolumeIndexHeader {
            chunk_size: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            volume_size: u64::from_le_bytes(h[16..24].try_into().unwrap()),
            chunk_count: u64::from_le_bytes(h[24..32].try_into().unwrap()),
        };
        ensure!(header.chunk_size > 0, "volume index has chunk size 0");
        ensure!(
            header.chunk_count == header.volume_size.div_ceil(header.chunk_size as u64),
            "volume index chunk count does not match volume size"
        );
        Ok(header)
    }

    /// Byte length of chunk `i` (the last chunk may be short).
    pub fn chunk_len(&self, i: u64) -> usize {
        let start = i * self.chunk_size as u64;
        (self.volume_size - start).min(self.chunk_size as u64) as usize
    }
}

/// Streams a volume index to a scratch file, in chunk order.
pub struct VolumeIndexWriter {
    header: VolumeIndexHeader,
    tmp: PathBuf,
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    written: u64,
}

impl VolumeIndexWriter {
    pub fn create(backend: &dyn Backend, chunk_size: u32, volume_size: u64) -> Result<VolumeIndexWriter> {
        let header =
            VolumeIndexHeader { chunk_size, volume_size, chunk_count: volume_size.div_ceil(chunk_size as u64) };
        let dir = backend.scratch_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!("vidx-{}", hex::encode(crate::id::random_bytes::<8>())));
        let file = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut hasher = blake3::Hasher::new();
        let h = header.encode();
        out.write_all(&h)?;
        hasher.update(&h);
        Ok(VolumeIndexWriter { header, tmp, out, hasher, written: 0 })
    }

    pub fn push(&mut self, id: &ChunkId) -> Result<()> {
        assert!(self.written < self.header.chunk_count, "more chunks than the volume holds");
        self.out.write_all(&id.0)?;
        self.hasher.update(&id.0);
        self.written += 1;
        Ok(())
    }

    /// Finishes, fsyncs and publishes the index at `path`; returns its digest (hex).
    pub fn finish(mut self, backend: &dyn Backend, path: &str) -> Result<String> {
        ensure!(
            self.written == self.header.chunk_count,
            "volume index has {} of {} chunks",
            self.written,
            self.header.chunk_count
        );
        let digest = self.hasher.finalize();
        self.out.write_all(digest.as_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        backend.put_file(&self.tmp, path)?;
        Ok(digest.to_hex().to_string())
    }

    pub fn abandon(self) {
        drop(self.out);
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Random and sequential access to a stored volume index.
pub struct VolumeIndexReader {
    pub header: VolumeIndexHeader,
    reader: Box<dyn ObjectReader>,
}

impl VolumeIndexReader {
    pub fn open(backend: &dyn Backend, path: &str) -> Result<VolumeIndexReader> {
        let reader = backend.open(path).with_context(|| format!("volume index {path} is missing"))?;
        let size = reader.size()?;
        let mut h = [0u8; HEADER_LEN as usize];
        ensure!(size >= HEADER_LEN + 32, "volume index {path} is truncated");
        reader.read_at(0, &mut h)?;
        let header = VolumeIndexHeader::decode(&h).with_context(|| format!("volume index {path}"))?;
        ensure!(size == HEADER_LEN + header.chunk_count * RECORD_LEN + 32, "volume index {path} has the wrong length");
        Ok(VolumeIndexReader { header, reader })
    }

    /// Reads records `[first, first + out.len())`.
    pub fn read_records(&self, first: u64, out: &mut [ChunkId]) -> Result<()> {
        assert!(first + out.len() as u64 <= self.header.chunk_count);
        let mut buf = vec![0u8; out.len() * RECORD_LEN as usize];
        self.reader.read_at(HEADER_LEN + first * RECORD_LEN, &mut buf)?;
        for (slot, rec) in out.iter_mut().zip(buf.chunks_exact(RECORD_LEN as usize)) {
            *slot = ChunkId(rec.try_into().unwrap());
        }
        Ok(())
    }

    pub fn get(&self, i: u64) -> Result<ChunkId> {
        let mut one = [ChunkId::ZERO];
        self.read_records(i, &mut one)?;
        Ok(one[0])
    }

    /// Calls `f(chunk_number, id)` for every record in order, reading in batches, and checks
    /// the trailing digest (and `expected_digest`, the manifest's copy, when given).
    pub fn for_each(&self, expected_digest: Option<&str>, mut f: impl FnMut(u64, ChunkId) -> Result<()>) -> Result<()> {
        const BATCH: u64 = 8192;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.header.encode());
        let mut batch = vec![ChunkId::ZERO; BATCH as usize];
        let mut i = 0;
        while i < self.header.chunk_count {
            let n = BATCH.min(self.header.chunk_count - i) as usize;
            self.read_records(i, &mut batch[..n])?;
            for (k, id) in batch[..n].iter().enumerate() {
                hasher.update(&id.0);
                f(i + k as u64, *id)?;
            }
            i += n as u64;
        }
        let mut stored = [0u8; 32];
        self.reader.read_at(HEADER_LEN + self.header.chunk_count * RECORD_LEN, &mut stored)?;
        let digest = hasher.finalize();
        ensure!(digest.as_bytes() == &stored, "volume index checksum mismatch");
        if let Some(expected) = expected_digest {
            ensure!(digest.to_hex().as_str() == expected, "volume index does not match its snapshot manifest");
        }
        Ok(())
    }
}
