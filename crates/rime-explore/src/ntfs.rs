//! NTFS file trees through the `ntfs` crate.
//!
//! Node ids are MFT file record numbers (the root directory is record 5), so hard links share
//! an id. Times come from `$STANDARD_INFORMATION`; the link count counts the non-DOS
//! `$FILE_NAME`s. NTFS keeps Windows security descriptors, not POSIX owners: files read as
//! 0644 (0444 when read-only), directories as 0755, owned by root — what `ntfs-3g` shows
//! without a user mapping. Symlinks are reparse points (`IO_REPARSE_TAG_SYMLINK`, as Windows
//! and ntfs-3g make them) or Interix symlinks (`IntxLNK`). Sparse runs are holes. The NTFS
//! metafiles (`$MFT`, `$Bitmap`, ...) are hidden. Compressed and encrypted files cannot be read
//! and say so.

use crate::io::RegionIo;
use crate::{DirEntry, FileTree, Kind, NodeId, Stat, Time};
use anyhow::{anyhow, bail, ensure, Context, Result};
use ntfs::structured_values::{NtfsFileName, NtfsFileNamespace, NtfsStandardInformation};
use ntfs::{Ntfs, NtfsAttributeType, NtfsFile, NtfsFileFlags, NtfsReadSeek};
use rime_volume::Region;
use std::io::SeekFrom;
use std::ops::Range;
use std::sync::Mutex;

const ROOT: NodeId = 5;
/// Records below this are NTFS metafiles.
const FIRST_USER_RECORD: u64 = 16;
const REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
const FILE_ATTRIBUTE_READONLY: u32 = 0x1;
const FILE_ATTRIBUTE_SYSTEM: u32 = 0x4;
const FILE_ATTRIBUTE_REPARSE: u32 = 0x400;
/// 100 ns intervals between 1601-01-01 and 1970-01-01.
const EPOCH_DIFF: i64 = 116_444_736_000_000_000;

pub struct NtfsTree {
    ntfs: Ntfs,
    io: Mutex<RegionIo>,
}

fn nt_time(t: ntfs::NtfsTime) -> Time {
    let v = t.nt_timestamp() as i64 - EPOCH_DIFF;
    Time { sec: v.div_euclid(10_000_000), nsec: (v.rem_euclid(10_000_000) * 100) as u32 }
}

fn err(e: ntfs::NtfsError) -> anyhow::Error {
    anyhow!("NTFS: {e}")
}

fn utf16_to_bytes(units: impl Iterator<Item = u16>) -> Vec<u8> {
    char::decode_utf16(units).map(|c| c.unwrap_or('\u{FFFD}')).collect::<String>().into_bytes()
}

/// What a node is, read from its file record.
struct Facts {
    kind: Kind,
    size: u64,
    info: NtfsStandardInformation,
    names: u32,
    link: Option<Vec<u8>>,
    flags: u16,
}

impl NtfsTree {
    pub fn open(region: Region) -> Result<Option<NtfsTree>> {
        if region.len < 512 {
            return Ok(None);
        }
        let mut bs = [0u8; 512];
        region.read_at(0, &mut bs)?;
        if &bs[3..11] != b"NTFS    " {
            return Ok(None);
        }
        let mut io = RegionIo::new(region);
        let mut ntfs = Ntfs::new(&mut io).map_err(err).context("damaged NTFS filesystem")?;
        ntfs.read_upcase_table(&mut io).map_err(err).context("damaged NTFS filesystem")?;
        Ok(Some(NtfsTree { ntfs, io: Mutex::new(io) }))
    }

