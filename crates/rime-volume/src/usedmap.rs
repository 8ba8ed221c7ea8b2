//! Used-block maps: which byte ranges of a volume hold data worth imaging.
//!
//! A map answers one question, sequentially and in bounded memory: within `[start, start+len)`,
//! which ranges are in use? Everything outside the answer is restored as zeros, so a map must
//! err on the side of "used".

use anyhow::Result;
use std::ops::Range;

pub trait UsedMap: Send {
    /// The filesystem that produced the map ("ext4", ...), if any.
    fn filesystem(&self) -> Option<&str>;
    /// How the map was made, for the manifest and messages.
    fn describe(&self) -> String;
    /// Used bytes as the filesystem itself reports them, if it keeps a count.
    fn reported_used_bytes(&self) -> Option<u64> {
        None
    }
    /// Appends the used ranges inside `[start, start + len)` to `out`, in order.
    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()>;

    /// Where the data of the file at `path` lies (for `--exclude-file`); `Ok(None)` when there
    /// is no such file. Only the file's data: the metadata that describes it stays.
    fn file_extents(&mut self, _path: &str) -> Result<Option<FileExtents>> {
        anyhow::bail!("excluding files is not supported on {}", self.describe())
    }

    /// Files this filesystem identifies as swap, page or hibernation files, left out by default.
    fn swap_files(&mut self) -> Result<Vec<SwapFile>> {
        Ok(Vec::new())
    }

    /// Warnings gathered while mapping (for example a fallback), to show the user.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// Wraps a filesystem map so that a structure found to be damaged in the middle of a backup
/// does not fail it: from the first error on, every byte counts as used (all non-zero chunks
/// are imaged), and a warning says so.
pub struct FallbackOnError {
    inner: Box<dyn UsedMap>,
    failed: Option<String>,
    reported: bool,
}

impl FallbackOnError {
    pub fn new(inner: Box<dyn UsedMap>) -> FallbackOnError {
        FallbackOnError { inner, failed: None, reported: false }
    }
}

impl UsedMap for FallbackOnError {
    fn filesystem(&self) -> Option<&str> {
        self.inner.filesystem()
    }
    fn describe(&self) -> String {
        match &self.failed {
            None => self.inner.describe(),
            Some(_) => format!("{} (then non-zero chunks after an error)", self.inner.describe()),
        }
    }
    fn reported_used_bytes(&self) -> Option<u64> {
        self.inner.reported_used_bytes()
    }
    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        if self.failed.is_none() {
            let mut ranges = Vec::new();
            match self.inner.used_ranges(start, len, &mut ranges) {
                Ok(()) => {
                    for r in ranges {
                        push_range(out, r);
                    }
                    return Ok(());
                }
                Err(e) => self.failed = Some(format!("{e:#}")),
            }
        }
        push_range(out, start..start + len);
        Ok(())
    }
    fn file_extents(&mut self, path: &str) -> Result<Option<FileExtents>> {
        self.inner.file_extents(path)
    }
    fn swap_files(&mut self) -> Result<Vec<SwapFile>> {
        self.inner.swap_files()
    }
    fn take_warnings(&mut self) -> Vec<String> {
        let mut w = self.inner.take_warnings();
        if let (Some(e), false) = (&self.failed, self.reported) {
            self.reported = true;
            w.push(format!(
                "the {} structures turned out damaged during the backup ({e}); the rest was imaged as all non-zero blocks",
                self.inner.filesystem().unwrap_or("filesystem")
            ));
        }
        w
    }
}

/// A swap, page or hibernation file found by the filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapFile {
    pub path: String,
    /// Bytes at the start to keep: a Linux swap file's header page, so that `swapon` still
    /// accepts the restored file; Windows recreates its page files, so they keep nothing.
    pub keep_header: u64,
}

/// The data of one file: its size and where its bytes lie, in file order. Holes (sparse
/// parts) have no extent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileExtents {
    pub size: u64,
    pub extents: Vec<FileExtent>,
}

