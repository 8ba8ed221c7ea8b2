//! `rime vm layout`: every domain in every state with every file, the volume holding each file
//! (through mount, loop device and `rime serve`'s FUSE file), and coverage by a volume set.

use crate::common::{rime_raw, Env};
use crate::vm_support::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn domain<'a>(layout: &'a Value, name: &str) -> &'a Value {
    layout["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name:?} not in the layout: {layout:#}"))
}

fn file<'a>(d: &'a Value, path: &Path) -> &'a Value {
    let p = path.to_str().unwrap();
    d["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == p)
        .unwrap_or_else(|| panic!("{p} not among the files of {d:#}"))
}

fn layout(args: &[&str]) -> Value {
    let mut all = vec!["vm", "layout", "--json"];
    all.extend_from_slice(args);
    rime_raw(&all).ok().json()
}

#[test]
fn every_domain_file_and_state_with_its_volume_and_coverage() {
    let _lv = shared();
    let env = Env::new();
    open_up(&env);
    let store = Volume::new(&env, "store", 128, true);
    let other = Volume::new(&env, "other", 64, false);
    let t = tag("layout");

    // web: running, qcow2 on a backing file, an ISO, a floppy and NVRAM, all on `store`.
    qcow2(&store.path("base.qcow2"), 64, None);
    qcow2(&store.path("web.qcow2"), 64, Some(&store.path("base.qcow2")));
    raw(&store.path("cd.iso"), 1024);
    raw(&store.path("fd.img"), 1440);
    let web_name = format!("{t} web \"1\" é");
    let disks = [
        Disk::Qcow2(&store.path("web.qcow2")),
        Disk::Cdrom(&store.path("cd.iso")),
        Disk::Floppy(&store.path("fd.img")),
    ];
    let web = TestDomain::define(env.dir.path(), &domain_xml(&web_name, &disks, true, ""));
    web.start();
    // db: its backing file on `other`, an external snapshot (memory and disk) on `store`, paused.
    qcow2(&other.path("dbbase.qcow2"), 64, None);
    qcow2(&store.path("db.qcow2"), 64, Some(&other.path("dbbase.qcow2")));
    let db = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} db 2 $(touch x)"), &[Disk::Qcow2(&store.path("db.qcow2"))], false, ""),
    );
    db.start();
    let mem = store.path("db-s1.mem");
    let overlay = store.path("db-s1.qcow2");
    virsh(&[
        "snapshot-create-as",
        "--domain",
        &db.uuid,
        "--name",
        "s1",
        "--memspec",
        &format!("file={},snapshot=external", mem.display()),
        "--diskspec",
        &format!("vda,snapshot=external,file={}", overlay.display()),
    ]);
    db.wait_state("running", Duration::from_secs(30));
    db.suspend();
    // off: shut off, its disk on `other`, its ISO on `store`.
    raw(&other.path("off.raw"), 4096);
    raw(&store.path("off.iso"), 512);
    let off = TestDomain::define(
        env.dir.path(),
        &domain_xml(
            &format!("{t} off's"),
            &[Disk::Raw(&other.path("off.raw")), Disk::Cdrom(&store.path("off.iso"))],
            false,
            "",
        ),
    );
    // saved: managed-saved, on `store`.
    qcow2(&store.path("saved.qcow2"), 64, None);
    let saved = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} saved"), &[Disk::Qcow2(&store.path("saved.qcow2"))], false, ""),
    );
    saved.start();
    saved.managed_save();
    // tmp: transient, running; crashy: transient, crashed (a guest panic through pvpanic).
    raw(&other.path("tmp.raw"), 1024);
    let tmp = TestDomain::create(
        env.dir.path(),
        &domain_xml(&format!("{t} tmp"), &[Disk::Raw(&other.path("tmp.raw"))], false, ""),
    );
    let crash_extra = "<on_crash>preserve</on_crash>";
    let crashy_xml = domain_xml(&format!("{t} crashy"), &[], false, crash_extra)
        .replace("</devices>", "<panic model='isa'><address type='isa' iobase='0x505'/></panic></devices>");
    let crashy = TestDomain::create(env.dir.path(), &crashy_xml);
    crashy.hmp("o 0x505 1");
    crashy.wait_state("crashed", Duration::from_secs(20));
    // Domain XML left behind by a domain no longer defined, its disk on `store`.
    qcow2(&store.path("gone.qcow2"), 16, None);
    let gone_name = format!("{t} gone");
    let _gone =
        LeftBehind::write(&gone_name, &domain_xml(&gone_name, &[Disk::Qcow2(&store.path("gone.qcow2"))], false, ""));

    let by_mount = layout(&["--volumes", store.mount_point()]);
    let w = domain(&by_mount, &web_name);
    assert_eq!(w["state"], "running");
    assert_eq!(w["persistent"], true);
    assert_eq!(w["coverage"], "full");
    let served = store.image.to_str().unwrap();
    for (role, path) in [
        ("disk", store.path("web.qcow2")),
        ("backing", store.path("base.qcow2")),
        ("cdrom", store.path("cd.iso")),
        ("floppy", store.path("fd.img")),
    ] {
        let f = file(w, &path);
        assert_eq!(f["role"], role, "{f:#}");
        // The kernel's view: mounted from the loop device on rime serve's FUSE file of the image.
        assert_eq!(f["volume"], served, "{f:#}");
        assert_eq!(f["device"], store.loopdev.path(), "{f:#}");
        assert_eq!(f["mount_point"], store.mount_point(), "{f:#}");
        assert_eq!(f["inside"], format!("/{}", path.file_name().unwrap().to_str().unwrap()));
        assert_eq!(f["covered_by"], store.mount_point());
    }
    let xml_file = file(w, &Path::new("/etc/libvirt/qemu").join(format!("{web_name}.xml")));
    assert_eq!(xml_file["role"], "domain-xml");
    assert!(xml_file["covered_by"].is_null());
    let nvram = w["files"].as_array().unwrap().iter().find(|f| f["role"] == "nvram").expect("NVRAM listed");
    assert!(nvram["path"].as_str().unwrap().starts_with("/var/lib/libvirt/qemu/nvram/"));
    assert_eq!(nvram["exists"], true);

    let d = domain(&by_mount, &db.name);
    assert_eq!(d["state"], "paused");
    assert_eq!(d["coverage"], "partial", "its backing file is on the other volume");
    assert_eq!(file(d, &overlay)["role"], "disk");
    assert_eq!(file(d, &store.path("db.qcow2"))["role"], "backing");
    assert_eq!(file(d, &other.path("dbbase.qcow2"))["volume"], other.loopdev.path());
    assert!(file(d, &other.path("dbbase.qcow2"))["covered_by"].is_null());
    assert_eq!(file(d, &mem)["role"], "snapshot-memory");

    let o = domain(&by_mount, &off.name);
    assert_eq!((o["state"].as_str(), o["coverage"].as_str()), (Some("shut off"), Some("partial")));
    let s = domain(&by_mount, &saved.name);
    assert_eq!((s["state"].as_str(), s["coverage"].as_str()), (Some("saved"), Some("full")));
    let save = file(s, &Path::new("/var/lib/libvirt/qemu/save").join(format!("{}.save", saved.name)));
    assert_eq!((save["role"].as_str(), save["exists"].as_bool()), (Some("managed-save"), Some(true)));
    let tr = domain(&by_mount, &tmp.name);
    assert_eq!(
        (tr["state"].as_str(), tr["persistent"].as_bool(), tr["coverage"].as_str()),
        (Some("running"), Some(false), Some("not-affected"))
    );
    assert!(
        tr["files"].as_array().unwrap().iter().all(|f| f["role"] != "domain-xml"),
        "a transient domain has no XML file"
    );
    assert_eq!(domain(&by_mount, &crashy.name)["state"], "crashed");
    let g = domain(&by_mount, &gone_name);
    assert_eq!((g["state"].as_str(), g["coverage"].as_str()), (Some("not connected"), Some("full")));

    // The same volume by its loop device, by the served image, and by the FUSE file: the same
    // coverage. Both volumes: db is whole.
    let fuse = store.served.as_ref().unwrap().fuse_file();
    for name in [store.loopdev.path(), served, fuse.to_str().unwrap()] {
        let l = layout(&["--volumes", name]);
        for n in [&web_name, &db.name, &off.name, &saved.name, &tmp.name] {
            assert_eq!(domain(&l, n)["coverage"], domain(&by_mount, n)["coverage"], "{n} by {name}");
        }
    }
    let both = layout(&["--volumes", store.mount_point(), other.loopdev.path()]);
    assert_eq!(domain(&both, &db.name)["coverage"], "full");
    assert_eq!(domain(&both, &tmp.name)["coverage"], "full");
    // Media: off's ISO is on `store`; without media, `other` holds all of off.
    assert_eq!(domain(&layout(&["--volumes", other.mount_point()]), &off.name)["coverage"], "partial");
    assert_eq!(domain(&layout(&["--volumes", other.mount_point(), "--no-media"]), &off.name)["coverage"], "full");

    // Text: a readable report VM by VM, and one line per VM with --quiet.
    let text = rime_raw(&["vm", "layout", "--volumes", store.mount_point()]).ok().stdout;
    let quoted = serde_json::to_string(&web_name).unwrap();
    assert!(text.contains(&format!("VM {quoted}  running")), "{text}");
    assert!(text.contains("coverage: partial") && text.contains("NOT on the volumes"), "{text}");
    let quiet = rime_raw(&["vm", "layout", "-q"]).ok().stdout;
    let ours: Vec<&str> = quiet.lines().filter(|l| l.contains(&t)).collect();
    assert_eq!(ours.len(), 7, "one line per domain and per XML left behind:\n{quiet}");
    assert!(ours.iter().any(|l| l.starts_with("crashed") && l.contains("crashy")), "{quiet}");

    // Not a mount point: a clear error.
    let bad = rime_raw(&["vm", "layout", "--volumes", env.dir.path().to_str().unwrap()]);
    assert_eq!(bad.code, Some(2));
    assert!(bad.fails().contains("not a mount point"));
    drop((web, db, off, saved, tmp, crashy));
}

#[test]
fn libvirt_not_running_is_one_clear_line() {
    let _lv = shared();
    let out = crate::common::rime_command()
        .args(["vm", "layout"])
        .env("RIME_LIBVIRT_URI", "qemu+unix:///system?socket=/nonexistent/libvirt-sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("libvirt is not reachable"), "{err}");
}
