//! LUKS1 and LUKS2 volumes are recognised, reported as encrypted (cipher, UUID, label) and
//! imaged whole: nothing inside them is skipped, so they restore bit-exact. A LUKS LV inside
//! LVM is reported the same way.

use crate::common::*;
use crate::lvm_fixture::*;
use serde_json::Value;
use std::fs;

fn luks_format(target: &str, version: &str, label: Option<&str>, keyfile: &std::path::Path) {
    let mut args = vec!["luksFormat", "-q", "--batch-mode", "--type", version, "--key-file", keyfile.to_str().unwrap()];
    // Fast key derivation: the tests check the headers, not their strength.
    if version == "luks2" {
        args.extend(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]);
    } else {
        args.extend(["--iter-time", "1"]);
    }
    if let Some(l) = label {
        args.extend(["--label", l]);
    }
    args.push(target);
    sh("cryptsetup", &args);
}

fn luks_uuid(target: &str) -> String {
    sh("cryptsetup", &["luksUUID", target]).trim().to_string()
}

#[test]
fn luks1_and_luks2_are_reported_and_imaged_whole() {
    let env = Env::new();
    let key = env.path("key");
    fs::write(&key, b"correct horse battery staple").unwrap();
    let (l1, l2) = (env.path("luks1.img"), env.path("luks2.img"));
    for (img, seed) in [(&l1, 81), (&l2, 82)] {
        write_random_file(img, seed, 40 * MIB);
    }
    luks_format(l1.to_str().unwrap(), "luks1", None, &key);
    luks_format(l2.to_str().unwrap(), "luks2", Some("rime-test"), &key);

    let json = env.backup_json(&[l1.to_str().unwrap(), l2.to_str().unwrap()]);
    let vols = json["manifest"]["volumes"].as_array().unwrap();
    let e1 = &vols[0]["encrypted"];
    assert_eq!(e1["format"], "LUKS1");
    assert_eq!(e1["cipher"], "aes-xts-plain64");
    assert_eq!(e1["uuid"], luks_uuid(l1.to_str().unwrap()));
    let e2 = &vols[1]["encrypted"];
    assert_eq!(e2["format"], "LUKS2");
    assert_eq!(e2["cipher"], "aes-xts-plain64");
    assert_eq!(e2["label"], "rime-test");
    assert_eq!(e2["uuid"], luks_uuid(l2.to_str().unwrap()));
    let warnings: Vec<String> = json["warnings"].as_array().unwrap().iter().map(|w| w.to_string()).collect();
    for name in ["luks1.img", "luks2.img"] {
        assert!(warnings.iter().any(|w| w.contains(name) && w.contains("encrypted")), "{warnings:?}");
    }
    for v in vols {
        assert_eq!(v["read_bytes"], v["size"], "{} is read whole", v["name"]);
    }
    for (img, name) in [(&l1, "luks1.img"), (&l2, "luks2.img")] {
        let restored = env.path(&format!("restored-{name}"));
        env.restore(json["snapshot"].as_str().unwrap(), &restored, &["--volume", name]);
        assert_same_bytes(img, &restored);
    }
    let long = env.rime(&["snapshots", "-l"]).ok();
    assert!(
        long.stdout.contains("LUKS2 encrypted (aes-xts-plain64") && long.stdout.contains("label rime-test"),
        "{}",
        long.stdout
    );
}

#[test]
fn a_luks_lv_inside_lvm_is_reported_encrypted() {
    let env = Env::new();
    let key = env.path("key");
    fs::write(&key, b"another passphrase").unwrap();
    let disk = Disk::new(&env.path("disk.img"), 120, &[(0, LVM_GUID)]);
    let (p1, _) = disk.part(1);
    let pv = disk.part_loop(1);
    let lvm = Lvm::new(&[&pv]);
    let pe = lvm.create_vg("vgc", &[&pv], &[])[0];
    lvm.add_lvs("vgc", &env.path(""), &[lv("secret", true, &[linear(10, 0, 0)])]);
    let at = extent_at(p1, pe, 0);
    write_random_at(&disk.image, 83, at, 10 * EXT);
    let dev = RangeLoop::new(&disk.image, at, 10 * EXT);
    luks_format(&dev.dev, "luks2", None, &key);
    drop((dev, pv));
    let json = env.backup_json(&[disk.image.to_str().unwrap()]);
    let lvs = first_volume(&json)["partitions"][0]["lvm"]["logical_volumes"].as_array().unwrap().clone();
    let secret: &Value = lvs.iter().find(|l| l["name"] == "secret").unwrap();
    assert_eq!(secret["encrypted"]["format"], "LUKS2", "{secret}");
    assert!(first_volume(&json)["read_bytes"].as_u64().unwrap() >= 10 * EXT, "the LUKS LV is read whole");
    let restored = env.path("restored.img");
    env.restore(json["snapshot"].as_str().unwrap(), &restored, &[]);
    let (a, b) = (fs::read(&disk.image).unwrap(), fs::read(&restored).unwrap());
    let r = at as usize..(at + 10 * EXT) as usize;
    assert!(a[r.clone()] == b[r], "the LUKS LV restores bit-exact");
}