/// Bytes `[file_offset, file_offset + range.len())` of a file lie at `range` of the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileExtent {
    pub file_offset: u64,
    pub range: Range<u64>,
}

impl FileExtents {
    /// The region ranges holding the file's bytes from `from` on.
    pub fn ranges_from(&self, from: u64) -> Vec<Range<u64>> {
        self.extents
            .iter()
            .filter_map(|e| {
                let len = e.range.end - e.range.start;
                let skip = from.saturating_sub(e.file_offset).min(len);
                (skip < len).then(|| e.range.start + skip..e.range.end)
            })
            .collect()
    }
}

/// Where Linux distributions put swap files; a candidate counts only if it carries the swap
/// signature.
pub const SWAP_FILE_CANDIDATES: &[&str] = &["/swapfile", "/swap.img", "/swap/swapfile", "/var/swap", "/swapfile1"];

/// A map with some byte ranges (excluded files' data) taken out.
pub struct Excluding {
    pub inner: Box<dyn UsedMap>,
    /// Sorted, non-overlapping.
    excluded: Vec<Range<u64>>,
    pub excluded_bytes: u64,
}

impl Excluding {
    pub fn new(inner: Box<dyn UsedMap>, excluded: Vec<Range<u64>>) -> Excluding {
        let merged = union_ranges(excluded);
        let excluded_bytes = merged.iter().map(|r| r.end - r.start).sum();
        Excluding { inner, excluded: merged, excluded_bytes }
    }
}

impl UsedMap for Excluding {
    fn filesystem(&self) -> Option<&str> {
        self.inner.filesystem()
    }
    fn describe(&self) -> String {
        format!("{} minus {} excluded bytes", self.inner.describe(), self.excluded_bytes)
    }
    fn take_warnings(&mut self) -> Vec<String> {
        self.inner.take_warnings()
    }
    fn reported_used_bytes(&self) -> Option<u64> {
        self.inner.reported_used_bytes()
    }
    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let mut used = Vec::new();
        self.inner.used_ranges(start, len, &mut used)?;
        let first = self.excluded.partition_point(|r| r.end <= start);
        for r in used {
            let mut pos = r.start;
            for x in self.excluded[first..].iter().take_while(|x| x.start < r.end) {
                if x.end <= pos {
                    continue;
                }
                if x.start > pos {
                    push_range(out, pos..x.start.min(r.end));
                }
                pos = pos.max(x.end);
                if pos >= r.end {
                    break;
                }
            }
            if pos < r.end {
                push_range(out, pos..r.end);
            }
        }
        Ok(())
    }
}

/// Every byte is "used": for `--all-blocks` and unknown filesystems (whose all-zero chunks the
/// backup still stores as markers).
pub struct AllBlocks {
    pub reason: String,
}

impl UsedMap for AllBlocks {
    fn filesystem(&self) -> Option<&str> {
        None
    }
    fn describe(&self) -> String {
        self.reason.clone()
    }
    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        out.push(start..start + len);
        Ok(())
    }
}

/// The swap files of several maps (the partitions of a disk, the LVs of a PV), each once.
pub fn swap_files_of<'a>(maps: impl Iterator<Item = &'a mut Box<dyn UsedMap>>) -> Vec<SwapFile> {
    let mut all = Vec::new();
    for map in maps {
        for f in map.swap_files().unwrap_or_default() {
            if !all.contains(&f) {
                all.push(f);
            }
        }
    }
    all
}

/// Sorts ranges and merges those that overlap or touch; empty ones go.
pub fn union_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Appends `r` to `out`, merging with the last range when they touch.
pub fn push_range(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    if let Some(last) = out.last_mut() {
        debug_assert!(last.end <= r.start, "ranges must come in order");
        if last.end == r.start {
            last.end = r.end;
            return;
        }
    }
    out.push(r);
}
