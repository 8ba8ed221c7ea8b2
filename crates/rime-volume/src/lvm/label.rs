//! The on-disk side of an LVM2 physical volume: its label, its header and its metadata areas.
//!
//! ```text
//! sector 0..3   one of them holds the label: "LABELONE", its own sector number, a CRC of the
//!               rest of the sector, the offset of the PV header, and "LVM2 001"
//! PV header     PV UUID (32 chars), device size, data areas, metadata areas (offset, size
//!               pairs, each list ended by a zero pair)
//! metadata area a 512-byte header ("\x20LVM2 x[5A%r0N*>", CRC) listing where the current text
//!               lies in the circular buffer that follows it, with the text's length and CRC
//! ```
//!
//! A PV usually has one metadata area at 4 KiB and may have a second at its end. Every copy is
//! read and checked (header CRC, magic, version, bounds, text CRC), and the copy with the highest
//! `seqno` wins, as LVM itself chooses. Offsets come from disk: each is checked against the
//! region before reading, and a text is at most [`text::MAX_TEXT`] bytes.

use super::text;
use crate::bytes::{le32, le64};
use crate::device::Region;
use anyhow::{bail, ensure, Context, Result};
use std::ops::Range;

const SECTOR: u64 = 512;
const LABEL_ID: &[u8; 8] = b"LABELONE";
const LABEL_TYPE: &[u8; 8] = b"LVM2 001";
const MDA_MAGIC: &[u8; 16] = b"\x20LVM2\x20x[5A%r0N*>";
const MDA_HEADER_SIZE: u64 = 512;
/// `raw_locn.flags`: this copy is deliberately not used (`pvchange --metadataignore`).
const RAW_LOCN_IGNORED: u32 = 1;
/// Initial value of LVM's CRC-32 (reflected polynomial, no final inversion).
const LVM_CRC_INIT: u32 = 0xf597_a6cf;

/// LVM's checksum: CRC-32 with its own initial value and no inversions, which `crc32fast`
/// computes once both are undone.
pub fn lvm_crc(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!LVM_CRC_INIT);
    h.update(data);
    !h.finalize()
}

/// A physical volume's label and header.
#[derive(Clone, Debug)]
pub struct PvLabel {
    /// The PV UUID as LVM prints it (`dd8sDS-HHJP-...`).
    pub uuid: String,
    pub device_size: u64,
    /// Metadata areas: byte ranges of the region.
    pub metadata_areas: Vec<Range<u64>>,
    /// The data area's start (`pe_start`, also in the VG text).
    pub data_start: u64,
}

/// Looks for an LVM2 label in the first four sectors. `Ok(None)` when there is none; an error
/// when one is there but damaged.
pub fn probe(region: &Region) -> Result<Option<PvLabel>> {
    if region.len < 4 * SECTOR {
        return Ok(None);
    }
    let mut head = [0u8; 4 * SECTOR as usize];
    region.read_at(0, &mut head)?;
    for n in 0..4u64 {
        let s = &head[(n * SECTOR) as usize..((n + 1) * SECTOR) as usize];
        if &s[..8] != LABEL_ID {
            continue;
        }
        if le64(s, 8)? != n || &s[24..32] != LABEL_TYPE {
            continue;
        }
        ensure!(le32(s, 16)? == lvm_crc(&s[20..]), "the LVM label in sector {n} fails its checksum");
        let at = le32(s, 20)? as usize;
        ensure!((32..SECTOR as usize - 40).contains(&at), "the LVM label puts its PV header outside the sector");
        return parse_header(&s[at..], region.len).map(Some);
    }
    Ok(None)
}

fn parse_header(h: &[u8], region_len: u64) -> Result<PvLabel> {
    let raw = &h[..32];
    // LVM's UUID alphabet: letters, digits, '!' and '#'.
    ensure!(
        raw.iter().all(|c| c.is_ascii_alphanumeric() || b"!#".contains(c)),
        "the LVM PV header holds a malformed UUID"
    );
    let uuid = format_uuid(raw);
    let device_size = le64(h, 32)?;
    let mut pos = 40;
    let mut lists: [Vec<Range<u64>>; 2] = Default::default();
    for list in lists.iter_mut() {
        loop {
            let (offset, size) = (le64(h, pos)?, le64(h, pos + 8)?);
            pos += 16;
            if offset == 0 && size == 0 {
                break;
            }
            ensure!(list.len() < 8, "the LVM PV header lists too many areas");
            list.push(offset..offset.saturating_add(size));
        }
    }
    let [data, metadata] = lists;
    let data_start = data.first().map(|r| r.start).context("the LVM PV header lists no data area")?;
    ensure!(data_start <= region_len, "the LVM data area starts past the end of the volume");
    for m in &metadata {
        ensure!(
            m.end <= region_len && m.end - m.start > MDA_HEADER_SIZE,
            "an LVM metadata area ({}..{}) lies outside the volume",
            m.start,
            m.end
        );
    }
    Ok(PvLabel { uuid, device_size, metadata_areas: metadata, data_start })
}

