//! NTFS used-block map from the `$Bitmap` file (MFT record 6), and file extents for exclusions.
//!
//! The boot sector gives the geometry and the first cluster of `$MFT`. Record 0 (`$MFT` itself)
//! maps the MFT, record 6 (`$Bitmap`) holds one bit per cluster. Records are protected by update
//! sequence arrays (fixups), which are checked and undone; attributes may be spread over several
//! records through an `$ATTRIBUTE_LIST`. The bitmap is read on demand for the range asked, through
//! one 64 KiB window, so memory stays bounded whatever the volume size.
//!
//! Used: every cluster whose bitmap bit is set, the boot sector, and every byte past the last
//! cluster (the backup boot sector sits in the volume's last sector). A volume marked dirty
//! (check scheduled, unclean shutdown) or whose `$LogFile` is not clean (changes Windows has
//! still to replay: a crash, or "fast startup" hibernation) is not trusted: its bitmap may lag
//! behind its allocations. Every number read from disk
//! — record and index sizes, attribute offsets, data run lengths and offsets — is checked before
//! use; nonsense is an error, never a panic or a read outside the region.
//!
//! `file_extents` resolves a path through the `$I30` directory indexes (case-insensitively, as
//! Windows does) and returns where a file's data lives, for `--exclude-file`.

#[path = "ntfs_files.rs"]
pub mod files;

use super::Untrusted;
use crate::bytes::{le16, le32, le64};
use crate::device::Region;
use crate::usedmap::{push_range, FileExtent, FileExtents, SwapFile, UsedMap};
use anyhow::{bail, ensure, Context, Result};
use std::ops::{ControlFlow, Range};

/// Bytes of the bitmap held in memory at a time.
const WINDOW: u64 = 64 * 1024;
/// More data runs than this in one stream is treated as nonsense (bounds memory).
const MAX_RUNS: usize = 1 << 20;
/// Largest attribute list or index bitmap read into memory.
const MAX_SMALL_STREAM: u64 = 4 << 20;

const ATTR_LIST: u32 = 0x20;
const ATTR_FILE_NAME: u32 = 0x30;
const ATTR_VOLUME_INFORMATION: u32 = 0x70;
const ATTR_DATA: u32 = 0x80;
const ATTR_INDEX_ROOT: u32 = 0x90;
const ATTR_INDEX_ALLOCATION: u32 = 0xA0;
const ATTR_BITMAP: u32 = 0xB0;
const ATTR_END: u32 = 0xFFFF_FFFF;

const RECORD_IN_USE: u16 = 0x1;
/// `$LogFile` restart area: no client has the log open.
const LOGFILE_NO_CLIENT: u16 = 0xFFFF;
/// `$LogFile` restart area flag: the volume was left clean.
const RESTART_VOLUME_IS_CLEAN: u16 = 0x2;
const RECORD_IS_DIRECTORY: u16 = 0x2;
/// $VOLUME_INFORMATION flag: a check is scheduled, or the volume was not shut down cleanly.
const VOLUME_IS_DIRTY: u16 = 0x1;

const MFT_RECORD: u64 = 0;
const LOGFILE_RECORD: u64 = 2;
const VOLUME_RECORD: u64 = 3;
const ROOT_RECORD: u64 = 5;
const BITMAP_RECORD: u64 = 6;

/// Names Windows gives its paging, hibernation and swap files: worth excluding from an image.
pub fn default_exclusions() -> &'static [&'static str] {
    &["/pagefile.sys", "/hiberfil.sys", "/swapfile.sys"]
}

// ---------------------------------------------------------------------------------------------
// Checked reads (`crate::bytes`, plus slices and bytes here): every offset may come from disk.
// ---------------------------------------------------------------------------------------------

fn get(b: &[u8], off: usize, len: usize) -> Result<&[u8]> {
    off.checked_add(len)
        .and_then(|end| b.get(off..end))
        .with_context(|| format!("structure field at {off}+{len} lies outside its {}-byte record", b.len()))
}
fn r8(b: &[u8], o: usize) -> Result<u8> {
    Ok(get(b, o, 1)?[0])
}
fn utf16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

// ---------------------------------------------------------------------------------------------
// Boot sector
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct NtfsGeometry {
    pub bytes_per_sector: u64,
    pub cluster_bytes: u64,
    pub total_sectors: u64,
    /// Clusters in the filesystem (the bitmap has one bit for each).
    pub clusters: u64,
    pub mft_lcn: u64,
    pub mft_mirror_lcn: u64,
    pub record_bytes: u64,
}

/// Decodes the boot sector's "clusters per record" byte: positive is clusters, negative is
/// log2 of the size in bytes.
fn record_size(raw: u8, cluster: u64, what: &str) -> Result<u64> {
    let v = raw as i8;
    let size = if v > 0 {
        v as u64 * cluster
    } else {
        let shift = -(v as i32);
        ensure!((9..=16).contains(&shift), "{what} size 2^{shift} is invalid");
        1u64 << shift
    };
    ensure!(size.is_power_of_two() && (512..=65536).contains(&size), "{what} size {size} is invalid");
    Ok(size)
}

