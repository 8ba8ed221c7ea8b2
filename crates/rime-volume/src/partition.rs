//! Partition tables: GPT (with its CRCs checked) and MBR (with extended/logical partitions).
//!
//! A partition table that does not fit its disk, or whose partitions overlap, is an error: Rime
//! will not guess which of two overlapping filesystems is real.

use crate::bytes::{le32, le64};
use crate::device::Region;
use anyhow::{bail, ensure, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
}

impl TableKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            TableKind::Gpt => "gpt",
            TableKind::Mbr => "mbr",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based number, as Linux names it (`sda2` is number 2; MBR logical partitions start at 5).
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// The GPT type GUID or the MBR type byte, as text.
    pub type_id: String,
    /// GPT partition name (empty for MBR).
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub sector_size: u64,
    pub partitions: Vec<Partition>,
}

fn guid_text(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10..16].iter().map(|b| format!("{b:02X}")).collect::<String>()
    )
}

/// Reads the partition table of `disk`: `Ok(None)` when there is none.
pub fn read(disk: &Region) -> Result<Option<PartitionTable>> {
    if disk.len < 1024 {
        return Ok(None);
    }
    let mut mbr = [0u8; 512];
    disk.read_at(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let protective = (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xEE);
    if protective {
        for sector_size in [512u64, 4096] {
            if let Some(table) = read_gpt(disk, sector_size)? {
                return Ok(Some(table));
            }
        }
        bail!("the disk has a protective MBR but no valid GPT header");
    }
    read_mbr(disk, &mbr)
}

fn read_gpt(disk: &Region, ss: u64) -> Result<Option<PartitionTable>> {
    if disk.len < ss * 3 {
        return Ok(None);
    }
    let mut hdr = vec![0u8; ss as usize];
    disk.read_at(ss, &mut hdr)?;
    if &hdr[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let header_size = le32(&hdr, 12)? as usize;
    ensure!((92..=ss as usize).contains(&header_size), "GPT header size {header_size} is invalid");
    let mut check = hdr[..header_size].to_vec();
    check[16..20].fill(0);
    ensure!(crc32fast::hash(&check) == le32(&hdr, 16)?, "GPT header checksum mismatch");
    let sectors = disk.len / ss;
    let last_usable = le64(&hdr, 48)?;
    let entries_lba = le64(&hdr, 72)?;
    let count = le32(&hdr, 80)? as u64;
    let entry_size = le32(&hdr, 84)? as u64;
    ensure!(
        entry_size >= 128 && entry_size.is_power_of_two() && entry_size <= 4096,
        "GPT entry size {entry_size} is invalid"
    );
    ensure!(count <= 16384, "GPT claims {count} partition entries");
    let table_bytes = count * entry_size;
    ensure!(
        entries_lba >= 2 && (entries_lba * ss).checked_add(table_bytes).is_some_and(|e| e <= disk.len),
        "the GPT partition entries lie outside the disk"
    );
    ensure!(
        last_usable < sectors,
        "the partition table does not fit the disk: it describes {} sectors, the disk has {sectors}",
        last_usable + 1
    );
    let mut entries = vec![0u8; table_bytes as usize];
    disk.read_at(entries_lba * ss, &mut entries)?;
    ensure!(crc32fast::hash(&entries) == le32(&hdr, 88)?, "GPT partition entries checksum mismatch");
    let mut partitions = Vec::new();
    for (i, e) in entries.chunks_exact(entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32)?, le64(e, 40)?);
        ensure!(first <= last, "GPT partition {} ends before it starts", i + 1);
        ensure!(
            last < sectors,
            "the partition table does not fit the disk: partition {} ends at sector {last}, the disk has {sectors}",
            i + 1
        );
        let name: String = char::decode_utf16(e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])))
            .map(|c| c.unwrap_or('?'))
            .take_while(|&c| c != '\0')
            .collect();
        partitions.push(Partition {
            number: i as u32 + 1,
            start: first * ss,
            len: (last - first + 1) * ss,
            type_id: guid_text(&crate::bytes::field(e, 0)?),
            name,
        });
    }
    check_overlaps(&mut partitions)?;
    Ok(Some(PartitionTable { kind: TableKind::Gpt, sector_size: ss, partitions }))
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

