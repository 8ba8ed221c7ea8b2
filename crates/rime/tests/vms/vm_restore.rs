//! `rime restore --vm`: to a new folder (paths in the definition rewritten, overlays rebased
//! onto their moved backing files, the saved state kept), and the refusals that keep it from
//! half-restoring a VM or replacing one that runs.

use crate::common::Env;
use crate::vm_support::*;
use std::path::Path;
use std::time::Duration;

#[test]
fn a_vm_restored_to_a_new_folder_runs_from_there_and_what_cannot_be_restored_is_refused() {
    let _lv = shared();
    let env = Env::new();
    open_up(&env);
    let store = Volume::new(&env, "store", 128, true);
    let t = tag("restore");
    qcow2(&store.path("base.qcow2"), 64, None);
    qcow2(&store.path("b.qcow2"), 64, Some(&store.path("base.qcow2")));
    raw(&store.path("p.raw"), 1024);
    let iso = env.path("outside.iso");
    raw(&iso, 256);
    let b = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} db \"b\""), &[Disk::Qcow2(&store.path("b.qcow2"))], false, ""),
    );
    let p = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} partial"), &[Disk::Raw(&store.path("p.raw")), Disk::Cdrom(&iso)], false, ""),
    );
    b.start();
    write_in_guest_disk(&b, VDA, 0x3c, 128);
    b.suspend();
    // The partial criterion takes P too, though its ISO is not on the volume.
    let backup = env.backup_json(&["--vm-aware", store.mount_point(), "--vm-criterion", "partial"]);
    let id = backup["snapshot"].as_str().unwrap().to_string();
    let rp = backup["manifest"]["vms"]["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == p.name.as_str())
        .unwrap()
        .clone();
    assert_eq!((rp["coverage"].as_str(), rp["complete"].as_bool()), (Some("partial"), Some(false)), "{rp:#}");

    // B is defined and paused: refused, with or without --replace; nothing changes.
    let target = env.path("moved here");
    let refused = env.rime(&["restore", "--vm", &b.name, &id, "--to", target.to_str().unwrap()]);
    assert_eq!(refused.code, Some(11));
    assert!(refused.fails().contains("--replace"));
    let running = env.rime(&["restore", "--vm", &b.name, &id, "--to", target.to_str().unwrap(), "--replace"]);
    assert_eq!(running.code, Some(11));
    assert!(running.fails().contains("paused"));
    assert!(!target.exists() || std::fs::read_dir(&target).unwrap().next().is_none(), "nothing written");
    assert!(b.state().starts_with("paused"));

    // Saved, it can be replaced; into the new folder.
    virsh(&["managedsave", "--domain", &b.uuid]);
    let done = env
        .rime(&["restore", "--vm", &b.name, &id, "--to", target.to_str().unwrap(), "--replace", "--json"])
        .ok()
        .json();
    assert_eq!(done["state"], "saved");
    assert_eq!(done["replaced"], true);
    let new_disk = target.join("b.qcow2");
    let new_base = target.join("base.qcow2");
    assert!(new_disk.exists() && new_base.exists());
    let xml = b.xml();
    assert!(xml.contains(&format!("<source file='{}'/>", new_disk.display())), "{xml}");
    assert!(!xml.contains(store.mount_point()), "no path into the old volume is left: {xml}");
    let info = crate::common::sh("qemu-img", &["info", "-U", new_disk.to_str().unwrap()]);
    assert!(info.contains(&format!("backing file: {}", new_base.display())), "the overlay is rebased: {info}");
    b.start();
    b.wait_state("paused", Duration::from_secs(60));
    assert!(b.xml().contains(&new_disk.display().to_string()), "it runs from the new folder");
    assert!(image_holds(&new_disk, 0x3c, 128), "the guest's writes are in the restored disk");

    // P: its ISO is not in the snapshot. Into a new folder that is refused, naming it.
    virsh(&["undefine", "--domain", &p.uuid]);
    let other = env.path("p-elsewhere");
    let missing = env.rime(&["restore", "--vm", &p.name, &id, "--to", other.to_str().unwrap()]);
    assert_eq!(missing.code, Some(11));
    assert!(missing.fails().contains("outside.iso"));
    assert!(!other.exists());
    // In place, the ISO still on this host is used, with a warning.
    std::fs::remove_file(store.path("p.raw")).unwrap();
    let in_place = env.rime(&["restore", "--vm", &p.name, &id]).ok();
    assert!(in_place.stderr.contains("outside.iso"), "{}", in_place.stderr);
    assert!(p.state().starts_with("shut off"));
    assert!(Path::new(&store.path("p.raw")).exists());

    // A VM the snapshot does not have.
    let none = env.rime(&["restore", "--vm", &format!("{t} nobody"), &id]);
    assert_eq!(none.code, Some(4));
    assert!(none.fails().contains("has no VM"));
}
