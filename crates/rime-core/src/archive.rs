//! The backup data path for one volume: a parallel pipeline
//!
//! ```text
//!   reader ──jobs──▶ N workers (zero check, BLAKE3, zstd) ──results──▶ writer (in order)
//!     ▲                                                                   │
//!     └────────────────────────── window tokens ◀─────────────────────────┘
//! ```
//!
//! The reader walks the volume in chunk order, reading only chunks that hold used blocks and
//! zeroing the unused blocks inside them. The writer commits results strictly in chunk order to
//! the volume index and appends new chunks to packs. The token window bounds the chunks in
//! flight, so memory is `window × chunk size` whatever the volume size.

use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use rime_repo::backend::Backend;
use rime_repo::compression::{Compressor, Encoding};
use rime_repo::index::IdSet;
use rime_repo::pack::{FinishedPack, PackWriter};
use rime_repo::volume_index::VolumeIndexWriter;
use rime_repo::{ChunkId, ChunkIndex, Compression};
use rime_volume::{AlignedBuf, UsedMap, Volume};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use crate::Progress;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    pub used_bytes: u64,
    pub read_bytes: u64,
    pub added_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub new_chunks: u64,
}

/// Receives new chunks and packs them; shared by all volumes of one backup so that chunks
/// repeated across volumes are stored once. Full packs are finished (trailer, fsync, rename,
/// index file) on a background thread so the pipeline never waits for the disk to sync.
/// The background pack finisher: where full packs go, and the thread that returns what it
/// published.
type Finisher = (Sender<PackWriter>, std::thread::JoinHandle<(Vec<FinishedPack>, Result<()>)>);

pub struct PackSink {
    backend: Arc<dyn Backend>,
    existing: Arc<ChunkIndex>,
    pack_size: u64,
    current: Option<PackWriter>,
    added: IdSet,
    finisher: Option<Finisher>,
    /// Packs this backup has published (complete after `flush` or `abandon`).
    pub published: Vec<FinishedPack>,
}

impl PackSink {
    pub fn new(backend: Arc<dyn Backend>, existing: Arc<ChunkIndex>, pack_size: u64) -> PackSink {
        PackSink {
            backend,
            existing,
            pack_size,
            current: None,
            added: IdSet::default(),
            finisher: None,
            published: Vec::new(),
        }
    }

    /// Stores a chunk unless the repository or this backup already has it; returns the bytes
    /// added to the repository.
    fn store(&mut self, id: ChunkId, encoding: Encoding, payload: &[u8], raw_len: u32) -> Result<u64> {
        if self.existing.contains(&id) || !self.added.insert(id) {
            return Ok(0);
        }
        if self.current.is_none() {
            self.current = Some(PackWriter::create(self.backend.as_ref())?);
        }
        let pack = self.current.as_mut().expect("pack just created");
        pack.add(id, encoding, payload, raw_len)?;
        if pack.len() >= self.pack_size {
            let full = self.current.take().expect("pack present");
            self.hand_to_finisher(full)?;
        }
        Ok(payload.len() as u64)
    }

    fn hand_to_finisher(&mut self, pack: PackWriter) -> Result<()> {
        let (tx, _) = self.finisher.get_or_insert_with(|| {
            // One pack may wait while another is being synced.
            let (tx, rx) = bounded::<PackWriter>(1);
            let backend = self.backend.clone();
            let handle = std::thread::spawn(move || {
                let mut done = Vec::new();
                for pack in rx.iter() {
                    match pack.finish(backend.as_ref()) {
                        Ok(finished) => done.push(finished),
                        Err(e) => {
                            rx.iter().for_each(PackWriter::abandon);
                            return (done, Err(e));
                        }
                    }
                }
                (done, Ok(()))
            });
            (tx, handle)
        });
        if let Err(returned) = tx.send(pack) {
            returned.into_inner().abandon();
            // The finisher stopped on an error: collect it.
            self.join_finisher()?;
            bail!("pack writer stopped");
        }
        Ok(())
    }

