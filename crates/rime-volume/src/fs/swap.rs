//! Linux swap areas (a swap partition or swap LV): only the header page is worth imaging.
//!
//! A swap area's pages hold nothing that survives a reboot, so, as with swap files, Rime keeps
//! the first page (the header `mkswap` wrote, with its UUID, label and size, so `swapon` works
//! on the restored area) and leaves the rest out. The signature `SWAPSPACE2` sits in the last ten
//! bytes of the first page, whose size is the page size of the machine that made it (4 KiB on
//! x86, up to 64 KiB elsewhere). An area holding a hibernation image has another signature
//! (`S1SUSPEND`, ...) and is not matched: it is imaged whole, since resuming needs it.

use crate::device::Region;
use crate::usedmap::{push_range, UsedMap};
use anyhow::Result;
use std::ops::Range;

const SIGNATURE: &[u8; 10] = b"SWAPSPACE2";
const PAGE_SIZES: &[u64] = &[4096, 8192, 16384, 65536];

pub struct SwapMap {
    header: u64,
}

impl SwapMap {
    pub fn probe(region: &Region) -> Result<Option<SwapMap>> {
        for &page in PAGE_SIZES {
            if page * 2 > region.len {
                break;
            }
            let mut sig = [0u8; 10];
            region.read_at(page - 10, &mut sig)?;
            if &sig == SIGNATURE && header_is_sound(region, page)? {
                return Ok(Some(SwapMap { header: page }));
            }
        }
        Ok(None)
    }
}

/// The signature alone could be left over from an area since reused: the header must hold
/// too. `mkswap` writes version 1, the last usable page (inside the area) and at most a page's
/// worth of bad-page entries; a disk label in the first sectors (an MBR's 0x55AA, a GPT header)
/// means the area was reused.
fn header_is_sound(region: &Region, page: u64) -> Result<bool> {
    let mut h = [0u8; 1024 + 12];
    region.read_at(0, &mut h)?;
    let field = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let (version, last_page, bad_pages) = (field(1024), field(1028) as u64, field(1032) as u64);
    let mut label = [0u8; 8];
    region.read_at(512, &mut label)?;
    Ok(version == 1
        && last_page > 0
        && (last_page + 1) * page <= region.len + page
        && bad_pages <= page / 4
        && h[510..512] != [0x55, 0xAA]
        && &label != b"EFI PART")
}

impl UsedMap for SwapMap {
    fn filesystem(&self) -> Option<&str> {
        Some("swap")
    }

    fn describe(&self) -> String {
        format!("swap area (header page of {} KiB kept, the rest left out)", self.header / 1024)
    }

    fn reported_used_bytes(&self) -> Option<u64> {
        Some(self.header)
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let end = (start + len).min(self.header);
        if start < end {
            push_range(out, start..end);
        }
        Ok(())
    }

    fn file_extents(&mut self, _path: &str) -> Result<Option<crate::usedmap::FileExtents>> {
        Ok(None)
    }
}
