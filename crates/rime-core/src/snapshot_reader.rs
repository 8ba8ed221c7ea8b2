//! Random access to one volume of a snapshot, straight from the repository.
//!
//! `SnapshotReader` is a `rime_volume::BlockSource`: filesystem readers (the image explorer,
//! `rime mount`) read any byte range of a backed-up volume through it without restoring the
//! volume. A read finds each chunk's id in the volume index (fixed 32-byte records, fetched in
//! small pages), fetches the chunk's blob from its pack, checks it against its id, and keeps it
//! in a bounded LRU cache. Zero-marker chunks read as zeros without any I/O.
//!
//! Every byte taken from the repository is counted (`ReadCounter`), so commands can report
//! "repository bytes read" and tests can check that extracting one small file touches only a
//! small fraction of the repository.

use anyhow::{anyhow, ensure, Context, Result};
use rime_repo::backend::{Backend, ObjectReader};
use rime_repo::pack::{self, pack_path, ENTRY_LEN};
use rime_repo::volume_index::{VolumeIndexHeader, VolumeIndexReader, RECORD_LEN};
use rime_repo::{ChunkId, ChunkIndex, Repository, VolumeEntry};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Default chunk cache: 64 MiB of decompressed chunks.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Volume index records fetched per read (16 KiB).
const RECORDS_PER_PAGE: u64 = 512;
/// Volume index pages kept (at most 2 MiB).
const MAX_PAGES: usize = 128;
/// Pack files kept open.
const MAX_OPEN_PACKS: usize = 64;

/// Bytes read from the repository, shared by every reader of one command.
#[derive(Debug, Default)]
pub struct ReadCounter {
    /// Blob payloads read from packs (compressed bytes).
    pub pack_bytes: AtomicU64,
    /// Volume index records read.
    pub volume_index_bytes: AtomicU64,
    /// Pack index files read to build the chunk index.
    pub chunk_index_bytes: AtomicU64,
    /// Chunks fetched (cache misses that needed the repository).
    pub chunks_fetched: AtomicU64,
    /// Reads served from the chunk cache.
    pub cache_hits: AtomicU64,
}

/// A snapshot of the counters, for reports.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReadStats {
    /// Everything below, added up.
    pub repo_bytes_read: u64,
    pub pack_bytes_read: u64,
    pub volume_index_bytes_read: u64,
    pub chunk_index_bytes_read: u64,
    pub chunks_fetched: u64,
    pub cache_hits: u64,
}

impl ReadCounter {
    pub fn stats(&self) -> ReadStats {
        let pack = self.pack_bytes.load(Ordering::Relaxed);
        let vidx = self.volume_index_bytes.load(Ordering::Relaxed);
        let cidx = self.chunk_index_bytes.load(Ordering::Relaxed);
        ReadStats {
            repo_bytes_read: pack + vidx + cidx,
            pack_bytes_read: pack,
            volume_index_bytes_read: vidx,
            chunk_index_bytes_read: cidx,
            chunks_fetched: self.chunks_fetched.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
        }
    }
}

/// Loads the repository's chunk index and counts the pack index files it read.
pub fn load_chunk_index(repo: &Repository, counter: &ReadCounter) -> Result<Arc<ChunkIndex>> {
    let (index, _bad) = repo.load_index()?;
    // A pack index file is 24 header bytes, 49 bytes per blob and a 32-byte digest.
    let bytes: u64 = index.packs.iter().map(|p| 24 + p.blobs as u64 * ENTRY_LEN as u64 + 32).sum();
    counter.chunk_index_bytes.fetch_add(bytes, Ordering::Relaxed);
    Ok(Arc::new(index))
}

/// A least-recently-used map with byte weights (the `lru` crate keeps the order; this keeps
/// the total weight under `limit`).
struct Lru<V> {
    map: lru::LruCache<u64, (V, usize)>,
    weight: usize,
    limit: usize,
}

impl<V: Clone> Lru<V> {
    fn new(limit: usize) -> Lru<V> {
        Lru { map: lru::LruCache::unbounded(), weight: 0, limit }
    }

    fn get(&mut self, key: u64) -> Option<V> {
        self.map.get(&key).map(|(v, _)| v.clone())
    }

    fn put(&mut self, key: u64, value: V, weight: usize) {
        if let Some((_, w)) = self.map.pop(&key) {
            self.weight -= w;
        }
        while self.weight + weight > self.limit {
            let Some((_, (_, w))) = self.map.pop_lru() else { break };
            self.weight -= w;
        }
        self.map.put(key, (value, weight));
        self.weight += weight;
    }
}

struct Inner {
    vidx: VolumeIndexReader,
    pages: Lru<Arc<Vec<ChunkId>>>,
    packs: HashMap<u32, Box<dyn ObjectReader>>,
}

/// One volume of one snapshot, readable at any offset.
pub struct SnapshotReader {
    backend: Arc<dyn Backend>,
    index: Arc<ChunkIndex>,
    header: VolumeIndexHeader,
    name: String,
    inner: Mutex<Inner>,
    cache: Mutex<Lru<Arc<Vec<u8>>>>,
    counter: Arc<ReadCounter>,
}

