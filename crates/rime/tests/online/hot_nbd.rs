//! Hot backup of a volume written over NBD: `fio` (random 4 KiB writes in bursts) and a
//! `qemu-io` writer (patterned 64 KiB writes, discards and write-zeroes) write through `rime serve` while
//! `rime backup --mode auto VOLUME` images it online (the volume is in use, so auto goes
//! online; the server is found from the volume's path). The restored image equals the volume
//! at the snapshot instant byte for byte. `--mode offline` refuses the protected volume.

use crate::common::*;
use crate::hot_support::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn volume_written_over_nbd_by_fio_and_qemu_io_backs_up_exactly() {
    require(&["fio", "qemu-io"]);
    let env = Env::new();
    let image = env.path("disk.img");
    urandom_file(&image, 192 * MIB);
    let served = Served::start(env.dir.path(), &image, false, &["--wip-ms", "100"]);

    // Offline refuses it, with one line.
    let msg = env.rime(&["backup", "--mode", "offline", image.to_str().unwrap()]).fails();
    assert!(msg.contains("protected by rime serve"), "{msg}");

    let mut fio = fio_nbd(&served.nbd_uri(), 192, 256, 200, 300);
    let stop = Arc::new(AtomicBool::new(false));
    let (uri, stop2) = (served.nbd_uri(), stop.clone());
    let qemu = std::thread::spawn(move || {
        let mut round = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let mut args = vec!["-f".to_string(), "raw".to_string()];
            for k in 0..16u64 {
                let off = (round * 7919 + k * 104729) % (192 * 16 - 1);
                args.push("-c".into());
                // Mostly data; discards and write-zeroes must be copied first too.
                args.push(match k {
                    5 => format!("discard {}k 64k", off * 64),
                    11 => format!("write -z {}k 64k", off * 64),
                    _ => format!("write -P {} {}k 64k", (round + k) % 255 + 1, off * 64),
                });
            }
            args.push(uri.clone());
            let out = std::process::Command::new("qemu-io").args(&args).output().unwrap();
            assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
            round += 1;
            std::thread::sleep(Duration::from_millis(150));
        }
        round
    });
    std::thread::sleep(Duration::from_secs(1));
    fio.assert_running();

    let before = served.status()["cow_blocks"].as_u64().unwrap();
    let v = env.backup_json(&["--mode", "auto", image.to_str().unwrap()]);
    fio.assert_running();
    let st = served.status();
    stop.store(true, Ordering::Relaxed);
    let rounds = qemu.join().unwrap();
    fio.stop();
    assert!(rounds > 0);
    assert_eq!(st["state"], "idle", "{st}");
    assert!(
        st["cow_blocks"].as_u64().unwrap() > before,
        "writes should have hit protected blocks during the backup: {st}"
    );
    let vol = first_volume(&v);
    assert!(vol["map"].as_str().unwrap().contains("online snapshot"), "{vol}");

    let dump = served.dump(1);
    let restored = env.path("restored.img");
    env.restore(v["snapshot"].as_str().unwrap(), &restored, &[]);
    assert_same_bytes(&dump, &restored);
    // The live volume moved on since.
    assert!(!same_bytes(&dump, &image), "the writers should have changed the volume after the snapshot");
    env.assert_verify_clean();
}
