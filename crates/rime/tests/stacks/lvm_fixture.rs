//! Building real LVM2 layouts in image files without device-mapper.
//!
//! `sfdisk` partitions the image; `pvcreate` and `vgcreate` run on loop devices over the
//! partitions (`losetup -o --sizelimit`); logical volumes are written into the VG's metadata with
//! `vgcfgrestore` from the text `vgcfgbackup` gives, plus a `logical_volumes` section built here
//! (`lvcreate` needs device-mapper). LVM itself therefore writes every label, header and metadata
//! copy Rime reads. Filesystems go into LVs through loop devices at the LVs' offsets. Every LVM
//! command is given a device filter that admits only this fixture's loop devices, so the host's
//! own volumes are never touched.

#![allow(dead_code)]

use crate::common::{sh, MIB};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The extent size the fixtures use.
pub const EXT: u64 = 4 * MIB;
/// Linux LVM's partition type GUID.
pub const LVM_GUID: &str = "E6D6D379-F507-44C2-A23C-238F2A3DF928";

/// A loop device over a byte range of a file; detached on drop.
pub struct RangeLoop {
    pub dev: String,
}

impl RangeLoop {
    #[track_caller]
    pub fn new(file: &Path, offset: u64, size: u64) -> RangeLoop {
        let out = sh(
            "losetup",
            &["--find", "--show", "-o", &offset.to_string(), "--sizelimit", &size.to_string(), file.to_str().unwrap()],
        );
        RangeLoop { dev: out.trim().to_string() }
    }

    pub fn path(&self) -> &Path {
        Path::new(&self.dev)
    }
}

impl Drop for RangeLoop {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("losetup").args(["-d", &self.dev]).status().is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.dev);
    }
}

/// A GPT disk image: `parts` are (size in MiB, 0 for the rest; type GUID or "L").
pub struct Disk {
    pub image: PathBuf,
    /// (start, size) in bytes of each partition, numbered from 1.
    pub parts: Vec<(u64, u64)>,
}

