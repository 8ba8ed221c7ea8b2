//! `rime backup --vm`: running VMs backed up through libvirt's backup API in pull mode, with
//! checkpoints and persistent dirty bitmaps, against a real libvirtd and QEMU (TCG; the domains
//! have no guest OS, so QEMU's own `qemu-io` writes into their disks while they run).
//!
//! What is compared is always the disk itself: `qemu-img convert` of the image (or its state
//! before the VM started) against the volume Rime restores, byte for byte.

use crate::common::*;
use crate::vm_support::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A qcow2 made from a raw image (what the VM's disk holds before it starts).
fn qcow2_from(raw: &Path, qcow2: &Path) {
    sh("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", p(raw), p(qcow2)]);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The guest's view of a disk image now (shared with the running VM).
fn disk_now(image: &Path, out: &Path) {
    let _ = std::fs::remove_file(out);
    sh("qemu-img", &["convert", "-q", "-U", "-O", "raw", p(image), p(out)]);
}

/// Writes `len` bytes of `pattern` at `offset` of the running domain's disk `drive`.
fn guest_write(d: &TestDomain, drive: &str, offset: u64, len: u64, pattern: u8) {
    let out = d.hmp(&format!("qemu-io {drive} \"write -P {pattern} {offset} {len}\""));
    assert!(!out.to_lowercase().contains("error"), "qemu-io: {out}");
}

const VDB: &str = "-d /machine/peripheral/virtio-disk1/virtio-backend";

/// QEMU quits cleanly (its persistent bitmaps are stored), as at a guest's shutdown.
fn quit(d: &TestDomain) {
    let _ = virsh_status(&["qemu-monitor-command", &d.uuid, "--hmp", "quit"]);
    d.wait_state("shut off", Duration::from_secs(30));
}

fn job_info(d: &TestDomain) -> String {
    virsh_status(&["domjobinfo", &d.uuid]).1
}

fn live<'a>(summary: &'a Value, name: &str) -> &'a Value {
    let vm = summary["manifest"]["vms"]["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name:?} not recorded: {summary:#}"));
    &vm["live"]
}

fn disk<'a>(summary: &'a Value, name: &str, target: &str) -> &'a Value {
    live(summary, name)["disks"].as_array().unwrap().iter().find(|d| d["target"] == target).unwrap()
}

fn volume<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["manifest"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap()
}

