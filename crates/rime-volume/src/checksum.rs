//! The checksums filesystems store, each in the exact form the kernel computes it.
//!
//! The kernel's CRC helpers take a running value and apply no inversion of their own
//! (`crc32c(seed, buf, len)`, `crc32_be(seed, ...)`, `crc16(seed, ...)`); filesystems chain them
//! from a seed. The `raw` functions here match those helpers exactly, so on-disk formats can be
//! followed line by line; [`crc32c`] is the conventional, inverted CRC-32C that XFS and btrfs
//! store. CRC-32C comes from the `crc32c` crate (SSE4.2 where the CPU has it), the others from
//! the `crc` crate's catalogue.

use crc::{Crc, CRC_16_MODBUS, CRC_32_MPEG_2};

/// CRC-32C (Castagnoli) of `data`: initial value !0 and a final inversion. What XFS v5
/// metadata and btrfs (csum type 0) store little-endian.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC-32C of `buf` with the four bytes at `hole` taken as zero (where the checksum itself lives).
pub fn crc32c_skipping(buf: &[u8], hole: usize) -> u32 {
    let c = crc32c::crc32c_append(0, &buf[..hole]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &buf[hole + 4..])
}

/// The kernel's `crc32c(seed, data)`: CRC-32C continued from the running value `seed`, without
/// inversions. ext4 `metadata_csum` and jbd2 checksums v2/v3 chain it from a filesystem seed.
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    // `crc32c_append` inverts on the way in and out; undo both.
    !crc32c::crc32c_append(!seed, data)
}

/// The kernel's `crc32_be` running from `!0`, as jbd2 checksum v1 (`journal_checksum` without
/// `metadata_csum`) accumulates it over every block of a transaction: CRC-32/MPEG-2.
pub struct Crc32Be(crc::Digest<'static, u32>);

static CRC32_BE: Crc<u32> = Crc::<u32>::new(&CRC_32_MPEG_2);
static CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_MODBUS);

impl Crc32Be {
    pub fn new() -> Crc32Be {
        Crc32Be(CRC32_BE.digest())
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The running value (the digest goes on).
    pub fn value(&self) -> u32 {
        self.0.clone().finalize()
    }
}

impl Default for Crc32Be {
    fn default() -> Self {
        Crc32Be::new()
    }
}

/// The kernel's `crc16(~0, ...)` chained over `parts` (the ext4 `uninit_bg` group descriptor
/// checksum): the reflected 0x8005 polynomial from 0xFFFF with no final inversion, CRC-16/MODBUS.
pub fn crc16(parts: &[&[u8]]) -> u16 {
    let mut d = CRC16.digest();
    for p in parts {
        d.update(p);
    }
    d.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // Raw chaining equals one pass, and the raw form is the inverted conventional one.
        assert_eq!(crc32c_raw(crc32c_raw(!0, b"1234"), b"56789"), crc32c_raw(!0, b"123456789"));
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
        let mut buf = b"ab\x01\x02\x03\x04cd".to_vec();
        let skipped = crc32c_skipping(&buf, 2);
        buf[2..6].fill(0);
        assert_eq!(skipped, crc32c(&buf));
        let mut be = Crc32Be::new();
        be.update(b"1234");
        be.update(b"56789");
        assert_eq!(be.value(), 0x0376_E6E7); // CRC-32/MPEG-2 check value
        assert_eq!(crc16(&[b"1234", b"56789"]), 0x4B37); // CRC-16/MODBUS check value
    }
}
