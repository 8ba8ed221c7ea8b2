//! Chunk compression: zstd at a level picked by name.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Fast,
    #[default]
    Normal,
    Best,
}

impl Compression {
    pub fn parse(s: &str) -> Result<Compression> {
        Ok(match s {
            "none" => Compression::None,
            "fast" => Compression::Fast,
            "normal" => Compression::Normal,
            "best" => Compression::Best,
            other => bail!("unknown compression '{other}' (expected none, fast, normal or best)"),
        })
    }

    /// The zstd level for this setting; `None` for no compression.
    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Compression::None => None,
            Compression::Fast => Some(1),
            Compression::Normal => Some(3),
            Compression::Best => Some(19),
        }
    }
}

/// How a blob's payload is encoded in its pack (stored in the pack index entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    Raw = 0,
    Zstd = 1,
}

impl Encoding {
    pub fn from_u8(v: u8) -> Result<Encoding> {
        match v {
            0 => Ok(Encoding::Raw),
            1 => Ok(Encoding::Zstd),
            other => bail!("unknown blob encoding {other}"),
        }
    }
}

/// Compresses `data` with a reusable zstd context; keeps the raw bytes when compression does
/// not pay (incompressible data is stored as is, so it is never expanded).
pub struct Compressor {
    ctx: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(setting: Compression) -> Result<Compressor> {
        let ctx = match setting.zstd_level() {
            Some(level) => Some(zstd::bulk::Compressor::new(level).context("zstd init")?),
            None => None,
        };
        Ok(Compressor { ctx })
    }

    pub fn compress(&mut self, data: &[u8]) -> Result<(Encoding, Vec<u8>)> {
        if let Some(ctx) = self.ctx.as_mut() {
            let packed = ctx.compress(data).context("zstd compress")?;
            // Keep compressed output only when it saves at least 1/32 of the chunk.
            if packed.len() + data.len() / 32 < data.len() {
                return Ok((Encoding::Zstd, packed));
            }
        }
        Ok((Encoding::Raw, data.to_vec()))
    }
}

/// Decodes a blob payload back to the chunk's raw bytes.
pub fn decode(encoding: Encoding, payload: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    match encoding {
        Encoding::Raw => Ok(payload.to_vec()),
        Encoding::Zstd => {
            let out = zstd::bulk::decompress(payload, raw_len).context("zstd decompress")?;
            if out.len() != raw_len {
                bail!("decompressed {} bytes, expected {raw_len}", out.len());
            }
            Ok(out)
        }
    }
}
