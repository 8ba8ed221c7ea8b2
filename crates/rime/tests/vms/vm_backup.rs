//! `rime backup --vm-aware`: the VMs on the volumes are saved for the snapshot and run again
//! right after it, whatever happens to the backup; the snapshot records them and carries the
//! files the volumes do not hold, enough to bring each VM back in the state it was saved in.

use crate::common::{rime_command, Env};
use crate::vm_support::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

fn vm<'a>(manifest: &'a Value, name: &str) -> &'a Value {
    manifest["vms"]["domains"]
        .as_array()
        .unwrap_or_else(|| panic!("no VMs recorded: {manifest:#}"))
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name:?} not recorded: {:#}", manifest["vms"]))
}

/// Three VMs (running with NVRAM, paused, off) and one only partly on a served volume.
struct Host {
    env: Env,
    store: Volume,
    a: TestDomain,
    b: TestDomain,
    c: TestDomain,
    p: TestDomain,
}

fn host(t: &str) -> Host {
    let env = Env::new();
    open_up(&env);
    let store = Volume::new(&env, "store", 256, true);
    qcow2(&store.path("a-base.qcow2"), 64, None);
    qcow2(&store.path("a.qcow2"), 64, Some(&store.path("a-base.qcow2")));
    raw(&store.path("a-fd.img"), 1440);
    qcow2(&store.path("b.qcow2"), 64, None);
    raw(&store.path("c.raw"), 4096);
    raw(&store.path("p.raw"), 1024);
    raw(&env.path("p.iso"), 256);
    let a_disks = [Disk::Qcow2(&store.path("a.qcow2")), Disk::Floppy(&store.path("a-fd.img"))];
    let a = TestDomain::define(env.dir.path(), &domain_xml(&format!("{t} web \"a\" é"), &a_disks, true, ""));
    let b = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} db $(b)"), &[Disk::Qcow2(&store.path("b.qcow2"))], false, ""),
    );
    let c = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} off c"), &[Disk::Raw(&store.path("c.raw"))], false, ""),
    );
    let p_disks = [Disk::Raw(&store.path("p.raw")), Disk::Cdrom(&env.path("p.iso"))];
    let p = TestDomain::define(env.dir.path(), &domain_xml(&format!("{t} partial p"), &p_disks, false, ""));
    a.start();
    b.start();
    b.suspend();
    p.start();
    Host { env, store, a, b, c, p }
}