    fn join_finisher(&mut self) -> Result<()> {
        if let Some((tx, handle)) = self.finisher.take() {
            drop(tx);
            let (done, result) = handle.join().expect("pack finisher panicked");
            self.published.extend(done);
            result?;
        }
        Ok(())
    }

    /// Publishes every pack, including the one being filled; returns once all are durable.
    pub fn flush(&mut self) -> Result<()> {
        if let Some(pack) = self.current.take() {
            self.hand_to_finisher(pack)?;
        }
        self.join_finisher()
    }

    /// Drops the unfinished pack; returns the packs already published.
    pub fn abandon(mut self) -> Vec<FinishedPack> {
        if let Some(pack) = self.current.take() {
            pack.abandon();
        }
        let _ = self.join_finisher();
        self.published
    }
}

struct Job {
    seq: u64,
    data: Option<Vec<u8>>,
    /// Unchanged since a previous snapshot: its chunk id, not read.
    reused: Option<ChunkId>,
}

enum Outcome {
    /// All zero, or no used block inside: stored as the zero marker.
    Zero,
    Known(ChunkId),
    New {
        id: ChunkId,
        encoding: Encoding,
        payload: Vec<u8>,
        raw_len: u32,
    },
}

/// Whether every byte is zero: 64 bytes at a time, OR-ed as words (the compiler vectorises
/// the fixed inner loop), stopping at the first non-zero block.
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in blocks.by_ref() {
        let acc = block.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap()));
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

pub struct ArchiveInput<'a> {
    pub volume: &'a Volume,
    pub map: &'a mut dyn UsedMap,
    pub chunk_size: u32,
    pub compression: Compression,
    pub threads: usize,
    /// For incremental backups (changed-block tracking): what a previous snapshot says about
    /// chunk `n`, so that only changed blocks are read from the volume.
    pub prior: Option<&'a mut (dyn FnMut(u64) -> Result<Option<Prior>> + Send)>,
}

/// A previous snapshot's knowledge of one chunk.
pub enum Prior {
    /// Nothing in the chunk changed: its id in the previous snapshot.
    Same(ChunkId),
    /// The previous snapshot's bytes of the chunk, and the byte ranges of the volume (inside
    /// the chunk, in order) that changed since and must be read.
    Patch(Vec<u8>, Vec<Range<u64>>),
}

/// Images one volume into `vidx`, storing new chunks through `sink`.
pub fn archive_volume(
    input: ArchiveInput<'_>,
    sink: &mut PackSink,
    vidx: &mut VolumeIndexWriter,
    progress: &dyn Progress,
) -> Result<ArchiveStats> {
    let ArchiveInput { volume, map, chunk_size, compression, threads, prior } = input;
    let cs = chunk_size as u64;
    let count = volume.size.div_ceil(cs);
    let threads = threads.max(1);
    // Room for several bulk reads in flight, so the reader reads ahead while workers compress.
    let window = (threads * 4 + 8).max(4 * LOOKAHEAD);
    // Jobs queue up to a whole window: workers keep busy while the reader waits on a bulk read.
    let (job_tx, job_rx) = bounded::<Job>(window);
    let (res_tx, res_rx) = bounded::<Result<(u64, Outcome)>>(window);
    let (token_tx, token_rx) = bounded::<()>(window);
    let existing = sink.existing.clone();
    let known = existing.clone();
    let mut prior = prior.map(|f| {
        // Only ids the repository still holds.
        move |seq: u64| match f(seq)? {
            Some(Prior::Same(id)) if id != ChunkId::ZERO && !known.contains(&id) => {
                bail!("chunk {id} of the previous snapshot is no longer in the repository")
            }
            other => Ok(other),
        }
    });

    std::thread::scope(|s| -> Result<ArchiveStats> {
        let prior = prior.as_mut().map(|f| f as &mut (dyn FnMut(u64) -> Result<Option<Prior>> + Send));
        let reader = s.spawn(move || read_chunks(volume, map, cs, count, job_tx, token_tx, prior));
        for _ in 0..threads {
            let (job_rx, res_tx, existing) = (job_rx.clone(), res_tx.clone(), existing.clone());
            s.spawn(move || process_chunks(job_rx, res_tx, &existing, compression));
        }
        drop((job_rx, res_tx));

        let written = write_in_order(&res_rx, &token_rx, count, cs, volume.size, sink, vidx, progress);
        // Unblock the reader and workers if the writer stopped early.
        drop((res_rx, token_rx));
        let read = reader.join().expect("reader thread panicked");
        let (used_bytes, read_bytes) = read?;
        let mut stats = written?;
        if stats.chunks != count {
            bail!("backup pipeline stopped after {} of {count} chunks", stats.chunks);
        }
        stats.used_bytes = used_bytes;
        stats.read_bytes = read_bytes;
        Ok(stats)
    })
}

