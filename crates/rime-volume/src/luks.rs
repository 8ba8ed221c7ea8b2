//! Recognising LUKS1 and LUKS2 encrypted volumes.
//!
//! Rime cannot see inside an encrypted volume without its key, so such a volume has no
//! used-block map: it is imaged whole (all non-zero chunks), and the snapshot records that it is
//! encrypted, with its cipher, UUID and (LUKS2) label. Both headers start with the magic
//! `LUKS\xba\xbe` and a big-endian version; LUKS2 keeps a second copy of its header (magic
//! `SKUL\xba\xbe`) at one of a few fixed offsets, read when the first is damaged. The LUKS2
//! cipher lives in the JSON area after the binary header, parsed with `serde_json` and bounded
//! by the header's own size field.

use crate::bytes::{be16, be64};
use crate::device::Region;
use anyhow::Result;

const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
/// Where cryptsetup may put the LUKS2 secondary header (its header sizes: 16 KiB to 4 MiB).
const LUKS2_SECONDARY_OFFSETS: &[u64] =
    &[0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000];
/// The largest LUKS2 header (binary header and JSON area) cryptsetup writes.
const LUKS2_MAX_HEADER: u64 = 4 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksInfo {
    /// 1 or 2.
    pub version: u16,
    /// `aes-xts-plain64`, ...
    pub cipher: String,
    pub uuid: String,
    /// LUKS2 only.
    pub label: Option<String>,
}

impl LuksInfo {
    pub fn describe(&self) -> String {
        format!("LUKS{} encrypted ({}, UUID {})", self.version, self.cipher, self.uuid)
    }
}

/// A LUKS header at the start of `region` (or a LUKS2 secondary header), if there is one.
pub fn probe(region: &Region) -> Result<Option<LuksInfo>> {
    if region.len < 4096 {
        return Ok(None);
    }
    let mut h = vec![0u8; 4096];
    region.read_at(0, &mut h)?;
    if &h[..6] == MAGIC_PRIMARY {
        return Ok(Some(parse(region, &h)));
    }
    for &off in LUKS2_SECONDARY_OFFSETS {
        if off + 4096 > region.len {
            break;
        }
        region.read_at(off, &mut h)?;
        if &h[..6] == MAGIC_SECONDARY && be16(&h, 6)? == 2 {
            return Ok(Some(parse(region, &h)));
        }
    }
    Ok(None)
}

fn parse(region: &Region, h: &[u8]) -> LuksInfo {
    let version = be16(h, 6).unwrap_or(0);
    let text = |r: std::ops::Range<usize>| {
        let b = &h[r];
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    if version == 1 {
        let (name, mode) = (text(8..40), text(40..72));
        return LuksInfo { version, cipher: format!("{name}-{mode}"), uuid: text(168..208), label: None };
    }
    let label = Some(text(24..72)).filter(|l| !l.is_empty());
    LuksInfo {
        version,
        cipher: luks2_cipher(region, h).unwrap_or_else(|| "unknown".into()),
        uuid: text(168..208),
        label,
    }
}

/// The encryption of the first data segment, from the JSON area after the binary header.
fn luks2_cipher(region: &Region, h: &[u8]) -> Option<String> {
    let hdr_size = be64(h, 8).ok()?;
    let offset = be64(h, 256).ok()?;
    if !(8192..=LUKS2_MAX_HEADER).contains(&hdr_size) || offset.checked_add(hdr_size)? > region.len {
        return None;
    }
    let mut json = vec![0u8; (hdr_size - 4096) as usize];
    region.read_at(offset + 4096, &mut json).ok()?;
    let end = json.iter().position(|&c| c == 0).unwrap_or(json.len());
    let v: serde_json::Value = serde_json::from_slice(&json[..end]).ok()?;
    let segments = v.get("segments")?.as_object()?;
    let first = segments.values().next()?;
    Some(first.get("encryption")?.as_str()?.to_string())
}
