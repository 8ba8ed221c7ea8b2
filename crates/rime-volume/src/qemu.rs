//! VM disk images: recognising their formats and serving them with a private, read-only
//! `qemu-nbd` on a unix socket (backing chains are followed by qemu).

use anyhow::{bail, Context, Result};
use rime_nbd::NbdClient;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The qemu format name of a disk image file, from its magic bytes; `None` for raw data.
pub fn image_format(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open volume {}", path.display()))?;
    let size = file.metadata()?.len();
    let mut head = [0u8; 512];
    let n = file.take(512).read(&mut head)?;
    let head = &head[..n];
    let format = if head.starts_with(b"QFI\xfb") {
        Some("qcow2")
    } else if head.starts_with(b"vhdxfile") {
        Some("vhdx")
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if head.starts_with(b"conectix") {
        Some("vpc") // dynamic VHD: footer copy at the start
    } else if head.starts_with(b"QED\0") {
        Some("qed")
    } else if n >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        Some("vdi")
    } else if size >= 512 && {
        let mut footer = [0u8; 8];
        std::fs::File::open(path)?.read_exact_at(&mut footer, size - 512).is_ok() && &footer == b"conectix"
    } {
        Some("vpc") // fixed VHD: raw data followed by a 512-byte footer
    } else {
        None
    };
    Ok(format.map(str::to_string))
}

/// A `qemu-nbd --read-only` serving one image on a private unix socket; stopped on drop.
pub struct QemuNbd {
    image: PathBuf,
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl QemuNbd {
    pub fn start(image: &Path, format: &str) -> Result<QemuNbd> {
        Self::start_with_bitmaps(image, format, &[])
    }

    /// [`QemuNbd::start`], also exporting the image's persistent dirty bitmaps `bitmaps` (as the
    /// NBD meta contexts `qemu:dirty-bitmap:<name>`).
    pub fn start_with_bitmaps(image: &Path, format: &str, bitmaps: &[String]) -> Result<QemuNbd> {
        let dir = std::env::temp_dir().join(format!("rime-nbd-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("sock");
        let child = Command::new("qemu-nbd")
            .arg("--read-only")
            .args(bitmaps.iter().map(|b| format!("--bitmap={b}")))
            .arg(format!("--format={format}"))
            .arg("--socket")
            .arg(&socket)
            .arg("--cache=none")
            .arg("--aio=threads")
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                if e.kind() == std::io::ErrorKind::NotFound {
                    bail!(
                        "{} is a {format} disk image, and reading it needs qemu-nbd (install qemu-utils)",
                        image.display()
                    );
                }
                return Err(e).context("start qemu-nbd");
            }
        };
        let mut server = QemuNbd { image: image.to_path_buf(), child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.socket.exists() {
            if server.child.try_wait()?.is_some() {
                let why = server.failure();
                bail!("qemu-nbd cannot open {} as {format}: {why}", image.display());
            }
            if Instant::now() > deadline {
                bail!("qemu-nbd did not start serving {} within 20 s", image.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Connects, retrying while qemu-nbd is still starting: it binds its socket before it
    /// listens, and before it opens the image. If it exits instead, its own reason is reported.
    pub fn connect(&mut self) -> Result<NbdClient> {
        self.connect_with(&[])
    }

    /// [`QemuNbd::connect`] asking for the NBD meta contexts `contexts`.
    pub fn connect_with(&mut self, contexts: &[&str]) -> Result<NbdClient> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match NbdClient::connect_unix_export(&self.socket, "", contexts) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    if self.child.try_wait()?.is_some() {
                        let why = self.failure();
                        bail!("qemu-nbd cannot open {}: {why}", self.image.display());
                    }
                    if Instant::now() > deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// The last line qemu-nbd printed on stderr, after it exited.
    fn failure(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err.lines().last().unwrap_or("it exited").trim().to_string()
    }
}

/// A persistent dirty bitmap of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistentBitmap {
    pub name: String,
    /// Not marked in use: the QEMU that last wrote the image stored it when it stopped.
    pub consistent: bool,
}

/// The persistent dirty bitmaps of a qcow2 image, per `qemu-img info` (shared with any user of
/// the image, which must not be writing it for the answer to hold).
pub fn persistent_bitmaps(image: &Path) -> Result<Vec<PersistentBitmap>> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .context("run qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img info {}: {}", image.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).context("qemu-img info printed no JSON")?;
    let bitmaps = info["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    Ok(bitmaps
        .iter()
        .filter_map(|b| {
            let flags = b["flags"].as_array()?;
            Some(PersistentBitmap {
                name: b["name"].as_str()?.to_string(),
                consistent: !flags.iter().any(|f| f == "in-use"),
            })
        })
        .collect())
}

fn unique() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:x}", t.as_nanos())
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl crate::device::BlockSource for NbdClient {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        NbdClient::read_exact_at(self, buf, offset)
    }
}
