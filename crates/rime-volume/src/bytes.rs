//! Fixed-width integers at byte offsets of on-disk structures, bounds-checked: every offset
//! may come from disk, so a field past the end of its structure is an error, never a panic.

/// A field that lies outside the structure it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("on-disk field at byte {offset} (+{len}) lies outside its {size}-byte structure")]
pub struct Truncated {
    pub offset: usize,
    pub len: usize,
    pub size: usize,
}

/// The `N` bytes at `o`.
pub fn field<const N: usize>(b: &[u8], o: usize) -> Result<[u8; N], Truncated> {
    o.checked_add(N).and_then(|end| b.get(o..end)).map(|s| s.try_into().expect("slice of N bytes")).ok_or(Truncated {
        offset: o,
        len: N,
        size: b.len(),
    })
}

pub fn le16(b: &[u8], o: usize) -> Result<u16, Truncated> {
    field(b, o).map(u16::from_le_bytes)
}
pub fn le32(b: &[u8], o: usize) -> Result<u32, Truncated> {
    field(b, o).map(u32::from_le_bytes)
}
pub fn le64(b: &[u8], o: usize) -> Result<u64, Truncated> {
    field(b, o).map(u64::from_le_bytes)
}
pub fn be16(b: &[u8], o: usize) -> Result<u16, Truncated> {
    field(b, o).map(u16::from_be_bytes)
}
pub fn be32(b: &[u8], o: usize) -> Result<u32, Truncated> {
    field(b, o).map(u32::from_be_bytes)
}
pub fn be64(b: &[u8], o: usize) -> Result<u64, Truncated> {
    field(b, o).map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inside_and_refuses_outside() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le16(&b, 0), Ok(0x0201));
        assert_eq!(be32(&b, 5), Ok(0x0607_0809));
        assert_eq!(le64(&b, 1), Ok(0x0908_0706_0504_0302));
        assert_eq!(le32(&b, 6), Err(Truncated { offset: 6, len: 4, size: 9 }));
        assert!(le64(&b, usize::MAX - 2).is_err(), "offset overflow is refused, not wrapped");
    }
}
