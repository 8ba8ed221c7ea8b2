//! Opening a volume, read-only: a block device, a raw image file, or a VM disk image (qcow2,
//! VHD, VHDX, VMDK) read as the guest sees it through `qemu-nbd` and Rime's NBD client.

use crate::error::VolumeError;
use crate::qemu::{self, QemuNbd};
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Positioned reads from whatever holds a volume's bytes.
pub trait BlockSource: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl BlockSource for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    BlockDevice,
    File,
    /// A VM disk image in a format qemu understands ("qcow2", "vpc", "vhdx", "vmdk", ...).
    DiskImage(String),
}

impl VolumeKind {
    pub fn as_str(&self) -> String {
        match self {
            VolumeKind::BlockDevice => "block-device".into(),
            VolumeKind::File => "file".into(),
            VolumeKind::DiskImage(format) => format!("disk-image:{format}"),
        }
    }
}

pub struct Volume {
    pub path: PathBuf,
    pub kind: VolumeKind,
    pub size: u64,
    source: Arc<dyn BlockSource>,
    /// The same file opened with `O_DIRECT`, for bulk reads that bypass the page cache (on
    /// this kind of VM the kernel's page-cache copy costs more CPU than hashing); cleared on
    /// the first refusal.
    direct: std::sync::Mutex<Option<File>>,
    /// Keeps the `qemu-nbd` server of a disk image alive as long as the volume.
    _server: Option<Arc<QemuNbd>>,
}

/// A byte range of a volume — the whole volume, or one partition of a disk — that
/// filesystem parsers read through. Reads outside the range are errors, never out-of-bounds
/// reads of the neighbouring data.
#[derive(Clone)]
pub struct Region {
    source: Arc<dyn BlockSource>,
    pub path: PathBuf,
    /// Offset of the region within its volume.
    pub start: u64,
    pub len: u64,
}

impl Region {
    /// A region over any block source (a snapshot's volume in the repository, say).
    pub fn from_source(source: Arc<dyn BlockSource>, path: impl Into<PathBuf>, len: u64) -> Region {
        Region { source, path: path.into(), start: 0, len }
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            bail!(
                "read past the end of {} region at {} ({} + {} > {})",
                self.path.display(),
                self.start,
                offset,
                buf.len(),
                self.len
            );
        }
        self.source
            .read_exact_at(buf, self.start + offset)
            .with_context(|| format!("read error on {} at byte {}", self.path.display(), self.start + offset))
    }

    /// A sub-range of this region.
    pub fn sub(&self, start: u64, len: u64) -> Result<Region> {
        if start.checked_add(len).is_none_or(|e| e > self.len) {
            bail!("range {start}+{len} lies outside {} ({} bytes)", self.path.display(), self.len);
        }
        Ok(Region { source: self.source.clone(), path: self.path.clone(), start: self.start + start, len })
    }
}

impl Volume {
    /// Opens a volume for reading. Block devices are opened with `O_EXCL` when `exclusive` is
    /// set, which the kernel refuses while the device is mounted or otherwise claimed. Image
    /// files in a VM disk format are served by a private read-only `qemu-nbd`.
    pub fn open(path: &Path, exclusive: bool) -> Result<Volume> {
        let unreadable = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound => VolumeError::NotFound(path.to_path_buf()),
            _ => VolumeError::Unreadable { path: path.to_path_buf(), source },
        };
        let meta = std::fs::metadata(path).map_err(unreadable)?;
        let kind = if meta.file_type().is_block_device() {
            VolumeKind::BlockDevice
        } else if meta.is_file() {
            if let Some(fs) = crate::remote::network_filesystem(path) {
                return Err(VolumeError::RemoteFilesystem { path: path.to_path_buf(), fs }.into());
            }
            match qemu::image_format(path)? {
                Some(format) => VolumeKind::DiskImage(format),
                None => VolumeKind::File,
            }
        } else {
            return Err(VolumeError::NotAVolume(path.to_path_buf()).into());
        };
        if let VolumeKind::DiskImage(format) = &kind {
            let mut server = QemuNbd::start(path, format)?;
            let client = server.connect()?;
            let server = Arc::new(server);
            let size = client.size();
            return Ok(Volume {
                path: path.into(),
                kind,
                size,
                source: Arc::new(client),
                direct: Default::default(),
                _server: Some(server),
            });
        }
        let mut opts = OpenOptions::new();
        opts.read(true);
        if exclusive && kind == VolumeKind::BlockDevice {
            opts.custom_flags(libc::O_EXCL);
        }
        let mut file: File = match opts.open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(VolumeError::InUse(path.to_path_buf()).into())
            }
            Err(e) => return Err(unreadable(e).into()),
        };
        let size = file.seek(SeekFrom::End(0)).with_context(|| format!("size of {}", path.display()))?;
        // This descriptor serves the filesystem maps' metadata reads (bitmaps, inode tables,
        // journals, indirect blocks: small or already large requests at scattered places); bulk
        // data goes through the O_DIRECT one. Read-ahead here would only fetch blocks nobody asked
        // for, in the background, competing with the bulk reads.
        rime_os::files::advise_random(&file);
        let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok();
        Ok(Volume {
            path: path.to_path_buf(),
            kind,
            size,
            source: Arc::new(file),
            direct: std::sync::Mutex::new(direct),
            _server: None,
        })
    }

    /// A volume read through any block source (for example a snapshot view served by
    /// `rime serve`); `path` names the volume itself.
    pub fn from_source(path: PathBuf, kind: VolumeKind, size: u64, source: Arc<dyn BlockSource>) -> Volume {
        Volume { path, kind, size, source, direct: Default::default(), _server: None }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the volume are an error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.region().read_at(offset, buf)
    }

    /// Reads `len` bytes at `offset` into `buf` for a sequential bulk pass: with `O_DIRECT`
    /// when the volume allows it and the range is 4 KiB-aligned, through the page cache
    /// otherwise. Returns the bytes read.
    pub fn read_bulk<'b>(&self, offset: u64, len: usize, buf: &'b mut AlignedBuf) -> Result<&'b [u8]> {
        assert!(len <= buf.len(), "bulk read larger than its buffer");
        if offset + len as u64 > self.size {
            bail!("read past the end of {} ({} + {} > {})", self.path.display(), offset, len, self.size);
        }
        let dst = &mut buf.as_mut_slice()[..len];
        if offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN) {
            let mut direct = self.direct.lock().unwrap();
            if let Some(file) = direct.as_ref() {
                match FileExt::read_exact_at(file, dst, offset) {
                    Ok(()) => return Ok(&buf.as_slice()[..len]),
                    // Some filesystems and devices refuse direct I/O: fall back for good.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("read error on {} at byte {offset}", self.path.display()))
                    }
                }
            }
        }
        self.read_at(offset, &mut buf.as_mut_slice()[..len])?;
        Ok(&buf.as_slice()[..len])
    }

    /// The whole volume as a region.
    pub fn region(&self) -> Region {
        Region { source: self.source.clone(), path: self.path.clone(), start: 0, len: self.size }
    }
}

/// Alignment of direct reads.
pub const ALIGN: usize = 4096;

/// A heap buffer aligned for `O_DIRECT`.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        assert!(len > 0 && len.is_multiple_of(ALIGN));
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: non-zero size; zeroed so the bytes are initialised.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).expect("allocation");
        AlignedBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised bytes uniquely owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}
