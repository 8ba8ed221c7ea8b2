//! Helpers for the VM tests: the real `libvirtd` that `.ci/run` starts (`qemu:///system`,
//! QEMU under TCG), test domains that are always destroyed and undefined, and ext4 volumes on
//! loop devices (plain, or served by `rime serve` through its FUSE file) that QEMU, running as
//! `libvirt-qemu`, can reach.
//!
//! libvirt is shared by every test of the binary, so each test names its domains with its own
//! tag and looks only at those; a test that acts on every domain (`--all`) takes [`exclusive`].

#![allow(dead_code)]

use crate::common::{sh, Env, LoopDev, Mount};
use crate::hot_support::require;
use crate::hot_support::Served;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub mod guest;

static LIBVIRT: RwLock<()> = RwLock::new(());

fn check_libvirt() {
    require(&["virsh", "qemu-img", "qemu-io", "mkfs.ext4", "losetup"]);
    let (ok, _, err) = virsh_status(&["uri"]);
    assert!(ok, "libvirtd does not answer at qemu:///system (.ci/run starts it): {err}");
}

/// Shared use of libvirt: this test touches only its own domains.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    check_libvirt();
    LIBVIRT.read().unwrap_or_else(|p| p.into_inner())
}

/// Sole use of libvirt: this test acts on every domain.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    check_libvirt();
    LIBVIRT.write().unwrap_or_else(|p| p.into_inner())
}