#[test]
fn vm_aware_backup_saves_the_vms_for_the_snapshot_only_records_them_and_restores_one() {
    let _lv = shared();
    let t = tag("backup");
    let h = host(&t);
    h.a.wait_state("running", Duration::from_secs(30));
    // Domain XML left behind by a VM no longer defined, its disk on the volume.
    raw(&h.store.path("gone.raw"), 512);
    let gone_name = format!("{t} gone");
    let gone =
        LeftBehind::write(&gone_name, &domain_xml(&gone_name, &[Disk::Raw(&h.store.path("gone.raw"))], false, ""));
    // What the guest wrote before the backup must be in the restored disk.
    write_in_guest_disk(&h.a, VDA, 0x5a, 256);

    let started = Instant::now();
    let out = h.env.rime(&["backup", "--vm-aware", h.store.mount_point(), "--json"]).ok();
    let took = started.elapsed();
    let summary = out.json();
    let m = &summary["manifest"];
    let (ra, rb, rc) = (vm(m, &h.a.name), vm(m, &h.b.name), vm(m, &h.c.name));
    assert_eq!((ra["state"].as_str(), ra["state_in_snapshot"].as_str()), (Some("running"), Some("saved")));
    assert_eq!((rb["state"].as_str(), rb["state_in_snapshot"].as_str()), (Some("paused"), Some("saved")));
    assert_eq!((rc["state"].as_str(), rc["state_in_snapshot"].as_str()), (Some("shut off"), Some("shut off")));
    for r in [ra, rb, rc] {
        assert_eq!(r["coverage"], "full");
        assert_eq!(r["complete"], true, "every file is in the snapshot: {r:#}");
    }
    assert!(rc["interruption_ms"].is_null(), "an off VM is not stopped");
    let rg = vm(m, &gone_name);
    assert_eq!((rg["state"].as_str(), rg["complete"].as_bool()), (Some("not connected"), Some(true)), "{rg:#}");
    for r in [ra, rb] {
        let ms = r["interruption_ms"].as_f64().expect("interruption recorded");
        assert!(ms > 0.0 && ms < took.as_secs_f64() * 1000.0, "{ms} ms in a {took:?} backup");
    }
    // The partly covered VM is named, left alone and not recorded.
    let warnings = summary["warnings"].to_string();
    assert!(warnings.contains("partial p") && warnings.contains("only partly"), "{warnings}");
    let rp = vm(m, &h.p.name);
    assert_eq!((rp["coverage"].as_str(), rp["complete"].as_bool()), (Some("partial"), Some(false)), "{rp:#}");
    assert!(rp["action"].as_str().unwrap().contains("not covered"), "{rp:#}");
    assert!(rp["interruption_ms"].is_null());
    // Files the volume holds are found inside its image; the rest is carried.
    let disk = ra["files"].as_array().unwrap().iter().find(|f| f["role"] == "disk").unwrap();
    assert_eq!(disk["in_snapshot"]["path"], "/a.qcow2");
    assert_eq!(disk["in_snapshot"]["volume"], "store.img");
    let carried: Vec<&str> = m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"] == "vm-file")
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for (uuid, role) in [
        (&h.a.uuid, "domain-xml"),
        (&h.a.uuid, "nvram"),
        (&h.a.uuid, "managed-save"),
        (&h.b.uuid, "managed-save"),
        (&h.c.uuid, "domain-xml"),
    ] {
        assert!(carried.contains(&format!("vm-{uuid}-{role}").as_str()), "{role} of {uuid} carried: {carried:?}");
    }
    // Running again as they were, right after the snapshot.
    assert!(h.a.state().starts_with("running"), "{}", h.a.state());
    assert!(h.b.state().starts_with("paused"), "{}", h.b.state());
    assert!(h.c.state().starts_with("shut off") && !h.c.state().contains("saved"));
    assert!(h.p.state().starts_with("running"));

    // The record, from the repository.
    let id = summary["snapshot"].as_str().unwrap();
    let listed = h.env.rime(&["snapshots"]).ok().stdout;
    assert!(listed.contains("web \\\"a\\\" é") && listed.contains("running→saved"), "{listed}");
    let layout = h.env.rime(&["vm", "layout", "--snapshot", id, "--json"]).ok().json();
    assert_eq!(layout["vms"], m["vms"]);
    h.env.assert_verify_clean();

    // Put A back where it was: its disk files are gone and it is undefined.
    virsh(&["destroy", "--domain", &h.a.uuid]);
    virsh(&["undefine", "--domain", &h.a.uuid, "--nvram"]);
    std::fs::remove_file(h.store.path("a.qcow2")).unwrap();
    std::fs::remove_file(h.store.path("a-base.qcow2")).unwrap();
    // Its floppy image is still there: refused without --replace, nothing defined.
    let refused = h.env.rime(&["restore", "--vm", &h.a.name, id]);
    assert_eq!(refused.code, Some(11));
    assert!(refused.fails().contains("a-fd.img"));
    assert!(!virsh(&["list", "--all", "--uuid"]).contains(&h.a.uuid));
    let restored = h.env.rime(&["restore", "--vm", &h.a.name, id, "--replace", "--json"]).ok().json();
    assert_eq!(restored["state"], "saved");
    assert!(h.a.state().starts_with("shut off (saved)"), "{}", h.a.state());
    h.a.start();
    assert!(h.a.state().starts_with("running (restored)"), "it resumes where it was saved: {}", h.a.state());
    assert!(image_holds(&h.store.path("a.qcow2"), 0x5a, 256), "the guest's writes are in the restored disk");
    assert!(h.a.xml().contains("/var/lib/libvirt/qemu/nvram/"), "NVRAM defined again");

    // The VM that was not connected is defined again from its carried XML, off.
    std::fs::remove_file(&gone.path).unwrap();
    let back = h.env.rime(&["restore", "--vm", &gone_name, id, "--replace", "--json"]).ok().json();
    assert_eq!(back["state"], "shut off");
    assert!(virsh(&["domstate", "--domain", &gone.uuid]).starts_with("shut off"));
}

/// Waits until `d`'s state starts with `prefix`, or `within` passes.
fn reaches(d: &TestDomain, prefix: &str, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if d.state().starts_with(prefix) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_failed_or_interrupted_backup_starts_the_vms_it_stopped_again() {
    let _lv = shared();
    let t = tag("fail");
    let h = host(&t);
    // A second volume that is mounted and has no snapshot provider: refused at the capture,
    // after the VMs were stopped.
    let busy = Volume::new(&h.env, "busy", 32, false);
    let failed = h.env.rime(&["backup", "--vm-aware", h.store.mount_point(), busy.loopdev.path()]);
    assert_eq!(failed.code, Some(6), "{failed:?}");
    let reason = failed.stderr.lines().last().unwrap_or_default();
    assert!(reason.starts_with("rime: ") && reason.contains("no snapshot provider"), "{}", failed.stderr);
    assert!(h.a.state().starts_with("running"), "{}", h.a.state());
    assert!(h.b.state().starts_with("paused"), "{}", h.b.state());
    assert_eq!(h.env.snapshots().len(), 0);

    // SIGTERM while the VMs are stopped (resumed after the backup; an after-snapshot hook
    // holds the backup there).
    let mut child = rime_command()
        .args(["--repo", h.env.repo.to_str().unwrap(), "backup", "--vm-aware", h.store.mount_point()])
        .args(["--vm-resume", "after-backup", "--after-snapshot", "sleep 60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(reaches(&h.a, "shut off (saved)", Duration::from_secs(60)), "the backup stopped A: {}", h.a.state());
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    // The signal's handler ran (it, or the backup's own failure path if the signal came during
    // the freeze and failed the capture, started the VMs again).
    assert!(err.contains("interrupted (signal 15)"), "{err}");
    assert!(h.a.state().starts_with("running"), "{}", h.a.state());
    assert!(h.b.state().starts_with("paused"), "{}", h.b.state());
    assert!(!Path::new(&format!("/var/lib/libvirt/qemu/save/{}.save", h.a.name)).exists());
}
