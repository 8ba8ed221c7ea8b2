//! Backing chains of VM disk images: the files an overlay reads through (qcow2's modern
//! differencing disks).
//!
//! qcow2 is read here, from its header (backing file name at `backing_file_offset`, its format
//! in header extension 0xE2792ACA), defensively: lengths are bounded, the chain is followed at
//! most [`MAX_DEPTH`] levels and a loop is an error. Other formats that can have a parent (VMDK,
//! VHDX, QED, VHD) are asked of `qemu-img info --backing-chain`. A relative backing name is
//! relative to the directory of the image that names it, as QEMU resolves it; a `json:` or
//! protocol name (not a local file) is reported as it is.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Longest chain followed.
pub const MAX_DEPTH: usize = 64;
/// QEMU's own limit on a backing file name.
const MAX_NAME: u32 = 1023;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

/// One image below another in a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    /// The local file, resolved against the directory of the image that names it.
    pub path: Option<PathBuf>,
    /// The name as the image records it.
    pub name: String,
    pub format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The backing file named in a qcow2 image's header (None: it has none).
pub fn qcow2_backing(image: &Path) -> Result<Option<(String, Option<String>)>> {
    let file = std::fs::File::open(image).with_context(|| format!("open {}", image.display()))?;
    let mut header = [0u8; 104];
    file.read_exact_at(&mut header, 0).with_context(|| format!("{}: qcow2 header", image.display()))?;
    if &header[..4] != b"QFI\xfb" {
        bail!("{} is not a qcow2 image", image.display());
    }
    let version = be32(&header, 4);
    let (offset, len) = (be64(&header, 8), be32(&header, 16));
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > MAX_NAME {
        bail!("{}: backing file name of {len} bytes (QEMU allows {MAX_NAME})", image.display());
    }
    let mut name = vec![0u8; len as usize];
    file.read_exact_at(&mut name, offset).with_context(|| format!("{}: backing file name", image.display()))?;
    let name =
        String::from_utf8(name).with_context(|| format!("{}: backing file name is not UTF-8", image.display()))?;
    // Header extensions follow the header (72 bytes in version 2, header_length in 3).
    let mut at = if version >= 3 { u64::from(be32(&header, 100)) } else { 72 };
    let mut format = None;
    for _ in 0..64 {
        let mut ext = [0u8; 8];
        if at >= offset || file.read_exact_at(&mut ext, at).is_err() {
            break;
        }
        let (kind, elen) = (be32(&ext, 0), be32(&ext, 4));
        if kind == 0 || elen > 65536 {
            break;
        }
        if kind == EXT_BACKING_FORMAT {
            let mut f = vec![0u8; elen as usize];
            file.read_exact_at(&mut f, at + 8)?;
            format = String::from_utf8(f).ok();
        }
        at += 8 + u64::from(elen).div_ceil(8) * 8;
    }
    Ok(Some((name, format)))
}

/// A backing name resolved as QEMU resolves it; None for protocol or `json:` names.
fn resolve(name: &str, image: &Path) -> Option<PathBuf> {
    if name.starts_with("json:") || (name.contains("://") && !name.starts_with("file://")) {
        return None;
    }
    let name = name.strip_prefix("file://").or_else(|| name.strip_prefix("file:")).unwrap_or(name);
    let p = Path::new(name);
    Some(if p.is_absolute() { p.to_path_buf() } else { image.parent().unwrap_or(Path::new(".")).join(p) })
}

/// The chain below `image` (nearest first), read from qcow2 headers, or from `qemu-img` for
/// other formats with parents. Raw images and formats without parents have none.
pub fn chain(image: &Path) -> Result<Vec<Backing>> {
    let mut out = Vec::new();
    let mut at = image.to_path_buf();
    let mut seen = vec![at.canonicalize().unwrap_or_else(|_| at.clone())];
    loop {
        let format = crate::qemu::image_format(&at)?;
        let next = match format.as_deref() {
            Some("qcow2") => qcow2_backing(&at)?,
            Some("vmdk" | "vhdx" | "qed" | "vpc") => return Ok([out, qemu_img_chain(&at)?].concat()),
            _ => None,
        };
        let Some((name, format)) = next else { return Ok(out) };
        let path = resolve(&name, &at);
        out.push(Backing { path: path.clone(), name, format });
        let Some(path) = path else { return Ok(out) };
        if out.len() > MAX_DEPTH {
            bail!("{}: backing chain deeper than {MAX_DEPTH}", image.display());
        }
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        if seen.contains(&canonical) {
            bail!("{}: backing chain loops at {}", image.display(), path.display());
        }
        if !path.exists() {
            return Ok(out);
        }
        seen.push(canonical);
        at = path;
    }
}

/// The chain below a non-qcow2 image, from `qemu-img info --backing-chain` (shared locks: the
/// image may be open in a running VM).
fn qemu_img_chain(image: &Path) -> Result<Vec<Backing>> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--force-share", "--backing-chain", "--output=json"])
        .arg(image)
        .output()
        .context("run qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img info {}: {}", image.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let infos: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).context("qemu-img info output")?;
    Ok(infos
        .iter()
        .skip(1)
        .filter_map(|i| {
            let name = i.get("filename")?.as_str()?.to_string();
            let format = i.get("format").and_then(|f| f.as_str()).map(str::to_string);
            Some(Backing { path: resolve(&name, image), name, format })
        })
        .collect())
}
