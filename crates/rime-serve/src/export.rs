//! The protected volume as a block export for the NBD server and the FUSE file: every write
//! goes through the copy-on-write engine.

use rime_snapshot::Engine;
use std::sync::Arc;

pub struct VolumeExport(pub Arc<Engine>);

impl rime_nbd::Export for VolumeExport {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn description(&self) -> &str {
        "rime protected volume"
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.0.write(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_punch: bool) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len, fua, may_punch)
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.trim(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.sync()
    }
}