impl NtfsGeometry {
    /// Parses and validates the boot sector (its first 512 bytes). `Ok(None)`: not NTFS.
    pub fn parse(b: &[u8], region_len: u64) -> Result<Option<NtfsGeometry>> {
        if b.len() < 512 || &b[3..11] != b"NTFS    " {
            return Ok(None);
        }
        ensure!(b[510] == 0x55 && b[511] == 0xAA, "boot sector signature is missing");
        let bps = le16(b, 0x0B)? as u64;
        ensure!(bps.is_power_of_two() && (512..=4096).contains(&bps), "bytes per sector {bps} is invalid");
        let raw = b[0x0D];
        // Since Windows 10 1709 values above 0x80 are negative powers of two (large clusters).
        let spc = if raw > 0x80 {
            let shift = 256 - raw as u32;
            ensure!(shift <= 12, "sectors per cluster 2^{shift} is invalid");
            1u64 << shift
        } else {
            raw as u64
        };
        ensure!(spc.is_power_of_two(), "sectors per cluster {raw:#x} is invalid");
        let cluster_bytes = spc * bps;
        ensure!(cluster_bytes <= 2 << 20, "cluster size {cluster_bytes} is invalid");
        let total_sectors = le64(b, 0x28)?;
        let fs_bytes = total_sectors.saturating_mul(bps);
        ensure!(
            fs_bytes <= region_len,
            "the filesystem ({fs_bytes} bytes) is larger than the volume ({region_len} bytes)"
        );
        let clusters = total_sectors / spc;
        ensure!(clusters >= 16, "the filesystem has only {clusters} clusters");
        let mft_lcn = le64(b, 0x30)?;
        let mft_mirror_lcn = le64(b, 0x38)?;
        ensure!(mft_lcn < clusters, "MFT cluster {mft_lcn} is outside the filesystem");
        ensure!(mft_mirror_lcn < clusters, "MFT mirror cluster {mft_mirror_lcn} is outside the filesystem");
        let record_bytes = record_size(b[0x40], cluster_bytes, "MFT record")?;
        Ok(Some(NtfsGeometry {
            bytes_per_sector: bps,
            cluster_bytes,
            total_sectors,
            clusters,
            mft_lcn,
            mft_mirror_lcn,
            record_bytes,
        }))
    }

    fn fs_bytes(&self) -> u64 {
        self.clusters * self.cluster_bytes
    }
}

// ---------------------------------------------------------------------------------------------
// Records, attributes, data runs
// ---------------------------------------------------------------------------------------------

/// Checks and undoes the update sequence array of a multi-sector record ("FILE" or "INDX"):
/// the last two bytes of every 512-byte stride must hold the update sequence number, and are
/// replaced by the saved originals.
fn apply_fixups(buf: &mut [u8], magic: &[u8; 4]) -> Result<()> {
    ensure!(buf.len() >= 512 && buf.len().is_multiple_of(512), "record size {} is invalid", buf.len());
    ensure!(
        &buf[0..4] == magic,
        "record magic is {:?}, expected {:?}",
        String::from_utf8_lossy(&buf[0..4]),
        String::from_utf8_lossy(magic)
    );
    let usa_off = le16(buf, 4)? as usize;
    let usa_count = le16(buf, 6)? as usize;
    let strides = buf.len() / 512;
    ensure!(usa_count == strides + 1, "update sequence array has {usa_count} entries for {strides} sectors");
    ensure!(
        usa_off >= 8 && usa_off.is_multiple_of(2) && usa_off + 2 * usa_count <= 512,
        "update sequence array offset {usa_off} is invalid"
    );
    let usn = [buf[usa_off], buf[usa_off + 1]];
    for i in 0..strides {
        let p = (i + 1) * 512 - 2;
        ensure!(buf[p..p + 2] == usn, "torn record: sector {i} does not end with the update sequence number");
        let saved = usa_off + 2 * (i + 1);
        buf[p] = buf[saved];
        buf[p + 1] = buf[saved + 1];
    }
    Ok(())
}

/// One data run: `len` clusters at virtual cluster `vcn`, stored at `lcn` (`None`: sparse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub vcn: u64,
    pub lcn: Option<u64>,
    pub len: u64,
}

/// Decodes a mapping pairs array starting at `vcn`.
fn decode_runs(mp: &[u8], mut vcn: u64, clusters: u64, out: &mut Vec<Run>) -> Result<()> {
    let mut pos = 0usize;
    let mut lcn: i64 = 0;
    loop {
        let Some(&h) = mp.get(pos) else { bail!("data runs run off the end of their attribute") };
        if h == 0 {
            return Ok(());
        }
        let (ls, os) = ((h & 0xF) as usize, (h >> 4) as usize);
        ensure!((1..=8).contains(&ls) && os <= 8, "data run header {h:#04x} is invalid");
        let field = get(mp, pos + 1, ls + os)?;
        let mut len = 0u64;
        for (i, &byte) in field[..ls].iter().enumerate() {
            len |= (byte as u64) << (8 * i);
        }
        ensure!(len > 0 && len <= clusters, "data run length {len} is invalid");
        let run_lcn = if os == 0 {
            None
        } else {
            let mut delta = 0u64;
            for (i, &byte) in field[ls..].iter().enumerate() {
                delta |= (byte as u64) << (8 * i);
            }
            // Sign-extend.
            if os < 8 && field[ls + os - 1] & 0x80 != 0 {
                delta |= u64::MAX << (8 * os);
            }
            lcn = lcn.checked_add(delta as i64).context("data run offset overflows")?;
            ensure!(lcn >= 0, "data run starts at negative cluster {lcn}");
            let l = lcn as u64;
            ensure!(
                l.checked_add(len).is_some_and(|e| e <= clusters),
                "data run {l}+{len} lies outside the filesystem ({clusters} clusters)"
            );
            Some(l)
        };
        ensure!(out.len() < MAX_RUNS, "more than {MAX_RUNS} data runs");
        out.push(Run { vcn, lcn: run_lcn, len });
        vcn = vcn.checked_add(len).context("data runs overflow")?;
        pos += 1 + ls + os;
    }
}