fn warnings(summary: &Value) -> String {
    summary["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string() + "\n").collect()
}

/// Restores one volume of a snapshot into a new raw file.
fn restored(env: &Env, snapshot: &str, volume: &str, out: &Path) -> PathBuf {
    let _ = std::fs::remove_file(out);
    env.rime(&["restore", snapshot, p(out), "--volume", volume]).ok();
    out.to_path_buf()
}

/// The physical byte offset of logical block `n` of a file in an ext image.
fn ext_block_of(image: &Path, file: &str, n: u64) -> u64 {
    let out = sh("debugfs", &["-R", &format!("bmap {file} {n}"), p(image)]);
    out.trim().parse::<u64>().unwrap_or_else(|_| panic!("debugfs bmap: {out}")) * 4096
}

#[test]
fn a_running_vm_is_imaged_at_the_instant_its_backup_began_and_incrementals_read_only_what_changed() {
    let _lv = shared();
    let t = tag("live");
    let env = Env::new();
    open_up(&env);
    // vda: ext4 with a tree of files (its free blocks hold garbage, which must not be imaged);
    // vdb: a raw disk, random data at its end.
    let (src, ext) = ext4_with_files(&env, "vda", 41, 512, 160 * MIB);
    let vda = env.path("vda.qcow2");
    qcow2_from(&ext, &vda);
    let vdb = env.path("vdb.raw");
    raw(&vdb, 64 * 1024);
    write_random_at(&vdb, 42, 40 * MIB, 24 * MIB);
    let vdb_before = env.path("vdb-before.raw");
    std::fs::copy(&vdb, &vdb_before).unwrap();
    let d = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} web"), &[Disk::Qcow2(&vda), Disk::Raw(&vdb)], false, ""),
    );
    d.start();
    d.wait_state("running", Duration::from_secs(30));

    // Writes while the backup reads: a block of a file on vda, the end of vdb.
    let file = "/bin/random-2.bin";
    let (a, b) = (ext_block_of(&ext, file, 3), ext_block_of(&ext, file, 40));
    let mut child = env.spawn(&["backup", "--vm", &d.name, "--json", "--threads", "1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job_info(&d).contains("Backup") {
        assert!(child.try_wait().unwrap().is_none(), "the backup ended before its job was seen");
        assert!(Instant::now() < deadline, "no backup job on the domain");
        std::thread::sleep(Duration::from_millis(10));
    }
    guest_write(&d, VDA, a, 4096, 0xb2);
    guest_write(&d, VDA, b, 8192, 0xb3);
    guest_write(&d, VDB, 60 * MIB, MIB, 0xb4);
    // The writes reached the disk during the job: QEMU copied the old data aside first.
    let during = job_info(&d);
    assert!(during.contains("Backup"), "the backup job ended before the writes:\n{during}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    let snap1 = first["snapshot"].as_str().unwrap().to_string();
    let l = live(&first, &d.name);
    assert_eq!(l["method"], "libvirt-pull");
    assert_eq!(l["consistency"], "crash-consistent", "{l:#}");
    assert!(l["checkpoint"].as_str().unwrap().starts_with("rime."), "{l:#}");
    assert_eq!(disk(&first, &d.name, "vda")["mode"], "full");
    // Only what the filesystem uses was read: not the garbage in its free blocks.
    let v = volume(&first, disk(&first, &d.name, "vda")["volume"].as_str().unwrap()).clone();
    assert_eq!(v["filesystem"], "ext4", "{v:#}");
    assert!(v["read_bytes"].as_u64().unwrap() < ext_used_bytes(&ext) + 8 * MIB, "{v:#}");

    // The snapshot holds each disk as it was when the job began, not the writes made since.
    let r1 = restored(&env, &snap1, v["name"].as_str().unwrap(), &env.path("r1-vda.raw"));
    assert_ext_restore_exact(&env, &ext, &r1, &src);
    let vdb_name = disk(&first, &d.name, "vdb")["volume"].as_str().unwrap().to_string();
    let r1b = restored(&env, &snap1, &vdb_name, &env.path("r1-vdb.raw"));
    assert_same_bytes(&vdb_before, &r1b);

    // An incremental reads only the chunks the dirty bitmap marks, and equals the disk now.
    guest_write(&d, VDA, a + 8192, 4096, 0xc5);
    let second = env.backup_json(&["--vm", &d.name]);
    let snap2 = second["snapshot"].as_str().unwrap().to_string();
    let l2 = live(&second, &d.name);
    assert_eq!(disk(&second, &d.name, "vda")["mode"], "incremental", "{l2:#}");
    assert_eq!(l2["base_snapshot"].as_str(), Some(snap1.as_str()));
    assert_eq!(l2["base_checkpoint"], l["checkpoint"]);
    assert_eq!(disk(&second, &d.name, "vdb")["mode"], "full");
    assert!(disk(&second, &d.name, "vdb")["reason"].as_str().unwrap().contains("raw"), "{l2:#}");
    let v2 = volume(&second, v["name"].as_str().unwrap());
    assert!(v2["read_bytes"].as_u64().unwrap() <= 4 * 65536, "read more than the changed chunks: {v2:#}");
    let now = env.path("vda-now.raw");
    disk_now(&vda, &now);
    let r2 = restored(&env, &snap2, v["name"].as_str().unwrap(), &env.path("r2-vda.raw"));
    let zf = env.path("vda-now-zf.raw");
    zerofreed_copy(&now, &zf);
    assert_same_bytes(&zf, &r2);
    assert_fsck_clean(&r2);
    // The only checkpoint left is the newest (the first one was deleted once superseded).
    let listed = virsh(&["checkpoint-list", &d.uuid, "--name"]);
    assert_eq!(listed.split_whitespace().collect::<Vec<_>>(), vec![l2["checkpoint"].as_str().unwrap()]);
    env.assert_verify_clean();
}

#[test]
fn incrementals_survive_a_vm_restart_and_a_broken_chain_falls_back_to_a_full_backup() {
    let _lv = shared();
    let t = tag("chain");
    let env = Env::new();
    open_up(&env);
    let image = env.path("d.qcow2");
    qcow2(&image, 256, None);
    let xml = domain_xml(&format!("{t} db"), &[Disk::Qcow2(&image)], false, "");
    let d = TestDomain::define(env.dir.path(), &xml);
    d.start();
    d.wait_state("running", Duration::from_secs(30));
    guest_write(&d, VDA, 0, 4 * MIB, 0x11);
    let name = d.name.clone();
    let vol = format!("{}.vda", name.replace(' ', "_"));
    let check = |snapshot: &str, what: &str| {
        let now = env.path("now.raw");
        disk_now(&image, &now);
        let r = restored(&env, snapshot, &vol, &env.path("r.raw"));
        assert!(same_bytes(&now, &r), "{what}: {:?}", first_difference(&now, &r));
    };
    let full = env.backup_json(&["--vm", &name]);
    assert_eq!(disk(&full, &name, "vda")["reason"], "no earlier checkpoint of this repository");
    check(full["snapshot"].as_str().unwrap(), "first full");

    // The VM stops and starts again: its bitmap was kept in the qcow2, the chain goes on.
    guest_write(&d, VDA, 100 * MIB, 64 * 1024, 0x22);
    quit(&d);
    d.start();
    d.wait_state("running", Duration::from_secs(30));
    let after_restart = env.backup_json(&["--vm", &name]);
    assert_eq!(disk(&after_restart, &name, "vda")["mode"], "incremental", "{after_restart:#}");
    assert!(volume(&after_restart, &vol)["read_bytes"].as_u64().unwrap() <= 2 * 65536);
    check(after_restart["snapshot"].as_str().unwrap(), "incremental after a restart");

    // The checkpoint deleted by hand: full, with a warning.
    let cp = live(&after_restart, &name)["checkpoint"].as_str().unwrap().to_string();
    virsh(&["checkpoint-delete", &d.uuid, &cp]);
    guest_write(&d, VDA, 120 * MIB, 64 * 1024, 0x33);
    let deleted = env.backup_json(&["--vm", &name]);
    assert_eq!(disk(&deleted, &name, "vda")["mode"], "full");
    assert!(
        warnings(&deleted).contains(&format!("checkpoint {cp} of its last backup is gone from libvirt")),
        "{}",
        warnings(&deleted)
    );
    check(deleted["snapshot"].as_str().unwrap(), "after the checkpoint was deleted");

    // The disk replaced while the VM was off (a copy without the bitmaps): libvirt refuses the
    // incremental, and the backup is full.
    quit(&d);
    let copy = env.path("copy.qcow2");
    sh("qemu-img", &["convert", "-q", "-O", "qcow2", p(&image), p(&copy)]);
    std::fs::rename(&copy, &image).unwrap();
    d.start();
    d.wait_state("running", Duration::from_secs(30));
    guest_write(&d, VDA, 130 * MIB, 64 * 1024, 0x44);
    let replaced = env.backup_json(&["--vm", &name]);
    assert_eq!(disk(&replaced, &name, "vda")["mode"], "full", "{replaced:#}");
    assert!(warnings(&replaced).contains("libvirt refused an incremental"), "{}", warnings(&replaced));
    check(replaced["snapshot"].as_str().unwrap(), "after the disk was replaced");

    // The VM redefined (same UUID, libvirt's checkpoint metadata gone): full, with a warning.
    let definition = virsh(&["dumpxml", "--inactive", &d.uuid]);
    let file = env.path("redefine.xml");
    std::fs::write(&file, definition).unwrap();
    quit(&d);
    virsh(&["undefine", &d.uuid, "--checkpoints-metadata"]);
    virsh(&["define", p(&file)]);
    d.start();
    d.wait_state("running", Duration::from_secs(30));
    let redefined = env.backup_json(&["--vm", &name]);
    assert_eq!(disk(&redefined, &name, "vda")["mode"], "full");
    assert!(warnings(&redefined).contains("gone from libvirt"), "{}", warnings(&redefined));
    check(redefined["snapshot"].as_str().unwrap(), "after the VM was redefined");

    // And from there the chain is whole again.
    guest_write(&d, VDA, 140 * MIB, 64 * 1024, 0x55);
    let again = env.backup_json(&["--vm", &name]);
    assert_eq!(disk(&again, &name, "vda")["mode"], "incremental");
    check(again["snapshot"].as_str().unwrap(), "incremental after the fallback");
}

#[test]
fn a_killed_backup_changes_nothing_and_the_next_one_counts_from_the_last_complete_checkpoint() {
    let _lv = shared();
    let t = tag("killed");
    let env = Env::new();
    open_up(&env);
    let data = env.path("d.raw");
    raw(&data, 768 * 1024);
    write_random_at(&data, 7, 0, 640 * MIB);
    let image = env.path("d.qcow2");
    qcow2_from(&data, &image);
    std::fs::remove_file(&data).unwrap();
    let d = TestDomain::define(env.dir.path(), &domain_xml(&format!("{t} app"), &[Disk::Qcow2(&image)], false, ""));
    d.start();
    d.wait_state("running", Duration::from_secs(30));
    let name = d.name.clone();
    let vol = format!("{}.vda", name.replace(' ', "_"));
    let first = env.backup_json(&["--vm", &name]);
    let snap1 = first["snapshot"].as_str().unwrap().to_string();

    // Killed in the middle of reading: its job stays on the domain, its checkpoint in libvirt.
    guest_write(&d, VDA, 700 * MIB, 64 * 1024, 0x66);
    let mut child = env.spawn(&["backup", "--vm", &name, "--threads", "1", "--compression", "best"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job_info(&d).contains("Backup") {
        assert!(child.try_wait().unwrap().is_none(), "the backup ended before it could be killed");
        assert!(Instant::now() < deadline, "no backup job on the domain");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(job_info(&d).contains("Backup"), "the killed backup's job should still be there");
    assert_eq!(virsh(&["checkpoint-list", &d.uuid, "--name"]).split_whitespace().count(), 2);
    assert_eq!(env.snapshot_ids(), vec![snap1.clone()], "a killed backup must not leave a snapshot");

    guest_write(&d, VDA, 710 * MIB, 64 * 1024, 0x77);
    let next = env.backup_json(&["--vm", &name]);
    let w = warnings(&next);
    assert!(w.contains("ending the backup job left by a Rime that stopped"), "{w}");
    assert!(w.contains("no snapshot of this repository records it"), "{w}");
    let l = live(&next, &name);
    assert_eq!(disk(&next, &name, "vda")["mode"], "incremental", "{l:#}");
    assert_eq!(l["base_snapshot"].as_str(), Some(snap1.as_str()));
    // Both writes since the first snapshot are in, and nothing more was read.
    assert!(volume(&next, &vol)["read_bytes"].as_u64().unwrap() <= 4 * 65536, "{:#}", volume(&next, &vol));
    let now = env.path("now.raw");
    disk_now(&image, &now);
    let r = restored(&env, next["snapshot"].as_str().unwrap(), &vol, &env.path("r.raw"));
    assert!(same_bytes(&now, &r), "{:?}", first_difference(&now, &r));
    assert_eq!(virsh(&["checkpoint-list", &d.uuid, "--name"]).split_whitespace().count(), 1);
    env.assert_verify_clean();
}

#[test]
fn a_vm_that_is_not_running_is_read_from_its_disk_files_and_restore_vm_writes_qcow2_again() {
    let _lv = shared();
    let t = tag("offvm");
    let env = Env::new();
    open_up(&env);
    let image = env.path("off.qcow2");
    qcow2(&image, 128, None);
    sh("qemu-io", &["-c", "write -P 0x5a 1M 3M", p(&image)]);
    let d = TestDomain::define(env.dir.path(), &domain_xml(&format!("{t} off"), &[Disk::Qcow2(&image)], false, ""));
    let s = env.backup_json(&["--vm", &d.name]);
    let l = live(&s, &d.name);
    assert_eq!(l["method"], "disk-files", "{l:#}");
    assert_eq!(l["checkpoint"], Value::Null);
    let files = s["manifest"]["vms"]["domains"][0]["files"].as_array().unwrap().clone();
    let roles: Vec<&str> = files.iter().map(|f| f["role"].as_str().unwrap()).collect();
    assert_eq!(roles, vec!["domain-xml", "disk"]);

    // Put back elsewhere: the disk is a qcow2 again with the same contents, the XML points at it.
    let to = env.path("restored");
    env.rime(&["restore", "--vm", &d.name, s["snapshot"].as_str().unwrap(), "--replace", "--to", p(&to)]).ok();
    let back = to.join("off.qcow2");
    assert!(sh("qemu-img", &["info", p(&back)]).contains("file format: qcow2"));
    let (same, out) = sh_status("qemu-img", &["compare", "-q", p(&image), p(&back)]);
    assert!(same, "{out}");
    assert!(virsh(&["dumpxml", &d.uuid]).contains(p(&back)));
}
