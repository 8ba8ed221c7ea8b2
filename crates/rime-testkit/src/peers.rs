//! The tools Rime is measured against, run the way an administrator would.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `partclone.<fs> -c -s IMG -o - | zstd -T0 > OUT`; returns the wall time.
pub fn partclone_zstd(fs: &str, img: &Path, out: &Path) -> Duration {
    let t0 = Instant::now();
    let mut partclone = Command::new(format!("partclone.{fs}"))
        .args(["-q", "-c", "-s"])
        .arg(img)
        .args(["-o", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run partclone.{fs}: {e}"));
    let zstd_out = std::fs::File::create(out).unwrap();
    let piped = partclone.stdout.take().expect("piped stdout");
    let zstd = Command::new("zstd").args(["-q", "-T0"]).stdin(piped).stdout(zstd_out).status();
    let cloned = partclone.wait();
    assert!(zstd.is_ok_and(|st| st.success()) && cloned.is_ok_and(|st| st.success()), "partclone.{fs} | zstd failed");
    t0.elapsed()
}
