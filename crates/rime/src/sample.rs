//! The sample volume: a real ext4 image with real files, made when `rime backup` names no
//! volume, so a new user sees a complete backup without preparing anything.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const SAMPLE_SIZE: u64 = 256 << 20;

/// Returns the sample volume's path, creating it on first use.
pub fn ensure_sample_volume(data_dir: &Path) -> Result<PathBuf> {
    let image = data_dir.join("sample-volume.img");
    if image.exists() {
        return Ok(image);
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let content = data_dir.join("sample-content.tmp");
    let _ = std::fs::remove_dir_all(&content);
    populate(&content)?;
    let partial = data_dir.join("sample-volume.img.tmp");
    let file = std::fs::File::create(&partial)?;
    file.set_len(SAMPLE_SIZE)?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rime-sample", "-d"])
        .arg(&content)
        .arg(&partial)
        .output()
        .context("cannot run mkfs.ext4 to make the sample volume (install e2fsprogs)")?;
    let _ = std::fs::remove_dir_all(&content);
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::rename(&partial, &image)?;
    Ok(image)
}

/// Text, binaries copied from /usr/bin, incompressible data, folders and a symlink.
fn populate(dir: &Path) -> Result<()> {
    let docs = dir.join("docs");
    let bin = dir.join("bin");
    let data = dir.join("data");
    for d in [&docs, &bin, &data] {
        std::fs::create_dir_all(d)?;
    }
    for i in 0..200 {
        let mut f = std::fs::File::create(docs.join(format!("report-{i:03}.txt")))?;
        for line in 0..(50 + i * 7) {
            writeln!(f, "report {i} line {line}: the quick brown fox jumps over the lazy dog {}", line * i)?;
        }
    }
    let mut copied = 0u64;
    if let Ok(entries) = std::fs::read_dir("/usr/bin") {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() || copied > 40 << 20 {
                continue;
            }
            if std::fs::copy(e.path(), bin.join(e.file_name())).is_ok() {
                copied += meta.len();
            }
        }
    }
    let mut random = vec![0u8; 16 << 20];
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ std::process::id() as u64;
    for b in random.chunks_mut(8) {
        // xorshift64*: cheap incompressible bytes without another dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        b.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()[..b.len()]);
    }
    std::fs::write(data.join("random.bin"), &random)?;
    std::os::unix::fs::symlink("docs/report-000.txt", dir.join("latest-report"))?;
    Ok(())
}
