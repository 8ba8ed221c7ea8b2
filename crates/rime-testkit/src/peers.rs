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

/// A stand-in VM: `qemu-io` with `image` open read-write, which takes QEMU's image locks as a
/// running QEMU does. It quits when dropped (or earlier with [`QemuHolding::quit`]).
pub struct QemuHolding(Option<std::process::Child>);

impl QemuHolding {
    pub fn open(image: &Path) -> QemuHolding {
        let child = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-io: {e}"));
        // qemu-io opens the image (and takes its locks) right after it starts.
        std::thread::sleep(Duration::from_millis(500));
        QemuHolding(Some(child))
    }

    pub fn quit(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.0.take() {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"quit\n");
            }
            let _ = child.wait();
        }
    }
}

impl Drop for QemuHolding {
    fn drop(&mut self) {
        self.stop();
    }
}
