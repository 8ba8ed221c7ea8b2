//! NTFS file trees, read with rime-volume's own NTFS parser (`fs::ntfs::files`, on the same
//! records, attributes, data runs and indexes its used-block map uses), so an NTFS image is
//! parsed one way only.
//!
//! Node ids are MFT file record numbers (the root directory is record 5), so hard links share
//! an id. Times come from `$STANDARD_INFORMATION`; the link count counts the non-DOS
//! `$FILE_NAME`s. NTFS keeps Windows security descriptors, not POSIX owners: files read as
//! 0644 (0444 when read-only), directories as 0755, owned by root — what `ntfs-3g` shows
//! without a user mapping. Symlinks are reparse points (`IO_REPARSE_TAG_SYMLINK`, as Windows
//! and ntfs-3g make them) or Interix symlinks (`IntxLNK`). Sparse runs are holes. The NTFS
//! metafiles (`$MFT`, `$Bitmap`, ...) are hidden. Compressed and encrypted files cannot be read
//! and say so.

use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time};
use anyhow::{bail, ensure, Result};
use rime_volume::fs::ntfs::files::{FileData, FileRecord, NAMESPACE_DOS, ROOT};
use rime_volume::fs::ntfs::NtfsMap;
use rime_volume::Region;
use std::ops::Range;

/// Records below this are NTFS metafiles.
const FIRST_USER_RECORD: u64 = 16;
const REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
const FILE_ATTRIBUTE_READONLY: u32 = 0x1;
const FILE_ATTRIBUTE_SYSTEM: u32 = 0x4;
const FILE_ATTRIBUTE_REPARSE: u32 = 0x400;
/// 100 ns intervals between 1601-01-01 and 1970-01-01.
const EPOCH_DIFF: i64 = 116_444_736_000_000_000;

pub struct NtfsTree {
    ntfs: NtfsMap,
}

fn nt_time(t: u64) -> Time {
    let v = t as i64 - EPOCH_DIFF;
    Time { sec: v.div_euclid(10_000_000), nsec: (v.rem_euclid(10_000_000) * 100) as u32 }
}

fn utf16_to_bytes(units: impl Iterator<Item = u16>) -> Vec<u8> {
    char::decode_utf16(units).map(|c| c.unwrap_or('\u{FFFD}')).collect::<String>().into_bytes()
}

/// What a node is, read from its file record.
struct Facts {
    kind: Kind,
    size: u64,
    record: FileRecord,
    data: Option<FileData>,
    link: Option<Vec<u8>>,
}

impl NtfsTree {
    pub fn open(region: Region) -> Result<Option<NtfsTree>> {
        Ok(NtfsMap::open_files(&region)?.map(|ntfs| NtfsTree { ntfs }))
    }

