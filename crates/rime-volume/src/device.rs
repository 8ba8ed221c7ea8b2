//! Opening a volume, read-only: a block device, a raw image file, or a VM disk image (qcow2,
//! VHD, VHDX, VMDK) read as the guest sees it through `qemu-nbd` and Rime's NBD client.

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
        let meta = std::fs::metadata(path).with_context(|| format!("cannot open volume {}", path.display()))?;
        let kind = if meta.file_type().is_block_device() {
            VolumeKind::BlockDevice
        } else if meta.is_file() {
            match qemu::image_format(path)? {
                Some(format) => VolumeKind::DiskImage(format),
                None => VolumeKind::File,
            }
        } else {
            bail!("{} is neither a block device nor a regular file", path.display());
        };
        if let VolumeKind::DiskImage(format) = &kind {
            let mut server = QemuNbd::start(path, format)?;
            let client = server.connect()?;
            let server = Arc::new(server);
            let size = client.size();
            return Ok(Volume { path: path.into(), kind, size, source: Arc::new(client), _server: Some(server) });
        }
        let mut opts = OpenOptions::new();
        opts.read(true);
        if exclusive && kind == VolumeKind::BlockDevice {
            opts.custom_flags(libc::O_EXCL);
        }
        let mut file: File = match opts.open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                bail!("volume {} is in use (mounted or claimed by another program)", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open volume {}", path.display())),
        };
        let size = file.seek(SeekFrom::End(0)).with_context(|| format!("size of {}", path.display()))?;
        // SAFETY: advisory hint on an owned descriptor; failure is harmless.
        unsafe {
            libc::posix_fadvise(std::os::unix::io::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        Ok(Volume { path: path.to_path_buf(), kind, size, source: Arc::new(file), _server: None })
    }

    /// A volume read through any block source (for example a snapshot view served by
    /// `rime serve`); `path` names the volume itself.
    pub fn from_source(path: PathBuf, kind: VolumeKind, size: u64, source: Arc<dyn BlockSource>) -> Volume {
        Volume { path, kind, size, source, _server: None }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the volume are an error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.region().read_at(offset, buf)
    }

    /// The whole volume as a region.
    pub fn region(&self) -> Region {
        Region { source: self.source.clone(), path: self.path.clone(), start: 0, len: self.size }
    }
}
