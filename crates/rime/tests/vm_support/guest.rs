//! A small real guest for the VM tests: Debian's kernel (`linux-image-amd64`), booted directly by
//! QEMU under TCG, with an initramfs made here from `busybox-static`, `qemu-ga` (with the shared
//! libraries `ldd` names) and the few modules it needs from `/lib/modules` (virtio PCI, disk and
//! console; ext4; the ACPI power button). No root disk: the initramfs is the root filesystem.
//!
//! In the guest, busybox's init runs `/etc/rc`, which loads the modules, names the virtio ports
//! as udev would (`/dev/virtio-ports/NAME`), mounts the ext4 data disk `/dev/vda` at `/mnt/data`
//! (and any other ext2/3/4 disk `/dev/vdX` at `/mnt/vdX`), starts busybox's acpid (the power
//! button powers off) and prints `rime-guest: ready` on the serial console, which goes to a file
//! the test reads. Init then runs qemu-ga on its virtio-serial channel (and starts it again if it
//! ends). Anything amiss is a console line starting `rime-guest: problem:`, which fails
//! [`Guest::wait_ready`] and the shutdowns. A poweroff — the agent's `guest-shutdown` (it runs our `/sbin/shutdown`), the power
//! button, `poweroff` — stops the writer, ends every process, unmounts the disks (printing
//! `rime-guest: unmounted MOUNTPOINT`) and powers off, so the disks are clean for `e2fsck`.
//!
//! The host drives the guest through the agent: `guest-exec` runs `/bin/sh -c SCRIPT`
//! ([`Guest::exec`]), `guest-fsfreeze-*` freezes the mounted disks (`virsh domfsfreeze`).
//!
//! The writer (`/bin/rime-writer DIR`, started by [`Guest::start_writer`] or at boot with
//! `rime.writer` on the kernel command line) writes DIR/log and DIR/f0..f15 until
//! [`Guest::stop_writer`] or a poweroff: round i writes `f(i mod 16)` whole as 64 KiB of
//! `rime-writer i` lines (fsynced), then appends the line `i` to `log` (fsynced); rounds are
//! numbered on from the log's last line. So in any crash-consistent image the lines of `log` are
//! the numbers from 1 on (the last one perhaps cut short), and each `fN` is made of lines of one
//! round (a file being rewritten may also be cut short or hold a mix of two rounds).
//!
//! Boot to a ready agent takes about 8–12 s under TCG on a busy 2-core machine: the kernel's
//! bzImage is decompressed on the host and QEMU boots the ELF through its PVH entry, which saves
//! the decompression under emulation (about half the boot).

use super::{escape, virsh, virsh_status, Disk, TestDomain};
use crate::common::sh;
use crate::hot_support::require;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Host tools the guest is made from (packages: see `.ci/run`).
const TOOLS: &[&str] = &["busybox", "qemu-ga", "qemu-img", "mkfs.ext4", "e2fsck", "debugfs", "ldd", "xz"];
const BUSYBOX: &str = "/bin/busybox";
const QEMU_GA: &str = "/usr/sbin/qemu-ga";
/// Modules the guest cannot do without, with their dependencies (unless built in).
const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console", "ext4"];
/// Modules loaded when the kernel has them: ext4's checksums through the crypto API, and the
/// power button (with evdev, which acpid reads).
const OPTIONAL_MODULES: &[&str] = &["crc32c_generic", "button", "evdev"];

/// How long a `guest-exec` may run before [`Guest::exec`] gives up.
pub const EXEC_WAIT: Duration = Duration::from_secs(120);

/// `/etc/inittab`: busybox init runs /etc/rc, then keeps qemu-ga running; on poweroff, reboot
/// or halt it runs /etc/rc.shutdown before ending every process.
const INITTAB: &str = "\
::sysinit:/etc/rc
::respawn:/usr/sbin/qemu-ga --method virtio-serial --path /dev/virtio-ports/org.qemu.guest_agent.0 --logfile /run/qemu-ga.log --statedir /run
::shutdown:/etc/rc.shutdown
";

