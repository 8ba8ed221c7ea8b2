//! FAT directories: the one parser of directory entries (8.3 names with their case flags,
//! VFAT long names, attributes, first cluster, size, times) and of cluster chains, shared by the
//! map's cross-check and the image explorer.
//!
//! Defensive: a directory is read as a sequence of 32-byte entries up to the first free-and-last
//! marker (0x00); deleted entries are skipped; a long name is used only when its sequence is
//! complete and its checksum matches the short entry that follows, else the short name is;
//! chains end at a free, reserved, bad or end-of-chain entry, at a cluster out of range, or
//! after as many clusters as the volume has (a loop).

use super::fat::{FatKind, FatMap};
use crate::bytes::{le16, le32};
use anyhow::Result;

pub const ATTR_READ_ONLY: u8 = 0x01;
pub const ATTR_VOLUME_ID: u8 = 0x08;
pub const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LONG_NAME: u8 = 0x0F;
/// Byte 12 of a short entry: the base name / the extension is stored lowercase (Windows NT).
const CASE_BASE_LOWER: u8 = 0x08;
const CASE_EXT_LOWER: u8 = 0x10;

/// A FAT date and time as stored: `date` is (year-1980)<<9 | month<<5 | day, `time` is
/// hour<<11 | minute<<5 | seconds/2, `hundredths` adds 0..199 centiseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FatTime {
    pub date: u16,
    pub time: u16,
    pub hundredths: u8,
}

impl FatTime {
    /// Seconds and nanoseconds since the Unix epoch, reading the (zoneless) local time as UTC;
    /// `None` for an unset date.
    pub fn unix(self) -> Option<(i64, u32)> {
        let (year, month, day) =
            (1980 + (self.date >> 9) as i64, ((self.date >> 5) & 0xF) as i64, (self.date & 0x1F) as i64);
        if !(1..=12).contains(&month) || day == 0 {
            return None;
        }
        let (h, m, s) = ((self.time >> 11) as i64, ((self.time >> 5) & 0x3F) as i64, ((self.time & 0x1F) * 2) as i64);
        let extra = self.hundredths.min(199) as i64;
        let sec = days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + s + extra / 100;
        Some((sec, (extra % 100) as u32 * 10_000_000))
    }
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// One live directory entry (not `.`, `..`, a volume label or a long-name slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirRecord {
    /// The long name if there is a valid one, else the 8.3 name (`NAME.EXT`, case flags
    /// applied; bytes above 0x7F, which depend on an OEM code page, read as U+FFFD).
    pub name: String,
    pub attr: u8,
    /// 0 for an empty file.
    pub first_cluster: u64,
    pub size: u32,
    pub created: FatTime,
    pub modified: FatTime,
    /// Date only.
    pub accessed: FatTime,
}

impl DirRecord {
    pub fn is_dir(&self) -> bool {
        self.attr & ATTR_DIRECTORY != 0
    }
}