/// Fails when two non-sparse runs share a cluster.
fn check_no_overlap(runs: &[Run]) -> Result<()> {
    let mut placed: Vec<(u64, u64)> = runs.iter().filter_map(|r| r.lcn.map(|l| (l, l + r.len))).collect();
    placed.sort_unstable();
    for w in placed.windows(2) {
        ensure!(w[0].1 <= w[1].0, "data runs overlap at cluster {}", w[1].0);
    }
    Ok(())
}

/// An attribute header inside a record, checked.
struct Attr<'a> {
    ty: u32,
    name: Vec<u16>,
    raw: &'a [u8],
    resident: bool,
}

impl Attr<'_> {
    fn value(&self) -> Result<&[u8]> {
        let len = le32(self.raw, 0x10)? as usize;
        let off = le16(self.raw, 0x14)? as usize;
        get(self.raw, off, len)
    }
}

/// The attributes of a (fixed-up) MFT record.
fn attributes(rec: &[u8]) -> Result<Vec<Attr<'_>>> {
    let first = le16(rec, 0x14)? as usize;
    let used = le32(rec, 0x18)? as usize;
    ensure!(used <= rec.len(), "record claims {used} bytes in use, more than its {} bytes", rec.len());
    ensure!(first >= 0x2A && first < used, "first attribute offset {first} is invalid");
    let mut out = Vec::new();
    let mut off = first;
    loop {
        let ty = le32(get(rec, 0, used)?, off)?;
        if ty == ATTR_END {
            return Ok(out);
        }
        let len = le32(rec, off + 4)? as usize;
        ensure!(
            len >= 0x18 && len.is_multiple_of(8) && off + len <= used,
            "attribute {ty:#x} at {off} has invalid length {len}"
        );
        let raw = &rec[off..off + len];
        let resident = raw[8] == 0;
        let name_len = raw[9] as usize;
        let name_off = le16(raw, 0x0A)? as usize;
        let name = if name_len == 0 { Vec::new() } else { utf16(get(raw, name_off, 2 * name_len)?) };
        if resident {
            let vlen = le32(raw, 0x10)? as usize;
            let voff = le16(raw, 0x14)? as usize;
            get(raw, voff, vlen).with_context(|| format!("resident attribute {ty:#x}"))?;
        } else {
            ensure!(len >= 0x40, "non-resident attribute {ty:#x} is too short ({len} bytes)");
            let mp = le16(raw, 0x20)? as usize;
            ensure!(mp >= 0x40 && mp < len, "mapping pairs offset {mp} of attribute {ty:#x} is invalid");
        }
        out.push(Attr { ty, name, raw, resident });
        off += len;
    }
}

/// A non-resident stream: sizes and data runs, in VCN order, contiguous from VCN 0.
#[derive(Clone, Debug)]
pub struct NonResident {
    pub data_size: u64,
    pub alloc_size: u64,
    pub init_size: u64,
    pub runs: Vec<Run>,
}

impl NonResident {
    fn vcns(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.vcn + r.len)
    }
}

/// An attribute's value, wherever it lives.
pub enum Stream {
    Resident(Vec<u8>),
    NonResident(NonResident),
}

/// Builds one stream from its attribute extents (each a non-resident attribute header).
fn join_extents(extents: &[&[u8]], clusters: u64, cluster_bytes: u64) -> Result<NonResident> {
    let mut ext: Vec<(u64, &[u8])> = extents.iter().map(|raw| Ok((le64(raw, 0x10)?, *raw))).collect::<Result<_>>()?;
    ext.sort_by_key(|e| e.0);
    ensure!(ext.first().is_some_and(|e| e.0 == 0), "no attribute extent starts at VCN 0");
    let first = ext[0].1;
    let alloc_size = le64(first, 0x28)?;
    let data_size = le64(first, 0x30)?;
    let init_size = le64(first, 0x38)?;
    let mut runs = Vec::new();
    for (lowest, raw) in &ext {
        let start = runs.last().map_or(0, |r: &Run| r.vcn + r.len);
        ensure!(*lowest == start, "attribute extent starts at VCN {lowest}, expected {start}");
        let highest = le64(raw, 0x18)?;
        let mp = le16(raw, 0x20)? as usize;
        let before = runs.len();
        decode_runs(&raw[mp..], *lowest, clusters, &mut runs)?;
        let end = runs.last().map_or(0, |r| r.vcn + r.len);
        if runs.len() > before && highest != 0 {
            ensure!(
                highest.checked_add(1) == Some(end),
                "attribute extent ends at VCN {end}, its header says {highest}"
            );
        }
    }
    check_no_overlap(&runs)?;
    let nr = NonResident { data_size, alloc_size, init_size, runs };
    let mapped = nr.vcns().saturating_mul(cluster_bytes);
    ensure!(data_size <= mapped, "stream size {data_size} exceeds its {mapped} mapped bytes");
    Ok(nr)
}

