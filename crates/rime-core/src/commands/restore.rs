//! `rime restore`: write one volume of a snapshot back, bit-exact, to a device or file.
//!
//! Checks first, writes second: the snapshot, the volume, the volume index digest and the
//! presence of every chunk are confirmed before the target is opened, so a damaged snapshot
//! never half-overwrites a good device. Then the main thread walks the volume index, zeroing
//! zero-chunk runs itself and handing data chunks to workers that read, decompress, check and
//! write them in parallel.

use crate::error::CommandError;
use crate::progress::Progress;
use crate::target::RestoreTarget;
use anyhow::{anyhow, bail, ensure, Result};
use crossbeam_channel::bounded;
use rime_repo::backend::ObjectReader;
use rime_repo::lock::LockMode;
use rime_repo::pack::{self, pack_path};
use rime_repo::volume_index::VolumeIndexReader;
use rime_repo::{ChunkId, ChunkIndex, Manifest, Repository, VolumeEntry};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TargetFormat {
    /// Bytes as the volume held them: a device or a raw image file.
    #[default]
    Raw,
    /// A new qcow2 image, converted by `qemu-img`.
    Qcow2,
}

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub snapshot: String,
    pub target: PathBuf,
    pub volume: Option<String>,
    pub threads: usize,
    pub format: TargetFormat,
}

#[derive(Debug, Serialize)]
pub struct RestoreSummary {
    pub snapshot: String,
    pub volume: String,
    pub target: String,
    pub size: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub seconds: f64,
}

/// Picks the volume to restore: the named one, or the only one.
pub fn pick_volume<'m>(manifest: &'m Manifest, name: Option<&str>) -> Result<&'m VolumeEntry> {
    let names = || manifest.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ");
    match name {
        Some(n) => manifest
            .volume(n)
            .ok_or_else(|| anyhow!("snapshot {} has no volume '{n}' (it has: {})", manifest.id, names())),
        None => match manifest.data_volumes().collect::<Vec<_>>()[..] {
            [only] => Ok(only),
            ref several => bail!(
                "snapshot {} holds {} volumes ({}); choose one with --volume",
                manifest.id,
                several.len(),
                names()
            ),
        },
    }
}

struct Job {
    chunk: u64,
    id: ChunkId,
}

pub fn restore(repo: &Repository, opts: &RestoreOptions, progress: &dyn Progress) -> Result<RestoreSummary> {
    match opts.format {
        TargetFormat::Raw => restore_raw(repo, opts, progress),
        TargetFormat::Qcow2 => restore_qcow2(repo, opts, progress),
    }
}

/// Restores to a sparse raw file beside the target, then converts it with `qemu-img`; the
/// target appears only when the conversion succeeded.
fn restore_qcow2(repo: &Repository, opts: &RestoreOptions, progress: &dyn Progress) -> Result<RestoreSummary> {
    if opts.target.exists() {
        bail!("{} exists; a qcow2 restore writes a new image file", opts.target.display());
    }
    let name = opts.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let raw = opts.target.with_file_name(format!(".{name}.rime-raw"));
    let partial = opts.target.with_file_name(format!(".{name}.rime-partial"));
    let _ = std::fs::remove_file(&raw);
    let result = (|| {
        let mut summary = restore_raw(
            repo,
            &RestoreOptions { target: raw.clone(), format: TargetFormat::Raw, ..opts.clone() },
            progress,
        )?;
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&partial)
            .output()
            .map_err(|e| anyhow!("cannot run qemu-img (install qemu-utils): {e}"))?;
        if !out.status.success() {
            bail!("qemu-img convert failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        std::fs::File::open(&partial)?.sync_all()?;
        std::fs::rename(&partial, &opts.target)?;
        summary.target = opts.target.display().to_string();
        Ok(summary)
    })();
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&partial);
    result
}