fn short_name(e: &[u8]) -> String {
    let part = |b: &[u8], lower: bool| -> String {
        let mut s: String = b
            .iter()
            .map(|&c| if c.is_ascii() { c as char } else { char::REPLACEMENT_CHARACTER })
            .collect::<String>()
            .trim_end_matches(' ')
            .to_string();
        if lower {
            s = s.to_ascii_lowercase();
        }
        s
    };
    let mut raw = [0u8; 11];
    raw.copy_from_slice(&e[..11]);
    if raw[0] == 0x05 {
        raw[0] = 0xE5; // a name really starting with 0xE5 is stored as 0x05
    }
    let base = part(&raw[..8], e[12] & CASE_BASE_LOWER != 0);
    let ext = part(&raw[8..11], e[12] & CASE_EXT_LOWER != 0);
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

fn short_checksum(e: &[u8]) -> u8 {
    e[..11].iter().fold(0u8, |sum, &b| (sum >> 1 | (sum & 1) << 7).wrapping_add(b))
}

/// A long name being gathered from its slots (which come last-first before the short entry).
struct LongName {
    /// 13 UTF-16 units per slot, by slot number (1-based).
    units: Vec<u16>,
    expected_next: u8,
    checksum: u8,
}

/// Parses the entries of one directory (its clusters, or the FAT12/16 root area, concatenated).
pub fn parse_dir(bytes: &[u8], kind: FatKind) -> Result<Vec<DirRecord>> {
    let mut out = Vec::new();
    let mut long: Option<LongName> = None;
    for e in bytes.chunks_exact(32) {
        match e[0] {
            0x00 => break,
            0xE5 => {
                long = None;
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & 0x3F == ATTR_LONG_NAME {
            let ord = e[0] & 0x1F;
            let mut slot = [0u16; 13];
            for (k, o) in (1..11).step_by(2).chain((14..26).step_by(2)).chain((28..32).step_by(2)).enumerate() {
                slot[k] = le16(e, o)?;
            }
            if e[0] & 0x40 != 0 && ord >= 1 {
                let mut units = vec![0xFFFFu16; 13 * ord as usize];
                units[13 * (ord as usize - 1)..].copy_from_slice(&slot);
                long = Some(LongName { units, expected_next: ord - 1, checksum: e[13] });
            } else if let Some(l) = long.as_mut().filter(|l| ord >= 1 && ord == l.expected_next && e[13] == l.checksum)
            {
                l.units[13 * (ord as usize - 1)..13 * ord as usize].copy_from_slice(&slot);
                l.expected_next = ord - 1;
            } else {
                long = None;
            }
            continue;
        }
        let gathered = long.take();
        if attr & ATTR_VOLUME_ID != 0 || &e[..11] == b".          " || &e[..11] == b"..         " {
            continue;
        }
        let name = gathered
            .filter(|l| l.expected_next == 0 && l.checksum == short_checksum(e))
            .map(|l| {
                let end = l.units.iter().position(|&u| u == 0).unwrap_or(l.units.len());
                char::decode_utf16(l.units[..end].iter().copied().take_while(|&u| u != 0xFFFF))
                    .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                    .collect::<String>()
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| short_name(e));
        let hi = if kind == FatKind::Fat32 { le16(e, 20)? as u64 } else { 0 };
        out.push(DirRecord {
            name,
            attr,
            first_cluster: hi << 16 | le16(e, 26)? as u64,
            size: le32(e, 28)?,
            created: FatTime { date: le16(e, 16)?, time: le16(e, 14)?, hundredths: e[13] },
            modified: FatTime { date: le16(e, 24)?, time: le16(e, 22)?, hundredths: 0 },
            accessed: FatTime { date: le16(e, 18)?, time: 0, hundredths: 0 },
        });
    }
    Ok(out)
}

/// A cluster chain from `first` through FAT copy 0 (the copy the kernel reads), ending at a
/// free, reserved, bad or end-of-chain entry, at a number out of range, or after as many
/// clusters as the volume has. Empty when `first` is not a data cluster.
pub fn chain(map: &mut FatMap, first: u64) -> Result<Vec<u64>> {
    let count = map.geometry().cluster_count;
    if first < 2 || first >= count + 2 {
        return Ok(Vec::new());
    }
    let mut out = vec![first];
    let mut c = first;
    while (out.len() as u64) <= count {
        let next = map.entry(0, c)? as u64;
        if next < 2 || next >= count + 2 {
            break;
        }
        out.push(next);
        c = next;
    }
    Ok(out)
}

/// A directory's bytes: the FAT12/16 root area when `first` is `None`, else its clusters (each
/// read once: `seen` stops loops and clusters shared with a directory already read).
pub fn read_dir_bytes(
    map: &mut FatMap,
    first: Option<u64>,
    seen: &mut std::collections::HashSet<u64>,
) -> Result<Vec<u8>> {
    match first {
        None => map.read_root_area(),
        Some(first) => {
            let mut bytes = Vec::new();
            for c in chain(map, first)? {
                if !seen.insert(c) {
                    break;
                }
                bytes.extend(map.read_cluster(c)?);
            }
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(name: &[u8; 11], attr: u8, case: u8) -> [u8; 32] {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(name);
        e[11] = attr;
        e[12] = case;
        e[26] = 5;
        e[28] = 42;
        e[24..26].copy_from_slice(&(((2024 - 1980) << 9 | 3 << 5 | 7) as u16).to_le_bytes());
        e[22..24].copy_from_slice(&((13 << 11 | 45 << 5 | (30 / 2)) as u16).to_le_bytes());
        e
    }

    fn long_slots(name: &str, short_entry: &[u8; 32]) -> Vec<[u8; 32]> {
        let mut units: Vec<u16> = name.encode_utf16().collect();
        units.push(0);
        while !units.len().is_multiple_of(13) {
            units.push(0xFFFF);
        }
        let n = units.len() / 13;
        let sum = short_checksum(short_entry);
        (1..=n)
            .rev()
            .map(|ord| {
                let mut e = [0u8; 32];
                e[0] = ord as u8 | if ord == n { 0x40 } else { 0 };
                e[11] = ATTR_LONG_NAME;
                e[13] = sum;
                let part = &units[13 * (ord - 1)..13 * ord];
                for (k, o) in (1..11).step_by(2).chain((14..26).step_by(2)).chain((28..32).step_by(2)).enumerate() {
                    e[o..o + 2].copy_from_slice(&part[k].to_le_bytes());
                }
                e
            })
            .collect()
    }

    #[test]
    fn short_and_long_names_and_fields() {
        let s1 = short(b"README  TXT", 0x20, CASE_BASE_LOWER | CASE_EXT_LOWER);
        let s2 = short(b"LONGNA~1TXT", 0x20, 0);
        let mut bytes = Vec::new();
        bytes.extend(short(b"VOLUME     ", ATTR_VOLUME_ID, 0));
        bytes.extend(s1);
        for slot in long_slots("A long name, ünïcode.txt", &s2) {
            bytes.extend(slot);
        }
        bytes.extend(s2);
        let mut deleted = short(b"GONE    TXT", 0x20, 0);
        deleted[0] = 0xE5;
        bytes.extend(deleted);
        bytes.extend([0u8; 32]);
        bytes.extend(short(b"AFTEREND   ", 0x20, 0));
        let r = parse_dir(&bytes, FatKind::Fat16).unwrap();
        let names: Vec<&str> = r.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["readme.txt", "A long name, ünïcode.txt"]);
        assert_eq!((r[0].first_cluster, r[0].size), (5, 42));
        let (sec, _) = r[0].modified.unix().unwrap();
        assert_eq!(sec, 1_709_819_130, "2024-03-07 13:45:30 read as UTC");
    }

    #[test]
    fn a_long_name_with_a_wrong_checksum_or_a_gap_is_not_used() {
        let s = short(b"LONGNA~1TXT", 0x20, 0);
        let mut slots = long_slots("a name that needs two slots", &s);
        slots[0][13] ^= 1; // checksum of the first (last-numbered) slot
        let mut bytes: Vec<u8> = slots.concat();
        bytes.extend(s);
        let r = parse_dir(&bytes, FatKind::Fat32).unwrap();
        assert_eq!(r[0].name, "LONGNA~1.TXT");
        let slots = long_slots("a name that needs two slots", &s);
        let mut bytes: Vec<u8> = slots[..1].concat(); // slot 1 missing
        bytes.extend(s);
        assert_eq!(parse_dir(&bytes, FatKind::Fat32).unwrap()[0].name, "LONGNA~1.TXT");
    }
}