const RC: &str = r#"#!/bin/sh
# The guest's boot (busybox init's sysinit); see crates/rime/tests/vm_support/guest.rs.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
up() { cut -d' ' -f1 /proc/uptime; }
echo "rime-guest: init at $(up) s, kernel $(uname -r)"
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "rime-guest: problem: insmod $m failed"
done < /etc/modules
# Give the devices a moment to appear (probes run as the drivers load; the host names the
# ports a little later).
i=0
while [ $i -lt 100 ]; do
  ls /sys/class/virtio-ports/*/name >/dev/null 2>&1 && [ -b /dev/vda ] && break
  sleep 0.1; i=$((i + 1))
done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
done
[ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] || echo "rime-guest: problem: no agent channel"
for b in /sys/block/vd*; do
  d=${b##*/}
  if [ "$d" = vda ]; then m=/mnt/data; else m=/mnt/$d; fi
  # ext2/3/4 magic 0xEF53 at byte 1080
  if [ "$(hexdump -s 1080 -n 2 -e '2/1 "%02x"' /dev/$d 2>/dev/null)" = 53ef ]; then
    mkdir -p $m
    if mount -t ext4 /dev/$d $m; then
      echo "rime-guest: mounted /dev/$d at $m"
    else
      echo "rime-guest: problem: mount of /dev/$d failed"; dmesg | tail -n 20
    fi
  else
    echo "rime-guest: /dev/$d holds no ext filesystem: left alone"
  fi
done
[ -b /dev/vda ] || echo "rime-guest: problem: no /dev/vda"
# acpid reads the power button's event device: wait for its node.
i=0
while [ $i -lt 50 ]; do
  for e in /sys/class/input/event*; do
    [ "$(cat $e/device/name 2>/dev/null)" = "Power Button" ] && [ -c /dev/input/${e##*/} ] && i=1000
  done
  [ $i -ge 1000 ] && break
  sleep 0.1; i=$((i + 1))
done
if [ $i -ge 1000 ]; then
  setsid acpid -f -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid </dev/null >/dev/null 2>&1 &
else
  echo "rime-guest: problem: no power button"
fi
case " $(cat /proc/cmdline) " in
  *" rime.writer "*) setsid /bin/rime-writer /mnt/data/writer </dev/null >/dev/null 2>&1 & ;;
esac
echo "rime-guest: ready at $(up) s"
"#;

const RC_SHUTDOWN: &str = r#"#!/bin/sh
# Busybox init runs this on poweroff, halt or reboot, before it ends every process.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo "rime-guest: stopping"
if [ -e /run/rime-writer.pid ]; then
  touch /run/rime-writer.stop
  i=0
  while [ ! -e /run/rime-writer.done ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
fi
mounts=$(grep ' /mnt/' /proc/mounts | cut -d' ' -f2)
for m in $mounts; do fsfreeze -u "$m" 2>/dev/null; done
for p in /proc/[0-9]*; do
  p=${p#/proc/}
  [ "$p" = 1 ] || [ "$p" = $$ ] || kill -TERM "$p" 2>/dev/null
done
sleep 0.5
for p in /proc/[0-9]*; do
  p=${p#/proc/}
  [ "$p" = 1 ] || [ "$p" = $$ ] || kill -KILL "$p" 2>/dev/null
done
sync
for m in $mounts; do
  if umount "$m"; then
    echo "rime-guest: unmounted $m"
  else
    echo "rime-guest: problem: could not unmount $m"; mount -o remount,ro "$m"
  fi
done
echo "rime-guest: halting"
"#;

/// What qemu-ga runs for `guest-shutdown`: `shutdown -h -P|-H|-r +0 MESSAGE`.
const SHUTDOWN: &str = r#"#!/bin/sh
echo "rime-guest: shutdown $*" > /dev/console
case " $* " in
  *" -r "*) exec /bin/reboot ;;
  *" -H "*) exec /bin/halt ;;
  *) exec /bin/poweroff ;;
esac
"#;

/// busybox acpid's action for the power button.
const POWER_BUTTON: &str = "#!/bin/sh\nexec /bin/poweroff\n";

const WRITER: &str = r#"#!/bin/sh
# rime-writer DIR: see crates/rime/tests/vm_support/guest.rs.
dir=${1:-/mnt/data/writer}
mkdir -p "$dir" || exit 1
rm -f /run/rime-writer.done
echo $$ > /run/rime-writer.pid
# Rounds go on from the last one logged (by an earlier run).
i=$(tail -n 1 "$dir/log" 2>/dev/null)
case "$i" in '' | *[!0-9]*) i=0 ;; esac
while [ ! -e /run/rime-writer.stop ]; do
  i=$((i + 1))
  yes "rime-writer $i" | head -c 65536 | dd of="$dir/f$((i % 16))" bs=64k conv=fsync 2>/dev/null
  echo $i >> "$dir/log"
  sync "$dir/log"
  echo $i > /run/rime-writer.last
