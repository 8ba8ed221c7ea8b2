//! The copy-on-write engine under concurrent writers: the snapshot view equals the volume at
//! the snapshot instant, archived blocks free their copies, the store cap aborts cleanly, the
//! write-inactivity period and the drain limit fail clearly, and the changed-block map.

use rime_snapshot::engine::{Engine, EngineConfig, EngineState, SnapshotLimits};
use rime_snapshot::store::StoreLimits;
use rime_snapshot::Bitmap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BS: u64 = 4096;

fn rng(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn volume(dir: &Path, blocks: u64) -> std::path::PathBuf {
    let p = dir.join("vol.img");
    let mut data = vec![0u8; (blocks * BS) as usize];
    let mut s = 1;
    data.chunks_mut(8).for_each(|c| c.copy_from_slice(&rng(&mut s).to_le_bytes()[..c.len()]));
    std::fs::write(&p, data).unwrap();
    p
}

fn engine(dir: &Path, blocks: u64, memory: u64, cap: u64) -> Arc<Engine> {
    let vol = volume(dir, blocks);
    let mut cfg = EngineConfig::new(dir.join("state"));
    cfg.store = StoreLimits { memory, cap, spill_dir: dir.join("spill") };
    cfg.dump_dir = Some(dir.to_path_buf());
    Arc::new(Engine::open(&vol, cfg).unwrap())
}

fn quick() -> SnapshotLimits {
    SnapshotLimits { wip: Duration::from_millis(20), limit: Duration::from_secs(10), drain: Duration::from_secs(5) }
}

/// Writers that pause now and then (so a write-inactivity period occurs).
fn writers(e: &Arc<Engine>, n: usize, stop: &Arc<AtomicBool>, pause_every: u64) -> Vec<std::thread::JoinHandle<u64>> {
    (0..n)
        .map(|t| {
            let (e, stop) = (e.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seed = 100 + t as u64;
                let blocks = e.size() / BS;
                let mut count = 0;
                while !stop.load(Ordering::Relaxed) {
                    let b = rng(&mut seed) % blocks;
                    let len = (1 + rng(&mut seed) % 8).min(blocks - b);
                    let data: Vec<u8> = (0..len * BS).map(|i| (i ^ seed) as u8).collect();
                    // Odd offsets too: partial blocks must be saved whole.
                    let off = b * BS + if count % 3 == 0 { 512 } else { 0 };
                    let data = &data[..(data.len() as u64).min(e.size() - off) as usize];
                    e.write(off, data, count % 50 == 0).unwrap();
                    count += 1;
                    if pause_every > 0 && count % pause_every == 0 {
                        std::thread::sleep(Duration::from_millis(60));
                    }
                }
                count
            })
        })
        .collect()
}

