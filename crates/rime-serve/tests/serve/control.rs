//! The backup's side of the control socket: a snapshot source reads the snapshot view, the
//! protection area shrinks as it archives, a filling difference store makes it read the saved
//! blocks first (freeing them on the server) without changing what it reads, and a backup that
//! goes away aborts its snapshot at once.

use rime_serve::control::ControlServer;
use rime_serve::SnapshotSource;
use rime_snapshot::engine::{Engine, EngineConfig, EngineState, SnapshotLimits};
use rime_snapshot::store::StoreLimits;
use rime_snapshot::Bitmap;
use rime_volume::BlockSource;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: u64 = 4096;

fn setup(dir: &std::path::Path, blocks: u64, cap: u64) -> (Arc<Engine>, std::path::PathBuf) {
    let vol = dir.join("vol.img");
    let data: Vec<u8> = (0..blocks * BS).map(|i| (i / BS) as u8 ^ (i as u8).rotate_left(3)).collect();
    std::fs::write(&vol, data).unwrap();
    let mut cfg = EngineConfig::new(dir.join("state"));
    cfg.store = StoreLimits { memory: 16 * BS, cap, spill_dir: dir.to_path_buf() };
    cfg.dump_dir = Some(dir.to_path_buf());
    let engine = Arc::new(Engine::open(&vol, cfg).unwrap());
    let sock = dir.join("control.sock");
    let limits =
        SnapshotLimits { wip: Duration::from_millis(10), limit: Duration::from_secs(5), drain: Duration::from_secs(5) };
    ControlServer::new(engine.clone(), limits, None).listen(&sock).unwrap();
    (engine, sock)
}

#[test]
fn a_filling_store_is_read_first_and_the_view_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sock) = setup(dir.path(), 1024, 256 * BS);
    let src = SnapshotSource::begin(&sock, None, None, None).unwrap();
    let dump = std::fs::read(src.info.dump.as_ref().unwrap()).unwrap();
    assert_eq!(engine.status().state, EngineState::Active);
    src.protect(&Bitmap::full(1024)).unwrap();
    src.start_archiving();
    let mut view = vec![0u8; (1024 * BS) as usize];
    for (i, piece) in view.chunks_mut(16 * BS as usize).enumerate() {
        // Before each of the first 20 reads, overwrite 24 new blocks far ahead of the reader:
        // without reading saved blocks first, the store (cap 256 blocks) would overflow at
        // the 11th.
        if i < 20 {
            let ahead = 512 + i as u64 * 24;
            for b in ahead..ahead + 24 {
                engine.write(b * BS, &vec![0xee; BS as usize], false).unwrap();
            }
        }
        src.read_exact_at(piece, i as u64 * 16 * BS).unwrap();
        assert!(engine.status().store.bytes < 256 * BS);
    }
    assert!(view == dump, "the view differs from the volume at the snapshot instant");
    assert!(
        src.early_blocks.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "saved blocks should have been read first"
    );
    let st = engine.status();
    assert_eq!((st.store.bytes, st.store.protected_blocks), (0, 0), "{st:?}");
    src.finish("backup-1", &Bitmap::full(1024), &Bitmap::new(1024)).unwrap();
    assert_eq!(engine.status().cbt_base.as_deref(), Some("backup-1"));
}

#[test]
fn a_backup_that_goes_away_aborts_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sock) = setup(dir.path(), 256, 1 << 30);
    let src = SnapshotSource::begin(&sock, None, None, None).unwrap();
    engine.write(0, &[1u8; 8192], false).unwrap();
    assert_eq!(engine.status().store.bytes, 2 * BS);
    drop(src);
    let t = Instant::now();
    while engine.status().state != EngineState::Idle {
        assert!(t.elapsed() < Duration::from_secs(10), "still {:?}", engine.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its changes went back into the changed-block map (everything: never backed up).
    assert_eq!(engine.status().changed_blocks, 256);
    // A second client while one holds a snapshot is refused clearly.
    let a = SnapshotSource::begin(&sock, None, None, None).unwrap();
    let err = SnapshotSource::begin(&sock, None, None, None).err().unwrap();
    assert!(format!("{err:#}").contains("already in progress"), "{err:#}");
    drop(a);
}

#[test]
fn a_server_of_another_protocol_version_is_refused() {
    use rime_serve::protocol::{encode, Reply, PROTOCOL_VERSION};
    use std::io::{BufRead, Write};
    // Only this build's server can run here, so a stand-in socket answers `status` as a server
    // of protocol version 2 would (with a real engine's status).
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = setup(dir.path(), 16, 16 * BS);
    let sock = dir.path().join("other.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let status = engine.status();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
        let reply = Reply::Status {
            protocol: PROTOCOL_VERSION + 1,
            status,
            volume: "/dev/other".into(),
            fuse_file: None,
            pid: 1,
        };
        (&s).write_all(&encode(&reply)).unwrap();
    });
    let err = SnapshotSource::begin(&sock, None, None, None).err().expect("another version must be refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("protocol version {}", PROTOCOL_VERSION + 1))
            && msg.contains(&format!("version {PROTOCOL_VERSION}")),
        "{msg}"
    );
    assert_eq!(engine.status().state, EngineState::Idle, "no snapshot was taken");
}
