//! The files of an NTFS volume, for the image explorer: the same record, attribute, run and
//! index parsing the used-block map uses ([`NtfsMap::open_files`] skips only the map's trust
//! checks), so an NTFS image is parsed one way.
//!
//! What a file is comes from its base record: `$STANDARD_INFORMATION` (times, attributes), its
//! `$FILE_NAME`s (the link count counts the non-DOS ones, in extension records too), the unnamed
//! `$DATA` stream (resident or runs; sparse runs are holes) and a `$REPARSE_POINT`. Directory
//! entries come from the `$I30` index. Every number read is checked, as in the map.

use super::{attributes, NtfsMap, Stream, ATTR_DATA, ATTR_FILE_NAME, RECORD_IN_USE, RECORD_IS_DIRECTORY};
use crate::bytes::{le16, le32, le64};
use anyhow::{ensure, Result};
use std::ops::{ControlFlow, Range};

/// The root directory's record.
pub const ROOT: u64 = super::ROOT_RECORD;
const ATTR_STANDARD_INFORMATION: u32 = 0x10;
const ATTR_REPARSE_POINT: u32 = 0xC0;
/// `$FILE_NAME` namespace of a short (8.3) alias, which is not a link of its own.
pub const NAMESPACE_DOS: u8 = 2;
/// Attribute header flags of a data stream.
pub const DATA_COMPRESSED: u16 = 0x0001;
pub const DATA_ENCRYPTED: u16 = 0x4000;
/// Largest reparse point read.
const MAX_REPARSE: usize = 16 * 1024;

/// A file's base record, as the explorer needs it.
pub struct FileRecord {
    pub number: u64,
    pub is_dir: bool,
    /// `$STANDARD_INFORMATION` file attributes (read-only 0x1, system 0x4, reparse 0x400, ...).
    pub attributes: u32,
    /// NT times (100 ns since 1601): creation, modification, MFT record change, access.
    pub created: u64,
    pub modified: u64,
    pub changed: u64,
    pub accessed: u64,
    /// Non-DOS `$FILE_NAME`s: hard links (at least 1).
    pub links: u32,
    record: Vec<u8>,
}

/// A file's unnamed `$DATA` stream.
pub struct FileData {
    pub size: u64,
    /// Attribute header flags ([`DATA_COMPRESSED`], [`DATA_ENCRYPTED`], ...).
    pub flags: u16,
    stream: Stream,
}

impl FileData {
    /// The byte ranges that hold data (sparse runs and the tail past the last run are holes).
    pub fn data_ranges(&self, cluster_bytes: u64) -> Vec<Range<u64>> {
        match &self.stream {
            #[allow(clippy::single_range_in_vec_init)] // one range: the whole (resident) file
            Stream::Resident(v) if !v.is_empty() => vec![0..v.len() as u64],
            Stream::Resident(_) => Vec::new(),
            Stream::NonResident(nr) => {
                let mut out: Vec<Range<u64>> = Vec::new();
                for r in nr.runs.iter().filter(|r| r.lcn.is_some()) {
                    let (s, e) =
                        ((r.vcn * cluster_bytes).min(self.size), ((r.vcn + r.len) * cluster_bytes).min(self.size));
                    if s < e {
                        match out.last_mut() {
                            Some(last) if last.end == s => last.end = e,
                            _ => out.push(s..e),
                        }
                    }
                }
                out
            }
        }
    }
}

impl NtfsMap {
    /// Record `number`, which must be a base record in use.
    pub fn file_record(&self, number: u64) -> Result<FileRecord> {
        let record = self.read_record(number)?;
        let flags = le16(&record, 0x16)?;
        ensure!(flags & RECORD_IN_USE != 0, "MFT record {number} is not in use");
        ensure!(le64(&record, 0x20)? & 0xFFFF_FFFF_FFFF == 0, "MFT record {number} is an extension record");
        let si = match self.stream(number, &record, ATTR_STANDARD_INFORMATION, &[])? {
            Some(Stream::Resident(v)) => v,
            _ => anyhow::bail!("MFT record {number} has no resident $STANDARD_INFORMATION"),
        };
        let mut links = 0;
        for r in self.records_holding(number, &record, ATTR_FILE_NAME, None)? {
            for a in attributes(&r)?.iter().filter(|a| a.ty == ATTR_FILE_NAME && a.resident) {
                if a.value()?.get(0x41).is_some_and(|&ns| ns != NAMESPACE_DOS) {
                    links += 1;
                }
            }
        }
        Ok(FileRecord {
            number,
            is_dir: flags & RECORD_IS_DIRECTORY != 0,
            attributes: le32(&si, 0x20)?,
            created: le64(&si, 0x00)?,
            modified: le64(&si, 0x08)?,
            changed: le64(&si, 0x10)?,
            accessed: le64(&si, 0x18)?,
            links: links.max(1),
            record,
        })
    }

    /// A directory's entries: (name, record number, namespace); DOS aliases included (the
    /// caller skips them).
    pub fn list_dir(&self, dir: u64) -> Result<Vec<(Vec<u16>, u64, u8)>> {
        let mut out = Vec::new();
        let mut too_many = false;
        let is_dir = self.for_each_index_entry(dir, &mut |reference, name, namespace| {
            out.push((name.to_vec(), reference & 0xFFFF_FFFF_FFFF, namespace));
            if out.len() > 1 << 22 {
                too_many = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })?;
        ensure!(is_dir, "MFT record {dir} is not a directory in use");
        ensure!(!too_many, "NTFS directory {dir} has too many entries");
        Ok(out)
    }

    /// The unnamed `$DATA` stream, if the file has one.
    pub fn file_data(&self, file: &FileRecord) -> Result<Option<FileData>> {
        let Some(stream) = self.stream(file.number, &file.record, ATTR_DATA, &[])? else { return Ok(None) };
        let mut flags = 0;
        for r in self.records_holding(file.number, &file.record, ATTR_DATA, Some(&[]))? {
            if let Some(a) = attributes(&r)?.iter().find(|a| a.ty == ATTR_DATA && a.name.is_empty()) {
                flags = le16(a.raw, 0x0C)?;
                break;
            }
        }
        let size = match &stream {
            Stream::Resident(v) => v.len() as u64,
            Stream::NonResident(nr) => nr.data_size,
        };
        Ok(Some(FileData { size, flags, stream }))
    }

    /// Reads data at `offset`; returns the bytes read (short only at the end of the stream).
    pub fn read_file_data(&self, data: &FileData, offset: u64, buf: &mut [u8]) -> Result<usize> {
        ensure!(data.flags & DATA_COMPRESSED == 0, "compressed NTFS files cannot be read yet");
        ensure!(data.flags & DATA_ENCRYPTED == 0, "encrypted NTFS files cannot be read");
        if offset >= data.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(data.size - offset) as usize;
        match &data.stream {
            Stream::Resident(v) => buf[..n].copy_from_slice(&v[offset as usize..offset as usize + n]),
            Stream::NonResident(nr) => self.read_stream(nr, offset, &mut buf[..n])?,
        }
        Ok(n)
    }

    /// The `$REPARSE_POINT` value, if the file has one.
    pub fn reparse_point(&self, file: &FileRecord) -> Result<Option<Vec<u8>>> {
        match self.stream(file.number, &file.record, ATTR_REPARSE_POINT, &[])? {
            None => Ok(None),
            Some(s) => {
                let v = self.stream_bytes(s, "reparse point")?;
                ensure!(v.len() <= MAX_REPARSE, "reparse point of {} bytes", v.len());
                Ok(Some(v))
            }
        }
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.geo.cluster_bytes
    }
}