    fn facts(&self, id: NodeId) -> Result<Facts> {
        let record = self.ntfs.file_record(id)?;
        if record.is_dir {
            return Ok(Facts { kind: Kind::Dir, size: 0, record, data: None, link: None });
        }
        if record.attributes & FILE_ATTRIBUTE_REPARSE != 0 {
            if let Some(target) = self.ntfs.reparse_point(&record)?.as_deref().and_then(parse_symlink_reparse) {
                let size = target.len() as u64;
                return Ok(Facts { kind: Kind::Symlink, size, record, data: None, link: Some(target) });
            }
        }
        let data = self.ntfs.file_data(&record)?;
        let size = data.as_ref().map_or(0, |d| d.size);
        if record.attributes & FILE_ATTRIBUTE_SYSTEM != 0 && (10..=4096).contains(&size) {
            // Interix symlink: "IntxLNK\1" and a UTF-16LE target.
            let d = data.as_ref().expect("size > 0");
            let mut body = vec![0u8; size as usize];
            let n = self.ntfs.read_file_data(d, 0, &mut body)?;
            if n == body.len() && body.starts_with(b"IntxLNK\x01") {
                let target = utf16_to_bytes(body[8..].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
                let size = target.len() as u64;
                return Ok(Facts { kind: Kind::Symlink, size, record, data, link: Some(target) });
            }
        }
        Ok(Facts { kind: Kind::File, size, record, data, link: None })
    }
}

/// The target of a symlink reparse point, with `\` turned into `/`; absolute Windows targets
/// (`\??\C:\...`) keep their drive-relative path.
fn parse_symlink_reparse(rp: &[u8]) -> Option<Vec<u8>> {
    if rp.len() < 20 || u32::from_le_bytes(rp[0..4].try_into().ok()?) != REPARSE_TAG_SYMLINK {
        return None;
    }
    let le16 = |o: usize| u16::from_le_bytes([rp[o], rp[o + 1]]) as usize;
    let (sub_off, sub_len, print_off, print_len) = (le16(8), le16(10), le16(12), le16(14));
    let flags = u32::from_le_bytes(rp[16..20].try_into().ok()?);
    let buf = &rp[20..];
    let (off, len) = if print_len > 0 { (print_off, print_len) } else { (sub_off, sub_len) };
    let name = buf.get(off..off + len)?;
    let mut target = utf16_to_bytes(name.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
    for b in target.iter_mut() {
        if *b == b'\\' {
            *b = b'/';
        }
    }
    if flags & 1 == 0 {
        // Absolute: drop a "/??/" prefix and a drive letter.
        let s = String::from_utf8_lossy(&target).into_owned();
        let s = s.strip_prefix("/??/").unwrap_or(&s);
        let s = if s.len() >= 2 && s.as_bytes()[1] == b':' { &s[2..] } else { s };
        target = s.as_bytes().to_vec();
    }
    Some(target)
}

impl FileTree for NtfsTree {
    fn fs_type(&self) -> &str {
        "ntfs"
    }

    fn root(&self) -> NodeId {
        ROOT
    }

    fn stat(&self, id: NodeId) -> Result<Stat> {
        let f = self.facts(id)?;
        let mode = match f.kind {
            Kind::Dir => 0o755,
            Kind::Symlink => 0o777,
            _ if f.record.attributes & FILE_ATTRIBUTE_READONLY != 0 => 0o444,
            _ => 0o644,
        };
        Ok(Stat {
            id,
            kind: f.kind,
            size: f.size,
            mode,
            uid: 0,
            gid: 0,
            nlink: if f.kind == Kind::Dir { 2 } else { f.record.links },
            atime: nt_time(f.record.accessed),
            mtime: nt_time(f.record.modified),
            ctime: nt_time(f.record.changed),
            crtime: Some(nt_time(f.record.created)),
            rdev: None,
            allocated: f.size,
        })
    }

    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for (name, child, namespace) in self.ntfs.list_dir(id)? {
            if namespace == NAMESPACE_DOS || child == id || child < FIRST_USER_RECORD && child != ROOT {
                continue;
            }
            let name = utf16_to_bytes(name.into_iter());
            if id == ROOT && name.first() == Some(&b'$') && child < 64 {
                continue; // $Extend and friends
            }
            out.push(DirEntry { name, id: child });
        }
        Ok(out)
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let f = self.facts(id)?;
        ensure!(f.kind != Kind::Dir, "is a directory");
        match &f.data {
            Some(d) => self.ntfs.read_file_data(d, offset, buf),
            None => Ok(0),
        }
    }

    fn read_link(&self, id: NodeId) -> Result<Vec<u8>> {
        match self.facts(id)?.link {
            Some(t) => Ok(t),
            None => bail!("not a symlink"),
        }
    }

    fn data_ranges(&self, id: NodeId) -> Result<Vec<Range<u64>>> {
        let f = self.facts(id)?;
        Ok(f.data.map(|d| d.data_ranges(self.ntfs.cluster_bytes())).unwrap_or_default())
    }
}