impl SnapshotReader {
    /// Opens `volume` (an entry of a manifest of `repo`). `cache_bytes` bounds the chunk cache.
    pub fn open(
        repo: &Repository,
        index: Arc<ChunkIndex>,
        volume: &VolumeEntry,
        cache_bytes: u64,
        counter: Arc<ReadCounter>,
    ) -> Result<SnapshotReader> {
        let vidx = VolumeIndexReader::open(repo.backend.as_ref(), &volume.index)?;
        counter.volume_index_bytes.fetch_add(rime_repo::volume_index::HEADER_LEN, Ordering::Relaxed);
        let header = vidx.header;
        ensure!(header.volume_size == volume.size, "volume index of {} disagrees with its manifest", volume.name);
        // At least a few chunks, so one read spanning chunk boundaries never thrashes.
        let limit = (cache_bytes as usize).max(4 * header.chunk_size as usize);
        Ok(SnapshotReader {
            backend: repo.backend.clone(),
            index,
            header,
            name: volume.name.clone(),
            inner: Mutex::new(Inner { vidx, pages: Lru::new(MAX_PAGES), packs: HashMap::new() }),
            cache: Mutex::new(Lru::new(limit)),
            counter,
        })
    }

    pub fn size(&self) -> u64 {
        self.header.volume_size
    }

    pub fn chunk_size(&self) -> u64 {
        self.header.chunk_size as u64
    }

    pub fn counter(&self) -> &Arc<ReadCounter> {
        &self.counter
    }

    /// The id of chunk `n`, through the page cache of volume index records.
    fn chunk_id(&self, inner: &mut Inner, n: u64) -> Result<ChunkId> {
        let page = n / RECORDS_PER_PAGE;
        let records = match inner.pages.get(page) {
            Some(r) => r,
            None => {
                let first = page * RECORDS_PER_PAGE;
                let count = RECORDS_PER_PAGE.min(self.header.chunk_count - first) as usize;
                let mut ids = vec![ChunkId::ZERO; count];
                inner.vidx.read_records(first, &mut ids)?;
                self.counter.volume_index_bytes.fetch_add(count as u64 * RECORD_LEN, Ordering::Relaxed);
                let ids = Arc::new(ids);
                inner.pages.put(page, ids.clone(), 1);
                ids
            }
        };
        Ok(records[(n - page * RECORDS_PER_PAGE) as usize])
    }

    /// Chunk `n`'s bytes, or `None` for a zero chunk.
    fn chunk(&self, n: u64) -> Result<Option<Arc<Vec<u8>>>> {
        if let Some(data) = self.cache.lock().unwrap().get(n) {
            self.counter.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(data));
        }
        let mut inner = self.inner.lock().unwrap();
        let id = self.chunk_id(&mut inner, n)?;
        if id.is_zero_marker() {
            return Ok(None);
        }
        let loc = *self.index.get(&id).ok_or_else(|| {
            anyhow!("chunk {id} of volume {} is missing from the repository (run `rime verify`)", self.name)
        })?;
        if !inner.packs.contains_key(&loc.pack) {
            if inner.packs.len() >= MAX_OPEN_PACKS {
                inner.packs.clear();
            }
            let reader = self.backend.open(&pack_path(&self.index.pack_id(&loc)))?;
            inner.packs.insert(loc.pack, reader);
        }
        let raw = pack::read_blob(inner.packs[&loc.pack].as_ref(), &loc.entry(id))?;
        drop(inner);
        self.counter.pack_bytes.fetch_add(loc.stored_len as u64, Ordering::Relaxed);
        self.counter.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        let expected = self.header.chunk_len(n);
        ensure!(raw.len() == expected, "chunk {id} holds {} bytes where the volume needs {expected}", raw.len());
        let data = Arc::new(raw);
        self.cache.lock().unwrap().put(n, data.clone(), expected);
        Ok(Some(data))
    }

    /// `offset..offset + len` as consecutive `(length, reads as zeros)` runs, in order: a zero
    /// run is made of zero-marker chunks (no data in the repository). At most `max_runs` runs:
    /// they may cover only a prefix of the range. Reads only volume index records.
    pub fn zero_runs(&self, offset: u64, len: u64, max_runs: usize) -> Result<Vec<(u64, bool)>> {
        let end = offset.checked_add(len).context("range overflows")?.min(self.header.volume_size);
        let cs = self.header.chunk_size as u64;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut inner = self.inner.lock().unwrap();
        let mut pos = offset;
        while pos < end {
            let n = pos / cs;
            let upto = ((n + 1) * cs).min(end);
            let zero = self.chunk_id(&mut inner, n)?.is_zero_marker();
            let full = runs.len() >= max_runs.max(1);
            match runs.last_mut() {
                Some((l, z)) if *z == zero => *l += upto - pos,
                _ if full => break,
                _ => runs.push((upto - pos, zero)),
            }
            pos = upto;
        }
        Ok(runs)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).context("read range overflows")?;
        ensure!(
            end <= self.header.volume_size,
            "read of {} bytes at {offset} lies past the end of volume {} ({} bytes)",
            buf.len(),
            self.name,
            self.header.volume_size
        );
        let cs = self.header.chunk_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = pos / cs;
            let within = (pos - n * cs) as usize;
            let take = (buf.len() - done).min(self.header.chunk_len(n) - within);
            match self.chunk(n)? {
                Some(data) => buf[done..done + take].copy_from_slice(&data[within..within + take]),
                None => buf[done..done + take].fill(0),
            }
            done += take;
        }
        Ok(())
    }
}

impl rime_volume::BlockSource for SnapshotReader {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_at(offset, buf).map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut l: Lru<u32> = Lru::new(3);
        l.put(1, 10, 1);
        l.put(2, 20, 1);
        l.put(3, 30, 1);
        assert_eq!(l.get(1), Some(10));
        l.put(4, 40, 1);
        assert_eq!(l.get(2), None);
        assert_eq!(l.get(1), Some(10));
        assert_eq!(l.get(3), Some(30));
        assert_eq!(l.get(4), Some(40));
        assert!(l.weight <= 3);
    }
}
