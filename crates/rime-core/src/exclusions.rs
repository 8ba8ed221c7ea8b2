//! `--exclude-file` and default swap-file exclusion: which byte ranges of a volume to leave out.
//!
//! Only a file's data blocks are left out; its inode, size and extent tree stay, so after a
//! restore the filesystem is consistent and the file exists with its size, reading as zeros.
//! Linux swap files found by their signature keep their first page, so the restored file is
//! still a valid (empty) swap area; Windows page and hibernation files keep nothing.

use anyhow::{bail, Result};
use rime_repo::snapshot::ExcludedFile;
use rime_volume::layout::Layout;
use rime_volume::usedmap::Excluding;

/// Applies exclusions to each volume's layout; returns what each volume excludes. A requested
/// path that exists on none of the volumes is an error (a typo must not go unnoticed).
pub fn apply(
    layouts: &mut [Layout],
    requested: &[String],
    warnings: &mut Vec<String>,
) -> Result<Vec<Vec<ExcludedFile>>> {
    let mut per_volume = Vec::new();
    let mut found_somewhere = vec![false; requested.len()];
    for layout in layouts.iter_mut() {
        // (path, reason, bytes at the start to keep)
        let mut wanted: Vec<(String, &'static str, u64)> =
            requested.iter().map(|p| (p.clone(), "requested", 0)).collect();
        match layout.map.swap_files() {
            Ok(swaps) => {
                for s in swaps {
                    if !wanted.iter().any(|(p, _, _)| *p == s.path) {
                        wanted.push((s.path, "swap file", s.keep_header));
                    }
                }
            }
            Err(e) => warnings.push(format!("could not look for swap files: {e:#}")),
        }
        let mut excluded = Vec::new();
        let mut ranges = Vec::new();
        for (path, reason, keep) in wanted {
            match layout.map.file_extents(&path) {
                Ok(Some(fe)) => {
                    if let Some(i) = requested.iter().position(|p| *p == path) {
                        found_somewhere[i] = true;
                    }
                    let file_ranges = fe.ranges_from(keep);
                    let bytes = file_ranges.iter().map(|r| r.end - r.start).sum();
                    ranges.extend(file_ranges);
                    excluded.push(ExcludedFile { path, size: fe.size, bytes, reason: reason.to_string() });
                }
                Ok(None) => {}
                Err(e) if reason == "requested" => warnings.push(format!("cannot exclude {path}: {e:#}")),
                Err(_) => {}
            }
        }
        if !ranges.is_empty() {
            let map = std::mem::replace(&mut layout.map, Box::new(rime_volume::AllBlocks { reason: String::new() }));
            layout.map = Box::new(Excluding::new(map, ranges));
        }
        per_volume.push(excluded);
    }
    for (path, found) in requested.iter().zip(found_somewhere) {
        if !found {
            match warnings.iter().find(|w| w.starts_with(&format!("cannot exclude {path}:"))) {
                Some(w) => bail!("--exclude-file: {}", w.trim_start_matches("cannot exclude ")),
                None => bail!("--exclude-file {path}: no such file on any volume being backed up"),
            }
        }
    }
    Ok(per_volume)
}