done
echo $i > /run/rime-writer.done
"#;

// ---------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------

/// Orders kernel releases by their numbers (`6.1.0-57-amd64` after `6.1.0-9-amd64`).
fn release_key(r: &str) -> Vec<u64> {
    r.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0)).collect()
}

/// The release of the newest kernel installed in /boot whose modules are installed too.
pub fn kernel_release() -> String {
    let mut found: Vec<String> = std::fs::read_dir("/boot")
        .expect("read /boot")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_string))
        .filter(|r| Path::new("/lib/modules").join(r).join("modules.dep").exists())
        .collect();
    found.sort_by_key(|r| release_key(r));
    found.pop().expect("no kernel in /boot with its modules (linux-image-amd64, installed by .ci/run)")
}

/// The kernel the guest boots: Debian's bzImage in /boot.
pub fn kernel() -> PathBuf {
    Path::new("/boot").join(format!("vmlinuz-{}", kernel_release()))
}

/// The bzImage's payload, decompressed: the kernel's ELF, which QEMU boots through its PVH
/// entry without running the decompressor under emulation. `None` if the kernel has no PVH
/// entry or its payload cannot be decompressed here.
fn vmlinux(bz: &[u8], release: &str, dir: &Path) -> Option<Vec<u8>> {
    let config = std::fs::read_to_string(format!("/boot/config-{release}")).ok()?;
    if !config.lines().any(|l| l == "CONFIG_PVH=y") {
        return None;
    }
    // The x86 boot protocol's setup header (2.08 and later): the payload's offset from the
    // protected-mode code, after the setup sectors, and its length.
    let u32_at = |o: usize| Some(u32::from_le_bytes(bz.get(o..o + 4)?.try_into().ok()?) as usize);
    if bz.get(0x202..0x206)? != b"HdrS" || u16::from_le_bytes([*bz.get(0x206)?, *bz.get(0x207)?]) < 0x208 {
        return None;
    }
    let setup_sects = match *bz.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = bz.get(start..start + u32_at(0x24c)?)?;
    // The build appends the decompressed size to the compressed stream.
    let size = u32_at(start + payload.len() - 4)?;
    let tool = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "xz"
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else {
        return None;
    };
    let file = dir.join("vmlinux.payload");
    std::fs::write(&file, payload).ok()?;
    // The appended size trails the stream: the tool may complain about it once it is done.
    let out = Command::new(tool).arg("-dc").arg(&file).output().ok()?;
    let _ = std::fs::remove_file(&file);
    (out.stdout.len() == size && out.stdout.starts_with(b"\x7fELF")).then_some(out.stdout)
}

/// The kernel as the guest boots it, in `dir` (which QEMU can read): the decompressed ELF when
/// QEMU can boot it directly (PVH), else a copy of the bzImage.
pub fn guest_kernel(dir: &Path) -> PathBuf {
    let release = kernel_release();
    let bz = std::fs::read(kernel()).expect("read the kernel");
    let (path, bytes) = match vmlinux(&bz, &release, dir) {
        Some(elf) => (dir.join("vmlinux"), elf),
        None => (dir.join("vmlinuz"), bz),
    };
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// Initramfs
// ---------------------------------------------------------------------------------------------

enum Entry {
    Dir,
    File(u32, Vec<u8>),
    Symlink(String),
    Char(u32, u32, u32),
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs.
#[derive(Default)]
struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// Adds `path` (absolute) and any missing parent directories.
    fn add(&mut self, path: &str, entry: Entry) {
        let rel = path.trim_start_matches('/');
        let mut parent = String::new();
        for part in rel.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry::Dir);
        }
        self.entries.insert(rel.to_string(), entry);
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.add(path, Entry::File(mode, data));
    }

    /// A file of the host, at the same path.
    fn host_file(&mut self, path: &str, mode: u32) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        self.file(path, mode, data);
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let pad = |out: &mut Vec<u8>| out.resize(out.len().next_multiple_of(4), 0);
        let record = |out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
            let fields =
                [ino as u32, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
            out.extend_from_slice(b"070701");
            for f in fields {
                out.extend_from_slice(format!("{f:08x}").as_bytes());
            }
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            pad(out);
            out.extend_from_slice(data);
            pad(out);
        };
        for (i, (name, entry)) in self.entries.iter().enumerate() {
            match entry {
                Entry::Dir => record(&mut out, i + 1, name, 0o040755, (0, 0), &[]),
                Entry::File(mode, data) => record(&mut out, i + 1, name, 0o100000 | mode, (0, 0), data),
                Entry::Symlink(target) => record(&mut out, i + 1, name, 0o120777, (0, 0), target.as_bytes()),
                Entry::Char(mode, major, minor) => {
                    record(&mut out, i + 1, name, 0o020000 | mode, (*major, *minor), &[])
                }
            }
        }
        record(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
        out
    }
}