/// Chunks the reader plans ahead: their used ranges are looked up first, so that runs of
/// consecutive chunks to read become one bulk read (up to this many chunks, and 1 MiB).
const LOOKAHEAD: usize = 16;
const BULK_BYTES: u64 = 1 << 20;

/// What the reader decided for one chunk.
struct Planned {
    seq: u64,
    start: u64,
    len: u64,
    ranges: Vec<Range<u64>>,
    reused: Option<ChunkId>,
    patch: Option<(Vec<u8>, Vec<Range<u64>>)>,
}

impl Planned {
    /// A chunk read whole from the volume (not skipped, not reused, not patched).
    fn reads_whole(&self) -> bool {
        !self.ranges.is_empty() && self.reused.is_none() && self.patch.is_none()
    }
}

/// Reader: returns (used bytes, bytes read).
fn read_chunks(
    volume: &Volume,
    map: &mut dyn UsedMap,
    cs: u64,
    count: u64,
    jobs: Sender<Job>,
    tokens: Sender<()>,
    mut prior: Option<&mut (dyn FnMut(u64) -> Result<Option<Prior>> + Send)>,
) -> Result<(u64, u64)> {
    let (mut used, mut read) = (0u64, 0u64);
    let bulk_len = (BULK_BYTES.max(cs) as usize).div_ceil(rime_volume::device::ALIGN) * rime_volume::device::ALIGN;
    let mut bulk = AlignedBuf::new(bulk_len);
    let mut next = 0u64;
    while next < count {
        // Plan a batch: used ranges and what the previous snapshot offers, in chunk order.
        let mut batch: Vec<Planned> = Vec::with_capacity(LOOKAHEAD);
        while next < count && batch.len() < LOOKAHEAD {
            let seq = next;
            next += 1;
            let start = seq * cs;
            let len = cs.min(volume.size - start);
            let mut ranges = Vec::new();
            map.used_ranges(start, len, &mut ranges)
                .with_context(|| format!("used-block map of {}", volume.path.display()))?;
            let (mut reused, mut patch) = (None, None);
            let known = match prior.as_mut() {
                Some(f) if !ranges.is_empty() => f(seq)?,
                _ => None,
            };
            match known {
                Some(Prior::Same(id)) => reused = Some(id),
                Some(Prior::Patch(base, changed)) => {
                    if base.len() as u64 != len {
                        bail!("the previous snapshot's chunk {seq} has {} bytes, not {len}", base.len());
                    }
                    patch = Some((base, changed))
                }
                None => {}
            }
            batch.push(Planned { seq, start, len, ranges, reused, patch });
        }

        let mut i = 0;
        while i < batch.len() {
            // A run of chunks read whole becomes one bulk read.
            let mut run_end = i;
            let mut run_bytes = 0u64;
            while run_end < batch.len()
                && batch[run_end].reads_whole()
                && run_bytes + batch[run_end].len <= bulk_len as u64
            {
                run_bytes += batch[run_end].len;
                run_end += 1;
            }
            let run_start = batch[i].start;
            let bytes =
                if run_end > i { Some(volume.read_bulk(run_start, run_bytes as usize, &mut bulk)?) } else { None };
            if run_end > i {
                read += run_bytes;
            }
            for p in batch.iter_mut().take(run_end.max(i + 1)).skip(i) {
                if tokens.send(()).is_err() {
                    return Ok((used, read)); // the writer stopped; its error is reported
                }
                if p.reused.is_some() {
                    used += p.ranges.iter().map(|r| r.end - r.start).sum::<u64>();
                }
                let data = if p.ranges.is_empty() || p.reused.is_some() {
                    None
                } else {
                    // The whole chunk (or its changed ranges over the previous snapshot's
                    // bytes), then blank what the filesystem does not use: unused blocks
                    // restore as zeros and their stale contents never reach the repository.
                    let mut buf = match p.patch.take() {
                        Some((mut base, changed)) => {
                            for r in changed {
                                debug_assert!(r.start >= p.start && r.end <= p.start + p.len);
                                volume.read_at(
                                    r.start,
                                    &mut base[(r.start - p.start) as usize..(r.end - p.start) as usize],
                                )?;
                                read += r.end - r.start;
                            }
                            base
                        }
                        None => {
                            let at = (p.start - run_start) as usize;
                            bytes.expect("a chunk read whole lies in the bulk read")[at..at + p.len as usize].to_vec()
                        }
                    };
                    let mut pos = p.start;
                    for r in &p.ranges {
                        debug_assert!(r.start >= pos && r.end <= p.start + p.len, "map ranges in order and in bounds");
                        buf[(pos - p.start) as usize..(r.start - p.start) as usize].fill(0);
                        used += r.end - r.start;
                        pos = r.end;
                    }
                    buf[(pos - p.start) as usize..].fill(0);
                    Some(buf)
                };
                if jobs.send(Job { seq: p.seq, data, reused: p.reused }).is_err() {
                    return Ok((used, read));
                }
            }
            i = run_end.max(i + 1);
        }
    }
    Ok((used, read))
}