impl Disk {
    #[track_caller]
    pub fn new(image: &Path, size_mib: u64, parts: &[(u64, &str)]) -> Disk {
        let f = std::fs::File::create(image).unwrap();
        f.set_len(size_mib * MIB).unwrap();
        drop(f);
        let mut script = String::from("label: gpt\n");
        for (size, kind) in parts {
            let size = if *size == 0 { String::new() } else { format!("{size}M") };
            script.push_str(&format!(",{size},{kind}\n"));
        }
        pipe("sfdisk", &["-q", image.to_str().unwrap()], &script);
        let json: serde_json::Value = serde_json::from_str(&sh("sfdisk", &["-J", image.to_str().unwrap()])).unwrap();
        let parts = json["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["start"].as_u64().unwrap() * 512, p["size"].as_u64().unwrap() * 512))
            .collect();
        Disk { image: image.to_path_buf(), parts }
    }

    /// Partition `n` (from 1): (start, size).
    pub fn part(&self, n: usize) -> (u64, u64) {
        self.parts[n - 1]
    }

    pub fn part_loop(&self, n: usize) -> RangeLoop {
        let (start, size) = self.part(n);
        RangeLoop::new(&self.image, start, size)
    }
}

#[track_caller]
pub fn pipe(program: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// LVM's tools confined to a set of devices.
pub struct Lvm {
    config: String,
}

impl Lvm {
    pub fn new(devices: &[&RangeLoop]) -> Lvm {
        let accept: Vec<String> = devices.iter().map(|d| format!("\"a|^{}$|\"", d.dev)).collect();
        let filter = format!("[{}, \"r|.*|\"]", accept.join(", "));
        let config = format!(
            "devices {{ filter={filter} global_filter={filter} use_devicesfile=0 }} backup {{ backup=0 archive=0 }}"
        );
        Lvm { config }
    }

    /// Runs an LVM command; returns stdout. Device-mapper errors on stderr are expected here.
    #[track_caller]
    pub fn run(&self, tool: &str, args: &[&str]) -> String {
        let out = self.status(tool, args);
        assert!(out.0, "{tool} {args:?} failed:\n{}", out.2);
        out.1
    }

    pub fn status(&self, tool: &str, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(tool)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `pvcreate` on each device, then `vgcreate` with 4 MiB extents. Returns each PV's
    /// `pe_start` in bytes.
    #[track_caller]
    pub fn create_vg(&self, vg: &str, pvs: &[&RangeLoop], pv_args: &[&str]) -> Vec<u64> {
        for pv in pvs {
            let mut args = vec!["-ff", "-y"];
            args.extend(pv_args);
            args.push(&pv.dev);
            self.run("pvcreate", &args);
        }
        let mut args = vec!["-s", "4m", vg];
        args.extend(pvs.iter().map(|p| p.dev.as_str()));
        self.run("vgcreate", &args);
        pvs.iter().map(|p| self.pe_start(p)).collect()
    }

    /// Where a PV's first extent starts, in bytes.
    pub fn pe_start(&self, pv: &RangeLoop) -> u64 {
        let out = self.run("pvs", &["--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", &pv.dev]);
        out.trim().parse().unwrap()
    }

    /// Adds logical volumes (sections built with [`lv`]) to the VG's metadata.
    #[track_caller]
    pub fn add_lvs(&self, vg: &str, dir: &Path, lvs: &[String]) {
        let backup = dir.join(format!("{vg}.vgcfg"));
        self.run("vgcfgbackup", &["-f", backup.to_str().unwrap(), vg]);
        let text = std::fs::read_to_string(&backup).unwrap();
        // The VG section is the last top-level section: insert before its closing brace.
        let end = text.rfind('}').expect("VG section");
        let with = format!("{}\nlogical_volumes {{\n{}\n}}\n{}", &text[..end], lvs.join("\n"), &text[end..]);
        std::fs::write(&backup, with).unwrap();
        self.run("vgcfgrestore", &["--force", "-f", backup.to_str().unwrap(), vg]);
    }

    /// What LVM itself reads from the devices: one line per LV with its segments.
    pub fn lv_report(&self, vg: &str) -> String {
        let out = self.run(
            "lvs",
            &[
                "-a",
                "--noheadings",
                "--units",
                "b",
                "-o",
                "lv_name,lv_size,segtype,seg_start_pe,seg_size_pe,stripes,seg_pe_ranges,pool_lv,origin",
                vg,
            ],
        );
        // Device names differ between the original and the restored disk; the ranges' PE
        // numbers do not.
        out.lines()
            .map(|l| l.split_whitespace().map(strip_dev).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn strip_dev(word: &str) -> String {
    word.split(' ').map(|w| w.rsplit_once(':').map_or(w.to_string(), |(_, r)| r.to_string())).collect()
}

/// One LV section: `segments` from [`linear`], [`striped`], [`thin_pool`], [`thin`] or [`raw`],
/// in extent order.
pub fn lv(name: &str, visible: bool, segments: &[(u64, String)]) -> String {
    let status = if visible { "\"READ\", \"WRITE\", \"VISIBLE\"" } else { "\"READ\", \"WRITE\"" };
    let mut out = format!(
        "{name} {{\nid = \"{}\"\nstatus = [{status}]\nflags = []\nsegment_count = {}\n",
        fake_uuid(name),
        segments.len()
    );
    let mut start = 0;
    for (i, (count, body)) in segments.iter().enumerate() {
        out.push_str(&format!("segment{} {{\nstart_extent = {start}\nextent_count = {count}\n{body}\n}}\n", i + 1));
        start += count;
    }
    out.push_str("}\n");
    out
}

/// A 32-character LVM UUID derived from a name.
fn fake_uuid(name: &str) -> String {
    let mut h: u64 = 1469598103934665603;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(1099511628211);
    }
    let chars: Vec<char> = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789".chars().collect();
    let raw: String = (0..32)
        .map(|i| {
            h = h.rotate_left(7).wrapping_mul(6364136223846793005).wrapping_add(i);
            chars[(h >> 33) as usize % chars.len()]
        })
        .collect();
    format!(
        "{}-{}-{}-{}-{}-{}-{}",
        &raw[..6],
        &raw[6..10],
        &raw[10..14],
        &raw[14..18],
        &raw[18..22],
        &raw[22..26],
        &raw[26..]
    )
}

/// `count` extents at extent `pe` of PV `pv` (0-based, as `pv0`...).
pub fn linear(count: u64, pv: usize, pe: u64) -> (u64, String) {
    (count, format!("type = \"striped\"\nstripe_count = 1\nstripes = [\"pv{pv}\", {pe}]"))
}

/// `count` extents striped over `(pv, pe)` places in chunks of `stripe_kib`.
pub fn striped(count: u64, stripe_kib: u64, places: &[(usize, u64)]) -> (u64, String) {
    let list: Vec<String> = places.iter().map(|(pv, pe)| format!("\"pv{pv}\", {pe}")).collect();
    (
        count,
        format!(
            "type = \"striped\"\nstripe_count = {}\nstripe_size = {}\nstripes = [{}]",
            places.len(),
            stripe_kib * 2,
            list.join(", ")
        ),
    )
}

pub fn thin_pool(count: u64, metadata: &str, data: &str, chunk_kib: u64) -> (u64, String) {
    (
        count,
        format!(
            "type = \"thin-pool\"\nmetadata = \"{metadata}\"\npool = \"{data}\"\ntransaction_id = 3\nchunk_size = {}\ndiscards = \"passdown\"\nzero_new_blocks = 1",
            chunk_kib * 2
        ),
    )
}

pub fn thin(count: u64, pool: &str, device_id: u64, origin: Option<&str>) -> (u64, String) {
    let origin = origin.map(|o| format!("\norigin = \"{o}\"")).unwrap_or_default();
    (count, format!("type = \"thin\"\nthin_pool = \"{pool}\"\ntransaction_id = 0\ndevice_id = {device_id}{origin}"))
}

pub fn raw(count: u64, body: &str) -> (u64, String) {
    (count, body.to_string())
}

/// Byte offset in the disk of extent `pe` of a PV in a partition starting at `part_start`.
pub fn extent_at(part_start: u64, pe_start: u64, pe: u64) -> u64 {
    part_start + pe_start + pe * EXT
}

/// Asserts that `restored` equals `original` with every byte Rime's map of it leaves out
/// zeroed ("bit-exact on used blocks"), and that the map did leave something out.
#[track_caller]
pub fn assert_restore_is_masked_original(original: &Path, restored: &Path) {
    use std::os::unix::fs::FileExt;
    let volume = rime_volume::Volume::open(original, false).unwrap();
    let mut layout = rime_volume::layout::map_volume(&volume.region(), &Default::default()).unwrap();
    let (a, b) = (std::fs::File::open(original).unwrap(), std::fs::File::open(restored).unwrap());
    let step = 4 * MIB;
    let (mut x, mut y) = (vec![0u8; step as usize], vec![0u8; step as usize]);
    let (mut used, mut left_out) = (Vec::new(), false);
    let mut pos = 0;
    while pos < volume.size {
        let n = step.min(volume.size - pos);
        a.read_exact_at(&mut x[..n as usize], pos).unwrap();
        b.read_exact_at(&mut y[..n as usize], pos).unwrap();
        used.clear();
        layout.map.used_ranges(pos, n, &mut used).unwrap();
        let mut masked = vec![0u8; n as usize];
        for r in &used {
            let (s, e) = ((r.start - pos) as usize, (r.end - pos) as usize);
            masked[s..e].copy_from_slice(&x[s..e]);
        }
        if let Some(i) = (0..n as usize).find(|&i| masked[i] != y[i]) {
            panic!("{} differs from the masked original at byte {}", restored.display(), pos + i as u64);
        }
        left_out |= masked[..] != x[..n as usize];
        pos += n;
    }
    assert!(left_out, "the original held bytes the map leaves out; none were");
}
