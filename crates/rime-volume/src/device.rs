//! Opening a volume: a block device or a regular (image) file, read-only.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    BlockDevice,
    File,
}

impl VolumeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::BlockDevice => "block-device",
            VolumeKind::File => "file",
        }
    }
}

pub struct Volume {
    pub path: PathBuf,
    pub kind: VolumeKind,
    pub size: u64,
    file: File,
}

impl Volume {
    /// Opens a volume for reading. Block devices are opened with `O_EXCL` when `exclusive` is
    /// set, which the kernel refuses while the device is mounted or otherwise claimed.
    pub fn open(path: &Path, exclusive: bool) -> Result<Volume> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot open volume {}", path.display()))?;
        let kind = if meta.file_type().is_block_device() {
            VolumeKind::BlockDevice
        } else if meta.is_file() {
            VolumeKind::File
        } else {
            bail!("{} is neither a block device nor a regular file", path.display());
        };
        let mut opts = OpenOptions::new();
        opts.read(true);
        if exclusive && kind == VolumeKind::BlockDevice {
            opts.custom_flags(libc::O_EXCL);
        }
        let mut file = match opts.open(path) {
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
        Ok(Volume { path: path.to_path_buf(), kind, size, file })
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the volume are an error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset + buf.len() as u64 > self.size {
            bail!("read past the end of {} ({} + {} > {})", self.path.display(), offset, buf.len(), self.size);
        }
        self.file
            .read_exact_at(buf, offset)
            .with_context(|| format!("read error on {} at byte {offset}", self.path.display()))
    }

    pub fn try_clone(&self) -> Result<Volume> {
        Ok(Volume { path: self.path.clone(), kind: self.kind, size: self.size, file: self.file.try_clone()? })
    }
}