// ---------------------------------------------------------------------------------------------
// The map
// ---------------------------------------------------------------------------------------------

enum Bitmap {
    Resident(Vec<u8>),
    NonResident(NonResident),
}

pub struct NtfsMap {
    region: Region,
    geo: NtfsGeometry,
    mft: NonResident,
    mft_records: u64,
    bitmap: Bitmap,
    /// (window start within the bitmap, bytes).
    window: Option<(u64, Vec<u8>)>,
}

impl NtfsMap {
    /// Recognises an NTFS filesystem. `Ok(None)`: not NTFS; `Err`: NTFS but unusable, or not
    /// to be trusted for a map ([`Untrusted`]: dirty, or `$LogFile` not clean).
    pub fn probe(region: &Region) -> Result<Option<NtfsMap>> {
        let Some(mut map) = Self::open_files(region)? else {
            return Ok(None);
        };
        map.check_trusted()?;
        map.load_bitmap()?;
        Ok(Some(map))
    }

    /// Opens an NTFS filesystem for reading its files (the explorer): boot sector and `$MFT`
    /// only, without the checks a map needs (a dirty volume can still be browsed).
    pub fn open_files(region: &Region) -> Result<Option<NtfsMap>> {
        if region.len < 512 {
            return Ok(None);
        }
        let mut boot = vec![0u8; 512];
        region.read_at(0, &mut boot)?;
        let Some(geo) = NtfsGeometry::parse(&boot, region.len)? else {
            return Ok(None);
        };
        let region = region.clone();
        let rb = geo.record_bytes;

        // Record 0 ($MFT) sits at the MFT's first cluster; its base $DATA extent maps the MFT
        // far enough to find any extension records.
        let mut rec0 = vec![0u8; rb as usize];
        let at = geo.mft_lcn * geo.cluster_bytes;
        ensure!(at + rb <= geo.fs_bytes(), "MFT record 0 lies outside the filesystem");
        region.read_at(at, &mut rec0)?;
        apply_fixups(&mut rec0, b"FILE").context("MFT record 0")?;
        let boot_extents: Vec<&[u8]> = attributes(&rec0)
            .context("MFT record 0")?
            .into_iter()
            .filter(|a| a.ty == ATTR_DATA && a.name.is_empty() && !a.resident)
            .map(|a| a.raw)
            .filter(|raw| le64(raw, 0x10).ok() == Some(0))
            .collect();
        ensure!(boot_extents.len() == 1, "MFT record 0 has no (or more than one) $DATA extent at VCN 0");
        let boot_mft = join_extents(&boot_extents, geo.clusters, geo.cluster_bytes).context("$MFT data runs")?;
        ensure!(
            boot_mft.runs.first().and_then(|r| r.lcn) == Some(geo.mft_lcn),
            "$MFT's first data run does not start at the boot sector's MFT cluster"
        );
        let mut map = NtfsMap {
            region,
            mft_records: boot_mft.data_size / rb,
            mft: boot_mft,
            geo,
            bitmap: Bitmap::Resident(Vec::new()),
            window: None,
        };
        // The whole $MFT, through its attribute list if it has one.
        match map.stream(MFT_RECORD, &rec0, ATTR_DATA, &[]).context("$MFT")? {
            Some(Stream::NonResident(nr)) => {
                map.mft_records = nr.data_size / rb;
                map.mft = nr;
            }
            _ => bail!("$MFT has no non-resident data"),
        }
        ensure!(map.mft_records > BITMAP_RECORD.max(ROOT_RECORD), "the MFT has only {} records", map.mft_records);
        Ok(Some(map))
    }

    /// Refuses (as [`Untrusted`]) a volume whose `$Bitmap` may lag behind its allocations.
    fn check_trusted(&self) -> Result<()> {
        let map = self;
        // A dirty volume may carry allocations its $Bitmap does not show yet (partclone and
        // ntfsprogs refuse such volumes too): better to image all of it.
        let rec3 = map.read_record(VOLUME_RECORD)?;
        match map.stream(VOLUME_RECORD, &rec3, ATTR_VOLUME_INFORMATION, &[]).context("$Volume")? {
            Some(Stream::Resident(v)) => {
                let flags = le16(&v, 0x0A).context("$VOLUME_INFORMATION")?;
                if flags & VOLUME_IS_DIRTY != 0 {
                    return Err(Untrusted(
                        "the volume is marked dirty (a check is scheduled or it was not shut down cleanly), so its \
                         $Bitmap cannot be trusted"
                            .into(),
                    )
                    .into());
                }
            }
            _ => bail!("$Volume has no (resident) volume information"),
        }

        // Windows logs metadata changes in $LogFile and replays them at mount: a log that is not
        // clean (a crash, or a volume hibernated by "fast startup") leaves $Bitmap stale.
        if let Some(why) = map.logfile_unclean()? {
            return Err(Untrusted(format!("its $LogFile holds changes Windows has not replayed ({why})")).into());
        }
        Ok(())
    }