#[test]
fn snapshot_view_is_the_volume_at_the_snapshot_instant() {
    let dir = tempfile::tempdir().unwrap();
    // Small memory buffer: most saved blocks spill to the temporary file.
    let e = engine(dir.path(), 2048, 64 * BS, 1 << 30);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writers(&e, 3, &stop, 200);
    std::thread::sleep(Duration::from_millis(100));
    let info = e.begin_snapshot(quick()).unwrap();
    let dump = std::fs::read(info.dump.as_ref().unwrap()).unwrap();
    // Read the view in 64 KiB pieces while writers go on, archiving as we go.
    let mut view = vec![0u8; e.size() as usize];
    for (i, piece) in view.chunks_mut(65536).enumerate() {
        e.snap_read(info.id, i as u64 * 65536, piece, true).unwrap();
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = w.into_iter().map(|h| h.join().unwrap()).sum();
    let status = e.status();
    assert!(status.cow_blocks > 0, "writers should have triggered copies: {status:?}");
    assert_eq!(status.store.protected_blocks, 0, "everything archived");
    assert_eq!(status.store.bytes, 0, "archived blocks free their copies");
    assert!(status.peak_store > 0 || status.store.peak > 0);
    assert!(view == dump, "snapshot view differs from the volume at the snapshot instant ({writes} writes)");
    e.end_snapshot(info.id, None).unwrap();
    assert_eq!(e.status().state, EngineState::Idle);
}

#[test]
fn unread_blocks_stay_protected_and_rereads_agree() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), 256, 1 << 20, 1 << 30);
    let info = e.begin_snapshot(quick()).unwrap();
    let dump = std::fs::read(info.dump.as_ref().unwrap()).unwrap();
    // Narrow the area to the first half: writes to the second half are not copied.
    let area = Bitmap::new(256);
    area.set_range(0, 128);
    e.protect_only(info.id, &area).unwrap();
    e.write(200 * BS, &vec![7u8; BS as usize], false).unwrap();
    assert_eq!(e.status().store.bytes, 0);
    e.write(10 * BS + 100, &vec![9u8; 3 * BS as usize], false).unwrap();
    assert_eq!(e.status().store.bytes, 4 * BS);
    assert_eq!(e.buffered_blocks(info.id, 10).unwrap(), vec![10, 11, 12, 13]);
    let mut a = vec![0u8; 128 * BS as usize];
    e.snap_read(info.id, 0, &mut a, false).unwrap();
    assert!(a[..] == dump[..a.len()]);
    e.mark_archived(info.id, 0, 64 * BS).unwrap();
    assert_eq!(e.status().store.bytes, 0);
    e.end_snapshot(info.id, None).unwrap();
}

#[test]
fn store_cap_aborts_cleanly_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), 1024, 8 * BS, 32 * BS);
    let info = e.begin_snapshot(quick()).unwrap();
    let t = Instant::now();
    for b in 0..100u64 {
        e.write(b * BS, &vec![b as u8; BS as usize], false).unwrap();
    }
    assert!(t.elapsed() < Duration::from_secs(2), "writers never wait for the store");
    let st = e.status();
    assert_eq!(st.state, EngineState::Aborted);
    assert!(st.aborted.as_deref().unwrap().contains("cap"), "{st:?}");
    let err = e.snap_read(info.id, 0, &mut [0u8; 4096], true).unwrap_err().to_string();
    assert!(err.contains("aborted") && err.contains("cap"), "{err}");
    // The volume has every write.
    let mut buf = vec![0u8; BS as usize];
    for b in 0..100u64 {
        e.read(b * BS, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == b as u8));
    }
    // The aborted snapshot's changes are still tracked.
    assert!(e.status().changed_blocks >= 100);
    e.end_snapshot(info.id, None).unwrap();
    assert_eq!(e.status().state, EngineState::Idle);
    // A new snapshot can be taken.
    let again = e.begin_snapshot(quick()).unwrap();
    e.end_snapshot(again.id, None).unwrap();
}

#[test]
fn no_write_inactivity_within_the_limit_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), 512, 1 << 20, 1 << 30);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writers(&e, 2, &stop, 0);
    let limits = SnapshotLimits {
        wip: Duration::from_millis(200),
        limit: Duration::from_secs(2),
        drain: Duration::from_secs(5),
    };
    let t = Instant::now();
    let err = e.begin_snapshot(limits).unwrap_err().to_string();
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    w.into_iter().for_each(|h| {
        h.join().unwrap();
    });
    assert!(err.contains("write-inactivity period") && err.contains("time limit"), "{err}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "{took:?}");
    assert_eq!(e.status().state, EngineState::Idle);
}