/// The shared libraries `ldd` finds for `binary` (none for a static one), with the loader.
fn libraries(binary: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(binary).env("LC_ALL", "C").output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Vec::new();
    }
    let libs: Vec<String> = text
        .lines()
        .filter_map(|l| {
            assert!(!l.contains("not found"), "ldd {binary}: {l}");
            l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_string)
        })
        .collect();
    assert!(!libs.is_empty(), "ldd {binary} named no library:\n{text}");
    libs
}

/// The kernel's modules: names (`ext4`, `virtio_pci`) to their files and dependencies, from
/// modules.dep, and the names built into the kernel.
struct Modules {
    dir: PathBuf,
    files: HashMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
}

fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

impl Modules {
    fn of(release: &str) -> Modules {
        let dir = Path::new("/lib/modules").join(release);
        let dep = std::fs::read_to_string(dir.join("modules.dep")).expect("read modules.dep");
        let files = dep
            .lines()
            .filter_map(|l| {
                let (file, deps) = l.split_once(':')?;
                let deps = deps.split_whitespace().map(module_name).collect();
                Some((module_name(file), (file.to_string(), deps)))
            })
            .collect();
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let builtin = builtin.lines().map(module_name).collect();
        Modules { dir, files, builtin }
    }

    /// Appends `name` to `order` after its dependencies; false if the kernel has no such
    /// module (built in counts as having it, with nothing to load).
    fn load(&self, name: &str, order: &mut Vec<String>) -> bool {
        if order.iter().any(|m| m == name) || self.builtin.contains(name) {
            return true;
        }
        let Some((_, deps)) = self.files.get(name) else { return false };
        for d in deps.iter().rev() {
            assert!(self.load(d, order), "module {name} needs {d}, which the kernel does not have");
        }
        order.push(name.to_string());
        true
    }