    fn load_bitmap(&mut self) -> Result<()> {
        let map = self;
        let rec6 = map.read_record(BITMAP_RECORD)?;
        ensure!(le16(&rec6, 0x16)? & RECORD_IN_USE != 0, "MFT record 6 ($Bitmap) is not in use");
        let needed = map.geo.clusters.div_ceil(8);
        map.bitmap = match map.stream(BITMAP_RECORD, &rec6, ATTR_DATA, &[]).context("$Bitmap")? {
            None => bail!("$Bitmap has no data"),
            Some(Stream::Resident(v)) => {
                ensure!(v.len() as u64 >= needed, "$Bitmap has {} bytes for {} clusters", v.len(), map.geo.clusters);
                Bitmap::Resident(v)
            }
            Some(Stream::NonResident(nr)) => {
                ensure!(
                    nr.data_size >= needed && nr.init_size >= needed,
                    "$Bitmap ({} bytes, {} initialised) is too small for {} clusters",
                    nr.data_size,
                    nr.init_size,
                    map.geo.clusters
                );
                // Every bitmap byte the map reads must be stored somewhere: a sparse hole
                // would read as "all free".
                let need_vcns = needed.div_ceil(map.geo.cluster_bytes);
                for r in nr.runs.iter().take_while(|r| r.vcn < need_vcns) {
                    ensure!(r.lcn.is_some(), "$Bitmap has a sparse hole at VCN {}", r.vcn);
                }
                Bitmap::NonResident(nr)
            }
        };
        Ok(())
    }

    pub fn geometry(&self) -> &NtfsGeometry {
        &self.geo
    }

