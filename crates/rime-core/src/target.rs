//! Restore targets: a block device or a file, written only inside `[0, volume size)`.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub struct RestoreTarget {
    pub path: PathBuf,
    file: File,
    is_block_device: bool,
    /// A file Rime just created: its holes already read as zeros.
    fresh: bool,
    /// Bytes Rime may write: the volume's size.
    limit: u64,
}

impl RestoreTarget {
    /// Opens (or creates, for a new file) a target that can hold `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<RestoreTarget> {
        let shown = path.display();
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .with_context(|| format!("cannot create restore target {shown}"))?;
                file.set_len(size).with_context(|| format!("cannot size {shown} to {size} bytes"))?;
                Ok(RestoreTarget { path: path.into(), file, is_block_device: false, fresh: true, limit: size })
            }
            Err(e) => Err(e).with_context(|| format!("cannot open restore target {shown}")),
            Ok(meta) => {
                let is_block_device = meta.file_type().is_block_device();
                if !is_block_device && !meta.is_file() {
                    bail!("restore target {shown} is neither a block device nor a regular file");
                }
                if let crate::inuse::Usage::InUse(why) = crate::inuse::check(path) {
                    bail!("restore target is in use: {why}");
                }
                let mut opts = OpenOptions::new();
                opts.write(true);
                if is_block_device {
                    opts.custom_flags(libc::O_EXCL);
                }
                let mut file = opts.open(path).map_err(|e| {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        anyhow::anyhow!("restore target {shown} is in use (mounted or claimed)")
                    } else {
                        anyhow::Error::new(e).context(format!("cannot open restore target {shown}"))
                    }
                })?;
                let have = file.seek(SeekFrom::End(0))?;
                if have < size {
                    bail!("restore target {shown} is too small: {have} bytes, the volume needs {size}");
                }
                Ok(RestoreTarget { path: path.into(), file, is_block_device, fresh: false, limit: size })
            }
        }
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        assert!(offset + data.len() as u64 <= self.limit, "restore write past the volume's end");
        self.file
            .write_all_at(data, offset)
            .with_context(|| format!("write to {} at byte {offset}", self.path.display()))
    }

    /// Makes `[offset, offset + len)` read as zeros: nothing for a fresh file, a hole punch for
    /// an existing file, BLKZEROOUT for a device, plain zero writes where those are refused.
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        assert!(offset + len <= self.limit, "restore zeroing past the volume's end");
        if self.fresh || len == 0 {
            return Ok(());
        }
        let done = if self.is_block_device {
            rime_os::files::zero_out_device(&self.file, offset, len).is_ok()
        } else {
            rime_os::files::punch_hole(&self.file, offset, len).is_ok()
        };
        if !done {
            let zeros = vec![0u8; (1 << 20).min(len) as usize];
            let mut pos = offset;
            while pos < offset + len {
                let n = zeros.len().min((offset + len - pos) as usize);
                self.write_at(pos, &zeros[..n])?;
                pos += n as u64;
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        self.file.sync_all().with_context(|| format!("fsync {}", self.path.display()))
    }
}
