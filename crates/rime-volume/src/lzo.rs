//! LZO1X decompression, for btrfs's LZO-compressed extents.
//!
//! Rime's own, small and bounds-checked, because no crate fits: `rust-lzo`, `lzo1x` and
//! `minilzo-rs` are GPL (Rime is Apache-2.0), and `lzokay-native` indexes out of bounds and
//! subtracts without checks on damaged input, which a backup's hostile images must never reach.
//! Invariants: output never grows past the caller's limit, every read of the input is checked,
//! and a back-reference never reaches before the block's own output.

use anyhow::{ensure, Result};

/// LZO1X decompression of one independent block, appended to `out`, which may not grow past
/// `limit` bytes. Back-references reach only into this block's output. Every read of `src`
/// and every copy is checked: damaged input is an error, never a panic or an overrun.
///
pub fn lzo1x_decompress(src: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<()> {
    let base = out.len();
    let mut ip = 0usize;
    let bad = || anyhow::anyhow!("LZO data is damaged");
    let byte = |ip: &mut usize| -> Result<usize> {
        let b = *src.get(*ip).ok_or_else(bad)?;
        *ip += 1;
        Ok(b as usize)
    };
    // Runs of zero bytes extend a length by 255 each, then a final non-zero byte.
    let long = |ip: &mut usize, base_len: usize| -> Result<usize> {
        let mut n = base_len;
        loop {
            let b = byte(ip)?;
            if b != 0 {
                return Ok(n + b);
            }
            n += 255;
        }
    };
    let literals = |ip: &mut usize, out: &mut Vec<u8>, n: usize| -> Result<()> {
        let s = src.get(*ip..*ip + n).ok_or_else(bad)?;
        ensure!(out.len() + n <= limit, "LZO data decompresses to more than {limit} bytes");
        out.extend_from_slice(s);
        *ip += n;
        Ok(())
    };
    let mut state;
    let first = *src.first().ok_or_else(bad)? as usize;
    if first >= 22 {
        ip = 1;
        literals(&mut ip, out, first - 17)?;
        state = 4;
    } else if first >= 18 {
        ip = 1;
        state = first - 17;
        literals(&mut ip, out, state)?;
    } else {
        state = 0;
    }
    loop {
        let inst = byte(&mut ip)?;
        let (dist, len, next);
        if inst & 0xC0 != 0 {
            // M2: 3..8 bytes within 2 KiB.
            let h = byte(&mut ip)?;
            dist = (h << 3) + ((inst >> 2) & 7) + 1;
            len = (inst >> 5) + 1;
            next = inst & 3;
        } else if inst & 0x20 != 0 {
            // M3: within 16 KiB.
            let l = inst & 0x1F;
            len = if l == 0 { long(&mut ip, 31)? + 2 } else { l + 2 };
            let v = byte(&mut ip)? | byte(&mut ip)? << 8;
            dist = (v >> 2) + 1;
            next = v & 3;
        } else if inst & 0x10 != 0 {
            // M4: 16..48 KiB away; distance 16384 ends the stream.
            let l = inst & 7;
            len = if l == 0 { long(&mut ip, 7)? + 2 } else { l + 2 };
            let v = byte(&mut ip)? | byte(&mut ip)? << 8;
            let d = ((inst & 8) << 11) + (v >> 2);
            if d == 0 {
                return Ok(());
            }
            dist = d + 16384;
            next = v & 3;
        } else if state == 0 {
            // A literal run of 4 or more.
            let n = if inst == 0 { long(&mut ip, 15)? + 3 } else { inst + 3 };
            literals(&mut ip, out, n)?;
            state = 4;
            continue;
        } else if state != 4 {
            let h = byte(&mut ip)?;
            dist = (inst >> 2) + (h << 2) + 1;
            len = 2;
            next = inst & 3;
        } else {
            let h = byte(&mut ip)?;
            dist = (inst >> 2) + (h << 2) + 2049;
            len = 3;
            next = inst & 3;
        }
        ensure!(dist <= out.len() - base, "LZO back-reference reaches before the block");
        ensure!(out.len() + len <= limit, "LZO data decompresses to more than {limit} bytes");
        let from = out.len() - dist;
        if dist >= len {
            out.extend_from_within(from..from + len);
        } else {
            for i in 0..len {
                out.push(out[from + i]);
            }
        }
        literals(&mut ip, out, next)?;
        state = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lzo_literals_matches_and_end_marker() {
        // "abcabcabcabc": 3 literals (first byte 17 + 3), a match of 9 at distance 3, end.
        // M2 with len 9 is impossible (max 8), so: M3 len 9 = 0x20 | 7, distance 3 -> (2 << 2).
        let src = [20u8, b'a', b'b', b'c', 0x20 | 7, 2 << 2, 0, 0x11, 0, 0];
        let mut out = Vec::new();
        lzo1x_decompress(&src, &mut out, 100).unwrap();
        assert_eq!(out, b"abcabcabcabc");
        // The same with room for less: an error, not an overrun.
        let mut out = Vec::new();
        assert!(lzo1x_decompress(&src, &mut out, 10).is_err());
        // Truncated input and a reference before the start: errors.
        assert!(lzo1x_decompress(&src[..6], &mut Vec::new(), 100).is_err());
        let far = [20u8, b'a', b'b', b'c', 0x20 | 7, 9 << 2, 0, 0x11, 0, 0];
        assert!(lzo1x_decompress(&far, &mut Vec::new(), 100).is_err());
    }
}