fn process_chunks(
    jobs: Receiver<Job>,
    results: Sender<Result<(u64, Outcome)>>,
    existing: &ChunkIndex,
    compression: Compression,
) {
    let mut compressor = match Compressor::new(compression) {
        Ok(c) => c,
        Err(e) => {
            let _ = results.send(Err(e));
            return;
        }
    };
    for job in jobs {
        let outcome = match job.data {
            None if job.reused.is_some_and(|id| id != ChunkId::ZERO) => Ok(Outcome::Known(job.reused.unwrap())),
            None => Ok(Outcome::Zero),
            Some(data) if is_all_zero(&data) => Ok(Outcome::Zero),
            Some(data) => {
                let id = ChunkId::of(&data);
                if existing.contains(&id) {
                    Ok(Outcome::Known(id))
                } else {
                    compressor.compress(&data).map(|(encoding, payload)| Outcome::New {
                        id,
                        encoding,
                        payload,
                        raw_len: data.len() as u32,
                    })
                }
            }
        };
        if results.send(outcome.map(|o| (job.seq, o))).is_err() {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_in_order(
    results: &Receiver<Result<(u64, Outcome)>>,
    tokens: &Receiver<()>,
    count: u64,
    cs: u64,
    size: u64,
    sink: &mut PackSink,
    vidx: &mut VolumeIndexWriter,
    progress: &dyn Progress,
) -> Result<ArchiveStats> {
    let mut stats = ArchiveStats::default();
    let mut pending: BTreeMap<u64, Outcome> = BTreeMap::new();
    while stats.chunks < count {
        let Ok(result) = results.recv() else { break };
        let (seq, outcome) = result?;
        pending.insert(seq, outcome);
        while let Some(outcome) = pending.remove(&stats.chunks) {
            let id = match outcome {
                Outcome::Zero => {
                    stats.zero_chunks += 1;
                    ChunkId::ZERO
                }
                Outcome::Known(id) => id,
                Outcome::New { id, encoding, payload, raw_len } => {
                    let added = sink.store(id, encoding, &payload, raw_len)?;
                    if added > 0 {
                        stats.new_chunks += 1;
                        stats.added_bytes += added;
                    }
                    id
                }
            };
            vidx.push(&id)?;
            let len = cs.min(size - stats.chunks * cs);
            stats.chunks += 1;
            progress.advance(len);
            let _ = tokens.recv();
        }
    }
    Ok(stats)
}