fn restore_raw(repo: &Repository, opts: &RestoreOptions, progress: &dyn Progress) -> Result<RestoreSummary> {
    let started = Instant::now();
    let _lock = repo.lock(LockMode::Shared, "restore", Duration::from_secs(30))?;
    let manifest = repo.resolve(&opts.snapshot)?;
    let volume = pick_volume(&manifest, opts.volume.as_deref())?;
    let vidx = VolumeIndexReader::open(repo.backend.as_ref(), &volume.index)?;
    let header = vidx.header;
    ensure!(header.volume_size == volume.size, "volume index of {} disagrees with its manifest", volume.name);
    let (index, _) = repo.load_index()?;

    let mut missing = 0u64;
    vidx.for_each(Some(&volume.index_digest), |_, id| {
        if !id.is_zero_marker() && !index.contains(&id) {
            missing += 1;
        }
        Ok(())
    })
    .map_err(|e| CommandError::Damaged(format!("snapshot {} volume {} is damaged: {e:#}", manifest.id, volume.name)))?;
    if missing > 0 {
        return Err(CommandError::Damaged(format!(
            "snapshot {} volume {} is damaged: {missing} chunks are missing from the repository (run `rime verify`)",
            manifest.id, volume.name
        ))
        .into());
    }

    let created = !opts.target.exists();
    let target = RestoreTarget::open(&opts.target, volume.size)?;
    let result = write_volume(repo, &index, &vidx, &target, opts.threads, progress);
    let (data_bytes, zero_bytes) = match result.and_then(|r| target.finish().map(|_| r)) {
        Ok(r) => r,
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(&opts.target);
            }
            return Err(e);
        }
    };
    Ok(RestoreSummary {
        snapshot: manifest.id.clone(),
        volume: volume.name.clone(),
        target: opts.target.display().to_string(),
        size: volume.size,
        data_bytes,
        zero_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Returns (data bytes written, zero bytes).
fn write_volume(
    repo: &Repository,
    index: &ChunkIndex,
    vidx: &VolumeIndexReader,
    target: &RestoreTarget,
    threads: usize,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    let header = vidx.header;
    let cs = header.chunk_size as u64;
    let threads = threads.max(1);
    let (job_tx, job_rx) = bounded::<Job>(threads * 8);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let fail = |e: anyhow::Error| {
        failed.store(true, Ordering::SeqCst);
        first_error.lock().unwrap().get_or_insert(e);
    };
    progress.begin("restore", header.volume_size);

    let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let (fail, failed) = (&fail, &failed);
            s.spawn(move || {
                let mut packs: HashMap<u32, Box<dyn ObjectReader>> = HashMap::new();
                for job in job_rx {
                    if failed.load(Ordering::SeqCst) {
                        continue;
                    }
                    if let Err(e) = restore_chunk(repo, index, &mut packs, target, &header, &job) {
                        fail(e);
                    }
                    progress.advance(header.chunk_len(job.chunk) as u64);
                }
            });
        }
        drop(job_rx);

        const BATCH: u64 = 4096;
        let mut ids = vec![ChunkId::ZERO; BATCH as usize];
        let mut zero_run: Option<(u64, u64)> = None; // (start, len) of pending zero bytes
        let mut i = 0u64;
        'outer: while i < header.chunk_count {
            let n = BATCH.min(header.chunk_count - i) as usize;
            if let Err(e) = vidx.read_records(i, &mut ids[..n]) {
                fail(e);
                break;
            }
            for (k, id) in ids[..n].iter().enumerate() {
                if failed.load(Ordering::SeqCst) {
                    break 'outer;
                }
                let chunk = i + k as u64;
                let len = header.chunk_len(chunk) as u64;
                if id.is_zero_marker() {
                    zero_bytes += len;
                    zero_run = match zero_run {
                        Some((start, l)) => Some((start, l + len)),
                        None => Some((chunk * cs, len)),
                    };
                    progress.advance(len);
                    continue;
                }
                if let Some((start, l)) = zero_run.take() {
                    if let Err(e) = target.zero(start, l) {
                        fail(e);
                        break 'outer;
                    }
                }
                data_bytes += len;
                if job_tx.send(Job { chunk, id: *id }).is_err() {
                    break 'outer;
                }
            }
            i += n as u64;
        }
        if let Some((start, l)) = zero_run.take() {
            if let Err(e) = target.zero(start, l) {
                fail(e);
            }
        }
        drop(job_tx);
    });
    progress.end();
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok((data_bytes, zero_bytes))
}

fn restore_chunk(
    repo: &Repository,
    index: &ChunkIndex,
    packs: &mut HashMap<u32, Box<dyn ObjectReader>>,
    target: &RestoreTarget,
    header: &rime_repo::volume_index::VolumeIndexHeader,
    job: &Job,
) -> Result<()> {
    let loc = index.get(&job.id).ok_or_else(|| anyhow!("chunk {} is missing", job.id))?;
    if !packs.contains_key(&loc.pack) {
        if packs.len() >= 64 {
            packs.clear();
        }
        let reader = repo.backend.open(&pack_path(&index.pack_id(loc)))?;
        packs.insert(loc.pack, reader);
    }
    let raw = pack::read_blob(packs[&loc.pack].as_ref(), &loc.entry(job.id))?;
    let expected = header.chunk_len(job.chunk);
    ensure!(raw.len() == expected, "chunk {} holds {} bytes where the volume needs {expected}", job.id, raw.len());
    target.write_at(job.chunk * header.chunk_size as u64, &raw)
}
