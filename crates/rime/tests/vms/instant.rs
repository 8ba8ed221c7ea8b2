//! `rime vm instant-restore`: a VM run straight from a `rime backup --vm` snapshot, against a
//! real libvirtd and QEMU (TCG; no guest OS, so QEMU's own `qemu-io` reads and writes its
//! disks). The guest's view of each disk is read through its overlay with `qemu-img convert
//! -U`, which follows the overlay's NBD backing into Rime's server, and compared byte for byte
//! with the disk as it was backed up.

use crate::common::*;
use crate::vm_support::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The guest's view of an image now (sharing the running VM's locks).
fn guest_view(image: &Path, out: &Path) -> PathBuf {
    let _ = std::fs::remove_file(out);
    sh("qemu-img", &["convert", "-q", "-U", "-O", "raw", p(image), p(out)]);
    out.to_path_buf()
}

/// The names of the domains on the host.
fn domain_names() -> Vec<String> {
    virsh(&["list", "--all", "--name"]).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// An instant recovery, cancelled (and its domain removed) when dropped, whatever the test did.
struct Instant<'a> {
    env: &'a Env,
    name: String,
    json: Value,
}

impl Instant<'_> {
    fn uuid(&self) -> &str {
        self.json["uuid"].as_str().unwrap()
    }

    fn disk(&self, target: &str) -> &Value {
        self.json["disks"].as_array().unwrap().iter().find(|d| d["target"] == target).unwrap()
    }

    fn overlay(&self, target: &str) -> PathBuf {
        PathBuf::from(self.disk(target)["overlay"].as_str().unwrap())
    }

    fn state_dir(&self) -> PathBuf {
        PathBuf::from(self.json["state_dir"].as_str().unwrap())
    }

    fn server_pid(&self) -> u32 {
        self.json["server_pid"].as_u64().unwrap() as u32
    }

    fn domain(&self) -> TestDomain {
        TestDomain { name: self.name.clone(), uuid: self.uuid().to_string() }
    }
}

impl Drop for Instant<'_> {
    fn drop(&mut self) {
        let _ = self.env.rime(&["vm", "instant-restore", "--cancel", &self.name]);
        let _ = virsh_status(&["destroy", "--domain", self.uuid()]);
        let _ = virsh_status(&["undefine", "--domain", self.uuid(), "--nvram"]);
    }
}

fn instant<'a>(env: &'a Env, snapshot: &str, vm: &str, name: &str, extra: &[&str]) -> Instant<'a> {
    let mut args = vec!["vm", "instant-restore", snapshot, "--vm", vm, "--json"];
    if name != vm {
        args.extend(["--as", name]);
    }
    args.extend_from_slice(extra);
    let json = env.rime(&args).ok().json();
    Instant { env, name: name.to_string(), json }
}

/// Makes the guest's writes to its first disk durable (qcow2 metadata included), so that a
/// reader outside QEMU sees them.
fn flush(d: &TestDomain) {
    d.hmp(&format!("qemu-io {VDA} \"flush\""));
}

