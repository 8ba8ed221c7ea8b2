//! `rime verify`: re-read and check every chunk that snapshots need.
//!
//! Each problem names the snapshots it damages. Checks: manifests parse; each volume index
//! matches its manifest's digest; every referenced chunk is in the index; and every referenced
//! chunk, read back from its pack, decodes to bytes whose BLAKE3 digest is its id.

use crate::progress::Progress;
use anyhow::Result;
use crossbeam_channel::unbounded;
use rime_repo::index::IdMap;
use rime_repo::lock::LockMode;
use rime_repo::pack::{self, pack_path, PackEntry};
use rime_repo::Repository;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// corrupt-chunk, missing-chunk, missing-pack, bad-volume-index, bad-manifest, bad-pack-index
    pub kind: String,
    pub detail: String,
    pub chunk: Option<String>,
    pub pack: Option<String>,
    /// Snapshots that need the damaged object.
    pub snapshots: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub snapshots: Vec<String>,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn verify(
    repo: &Repository,
    snapshot: Option<&str>,
    threads: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let _lock = repo.lock(LockMode::Shared, "verify", Duration::from_secs(30))?;
    let mut report = VerifyReport::default();
    let problem = |kind: &str, detail: String, chunk: Option<String>, pack: Option<String>, snapshots: Vec<String>| {
        Problem { kind: kind.into(), detail, chunk, pack, snapshots }
    };

    let (manifests, bad_manifests) = repo.manifests()?;
    let selected = match snapshot {
        Some(spec) => vec![repo.resolve(spec)?],
        None => {
            for (path, reason) in bad_manifests {
                report.problems.push(problem("bad-manifest", format!("{path}: {reason}"), None, None, vec![]));
            }
            manifests
        }
    };
    report.snapshots = selected.iter().map(|m| m.id.clone()).collect();

    let (index, bad_indexes) = repo.load_index()?;
    for b in bad_indexes {
        report.problems.push(problem("bad-pack-index", format!("{}: {}", b.path, b.reason), None, None, vec![]));
    }

    // Which snapshots need each chunk (indexes into `selected`).
    let mut needed: IdMap<Vec<u32>> = IdMap::default();
    for (n, m) in selected.iter().enumerate() {
        for v in &m.volumes {
            let scan = crate::references::scan_volume(repo, v, |id| {
                let users = needed.entry(id).or_default();
                if users.last() != Some(&(n as u32)) {
                    users.push(n as u32);
                }
            });
            if let Err(e) = scan {
                report.problems.push(problem(
                    "bad-volume-index",
                    format!("volume {} ({}): {e:#}", v.name, v.index),
                    None,
                    None,
                    vec![m.id.clone()],
                ));
            }
        }
    }
    let names = |users: &[u32]| users.iter().map(|&u| selected[u as usize].id.clone()).collect::<Vec<_>>();

    let mut by_pack: HashMap<u32, Vec<PackEntry>> = HashMap::new();
    let mut total_bytes = 0u64;
    for (id, users) in &needed {
        match index.get(id) {
            Some(loc) => {
                total_bytes += loc.stored_len as u64;
                by_pack.entry(loc.pack).or_default().push(loc.entry(*id));
            }
            None => report.problems.push(problem(
                "missing-chunk",
                format!("chunk {id} is not in any pack"),
                Some(id.to_hex()),
                None,
                names(users),
            )),
        }
    }

    progress.begin("verify", total_bytes);
    let (tx, rx) = unbounded();
    for (pack, mut entries) in by_pack {
        entries.sort_by_key(|e| e.offset);
        tx.send((pack, entries)).expect("receiver alive");
    }
    drop(tx);
    let found: Mutex<Vec<(rime_repo::ChunkId, String, &'static str, String)>> = Mutex::new(Vec::new());
    let counts = Mutex::new((0u64, 0u64));
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            let (rx, found, counts, index) = (rx.clone(), &found, &counts, &index);
            s.spawn(move || {
                for (pack, entries) in rx {
                    let pack_id = index.packs[pack as usize].id;
                    let reader = match repo.backend.open(&pack_path(&pack_id)) {
                        Ok(r) => r,
                        Err(e) => {
                            let mut f = found.lock().unwrap();
                            for entry in &entries {
                                f.push((entry.id, pack_id.to_hex(), "missing-pack", format!("{e:#}")));
                            }
                            continue;
                        }
                    };
                    let (mut chunks, mut bytes) = (0u64, 0u64);
                    for entry in &entries {
                        if let Err(e) = pack::read_blob(reader.as_ref(), entry) {
                            found.lock().unwrap().push((entry.id, pack_id.to_hex(), "corrupt-chunk", format!("{e:#}")));
                        }
                        chunks += 1;
                        bytes += entry.stored_len as u64;
                        progress.advance(entry.stored_len as u64);
                    }
                    let mut c = counts.lock().unwrap();
                    c.0 += chunks;
                    c.1 += bytes;
                }
            });
        }
    });
    progress.end();
    let (chunks, bytes) = counts.into_inner().unwrap();
    report.chunks_checked = chunks;
    report.bytes_checked = bytes;
    let mut found = found.into_inner().unwrap();
    found.sort_by_key(|a| a.0);
    for (id, pack, kind, detail) in found {
        report.problems.push(problem(kind, detail, Some(id.to_hex()), Some(pack), names(&needed[&id])));
    }
    Ok(report)
}
