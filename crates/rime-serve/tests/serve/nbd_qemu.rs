//! The NBD server against QEMU's own clients: `qemu-nbd --list`, `qemu-img` and `qemu-io`
//! over a unix socket and TCP; FUA and flush; write-zeroes and trim; and a snapshot taken
//! while `qemu-io` writes through the server equals the volume at the snapshot instant.

use rime_nbd::{Address, NbdServer};
use rime_serve::export::VolumeExport;
use rime_snapshot::engine::{Engine, EngineConfig, SnapshotLimits};
use rime_testkit::require;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{tool} {} failed:\n{text}", args.join(" "));
    text
}

fn setup(dir: &Path, size: usize) -> (Arc<Engine>, String) {
    let vol = dir.join("vol.img");
    let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ 0x11).collect();
    std::fs::write(&vol, data).unwrap();
    let mut cfg = EngineConfig::new(dir.join("state"));
    cfg.dump_dir = Some(dir.to_path_buf());
    cfg.store.spill_dir = dir.to_path_buf();
    let engine = Arc::new(Engine::open(&vol, cfg).unwrap());
    let sock = dir.join("nbd.sock");
    let server = NbdServer::new(Arc::new(VolumeExport(engine.clone())), "vol".into());
    server.listen(&Address::parse(&format!("unix:{}", sock.display()))).unwrap();
    (engine, format!("nbd+unix:///?socket={}", sock.display()))
}

#[test]
fn qemu_tools_work_against_the_server() {
    require(&["qemu-io"]);
    let dir = tempfile::tempdir().unwrap();
    let (engine, uri) = setup(dir.path(), 16 << 20);
    let sock = dir.path().join("nbd.sock");
    let list = run("qemu-nbd", &["--list", "-k", sock.to_str().unwrap()]);
    assert!(list.contains("export: 'vol'") && list.contains("16777216"), "{list}");
    let info = run("qemu-img", &["info", "--output=json", &uri]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    // The named export works too.
    run("qemu-io", &["-f", "raw", "-c", "read 0 4k", &format!("nbd+unix:///vol?socket={}", sock.display())]);
    // An unknown export is refused.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &format!("nbd+unix:///nope?socket={}", sock.display())])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let io = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "write -f -P 0xcd 2M 4k",
            "-c",
            "flush",
            "-c",
            "write -z 3M 128k",
            "-c",
            "read -P 0 3M 128k",
            "-c",
            "write -P 0x33 6M 64k",
            "-c",
            "write -z -u 6M 64k",
            "-c",
            "read -P 0 6M 64k",
            "-c",
            "discard 5M 64k",
            "-c",
            "write -P 0x01 16383k 1k",
            &uri,
        ],
    );
    assert!(!io.contains("error") && !io.contains("Pattern verification failed"), "{io}");
    // The data is in the volume file.
    let file = std::fs::read(engine.path()).unwrap();
    assert!(file[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0xab));
    assert!(file[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0xcd));
    assert!(file[3 << 20..(3 << 20) + 131072].iter().all(|&b| b == 0));
    assert!(file[(16383 << 10)..].iter().all(|&b| b == 1));
    // Past the end: refused, nothing written.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write 16M 4k", &uri]).output().unwrap();
    assert!(
        !out.status.success()
            || String::from_utf8_lossy(&out.stderr).contains("error")
            || String::from_utf8_lossy(&out.stdout).contains("error")
    );
    assert_eq!(std::fs::metadata(engine.path()).unwrap().len(), 16 << 20);
    // The changed-block map saw every write.
    assert!(engine.status().writes >= 5);

    // QEMU's block layer reads the whole export (as a VM's disk driver would).
    let copy = dir.path().join("copy.img");
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(engine.path()).unwrap());

    // TCP on 127.0.0.1.
    let server = NbdServer::new(Arc::new(VolumeExport(engine.clone())), "vol".into());
    let port = 20000 + (std::process::id() % 20000) as u16;
    server.listen(&Address::parse(&format!("127.0.0.1:{port}"))).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "read -P 0xab 1M 64k", &format!("nbd://127.0.0.1:{port}")]);
    run("qemu-img", &["info", &format!("nbd://127.0.0.1:{port}/vol")]);
}

#[test]
fn snapshot_while_qemu_io_writes_is_the_volume_at_that_instant() {
    require(&["qemu-io"]);
    let dir = tempfile::tempdir().unwrap();
    let (engine, uri) = setup(dir.path(), 32 << 20);
    // A writer: bursts of random-offset writes with pauses (so a write-inactivity period occurs).
    let writer_uri = uri.clone();
    let writer = std::thread::spawn(move || {
        let mut seed = 7u64;
        for round in 0..8 {
            let mut args = vec!["-f".to_string(), "raw".to_string()];
            for _ in 0..40 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let off = (seed >> 33) % (32 * 256 - 4);
                args.push("-c".into());
                args.push(format!("write -P {} {}k 8k", (round * 40) % 250 + 1, off * 4));
            }
            args.push(writer_uri.clone());
            run("qemu-io", &args.iter().map(String::as_str).collect::<Vec<_>>());
            std::thread::sleep(Duration::from_millis(150));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let limits = SnapshotLimits {
        wip: Duration::from_millis(50),
        limit: Duration::from_secs(20),
        drain: Duration::from_secs(5),
    };
    let info = engine.begin_snapshot(limits).unwrap();
    let dump = std::fs::read(info.dump.as_ref().unwrap()).unwrap();
    let mut view = vec![0u8; engine.size() as usize];
    for (i, piece) in view.chunks_mut(1 << 20).enumerate() {
        engine.snap_read(info.id, (i as u64) << 20, piece, true).unwrap();
        std::thread::sleep(Duration::from_millis(40));
    }
    writer.join().unwrap();
    assert!(engine.status().cow_blocks > 0, "writes should have hit protected blocks during the snapshot");
    assert!(view == dump, "the snapshot view differs from the volume at the snapshot instant");
    engine.end_snapshot(info.id, None).unwrap();
}