/// Instant-recovery servers running for domains whose names start with `tag`.
fn servers(tag: &str) -> usize {
    let needle = format!("/run/rime/instant/{}", tag.replace(' ', "_"));
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("instant-serve") && c.contains(&needle))
        .count()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn a_vm_runs_from_the_repository_at_once_and_finish_moves_it_onto_local_disks_while_it_runs() {
    let _lv = shared();
    let t = tag("instant");
    let env = Env::new();
    open_up(&env);
    // vda: a qcow2 with data at 1 MiB and near its end; vdb: a raw disk with random data.
    let vda = env.path("vda.qcow2");
    qcow2(&vda, 64, None);
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x77 60M 1M", p(&vda)]);
    let vdb = env.path("vdb.raw");
    raw(&vdb, 16 * 1024);
    write_random_at(&vdb, 7, 2 * MIB, 5 * MIB);
    let want_vda = guest_view(&vda, &env.path("want-vda.raw"));
    let want_vdb = env.path("want-vdb.raw");
    std::fs::copy(&vdb, &want_vdb).unwrap();
    let src = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} src"), &[Disk::Qcow2(&vda), Disk::Raw(&vdb)], true, "")
            .replace("<devices>", "<devices><interface type='user'><mac address='52:54:00:12:34:56'/></interface>"),
    );
    // Started once, so that it has NVRAM (OVMF's variables), then backed up shut off.
    src.start();
    virsh(&["destroy", "--domain", &src.uuid]);
    let nvram = virsh(&["dumpxml", "--domain", &src.uuid])
        .split("<nvram")
        .nth(1)
        .and_then(|r| r.split('>').nth(1))
        .and_then(|r| r.split('<').next())
        .unwrap()
        .to_string();
    assert!(Path::new(&nvram).exists(), "{nvram}");
    let snap = env.backup(&["--vm", &src.name]);

    // Bad input: one line, a non-zero exit, nothing left behind.
    let new = format!("{t} copy a");
    let unknown = env.rime(&["vm", "instant-restore", "0123abcd", "--vm", &src.name, "--as", &new]);
    assert_eq!(unknown.code, Some(4));
    unknown.fails();
    let nobody = env.rime(&["vm", "instant-restore", &snap, "--vm", &format!("{t} nobody"), "--as", &new]);
    assert_eq!(nobody.code, Some(4));
    assert!(nobody.fails().contains("has no VM"));
    let taken = env.rime(&["vm", "instant-restore", &snap, "--vm", &src.name]);
    assert_eq!(taken.code, Some(11));
    assert!(taken.fails().contains("--as"));
    let taken = env.rime(&["vm", "instant-restore", &snap, "--vm", &src.name, "--as", &src.name]);
    assert_eq!(taken.code, Some(11));
    taken.fails();
    // A name libvirt refuses at define, after the server was started and the overlays made:
    // all of it is undone.
    let bad = env.rime(&["vm", "instant-restore", &snap, "--vm", &src.name, "--as", &format!("{t} bad\nname")]);
    assert_eq!(bad.code, Some(10));
    bad.fails();
    assert_eq!(servers(&t), 0, "no server is left running");
    assert!(!domain_names().contains(&new));
    assert_eq!(domain_names().iter().filter(|n| n.starts_with(&t)).count(), 1, "only the source domain");
    let leftovers = std::fs::read_dir("/run/rime/instant")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&t.replace(' ', "_"))).count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "no state is left behind");

    // Running within 10 s, under its new name, new UUID and MAC, its own NVRAM.
    let a = instant(&env, &snap, &src.name, &new, &[]);
    let secs = a.json["seconds_to_running"].as_f64().unwrap();
    assert!(secs < 10.0, "{secs} s to running");
    let dom = a.domain();
    assert!(dom.state().starts_with("running"), "{}", dom.state());
    assert_ne!(a.uuid(), src.uuid);
    let live = dom.xml();
    assert!(!live.contains("52:54:00:12:34:56"), "a new MAC address: {live}");
    assert!(live.contains("protocol='nbd'"), "the disk's backing is the NBD export: {live}");
    assert!(!live.contains(&format!(">{nvram}<")), "its own NVRAM: {live}");
    // The guest sees the disks as they were backed up.
    assert_same_bytes(&want_vda, &guest_view(&a.overlay("vda"), &env.path("a-vda.raw")));
    assert_same_bytes(&want_vdb, &guest_view(&a.overlay("vdb"), &env.path("a-vdb.raw")));
    // Its writes land in the overlay; the repository stays as it was.
    write_in_guest_disk(&dom, VDA, 0xab, 64);
    flush(&dom);
    assert!(image_holds(&a.overlay("vda"), 0xab, 64), "the guest's write is in its overlay");
    env.assert_verify_clean();
    let restored = env.path("r-vda.raw");
    let vol = a.disk("vda")["volume"].as_str().unwrap().to_string();
    env.restore(&snap, &restored, &["--volume", &vol]);
    assert_same_bytes(&want_vda, &restored);

    // A second instance of the same snapshot, its overlays elsewhere; both are listed.
    let b_dir = env.path("b-overlays");
    let b = instant(&env, &snap, &src.name, &format!("{t} copy b"), &["--overlay-dir", p(&b_dir)]);
    assert!(b.overlay("vda").starts_with(&b_dir));
    let listed = env.rime(&["vm", "instant-restore", "--list", "--json"]).ok().json();
    let mine: Vec<&Value> =
        listed.as_array().unwrap().iter().filter(|i| i["name"].as_str().unwrap().starts_with(&t)).collect();
    assert_eq!(mine.len(), 2, "{listed:#}");
    assert!(mine.iter().all(|i| i["server_running"] == true && i["domain_state"] == "running"), "{listed:#}");
    assert!(mine.iter().all(|i| i["snapshot"] == snap.as_str()), "{listed:#}");
    let text = env.rime(&["vm", "instant-restore", "--status"]).ok().stdout;
    assert!(text.contains(&format!("{new:?} running from snapshot {}", &snap[..8])), "{text}");

    // Finish: by default onto the disks' paths at backup time, which the source VM still has:
    // refused, nothing changed.
    let in_the_way = env.rime(&["vm", "instant-restore", "--finish", &new]);
    assert_eq!(in_the_way.code, Some(11));
    assert!(in_the_way.fails().contains("--to"));
    assert!(alive(a.server_pid()) && a.overlay("vda").exists());
    // Into a folder: copied while it runs, onto standalone images; the server and overlays go.
    let to = env.path("finished");
    let done = env.rime(&["vm", "instant-restore", "--finish", &new, "--to", p(&to), "--json"]).ok().json();
    assert_eq!(done["disks"].as_array().unwrap().len(), 2, "{done:#}");
    assert!(dom.state().starts_with("running"), "it ran on: {}", dom.state());
    // Each in its format at backup time: vda qcow2, vdb raw.
    let (fa, fb) = (to.join("vda.qcow2"), to.join("vdb.raw"));
    for (f, format) in [(&fa, "qcow2"), (&fb, "raw")] {
        let info = sh("qemu-img", &["info", "-U", p(f)]);
        assert!(info.contains(&format!("file format: {format}")) && !info.contains("backing file"), "{info}");
    }
    let mut want_after = std::fs::read(&want_vda).unwrap();
    want_after[..64 << 10].fill(0xab);
    let now_vda = std::fs::read(guest_view(&fa, &env.path("f-vda.raw"))).unwrap();
    assert!(now_vda == want_after, "the copy is the backed-up disk plus the guest's write");
    assert_same_bytes(&want_vdb, &guest_view(&fb, &env.path("f-vdb.raw")));
    for xml in [dom.xml(), virsh(&["dumpxml", "--inactive", "--domain", a.uuid()])] {
        assert!(xml.contains(&format!("<source file='{}'", fa.display())), "{xml}");
        assert!(xml.contains(&format!("<source file='{}'", fb.display())), "{xml}");
        assert!(!xml.contains("nbd"), "{xml}");
    }
    assert!(!alive(a.server_pid()), "the server is gone");
    assert!(!a.state_dir().exists() && !a.overlay("vda").exists());
    // Still writable, into the local copy.
    write_in_guest_disk(&dom, VDA, 0xcd, 64);
    flush(&dom);
    assert!(image_holds(&fa, 0xcd, 64));

    // Cancel: the other instance, its domain, NVRAM, overlays and server are gone.
    let b_nvram = virsh(&["dumpxml", "--domain", b.uuid()])
        .split("<nvram")
        .nth(1)
        .and_then(|r| r.split('>').nth(1))
        .and_then(|r| r.split('<').next())
        .unwrap()
        .to_string();
    assert!(Path::new(&b_nvram).exists() && b_nvram != nvram, "{b_nvram}");
    env.rime(&["vm", "instant-restore", "--cancel", &b.name]).ok();
    assert!(!domain_names().contains(&b.name));
    assert!(!b.overlay("vda").exists() && !b.overlay("vdb").exists() && !b.state_dir().exists());
    assert!(!alive(b.server_pid()));
    assert!(!Path::new(&b_nvram).exists());
    let again = env.rime(&["vm", "instant-restore", "--cancel", &b.name]);
    assert_eq!(again.code, Some(4));
    again.fails();
    drop(dom);
}