#[test]
fn a_write_that_does_not_drain_within_the_drain_limit_fails_the_snapshot_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 16384; // 64 MiB
    let e = engine(dir.path(), blocks, 1 << 20, 1 << 30);
    // A write that slips in just as the gate closes, and takes far longer than the drain limit
    // (64 MiB against 1 ms); the hook starts it at that moment, once.
    let slow: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<std::io::Result<()>>>>> = Arc::default();
    let (e2, slow2) = (e.clone(), slow.clone());
    let once = AtomicBool::new(false);
    e.set_before_gate_hook(move || {
        if once.swap(true, Ordering::SeqCst) {
            return;
        }
        let e3 = e2.clone();
        *slow2.lock().unwrap() =
            Some(std::thread::spawn(move || e3.write(0, &vec![0xa5u8; (blocks * 4096) as usize], false)));
        while e2.writes_in_flight() == 0 {
            std::thread::yield_now();
        }
    });
    let limits = SnapshotLimits {
        wip: Duration::from_millis(10),
        limit: Duration::from_secs(5),
        drain: Duration::from_millis(1),
    };
    let err = e.begin_snapshot(limits).unwrap_err();
    assert!(matches!(err, rime_snapshot::SnapshotError::DrainTimeout(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("drain limit of 0.001 s") && msg.contains("not taken"), "{msg}");
    // The gate opened again: the slow write completes, and no snapshot is left behind.
    slow.lock().unwrap().take().unwrap().join().unwrap().unwrap();
    assert_eq!(e.status().state, EngineState::Idle);
    assert_eq!(e.status().snapshot, None);
    let mut back = vec![0u8; 4096];
    e.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0xa5), "the write went through");
    // The next snapshot (the hook no longer interferes) is taken normally.
    let info = e.begin_snapshot(quick()).unwrap();
    e.end_snapshot(info.id, None).unwrap();
}

#[test]
fn snapshots_between_bursts_drain_at_once_and_writers_go_on() {
    // Snapshots taken repeatedly while writers write in bursts: each is taken in a pause,
    // drains in well under the limit, and the writers carry on afterwards.
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), 512, 1 << 20, 1 << 30);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writers(&e, 2, &stop, 50);
    for _ in 0..3 {
        let info = e.begin_snapshot(quick()).unwrap();
        assert!(info.drained_ms < 1000, "{info:?}");
        e.end_snapshot(info.id, None).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    w.into_iter().for_each(|h| {
        h.join().unwrap();
    });
}

#[test]
fn changed_block_tracking_follows_backups_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(dir.path(), 256);
    let cfg = EngineConfig::new(dir.path().join("state"));
    let e = Engine::open(&vol, cfg.clone()).unwrap();
    assert_eq!(e.status().changed_blocks, 256, "never backed up: everything changed");
    let info = e.begin_snapshot(quick()).unwrap();
    e.write(5 * BS, &[1u8; 10], false).unwrap();
    let (base, delta, _) = e.snapshot_changes(info.id).unwrap();
    assert_eq!((base, delta.count()), (None, 256));
    e.end_snapshot(info.id, Some(("snap1".into(), Some(Bitmap::full(256))))).unwrap();
    assert_eq!(e.status().changed_blocks, 1, "only the write after the snapshot instant");
    e.write(100 * BS, &[1u8; 8192], false).unwrap();
    // A failed backup gives its changes back.
    let info = e.begin_snapshot(quick()).unwrap();
    assert_eq!(e.status().changed_blocks, 0);
    e.end_snapshot(info.id, None).unwrap();
    assert_eq!(e.status().changed_blocks, 3);
    e.shutdown().unwrap();
    drop(e);
    let e = Engine::open(&vol, cfg.clone()).unwrap();
    let st = e.status();
    assert_eq!((st.changed_blocks, st.cbt_base.as_deref()), (3, Some("snap1")), "{st:?}");
    // Crash: no clean shutdown.
    drop(e);
    let e = Engine::open(&vol, cfg.clone()).unwrap();
    let st = e.status();
    assert_eq!((st.changed_blocks, st.cbt_base), (256, None), "unclean restart: everything changed");
    e.shutdown().unwrap();
    drop(e);
    // Modified while not served.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", 0).unwrap();
    drop(f);
    let e = Engine::open(&vol, cfg).unwrap();
    assert_eq!(e.status().changed_blocks, 256);
}