pub fn virsh_status(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("virsh")
        .args(["--connect", "qemu:///system", "--quiet"])
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .expect("run virsh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
pub fn virsh(args: &[&str]) -> String {
    let (ok, out, err) = virsh_status(args);
    assert!(ok, "virsh {} failed: {err}", args.join(" "));
    out
}

/// A prefix unique to this test process and tag, for domain names.
pub fn tag(t: &str) -> String {
    format!("rime-test-{}-{t}", std::process::id())
}

/// The test's folder, reachable by QEMU (it runs as libvirt-qemu).
pub fn open_up(env: &Env) {
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// An ext4 volume on a loop device, mounted; with `served`, the image is protected by
/// `rime serve` and the loop device is on its FUSE file.
pub struct Volume {
    pub mount: Mount,
    pub loopdev: LoopDev,
    pub served: Option<Served>,
    pub image: PathBuf,
}

impl Volume {
    pub fn new(env: &Env, name: &str, size_mib: u64, served: bool) -> Volume {
        let image = env.path(&format!("{name}.img"));
        sh("truncate", &["-s", &format!("{size_mib}M"), image.to_str().unwrap()]);
        sh("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let served = served.then(|| {
            let dir = env.path(&format!("{name}-serve"));
            std::fs::create_dir_all(&dir).unwrap();
            Served::start(&dir, &image, true, &[])
        });
        let carrier = served.as_ref().map_or(image.clone(), |s| s.fuse_file());
        let loopdev = LoopDev::attach(&carrier);
        let mount = Mount::new(&loopdev.dev, &env.path(&format!("{name}-mnt")), &[]);
        std::fs::set_permissions(&mount.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Volume { mount, loopdev, served, image }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mount.dir.join(rel)
    }

    pub fn mount_point(&self) -> &str {
        self.mount.dir.to_str().unwrap()
    }
}

/// A qcow2 image (on `backing`, if given).
pub fn qcow2(path: &Path, size_mib: u64, backing: Option<&Path>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let b;
    if let Some(back) = backing {
        b = back.to_str().unwrap().to_string();
        args.extend(["-b", &b, "-F", "qcow2"]);
    }
    let p = path.to_str().unwrap().to_string();
    let size = format!("{size_mib}M");
    args.push(&p);
    if backing.is_none() {
        args.push(&size);
    }
    sh("qemu-img", &args);
}

/// A raw file of `size_kib` (a floppy or ISO stand-in, or a raw disk).
pub fn raw(path: &Path, size_kib: u64) {
    sh("truncate", &["-s", &format!("{size_kib}K"), path.to_str().unwrap()]);
}

/// A disk of a test domain.
#[derive(Clone, Copy)]
pub enum Disk<'a> {
    Qcow2(&'a Path),
    Raw(&'a Path),
    Cdrom(&'a Path),
    Floppy(&'a Path),
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// The `<disk>` elements of `disks`: virtio ones are vda, vdb… in order, CD-ROMs hdc, hdd….
pub fn disks_xml(disks: &[Disk]) -> String {
    let mut devices = String::new();
    let (mut vd, mut hd) = (b'a', b'c');
    for d in disks {
        let (kind, device, path, target) = match d {
            Disk::Qcow2(p) => ("qcow2", "disk", p, format!("vd{}' bus='virtio", vd as char)),
            Disk::Raw(p) => ("raw", "disk", p, format!("vd{}' bus='virtio", vd as char)),
            Disk::Cdrom(p) => ("raw", "cdrom", p, format!("hd{}' bus='ide", hd as char)),
            Disk::Floppy(p) => ("raw", "floppy", p, "fda' bus='fdc".to_string()),
        };
        match d {
            Disk::Qcow2(_) | Disk::Raw(_) => vd += 1,
            Disk::Cdrom(_) => hd += 1,
            Disk::Floppy(_) => {}
        }
        let ro = if device == "cdrom" { "<readonly/>" } else { "" };
        devices.push_str(&format!(
            "<disk type='file' device='{device}'><driver name='qemu' type='{kind}'/><source file='{}'/><target dev='{target}'/>{ro}</disk>",
            escape(path.to_str().unwrap())
        ));
    }
    devices
}

/// The XML of a small test domain: 64 MiB, TCG, no guest OS (SeaBIOS finds nothing to boot and
/// waits), the disks given; `nvram` adds OVMF with a variables file; `extra` goes in `<domain>`.
pub fn domain_xml(name: &str, disks: &[Disk], nvram: bool, extra: &str) -> String {
    let devices = disks_xml(disks);
    let firmware = if nvram {
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>"
    } else {
        ""
    };
    format!(
        "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type>{firmware}</os><features><acpi/></features>{extra}\
         <devices>{devices}</devices></domain>",
        escape(name)
    )
}

/// A test domain, destroyed and undefined (with its managed save, NVRAM and snapshot metadata)
/// when dropped.
pub struct TestDomain {
    pub name: String,
    pub uuid: String,
}

impl TestDomain {
    /// Defines a persistent domain from `xml`.
    pub fn define(dir: &Path, xml: &str) -> TestDomain {
        let file = tempfile::Builder::new().suffix(".xml").tempfile_in(dir).unwrap();
        std::fs::write(file.path(), xml).unwrap();
        virsh(&["define", file.path().to_str().unwrap()]);
        Self::found(xml)
    }

    /// Starts a transient domain from `xml`.
    pub fn create(dir: &Path, xml: &str) -> TestDomain {
        let file = tempfile::Builder::new().suffix(".xml").tempfile_in(dir).unwrap();
        std::fs::write(file.path(), xml).unwrap();
        virsh(&["create", file.path().to_str().unwrap()]);
        Self::found(xml)
    }

    fn found(xml: &str) -> TestDomain {
        let name = domain_name(xml);
        // Found by listing, never by passing the name where virsh could read it as an id.
        for uuid in virsh(&["list", "--all", "--uuid"]).lines().filter(|l| !l.is_empty()) {
            // Other tests' domains come and go meanwhile: one gone is simply not it.
            let (ok, xml, _) = virsh_status(&["dumpxml", "--domain", uuid]);
            if ok && domain_name(&xml) == name {
                return TestDomain { name, uuid: uuid.to_string() };
            }
        }
        panic!("domain {name:?} not found after defining it");
    }

    pub fn state(&self) -> String {
        virsh(&["domstate", "--reason", "--domain", &self.uuid]).trim().to_string()
    }

    pub fn start(&self) {
        virsh(&["start", "--domain", &self.uuid]);
    }

    pub fn suspend(&self) {
        virsh(&["suspend", "--domain", &self.uuid]);
    }

    pub fn managed_save(&self) {
        virsh(&["managedsave", "--domain", &self.uuid]);
    }

    /// An HMP command in its QEMU monitor.
    pub fn hmp(&self, cmd: &str) -> String {
        virsh(&["qemu-monitor-command", "--domain", &self.uuid, "--hmp", cmd])
    }

    /// Waits until its state starts with `prefix`.
    #[track_caller]
    pub fn wait_state(&self, prefix: &str, within: Duration) {
        let t = Instant::now();
        loop {
            let s = self.state();
            if s.starts_with(prefix) {
                return;
            }
            assert!(t.elapsed() < within, "{:?} is {s:?}, not {prefix:?}, after {within:?}", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn xml(&self) -> String {
        virsh(&["dumpxml", "--domain", &self.uuid])
    }
}

/// The `<name>` of a domain XML, unescaped.
pub fn domain_name(xml: &str) -> String {
    let n = xml.split("<name>").nth(1).and_then(|r| r.split("</name>").next()).unwrap_or("");
    n.replace("&quot;", "\"").replace("&apos;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        let _ = virsh_status(&["destroy", "--domain", &self.uuid]);
        // libvirt may still be finishing the destroy's job: try again for a while.
        for _ in 0..50 {
            let args = [
                "undefine",
                "--domain",
                &self.uuid,
                "--managed-save",
                "--nvram",
                "--snapshots-metadata",
                "--checkpoints-metadata",
            ];
            let (ok, _, err) = virsh_status(&args);
            if ok || err.contains("failed to get domain") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: test domain {:?} ({}) could not be undefined", self.name, self.uuid);
    }
}

/// The first virtio disk of a domain, for [`write_in_guest_disk`] (its block backend sits on
/// the device's virtio-backend child).
pub const VDA: &str = "-d /machine/peripheral/virtio-disk0/virtio-backend";

/// Writes `pattern` (a byte) over the first `kib` KiB of a running domain's disk `drive`
/// (through QEMU itself: there is no guest OS to do it).
pub fn write_in_guest_disk(d: &TestDomain, drive: &str, pattern: u8, kib: u64) {
    let out = d.hmp(&format!("qemu-io {drive} \"write -P {pattern} 0 {kib}k\""));
    let lower = out.to_lowercase();
    assert!(!lower.contains("error") && !lower.contains("conflict"), "qemu-io in {:?}: {out}", d.name);
}

/// Whether the first `kib` KiB of an image (read as the guest sees it, sharing its locks) are
/// all `pattern`.
pub fn image_holds(image: &Path, pattern: u8, kib: u64) -> bool {
    let out = Command::new("qemu-io")
        .args(["-U", "-r", "-c", &format!("read -P {pattern} 0 {kib}k")])
        .arg(image)
        .output()
        .expect("run qemu-io");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("Pattern verification failed") && text.contains("read ")
}

/// Domain XML left in libvirt's configuration folder by a domain no longer defined ("not
/// connected"); removed, with any domain defined from it meanwhile, when dropped.
pub struct LeftBehind {
    pub path: PathBuf,
    pub uuid: String,
}

impl LeftBehind {
    pub fn write(name: &str, xml: &str) -> LeftBehind {
        let uuid = format!("0b5e7d1c-9f1e-4a57-8d63-{:012x}", std::process::id() as u64 * 7919 + name.len() as u64);
        let path = Path::new("/etc/libvirt/qemu").join(format!("{name}.xml"));
        std::fs::write(&path, xml.replace("<memory", &format!("<uuid>{uuid}</uuid><memory"))).unwrap();
        LeftBehind { path, uuid }
    }
}

impl Drop for LeftBehind {
    fn drop(&mut self) {
        let _ = virsh_status(&["undefine", "--domain", &self.uuid]);
        let _ = std::fs::remove_file(&self.path);
    }
}