    /// The module's object, decompressed if the kernel ships it compressed.
    fn object(&self, name: &str) -> Vec<u8> {
        let path = self.dir.join(&self.files[name].0);
        let tool = match path.extension().and_then(|e| e.to_str()) {
            Some("ko") => return std::fs::read(&path).unwrap(),
            Some("xz") => "xz",
            Some("zst") => "zstd",
            Some("gz") => "gzip",
            other => panic!("module {} compressed as {other:?}", path.display()),
        };
        let out = Command::new(tool).arg("-dc").arg(&path).output().expect("decompress a module");
        assert!(out.status.success(), "{tool} -dc {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

/// Writes the guest's initramfs (an uncompressed cpio archive, which the kernel unpacks faster
/// under TCG than a compressed one) into `dir`; returns its path.
pub fn build_initramfs(dir: &Path) -> PathBuf {
    require(TOOLS);
    let mut a = Archive::default();
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp", "/mnt/data", "/usr/bin", "/sbin"] {
        a.add(d, Entry::Dir);
    }
    a.add("/var/run", Entry::Symlink("../run".into()));
    a.add("/dev/console", Entry::Char(0o600, 5, 1));

    // busybox and every applet it has, as links in /bin (our /sbin/shutdown is not one).
    a.host_file(BUSYBOX, 0o755);
    let list = sh(BUSYBOX, &["--list"]);
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "busybox") {
        a.add(&format!("/bin/{applet}"), Entry::Symlink("busybox".into()));
    }
    a.add("/init", Entry::Symlink("bin/busybox".into()));
    a.host_file(QEMU_GA, 0o755);
    for lib in [libraries(BUSYBOX), libraries(QEMU_GA)].concat() {
        a.host_file(&lib, 0o755);
    }

    let modules = Modules::of(&kernel_release());
    let mut order = Vec::new();
    for m in MODULES {
        assert!(modules.load(m, &mut order), "the kernel has no module {m}");
    }
    for m in OPTIONAL_MODULES {
        modules.load(m, &mut order);
    }
    for m in &order {
        a.file(&format!("/lib/modules/{m}.ko"), 0o644, modules.object(m));
    }
    a.file("/etc/modules", 0o644, order.iter().map(|m| format!("{m}\n")).collect::<String>().into_bytes());

    a.file("/etc/inittab", 0o644, INITTAB.into());
    a.file("/etc/rc", 0o755, RC.into());
    a.file("/etc/rc.shutdown", 0o755, RC_SHUTDOWN.into());
    a.file("/sbin/shutdown", 0o755, SHUTDOWN.into());
    a.file("/etc/acpi/PWRF/00000080", 0o755, POWER_BUTTON.into());
    a.file("/bin/rime-writer", 0o755, WRITER.into());

    let path = dir.join("rime-guest.cpio");
    std::fs::write(&path, a.bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// Disks
// ---------------------------------------------------------------------------------------------

/// A qcow2 image at `path` holding an ext4 filesystem of `size_mib` (made with mkfs.ext4 on a
/// raw file, then converted; inode tables and journal written now, so the guest's kernel has no
/// lazy initialisation to do behind the test's back).
pub fn ext4_qcow2(path: &Path, size_mib: u64) {
    let raw = path.with_extension("mkfs.raw");
    let r = raw.to_str().unwrap();
    sh("truncate", &["-s", &format!("{size_mib}M"), r]);
    sh("mkfs.ext4", &["-q", "-F", "-L", "rime-data", "-E", "lazy_itable_init=0,lazy_journal_init=0", r]);
    sh("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", r, path.to_str().unwrap()]);
    std::fs::remove_file(&raw).unwrap();
}

/// A raw copy of a (shut down) guest disk at `raw`, for e2fsck and debugfs.
pub fn to_raw(image: &Path, raw: &Path) {
    sh("qemu-img", &["convert", "-q", "-O", "raw", image.to_str().unwrap(), raw.to_str().unwrap()]);
}

/// `e2fsck -fn` of a raw image: (clean, its output).
pub fn e2fsck(raw: &Path) -> (bool, String) {
    let out = Command::new("e2fsck").args(["-fn"]).arg(raw).env("LC_ALL", "C").output().expect("run e2fsck");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A file's contents in an ext2/3/4 raw image (`debugfs -R 'cat PATH'`).
pub fn debugfs_cat(raw: &Path, path: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(raw).output().expect("run debugfs");
    assert!(out.status.success(), "debugfs cat {path}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------------------------

/// What a `guest-exec` gave.
#[derive(Debug)]
pub struct Exec {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

fn base64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c:?}"),
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A running guest: its domain (destroyed and undefined when dropped) and its console log.
pub struct Guest {
    pub domain: TestDomain,
    pub console: PathBuf,
    /// When `virsh start` was called.
    pub started: Instant,
}

impl Guest {
    /// Defines and starts the guest `name` with `data_disk` (qcow2, ext4 from [`ext4_qcow2`]) as
    /// /dev/vda, mounted at /mnt/data, and `extra_disks` as /dev/vdb… (each ext2/3/4 one mounted
    /// at /mnt/vdX). `dir` (0755: see `open_up`) receives the kernel, initramfs (built there
    /// unless it is already) and console log. Does not wait: see [`Guest::wait_ready`].
    pub fn boot(dir: &Path, name: &str, data_disk: &Path, extra_disks: &[Disk]) -> Guest {
        Self::boot_with(dir, name, data_disk, extra_disks, "")
    }

    /// [`Guest::boot`] with more kernel command line (`rime.writer` starts the writer at boot).
    pub fn boot_with(dir: &Path, name: &str, data_disk: &Path, extra_disks: &[Disk], cmdline: &str) -> Guest {
        let initrd = dir.join("rime-guest.cpio");
        let initrd = if initrd.exists() { initrd } else { build_initramfs(dir) };
        let kernel = ["vmlinux", "vmlinuz"].map(|k| dir.join(k)).into_iter().find(|k| k.exists());
        let kernel = kernel.unwrap_or_else(|| guest_kernel(dir));
        let file_name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let console = dir.join(format!("{file_name}.console.log"));
        let disks = [&[Disk::Qcow2(data_disk)], extra_disks].concat();
        let xml = format!(
            "<domain type='qemu'><name>{}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
             <cmdline>console=ttyS0 panic=-1 quiet {}</cmdline></os><features><acpi/></features>\
             <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
             <devices>{}<serial type='file'><source path='{}' append='off'/><target port='0'/></serial>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <memballoon model='none'/></devices></domain>",
            escape(name),
            escape(kernel.to_str().unwrap()),
            escape(initrd.to_str().unwrap()),
            escape(cmdline),
            super::disks_xml(&disks),
            escape(console.to_str().unwrap()),
        );
        let domain = TestDomain::define(dir, &xml);
        let started = Instant::now();
        domain.start();
        Guest { domain, console, started }
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits until the console shows `needle`.
    #[track_caller]
    pub fn wait_console(&self, needle: &str, within: Duration) {
        let t = Instant::now();
        while !self.console().contains(needle) {
            let state = self.domain.state();
            assert!(state.starts_with("running"), "{:?} is {state}:\n{}", self.domain.name, self.console());
            assert!(t.elapsed() < within, "no {needle:?} after {within:?}:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the guest has said it is ready and its agent answers; returns the time since
    /// it was started.
    #[track_caller]
    pub fn wait_ready(&self, within: Duration) -> Duration {
        let left = within.saturating_sub(self.started.elapsed());
        self.wait_console("rime-guest: ready", left);
        let console = self.console();
        assert!(!console.contains("rime-guest: problem"), "the guest's boot went wrong:\n{console}");
        while !self.agent_ping() {
            assert!(self.started.elapsed() < within, "the agent does not answer after {within:?}:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(100));
        }
        self.started.elapsed()
    }

    /// An agent command (`execute`, with `arguments` unless null): its `return`, or libvirt's
    /// error.
    pub fn agent(&self, execute: &str, arguments: Value) -> Result<Value, String> {
        let mut cmd = json!({ "execute": execute });
        if !arguments.is_null() {
            cmd["arguments"] = arguments;
        }
        let cmd = cmd.to_string();
        let args = ["qemu-agent-command", "--domain", &self.domain.uuid, "--timeout", "30", "--cmd", &cmd];
        let (ok, out, err) = virsh_status(&args);
        if !ok {
            return Err(err.trim().to_string());
        }
        let reply: Value = serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))?;
        Ok(reply["return"].clone())
    }

    pub fn agent_ping(&self) -> bool {
        self.agent("guest-ping", Value::Null).is_ok()
    }

    /// Starts `/bin/sh -c script` through the agent (`guest-exec`); its output is kept for
    /// [`Guest::exec_status`] if `capture`. Returns its pid.
    #[track_caller]
    pub fn spawn(&self, script: &str, capture: bool) -> i64 {
        let args = json!({ "path": "/bin/sh", "arg": ["-c", script], "capture-output": capture });
        let r = self.agent("guest-exec", args).unwrap_or_else(|e| panic!("guest-exec {script:?}: {e}"));
        r["pid"].as_i64().unwrap_or_else(|| panic!("guest-exec {script:?}: {r}"))
    }

    /// The outcome of a process [`Guest::spawn`] started, once it has ended.
    #[track_caller]
    pub fn exec_status(&self, pid: i64) -> Option<Exec> {
        let r = self.agent("guest-exec-status", json!({ "pid": pid })).unwrap_or_else(|e| panic!("{e}"));
        if r["exited"] != true {
            return None;
        }
        let text = |k: &str| String::from_utf8_lossy(&base64(r[k].as_str().unwrap_or(""))).into_owned();
        // A process killed by a signal has "signal" instead of "exitcode".
        let code = r["exitcode"].as_i64().unwrap_or_else(|| 128 + r["signal"].as_i64().unwrap_or(0));
        Some(Exec { code, stdout: text("out-data"), stderr: text("err-data") })
    }

    /// Runs `/bin/sh -c script` in the guest and waits for it (at most [`EXEC_WAIT`]).
    #[track_caller]
    pub fn exec(&self, script: &str) -> Exec {
        let pid = self.spawn(script, true);
        let t = Instant::now();
        loop {
            if let Some(e) = self.exec_status(pid) {
                return e;
            }
            assert!(t.elapsed() < EXEC_WAIT, "{script:?} still runs in the guest after {EXEC_WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Guest::exec`] that must succeed; returns its stdout.
    #[track_caller]
    pub fn sh(&self, script: &str) -> String {
        let e = self.exec(script);
        assert_eq!(e.code, 0, "{script:?} failed in the guest: {e:?}");
        e.stdout
    }

    /// Starts the writer on /mnt/data/writer; returns once it has finished a round.
    #[track_caller]
    pub fn start_writer(&self) {
        self.sh("rm -f /run/rime-writer.stop /run/rime-writer.done /run/rime-writer.last; \
             setsid /bin/rime-writer /mnt/data/writer </dev/null >/dev/null 2>&1 &");
        let t = Instant::now();
        while self.writer_rounds().is_none() {
            assert!(t.elapsed() < EXEC_WAIT, "the writer finishes no round:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The writer's last finished round, if it has finished one since it started.
    #[track_caller]
    pub fn writer_rounds(&self) -> Option<u64> {
        self.sh("cat /run/rime-writer.last 2>/dev/null || true").trim().parse().ok()
    }

    /// Stops the writer after its current round; returns that round's number (rounds are
    /// numbered on from those already in the log: this is the log's last line).
    #[track_caller]
    pub fn stop_writer(&self) -> u64 {
        let out = self.sh("touch /run/rime-writer.stop; \
             while [ ! -e /run/rime-writer.done ]; do sleep 0.1; done; cat /run/rime-writer.done");
        out.trim().parse().unwrap_or_else(|_| panic!("writer rounds: {out:?}"))
    }

    /// Freezes the guest's mounted filesystems (`virsh domfsfreeze`); returns how many.
    #[track_caller]
    pub fn freeze(&self) -> usize {
        self.counted("domfsfreeze", "Froze ")
    }

    /// Thaws them (`virsh domfsthaw`); returns how many.
    #[track_caller]
    pub fn thaw(&self) -> usize {
        self.counted("domfsthaw", "Thawed ")
    }

    /// `virsh COMMAND` for this domain (not quiet: the count is in its message) and the number
    /// in its line starting with `prefix` ("Froze 1 filesystem(s)").
    #[track_caller]
    fn counted(&self, command: &str, prefix: &str) -> usize {
        let out = Command::new("virsh")
            .args(["--connect", "qemu:///system", command, "--domain", &self.domain.uuid])
            .env("LC_ALL", "C")
            .output()
            .expect("run virsh");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "virsh {command} failed: {}", String::from_utf8_lossy(&out.stderr));
        let n = text.lines().find_map(|l| l.trim().strip_prefix(prefix)?.split_whitespace().next()?.parse().ok());
        n.unwrap_or_else(|| panic!("no {prefix:?} in the output of virsh {command}: {text:?}"))
    }

    /// Powers the guest off through the agent (`guest-shutdown`) and waits until it is off;
    /// checks that it unmounted /mnt/data.
    #[track_caller]
    pub fn shutdown(&self, within: Duration) {
        self.power_off("agent", within);
    }

    /// Powers the guest off with the ACPI power button, and waits as [`Guest::shutdown`].
    #[track_caller]
    pub fn acpi_shutdown(&self, within: Duration) {
        self.power_off("acpi", within);
    }

    /// `sync` in the guest, then [`Guest::shutdown`].
    #[track_caller]
    pub fn sync_and_shutdown(&self, within: Duration) {
        self.sh("sync");
        self.shutdown(within);
    }

    #[track_caller]
    fn power_off(&self, mode: &str, within: Duration) {
        virsh(&["shutdown", "--domain", &self.domain.uuid, "--mode", mode]);
        let t = Instant::now();
        loop {
            let state = self.domain.state();
            if state.starts_with("shut off") {
                assert_eq!(state, "shut off (shutdown)", "{}", self.console());
                break;
            }
            assert!(
                t.elapsed() < within,
                "{:?} is {state} {within:?} after a shutdown:\n{}",
                self.domain.name,
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let console = self.console();
        assert!(
            console.contains("rime-guest: unmounted /mnt/data") && !console.contains("rime-guest: problem"),
            "/mnt/data not cleanly unmounted:\n{console}"
        );
    }
}