#[test]
fn a_lost_vm_runs_again_under_its_own_name_and_a_failing_repository_fails_only_that_read() {
    let _lv = shared();
    let t = tag("readerr");
    let env = Env::new();
    open_up(&env);
    let vda = env.path("vda.qcow2");
    qcow2(&vda, 32, None);
    // Distinct data in every chunk, so no read is served by a chunk read before.
    let data = env.path("data.raw");
    raw(&data, 32 * 1024);
    write_random_at(&data, 11, 0, 32 * MIB);
    sh("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", p(&data), p(&vda)]);
    let src = TestDomain::define(env.dir.path(), &domain_xml(&format!("{t} src"), &[Disk::Qcow2(&vda)], false, ""));
    let snap = env.backup(&["--vm", &src.name]);
    // The VM is lost; it comes back under its own name and UUID.
    let (name, uuid) = (src.name.clone(), src.uuid.clone());
    drop(src);
    let a = instant(&env, &snap, &name, &name, &["--cache-size", "1"]);
    assert_eq!(a.uuid(), uuid);
    // Every pack emptied in place (the server keeps them open): reads of chunks it has not
    // cached fail.
    let packs: Vec<PathBuf> = files_under(&env.repo.join("packs")).into_iter().collect();
    assert!(!packs.is_empty());
    let saved: Vec<Vec<u8>> = packs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for p in &packs {
        std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(0).unwrap();
    }
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-U", "-O", "raw", p(&a.overlay("vda")), p(&env.path("bad.raw"))])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a read of a damaged repository must fail, not return garbage");
    assert!(alive(a.server_pid()), "the server survives a failed read");
    // Repaired in place, the same server serves the right bytes again, and the VM runs on.
    for (p, bytes) in packs.iter().zip(&saved) {
        std::fs::write(p, bytes).unwrap();
    }
    assert_same_bytes(&data, &guest_view(&a.overlay("vda"), &env.path("good.raw")));
    // (Its guard undefines the domain at the end, once the recovery is finished.)
    let dom = a.domain();
    dom.wait_state("running", Duration::from_secs(10));

    // Shut off, it is finished by converting its overlays (through the export) to local images.
    virsh(&["destroy", "--domain", a.uuid()]);
    let to = env.path("finished");
    let done = env.rime(&["vm", "instant-restore", "--finish", &name, "--to", p(&to), "--json"]).ok().json();
    assert_eq!(done["disks"][0]["how"], "convert", "{done:#}");
    let copy = to.join("vda.qcow2");
    let info = sh("qemu-img", &["info", p(&copy)]);
    assert!(!info.contains("backing file"), "{info}");
    assert_same_bytes(&data, &guest_view(&copy, &env.path("copy.raw")));
    let def = virsh(&["dumpxml", "--inactive", "--domain", a.uuid()]);
    assert!(def.contains(&format!("<source file='{}'/>", copy.display())), "{def}");
    assert!(!alive(a.server_pid()) && !a.state_dir().exists());
    dom.start();
    dom.wait_state("running", Duration::from_secs(10));
}