    fn file<'n>(&'n self, io: &mut RegionIo, id: NodeId) -> Result<NtfsFile<'n>> {
        let f = self.ntfs.file(io, id).map_err(err).with_context(|| format!("NTFS file record {id}"))?;
        ensure!(f.flags().contains(NtfsFileFlags::IN_USE), "NTFS file record {id} is not in use");
        Ok(f)
    }

    /// The raw value of the first attribute of type `ty` (unnamed for $DATA), if any.
    fn attribute_bytes(
        &self,
        io: &mut RegionIo,
        file: &NtfsFile,
        ty: NtfsAttributeType,
        limit: u64,
    ) -> Result<Option<Vec<u8>>> {
        let mut attrs = file.attributes();
        while let Some(item) = attrs.next(io) {
            let item = item.map_err(err)?;
            let a = item.to_attribute().map_err(err)?;
            if a.ty().map_err(err)? != ty {
                continue;
            }
            let len = a.value_length();
            ensure!(len <= limit, "NTFS attribute too large ({len} bytes)");
            let mut v = a.value(io).map_err(err)?;
            let mut buf = vec![0u8; len as usize];
            let mut done = 0;
            while done < buf.len() {
                let n = v.read(io, &mut buf[done..]).map_err(err)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            buf.truncate(done);
            return Ok(Some(buf));
        }
        Ok(None)
    }

    fn facts(&self, io: &mut RegionIo, id: NodeId) -> Result<Facts> {
        let file = self.file(io, id)?;
        let info = file.info().map_err(err)?;
        let attrs = info.file_attributes().bits();
        let mut names = 0;
        let mut list = file.attributes();
        while let Some(item) = list.next(io) {
            let item = item.map_err(err)?;
            let a = item.to_attribute().map_err(err)?;
            if a.ty().map_err(err)? == NtfsAttributeType::FileName {
                if let Ok(n) = a.structured_value::<_, NtfsFileName>(io) {
                    if n.namespace() != NtfsFileNamespace::Dos {
                        names += 1;
                    }
                }
            }
        }
        let flags = 0;
        if file.is_directory() {
            return Ok(Facts { kind: Kind::Dir, size: 0, info, names: names.max(1), link: None, flags });
        }
        if attrs & FILE_ATTRIBUTE_REPARSE != 0 {
            if let Some(rp) = self.attribute_bytes(io, &file, NtfsAttributeType::ReparsePoint, 65536)? {
                if let Some(target) = parse_symlink_reparse(&rp) {
                    let size = target.len() as u64;
                    return Ok(Facts {
                        kind: Kind::Symlink,
                        size,
                        info,
                        names: names.max(1),
                        link: Some(target),
                        flags,
                    });
                }
            }
        }
        let (size, flags) = match file.data(io, "") {
            Some(item) => {
                let item = item.map_err(err)?;
                let a = item.to_attribute().map_err(err)?;
                (a.value_length(), a.flags().bits())
            }
            None => (0, 0),
        };
        if attrs & FILE_ATTRIBUTE_SYSTEM != 0 && (10..=4096).contains(&size) {
            // Interix symlink: "IntxLNK\1" and a UTF-16LE target.
            let mut head = [0u8; 8];
            if self.read_data(io, &file, 0, &mut head)? == 8 && &head == b"IntxLNK\x01" {
                let mut body = vec![0u8; size as usize - 8];
                let n = self.read_data(io, &file, 8, &mut body)?;
                body.truncate(n);
                let target = utf16_to_bytes(body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
                return Ok(Facts {
                    kind: Kind::Symlink,
                    size: target.len() as u64,
                    info,
                    names: names.max(1),
                    link: Some(target),
                    flags,
                });
            }
        }
        Ok(Facts { kind: Kind::File, size, info, names: names.max(1), link: None, flags })
    }

    fn read_data(&self, io: &mut RegionIo, file: &NtfsFile, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let Some(item) = file.data(io, "") else {
            return Ok(0);
        };
        let item = item.map_err(err)?;
        let a = item.to_attribute().map_err(err)?;
        let flags = a.flags().bits();
        ensure!(flags & 0x0001 == 0, "compressed NTFS files cannot be read yet");
        ensure!(flags & 0x4000 == 0, "encrypted NTFS files cannot be read");
        let len = a.value_length();
        if offset >= len {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(len - offset) as usize;
        let mut v = a.value(io).map_err(err)?;
        v.seek(io, SeekFrom::Start(offset)).map_err(err)?;
        let mut done = 0;
        while done < want {
            let n = v.read(io, &mut buf[done..want]).map_err(err)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf[done..want].fill(0);
        Ok(want)
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
        let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let f = self.facts(&mut io, id)?;
        let attrs = f.info.file_attributes().bits();
        let mode = match f.kind {
            Kind::Dir => 0o755,
            Kind::Symlink => 0o777,
            _ if attrs & FILE_ATTRIBUTE_READONLY != 0 => 0o444,
            _ => 0o644,
        };
        let _ = f.flags;
        Ok(Stat {
            id,
            kind: f.kind,
            size: f.size,
            mode,
            uid: 0,
            gid: 0,
            nlink: if f.kind == Kind::Dir { 2 } else { f.names },
            atime: nt_time(f.info.access_time()),
            mtime: nt_time(f.info.modification_time()),
            ctime: nt_time(f.info.mft_record_modification_time()),
            crtime: Some(nt_time(f.info.creation_time())),
            rdev: None,
            allocated: f.size,
        })
    }

    fn read_dir(&self, id: NodeId) -> Result<Vec<DirEntry>> {
        let mut guard = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let io = &mut *guard;
        let file = self.file(io, id)?;
        ensure!(file.is_directory(), "not a directory");
        let index = file.directory_index(io).map_err(err)?;
        let mut entries = index.entries();
        let mut out = Vec::new();
        while let Some(entry) = entries.next(io) {
            let entry = entry.map_err(err)?;
            let Some(key) = entry.key() else { continue };
            let key = key.map_err(err)?;
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let child = entry.file_reference().file_record_number();
            if child == id || child < FIRST_USER_RECORD && child != ROOT {
                continue;
            }
            let name = utf16_to_bytes(key.name().u16_iter());
            if id == ROOT && name.first() == Some(&b'$') && child < 64 {
                continue; // $Extend and friends
            }
            out.push(DirEntry { name, id: child });
            ensure!(out.len() < 1 << 22, "NTFS directory has too many entries");
        }
        Ok(out)
    }

    fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let file = self.file(&mut io, id)?;
        ensure!(!file.is_directory(), "is a directory");
        self.read_data(&mut io, &file, offset, buf)
    }

    fn read_link(&self, id: NodeId) -> Result<Vec<u8>> {
        let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        match self.facts(&mut io, id)?.link {
            Some(t) => Ok(t),
            None => bail!("not a symlink"),
        }
    }

    fn data_ranges(&self, id: NodeId) -> Result<Vec<Range<u64>>> {
        let mut guard = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let io = &mut *guard;
        let file = self.file(io, id)?;
        let Some(item) = file.data(io, "") else {
            return Ok(Vec::new());
        };
        let item = item.map_err(err)?;
        let a = item.to_attribute().map_err(err)?;
        let len = a.value_length();
        if len == 0 {
            return Ok(Vec::new());
        }
        let value = a.value(io).map_err(err)?;
        let ntfs::attribute_value::NtfsAttributeValue::NonResident(nr) = value else {
            return Ok(vec![0..len]);
        };
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = 0u64;
        for run in nr.data_runs() {
            let run = run.map_err(err)?;
            let end = pos.saturating_add(run.allocated_size()).min(len);
            if run.data_position().value().is_some() && pos < end {
                match out.last_mut() {
                    Some(last) if last.end == pos => last.end = end,
                    _ => out.push(pos..end),
                }
            }
            pos = pos.saturating_add(run.allocated_size());
            if pos >= len {
                break;
            }
        }
        Ok(out)
    }
}