fn read_mbr(disk: &Region, mbr: &[u8; 512]) -> Result<Option<PartitionTable>> {
    const SS: u64 = 512;
    let sectors = disk.len / SS;
    // An MBR sector is a fixed 512 bytes: the four 16-byte entries at 446 are always inside it.
    let entry = |sector: &[u8; 512], i: usize| {
        let e: [u8; 16] = sector[446 + i * 16..446 + (i + 1) * 16].try_into().expect("16 bytes");
        let word = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]) as u64;
        (e[0], e[4], word(8), word(12))
    };
    // Not an MBR unless every entry looks like one (a FAT or NTFS boot sector also ends in 55AA).
    for i in 0..4 {
        let (boot, kind, start, len) = entry(mbr, i);
        if boot != 0 && boot != 0x80 {
            return Ok(None);
        }
        if kind != 0 && (start == 0 || len == 0) {
            return Ok(None);
        }
    }
    let mut partitions = Vec::new();
    let fits = |start: u64, len: u64, n: u32| -> Result<()> {
        ensure!(
            start + len <= sectors,
            "the partition table does not fit the disk: partition {n} ends at sector {}, the disk has {sectors}",
            start + len
        );
        Ok(())
    };
    let mut extended = None;
    for i in 0..4 {
        let (_, kind, start, len) = entry(mbr, i);
        if kind == 0 {
            continue;
        }
        fits(start, len, i as u32 + 1)?;
        if is_extended(kind) {
            ensure!(extended.is_none(), "the MBR has more than one extended partition");
            extended = Some((start, len));
        } else {
            partitions.push(Partition {
                number: i as u32 + 1,
                start: start * SS,
                len: len * SS,
                type_id: format!("0x{kind:02X}"),
                name: String::new(),
            });
        }
    }
    if partitions.is_empty() && extended.is_none() {
        return Ok(None);
    }
    if let Some((ext_start, ext_len)) = extended {
        // Walk the chain of extended boot records; each link is relative to the extended
        // partition's start, and a chain that loops or leaves the extended partition is an error.
        let mut ebr_rel = 0u64;
        let mut number = 5;
        let mut seen = std::collections::HashSet::new();
        loop {
            ensure!(seen.insert(ebr_rel) && seen.len() <= 256, "the extended partition's EBR chain loops");
            ensure!(ebr_rel < ext_len, "an EBR lies outside the extended partition");
            let ebr_lba = ext_start + ebr_rel;
            let mut ebr = [0u8; 512];
            disk.read_at(ebr_lba * SS, &mut ebr)?;
            ensure!(ebr[510..512] == [0x55, 0xAA], "EBR at sector {ebr_lba} has no signature");
            let (_, kind, start, len) = entry(&ebr, 0);
            if kind != 0 && len > 0 {
                fits(ebr_lba + start, len, number)?;
                ensure!(
                    ebr_lba + start + len <= ext_start + ext_len,
                    "logical partition {number} leaves the extended partition"
                );
                partitions.push(Partition {
                    number,
                    start: (ebr_lba + start) * SS,
                    len: len * SS,
                    type_id: format!("0x{kind:02X}"),
                    name: String::new(),
                });
                number += 1;
            }
            let (_, next_kind, next_start, _) = entry(&ebr, 1);
            if next_kind == 0 || next_start == 0 {
                break;
            }
            ebr_rel = next_start;
        }
    }
    check_overlaps(&mut partitions)?;
    Ok(Some(PartitionTable { kind: TableKind::Mbr, sector_size: SS, partitions }))
}

fn check_overlaps(partitions: &mut [Partition]) -> Result<()> {
    partitions.sort_by_key(|p| p.start);
    for w in partitions.windows(2) {
        if w[0].start + w[0].len > w[1].start {
            bail!("partitions {} and {} overlap", w[0].number, w[1].number);
        }
    }
    Ok(())
}