    /// Reads `buf.len()` bytes of a non-resident stream at `offset`; bytes past the
    /// initialised size and in sparse runs read as zeros.
    fn read_stream(&self, s: &NonResident, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).context("stream read overflows")?;
        ensure!(end <= s.data_size, "read {offset}+{} past the end of a {}-byte stream", buf.len(), s.data_size);
        let cb = self.geo.cluster_bytes;
        let mut pos = offset;
        while pos < end {
            let done = (pos - offset) as usize;
            let vcn = pos / cb;
            let i = s.runs.partition_point(|r| r.vcn + r.len <= vcn);
            let Some(run) = s.runs.get(i).filter(|r| r.vcn <= vcn) else { bail!("stream offset {pos} is not mapped") };
            let run_end = (run.vcn + run.len) * cb;
            let n = (run_end.min(end) - pos) as usize;
            let piece = &mut buf[done..done + n];
            match run.lcn {
                None => piece.fill(0),
                Some(lcn) => {
                    let disk = lcn * cb + (pos - run.vcn * cb);
                    self.region.read_at(disk, piece)?;
                }
            }
            // Past the initialised size a stream reads as zeros.
            if pos + n as u64 > s.init_size {
                let z = s.init_size.saturating_sub(pos) as usize;
                piece[z.min(n)..].fill(0);
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// Why `$LogFile` is not clean, or `None` when it is: empty (all 0xFF, as Linux's ntfs-3g
    /// and mkntfs leave it), or a restart area with no client in use or marked clean. The newer
    /// of the two restart pages counts, as in ntfs-3g's `ntfs_check_logfile`.
    fn logfile_unclean(&self) -> Result<Option<String>> {
        let rec = self.read_record(LOGFILE_RECORD)?;
        let log = match self.stream(LOGFILE_RECORD, &rec, ATTR_DATA, &[]).context("$LogFile")? {
            Some(Stream::NonResident(nr)) => nr,
            _ => bail!("$LogFile has no non-resident data"),
        };
        ensure!(log.data_size >= 2 * 4096, "$LogFile is only {} bytes", log.data_size);
        let mut first = vec![0u8; 4096];
        self.read_stream(&log, 0, &mut first)?;
        if first.iter().all(|&b| b == 0xFF) {
            return Ok(None);
        }
        let page_size = match &first[0..4] {
            b"RSTR" => le32(&first, 0x10)? as u64,
            b"CHKD" => return Ok(Some("chkdsk was interrupted while repairing it".into())),
            _ => return Ok(Some("its first restart page is neither empty nor a restart page".into())),
        };
        ensure!(
            page_size.is_power_of_two() && (512..=65536).contains(&page_size) && 2 * page_size <= log.data_size,
            "$LogFile's restart page size {page_size} is invalid"
        );
        // (current LSN, clean) of each valid restart page.
        let mut newest: Option<(u64, bool)> = None;
        for at in [0, page_size] {
            let mut page = vec![0u8; page_size as usize];
            self.read_stream(&log, at, &mut page)?;
            if apply_fixups(&mut page, b"RSTR").is_err() {
                continue;
            }
            let ra = le16(&page, 0x18)? as usize;
            if ra < 0x1E || ra + 0x30 > page.len() {
                continue;
            }
            let lsn = le64(&page, ra)?;
            let in_use = le16(&page, ra + 0x0C)?;
            let flags = le16(&page, ra + 0x0E)?;
            let clean = in_use == LOGFILE_NO_CLIENT || flags & RESTART_VOLUME_IS_CLEAN != 0;
            if newest.is_none_or(|(l, _)| lsn > l) {
                newest = Some((lsn, clean));
            }
        }
        Ok(match newest {
            None => Some("neither restart page is intact".into()),
            Some((_, true)) => None,
            Some((lsn, false)) => Some(format!("a client is active and the volume is not marked clean at LSN {lsn}")),
        })
    }

    /// Reads MFT record `n`, fixups undone.
    fn read_record(&self, n: u64) -> Result<Vec<u8>> {
        ensure!(n < self.mft_records, "MFT record {n} is past the end of the MFT ({} records)", self.mft_records);
        let rb = self.geo.record_bytes;
        let mut rec = vec![0u8; rb as usize];
        self.read_stream(&self.mft, n * rb, &mut rec).with_context(|| format!("MFT record {n}"))?;
        apply_fixups(&mut rec, b"FILE").with_context(|| format!("MFT record {n}"))?;
        Ok(rec)
    }

    /// The base record and the extension records that hold attributes of type `ty` (named
    /// `name`, or any name), as the attribute list says; just the base without a list.
    fn records_holding(&self, base_no: u64, base: &[u8], ty: u32, name: Option<&[u16]>) -> Result<Vec<Vec<u8>>> {
        let attrs = attributes(base)?;
        let mut records: Vec<Vec<u8>> = Vec::new();
        if let Some(list) = attrs.iter().find(|a| a.ty == ATTR_LIST) {
            let list = self.small_value(list)?;
            let mut wanted: Vec<u64> = Vec::new();
            let mut off = 0usize;
            while off + 0x1A <= list.len() {
                let e = &list[off..];
                let t = le32(e, 0)?;
                let elen = le16(e, 4)? as usize;
                ensure!(
                    elen >= 0x1A && off + elen <= list.len(),
                    "attribute list entry at {off} has invalid length {elen}"
                );
                let nlen = r8(e, 6)? as usize;
                let noff = r8(e, 7)? as usize;
                ensure!(noff + 2 * nlen <= elen, "attribute list entry at {off} has an invalid name");
                if t == ty && name.is_none_or(|n| utf16(&e[noff..noff + 2 * nlen]) == n) {
                    let rec = le64(e, 0x10)? & 0xFFFF_FFFF_FFFF;
                    if !wanted.contains(&rec) {
                        wanted.push(rec);
                    }
                }
                off += elen;
            }
            for rec in wanted {
                if rec == base_no {
                    records.push(base.to_vec());
                } else {
                    let r = self.read_record(rec)?;
                    let owner = le64(&r, 0x20)? & 0xFFFF_FFFF_FFFF;
                    ensure!(owner == base_no, "extension record {rec} belongs to record {owner}, not {base_no}");
                    records.push(r);
                }
            }
        } else {
            records.push(base.to_vec());
        }
        Ok(records)
    }

    /// The value of attribute `ty` named `name` of the file whose base record is `base`,
    /// following an attribute list into extension records.
    pub fn stream(&self, base_no: u64, base: &[u8], ty: u32, name: &[u16]) -> Result<Option<Stream>> {
        let records = self.records_holding(base_no, base, ty, Some(name))?;
        let mut resident: Option<Vec<u8>> = None;
        let mut extents: Vec<&[u8]> = Vec::new();
        let parsed: Vec<Vec<Attr<'_>>> = records.iter().map(|r| attributes(r)).collect::<Result<_>>()?;
        for a in parsed.iter().flatten().filter(|a| a.ty == ty && a.name == name) {
            if a.resident {
                ensure!(resident.is_none() && extents.is_empty(), "attribute {ty:#x} appears more than once");
                resident = Some(a.value()?.to_vec());
            } else {
                ensure!(resident.is_none(), "attribute {ty:#x} is both resident and non-resident");
                extents.push(a.raw);
            }
        }
        if let Some(v) = resident {
            return Ok(Some(Stream::Resident(v)));
        }
        if extents.is_empty() {
            return Ok(None);
        }
        Ok(Some(Stream::NonResident(join_extents(&extents, self.geo.clusters, self.geo.cluster_bytes)?)))
    }

    /// The whole value of a (small) attribute: resident, or non-resident up to a size cap.
    fn small_value(&self, a: &Attr<'_>) -> Result<Vec<u8>> {
        if a.resident {
            return Ok(a.value()?.to_vec());
        }
        let nr = join_extents(&[a.raw], self.geo.clusters, self.geo.cluster_bytes)?;
        ensure!(
            nr.data_size <= MAX_SMALL_STREAM,
            "attribute {:#x} is implausibly large ({} bytes)",
            a.ty,
            nr.data_size
        );
        let mut v = vec![0u8; nr.data_size as usize];
        self.read_stream(&nr, 0, &mut v)?;
        Ok(v)
    }

    fn stream_bytes(&self, s: Stream, what: &str) -> Result<Vec<u8>> {
        match s {
            Stream::Resident(v) => Ok(v),
            Stream::NonResident(nr) => {
                ensure!(nr.data_size <= MAX_SMALL_STREAM, "{what} is implausibly large ({} bytes)", nr.data_size);
                let mut v = vec![0u8; nr.data_size as usize];
                self.read_stream(&nr, 0, &mut v)?;
                Ok(v)
            }
        }
    }

    /// Bitmap byte `i` (covering clusters 8i .. 8i+8), through the window.
    fn bitmap_byte(&mut self, i: u64) -> Result<u8> {
        let nr = match &self.bitmap {
            Bitmap::Resident(v) => return v.get(i as usize).copied().context("bitmap byte out of range"),
            Bitmap::NonResident(nr) => nr,
        };
        let wstart = i - i % WINDOW;
        if !matches!(&self.window, Some((s, _)) if *s == wstart) {
            let len = WINDOW.min(nr.data_size - wstart.min(nr.data_size));
            ensure!(i < wstart + len, "bitmap byte {i} is past the end of $Bitmap");
            let mut buf = vec![0u8; len as usize];
            self.read_stream(nr, wstart, &mut buf)?;
            self.window = Some((wstart, buf));
        }
        let (s, buf) = self.window.as_ref().expect("window just loaded");
        buf.get((i - s) as usize).copied().context("bitmap byte out of range")
    }

    // -----------------------------------------------------------------------------------------
    // Files, for exclusions
    // -----------------------------------------------------------------------------------------

    /// Where the data of the file at `path` ("/pagefile.sys", "/dir/file") lives: its size and
    /// the byte ranges of the region holding its non-resident unnamed `$DATA` runs, in file
    /// order (sparse runs hold no clusters and are left out). A resident (small) file has no
    /// ranges. Names match case-insensitively, as Windows resolves them. `Ok(None)`: no such file.
    pub fn file_extents(&mut self, path: &str) -> Result<Option<FileExtents>> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        ensure!(!parts.is_empty(), "{path:?} does not name a file");
        let mut no = ROOT_RECORD;
        for part in &parts {
            match self.lookup(no, part).with_context(|| format!("looking up {part:?} in {path}"))? {
                Some(child) => no = child,
                None => return Ok(None),
            }
        }
        let rec = self.read_record(no)?;
        let flags = le16(&rec, 0x16)?;
        ensure!(flags & RECORD_IN_USE != 0, "{path}: its directory entry points to unused MFT record {no}");
        ensure!(flags & RECORD_IS_DIRECTORY == 0, "{path} is a directory");
        let cb = self.geo.cluster_bytes;
        match self.stream(no, &rec, ATTR_DATA, &[]).with_context(|| format!("{path}: $DATA"))? {
            None => bail!("{path} has no data stream"),
            Some(Stream::Resident(v)) => Ok(Some(FileExtents { size: v.len() as u64, extents: Vec::new() })),
            Some(Stream::NonResident(nr)) => {
                let mut extents: Vec<FileExtent> = Vec::new();
                let mut vcn = 0u64;
                for r in &nr.runs {
                    if let Some(lcn) = r.lcn {
                        let range = lcn * cb..(lcn + r.len) * cb;
                        match extents.last_mut() {
                            Some(last) if last.range.end == range.start => last.range.end = range.end,
                            _ => extents.push(FileExtent { file_offset: vcn * cb, range }),
                        }
                    }
                    vcn += r.len;
                }
                Ok(Some(FileExtents { size: nr.data_size, extents }))
            }
        }
    }

    /// Finds `name` in directory record `dir`: the child's MFT record number (an exact match,
    /// else a case-insensitive one).
    fn lookup(&mut self, dir: u64, name: &str) -> Result<Option<u64>> {
        let target: Vec<u16> = name.encode_utf16().collect();
        let folded_target = fold(&target);
        let mut found = Found::default();
        let is_dir = self.for_each_index_entry(dir, &mut |reference, key_name, _| {
            if key_name == target.as_slice() {
                found.exact = Some(reference);
                return ControlFlow::Break(());
            }
            if found.folded.is_none() && fold(key_name) == folded_target {
                found.folded = Some(reference);
            }
            ControlFlow::Continue(())
        })?;
        if !is_dir {
            return Ok(None); // a file in the middle of the path: no such file
        }
        match found.exact.or(found.folded) {
            Some(r) => self.check_child(r).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `visit(file reference, name, namespace)` for every entry of directory `dir`'s
    /// `$I30` index (its root, then every in-use index block), until it breaks. False when
    /// `dir` is not a directory in use.
    pub(crate) fn for_each_index_entry(&self, dir: u64, visit: &mut IndexVisitor<'_>) -> Result<bool> {
        let rec = self.read_record(dir)?;
        let flags = le16(&rec, 0x16)?;
        if flags & RECORD_IN_USE == 0 || flags & RECORD_IS_DIRECTORY == 0 {
            return Ok(false);
        }
        let i30: Vec<u16> = "$I30".encode_utf16().collect();
        let root = match self.stream(dir, &rec, ATTR_INDEX_ROOT, &i30)? {
            Some(Stream::Resident(v)) => v,
            Some(Stream::NonResident(_)) => bail!("directory {dir} has a non-resident index root"),
            None => bail!("directory {dir} has no $I30 index root"),
        };
        ensure!(le32(&root, 0)? == ATTR_FILE_NAME, "directory {dir}'s index is not a file name index");
        let block = le32(&root, 8)? as u64;
        let entries_off = le32(&root, 0x10)? as usize;
        let index_len = le32(&root, 0x14)? as usize;
        let (s, e) = (0x10usize.saturating_add(entries_off), 0x10usize.saturating_add(index_len));
        ensure!(s <= e && e <= root.len(), "directory {dir}'s index root is malformed");
        if index_entries(&root[s..e], visit)?.is_break() {
            return Ok(true);
        }
        if let Some(alloc) = self.stream(dir, &rec, ATTR_INDEX_ALLOCATION, &i30)? {
            let Stream::NonResident(alloc) = alloc else { bail!("directory {dir} has a resident index allocation") };
            ensure!(block.is_power_of_two() && (512..=65536).contains(&block), "index block size {block} is invalid");
            let bitmap = match self.stream(dir, &rec, ATTR_BITMAP, &i30)? {
                Some(s) => self.stream_bytes(s, "index bitmap")?,
                None => bail!("directory {dir} has an index allocation but no index bitmap"),
            };
            let blocks = alloc.data_size / block;
            let mut buf = vec![0u8; block as usize];
            for i in 0..blocks {
                let in_use = bitmap.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0);
                if !in_use {
                    continue;
                }
                self.read_stream(&alloc, i * block, &mut buf)?;
                apply_fixups(&mut buf, b"INDX").with_context(|| format!("index block {i} of directory {dir}"))?;
                let entries_off = le32(&buf, 0x18)? as usize;
                let index_len = le32(&buf, 0x1C)? as usize;
                let (s, e) = (0x18usize.saturating_add(entries_off), 0x18usize.saturating_add(index_len));
                ensure!(s <= e && e <= buf.len(), "index block {i} of directory {dir} is malformed");
                if index_entries(&buf[s..e], visit)?.is_break() {
                    break;
                }
            }
        }
        Ok(true)
    }

    /// Validates a directory entry's file reference; returns the record number.
    fn check_child(&self, reference: u64) -> Result<u64> {
        let no = reference & 0xFFFF_FFFF_FFFF;
        let seq = (reference >> 48) as u16;
        let rec = self.read_record(no)?;
        let rec_seq = le16(&rec, 0x10)?;
        ensure!(
            seq == 0 || seq == rec_seq,
            "stale directory entry: record {no} has sequence {rec_seq}, the entry {seq}"
        );
        Ok(no)
    }
}

#[derive(Default)]
struct Found {
    exact: Option<u64>,
    folded: Option<u64>,
}

/// Upper-cases a UTF-16 name unit by unit (the simple mapping NTFS's $UpCase table holds).
fn fold(name: &[u16]) -> Vec<u16> {
    name.iter()
        .map(|&u| {
            let Some(c) = char::from_u32(u as u32) else {
                return u;
            };
            let mut up = c.to_uppercase();
            match (up.next(), up.next()) {
                (Some(x), None) if (x as u32) <= 0xFFFF => x as u32 as u16,
                _ => u,
            }
        })
        .collect()
}

/// What an index walk calls for each entry: (file reference, name, namespace).
pub(crate) type IndexVisitor<'a> = dyn FnMut(u64, &[u16], u8) -> ControlFlow<()> + 'a;

/// Walks a run of index entries (each keyed by a `$FILE_NAME`), calling `visit(file
/// reference, name, namespace)` until the last entry or a break.
fn index_entries(b: &[u8], visit: &mut IndexVisitor<'_>) -> Result<ControlFlow<()>> {
    let mut off = 0usize;
    loop {
        let e = get(b, off, 0x10).context("index entries run off their node")?;
        let len = le16(e, 8)? as usize;
        let key_len = le16(e, 10)? as usize;
        let flags = le16(e, 12)?;
        if flags & 0x2 != 0 {
            return Ok(ControlFlow::Continue(())); // the last entry carries no key
        }
        ensure!(
            len >= 0x10 && len.is_multiple_of(8) && off + len <= b.len(),
            "index entry at {off} has invalid length {len}"
        );
        ensure!(0x10 + key_len <= len && key_len >= 0x42, "index entry at {off} has an invalid key");
        let key = &b[off + 0x10..off + 0x10 + key_len];
        let nlen = key[0x40] as usize;
        let name = utf16(get(key, 0x42, 2 * nlen)?);
        if visit(le64(e, 0)?, &name, key[0x41]).is_break() {
            return Ok(ControlFlow::Break(()));
        }
        off += len;
    }
}

impl UsedMap for NtfsMap {
    fn file_extents(&mut self, path: &str) -> Result<Option<FileExtents>> {
        NtfsMap::file_extents(self, path)
    }

    /// Windows' page, swap and hibernation files, when present.
    fn swap_files(&mut self) -> Result<Vec<SwapFile>> {
        let mut found = Vec::new();
        for name in default_exclusions() {
            if matches!(NtfsMap::file_extents(self, name), Ok(Some(_))) {
                found.push(SwapFile { path: name.to_string(), keep_header: 0 });
            }
        }
        Ok(found)
    }

    fn filesystem(&self) -> Option<&str> {
        Some("ntfs")
    }

    fn describe(&self) -> String {
        "ntfs $Bitmap".into()
    }

    fn used_ranges(&mut self, start: u64, len: u64, out: &mut Vec<Range<u64>>) -> Result<()> {
        let end = start.checked_add(len).filter(|&e| e <= self.region.len);
        let Some(end) = end else { bail!("range {start}+{len} lies outside the volume ({} bytes)", self.region.len) };
        let cb = self.geo.cluster_bytes;
        let fs_end = self.geo.fs_bytes();
        let c0 = start / cb;
        let c1 = end.min(fs_end).div_ceil(cb);
        let mut c = c0;
        while c < c1 {
            let byte = self.bitmap_byte(c / 8)?;
            if byte == 0 && c.is_multiple_of(8) && c + 8 <= c1 && c != 0 {
                c += 8;
                continue;
            }
            let cs = c * cb;
            // Cluster 0 holds the boot sector: kept whatever the bitmap says.
            if byte & (1 << (c % 8)) != 0 || c == 0 {
                push_range(out, cs.max(start)..(cs + cb).min(end));
            }
            c += 1;
        }
        // The sectors after the last cluster (the backup boot sector) and bytes past the
        // filesystem are kept.
        if end > fs_end {
            push_range(out, fs_end.max(start)..end);
        }
        Ok(())
    }
}

impl NtfsMap {
    /// The same list as the module's [`default_exclusions`].
    pub fn default_exclusions() -> &'static [&'static str] {
        default_exclusions()
    }
}