/// `dd8sDSHHJPscsWzS...` as `dd8sDS-HHJP-scsW-zSfb-fhKW-L2tp-nQq6Z5`.
fn format_uuid(raw: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    for (i, len) in [6, 4, 4, 4, 4, 4, 6].iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        out.push_str(&String::from_utf8_lossy(&raw[pos..pos + len]));
        pos += len;
    }
    out
}

/// The volume group text chosen from a PV's metadata areas.
#[derive(Clone, Debug)]
pub struct MetadataText {
    pub text: String,
    pub seqno: u64,
    /// Copies that were unreadable or older, for the warnings.
    pub notes: Vec<String>,
}

/// Reads every metadata copy and returns the newest valid one; `Ok(None)` when the PV keeps
/// no copy (no metadata area, or every copy marked ignored): its VG is described on other PVs.
pub fn read_metadata(region: &Region, label: &PvLabel) -> Result<Option<MetadataText>> {
    let mut best: Option<MetadataText> = None;
    let mut notes = Vec::new();
    for (i, area) in label.metadata_areas.iter().enumerate() {
        match read_area(region, area) {
            Ok(Some((text, seqno))) => {
                if best.as_ref().is_none_or(|b| seqno > b.seqno) {
                    if let Some(old) = best.take() {
                        notes.push(format!("metadata copy with seqno {} is older than copy {i}", old.seqno));
                    }
                    best = Some(MetadataText { text, seqno, notes: Vec::new() });
                }
            }
            Ok(None) => {}
            Err(e) => notes.push(format!("metadata copy {i} at byte {}: {e:#}", area.start)),
        }
    }
    match best {
        Some(mut b) => {
            b.notes = notes;
            Ok(Some(b))
        }
        None if notes.is_empty() => Ok(None),
        None => bail!("no valid metadata copy ({})", notes.join("; ")),
    }
}

/// One metadata area: `Ok(None)` when its copy is marked ignored.
fn read_area(region: &Region, area: &Range<u64>) -> Result<Option<(String, u64)>> {
    let mut h = [0u8; MDA_HEADER_SIZE as usize];
    region.read_at(area.start, &mut h)?;
    ensure!(le32(&h, 0)? == lvm_crc(&h[4..]), "header fails its checksum");
    ensure!(&h[4..20] == MDA_MAGIC, "header has no LVM magic");
    ensure!(le32(&h, 20)? == 1, "header version {} is unknown", le32(&h, 20)?);
    ensure!(le64(&h, 24)? == area.start, "header names another start ({})", le64(&h, 24)?);
    let size = area.end - area.start;
    // The first raw location is the committed text; LVM uses a second one only while writing.
    let (offset, len, crc, flags) = (le64(&h, 40)?, le64(&h, 48)?, le32(&h, 56)?, le32(&h, 60)?);
    if flags & RAW_LOCN_IGNORED != 0 {
        return Ok(None);
    }
    ensure!(len > 0, "the area holds no metadata text");
    ensure!(len as usize <= text::MAX_TEXT && len < size, "metadata text of {len} bytes does not fit its area");
    ensure!((MDA_HEADER_SIZE..size).contains(&offset), "metadata text offset {offset} lies outside its area");
    // The text may wrap around the circular buffer, which starts after the header.
    let mut text = vec![0u8; len as usize];
    let first = len.min(size - offset);
    region.read_at(area.start + offset, &mut text[..first as usize])?;
    if first < len {
        ensure!(len - first <= size - MDA_HEADER_SIZE, "metadata text wraps past its area");
        region.read_at(area.start + MDA_HEADER_SIZE, &mut text[first as usize..])?;
    }
    ensure!(lvm_crc(&text) == crc, "metadata text fails its checksum");
    let text = String::from_utf8(text).context("metadata text is not UTF-8")?;
    let seqno = vg_seqno(&text)?;
    Ok(Some((text, seqno)))
}

/// The `seqno` of the (single) volume group section of a metadata text.
fn vg_seqno(text: &str) -> Result<u64> {
    let top = text::parse(text)?;
    let vg = top.sections().next().context("metadata text holds no volume group")?;
    vg.uint("seqno")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_lvm() {
        // A label sector written by LVM 2.03.16 (pvcreate): its CRC field covers bytes 20..512.
        let mut s = vec![0u8; 512];
        s[..8].copy_from_slice(b"LABELONE");
        s[8] = 1;
        s[20] = 0x20;
        s[24..32].copy_from_slice(b"LVM2 001");
        s[32..64].copy_from_slice(b"dd8sDSHHJPscsWzSfbfhKWL2tpnQq6Z5");
        s[64..72].copy_from_slice(&0x36e0_0000u64.to_le_bytes());
        s[72..80].copy_from_slice(&0x10_0000u64.to_le_bytes());
        s[104..112].copy_from_slice(&0x1000u64.to_le_bytes());
        s[112..120].copy_from_slice(&0xf_f000u64.to_le_bytes());
        s[136] = 2;
        s[140] = 1;
        assert_eq!(lvm_crc(&s[20..]), 0xf40f_1377);
        assert_eq!(format_uuid(&s[32..64]), "dd8sDS-HHJP-scsW-zSfb-fhKW-L2tp-nQq6Z5");
    }
}
