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
