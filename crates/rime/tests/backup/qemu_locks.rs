//! QEMU's image locks: an image a QEMU process may write is in use (found through QEMU's own
//! locks), and an offline backup holds the lock that keeps any QEMU from starting to write the
//! image until the backup is done. `qemu-io` stands in for a VM: it opens images the way QEMU's
//! block layer does, locks included.

use crate::common::*;

#[test]
fn an_image_qemu_writes_is_in_use_and_a_backup_keeps_qemu_from_writing() {
    rime_testkit::require(&["qemu-io"]);
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vm-disk", 11, 16, 128 * 1024);

    // A "VM" with the image open read-write: the offline backup is refused, naming QEMU.
    let vm = rime_testkit::peers::QemuHolding::open(&image);
    let run = env.rime(&["backup", "--mode", "offline", image.to_str().unwrap()]);
    assert_eq!(run.code, Some(6), "{run:?}");
    let line = run.fails();
    assert!(line.contains("open for writing by QEMU"), "{line}");
    vm.quit();

    // During an offline backup (after its volumes are opened, when after-snapshot hooks run),
    // a QEMU cannot get write access; afterwards it can again.
    let log = env.path("qemu.log");
    let try_write = format!(
        "qemu-io -f raw -c 'write 0 512' \"$RIME_VOLUMES\" >> '{0}' 2>&1; echo \"exit $?\" >> '{0}'",
        log.display()
    );
    env.backup_json(&["--mode", "offline", image.to_str().unwrap(), "--after-snapshot", &try_write]);
    let during = std::fs::read_to_string(&log).unwrap();
    assert!(during.contains("Failed to get \"write\" lock") && !during.contains("exit 0"), "{during}");
    let (ok, out) = sh_status("qemu-io", &["-f", "raw", "-c", "write 0 512", image.to_str().unwrap()]);
    assert!(ok && !out.contains("Failed"), "after the backup the image is writable again: {out}");
}
