//! The NBD client against real servers: `qemu-nbd` (structured replies, `base:allocation`,
//! persistent dirty bitmaps exported with `--bitmap`, named exports, error chunks injected with
//! blkdebug) and Rime's own server (simple replies only). Every answer is checked against
//! QEMU's own view of the same image (`qemu-img convert`, `qemu-img map`).

use rime_nbd::client::{Extent, ServerError};
use rime_nbd::proto::{STATE_DIRTY, STATE_HOLE, STATE_ZERO};
use rime_nbd::NbdClient;
use rime_testkit::{require, run, s, Rng};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod simple;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// A `qemu-nbd` serving on a unix socket until dropped.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd --read-only --persistent` with `args` (the image last).
    fn start(dir: &Path, args: &[&str]) -> QemuNbd {
        let socket = dir.join("nbd.sock");
        let child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--shared=8", "--socket", s(&socket)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-nbd");
        let mut server = QemuNbd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Listening once a connection gets the greeting (then left with NBD_OPT_ABORT).
        loop {
            if let Ok(mut c) = UnixStream::connect(&server.socket) {
                use std::io::{Read, Write};
                let mut hello = [0u8; 18];
                if c.read_exact(&mut hello).is_ok() && &hello[..8] == b"NBDMAGIC" {
                    let mut abort = 1u32.to_be_bytes().to_vec();
                    abort.extend_from_slice(b"IHAVEOPT");
                    abort.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0]);
                    let _ = c.write_all(&abort);
                    let _ = c.read(&mut [0u8; 20]);
                    break;
                }
            }
            assert!(server.child.try_wait().unwrap().is_none(), "qemu-nbd {args:?} exited");
            assert!(Instant::now() < deadline, "qemu-nbd {args:?} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One write of the test image: where, how long, and whether it writes zeroes.
struct Write {
    offset: u64,
    len: u64,
    how: &'static str,
}

const SIZE: u64 = 40 * MIB;

/// Written before the bitmap exists: allocated, never dirty.
const BEFORE_BITMAP: &[Write] = &[Write { offset: 16 * MIB, len: 256 * KIB, how: "-P 0x42" }];

/// Written while the bitmap records.
const WRITES: &[Write] = &[
    Write { offset: MIB, len: 64 * KIB, how: "-P 0xab" },
    // Unaligned, inside one cluster.
    Write { offset: 3000 * KIB, len: 5 * KIB, how: "-P 0x5c" },
    // Explicitly zeroed, never written before.
    Write { offset: 8 * MIB, len: 192 * KIB, how: "-z" },
    // Data, then half of it zeroed.
    Write { offset: 12 * MIB, len: 128 * KIB, how: "-P 0x99" },
    Write { offset: 12 * MIB, len: 64 * KIB, how: "-z" },
    // Random data across a read piece boundary (reads go in 4 MiB pieces).
    Write { offset: 20 * MIB - 300 * KIB, len: MIB, how: "-s" },
    // The last bytes of the image.
    Write { offset: SIZE - 4 * KIB, len: 4 * KIB, how: "-P 0x01" },
];

/// A qcow2 image with data, explicit zeroes and unallocated ranges, and a persistent dirty
/// bitmap `b0` that recorded [`WRITES`] but not [`BEFORE_BITMAP`].
fn make_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), &SIZE.to_string()]);
    let random = dir.join("random.bin");
    std::fs::write(&random, Rng::new(7).bytes(MIB as usize)).unwrap();
    let io = |writes: &[Write]| {
        let mut args = vec!["-f".to_string(), "qcow2".into()];
        for w in writes {
            let how = if w.how == "-s" { format!("-s {}", s(&random)) } else { w.how.to_string() };
            args.push("-c".into());
            args.push(format!("write {how} {} {}", w.offset, w.len));
        }
        args.push(s(&img).to_string());
        run("qemu-io", &args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    io(BEFORE_BITMAP);
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    io(WRITES);
    img
}

/// The image as raw bytes, by `qemu-img convert`.
fn raw_of(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("disk.raw");
    run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", s(img), s(&raw)]);
    std::fs::read(raw).unwrap()
}

/// `qemu-img map` of the image as `base:allocation` extents (HOLE when not data, ZERO when
/// reading as zeroes), merged.
fn map_of(img: &Path) -> Vec<Extent> {
    let out = run("qemu-img", &["map", "--output=json", "-f", "qcow2", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut extents = Vec::new();
    for e in v.as_array().unwrap() {
        let flags = if e["data"].as_bool().unwrap() { 0 } else { STATE_HOLE }
            | if e["zero"].as_bool().unwrap() { STATE_ZERO } else { 0 };
        extents.push(Extent { offset: e["start"].as_u64().unwrap(), len: e["length"].as_u64().unwrap(), flags });
    }
    merged(&extents)
}

fn merged(extents: &[Extent]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &e in extents {
        match out.last_mut() {
            Some(l) if l.flags == e.flags && l.offset + l.len == e.offset => l.len += e.len,
            _ => out.push(e),
        }
    }
    out
}

/// Checks that `extents` cover exactly `[offset, offset + len)`, in order, none empty, and that
/// no two neighbours share flags (the client merges them).
fn assert_covers(extents: &[Extent], offset: u64, len: u64) {
    let mut pos = offset;
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e.offset, pos, "extent {i} of {extents:?}");
        assert!(e.len > 0, "empty extent {i} of {extents:?}");
        if i > 0 {
            assert_ne!(extents[i - 1].flags, e.flags, "unmerged extents {i} of {extents:?}");
        }
        pos += e.len;
    }
    assert_eq!(pos, offset + len, "{extents:?}");
}

/// The flags of `extents` at byte `at`.
fn flags_at(extents: &[Extent], at: u64) -> u32 {
    extents.iter().find(|e| e.offset <= at && at < e.offset + e.len).expect("covered").flags
}

/// Reads the whole export in pieces of awkward sizes and offsets.
fn read_all(c: &NbdClient) -> Vec<u8> {
    let size = c.size() as usize;
    let mut out = vec![0x55u8; size];
    let mut pos = 0;
    let mut rng = Rng::new(3);
    while pos < size {
        // Up to 9 MiB, so that most reads go out as several requests.
        let n = (1 + rng.below(9 << 20) as usize).min(size - pos);
        c.read_exact_at(&mut out[pos..pos + n], pos as u64).unwrap();
        pos += n;
    }
    out
}

fn server_error(e: &std::io::Error) -> &ServerError {
    e.get_ref().and_then(|i| i.downcast_ref::<ServerError>()).unwrap_or_else(|| panic!("not a server error: {e}"))
}

#[test]
fn structured_reads_equal_qemu_img_convert() {
    require(&["qemu-nbd", "qemu-img", "qemu-io"]);
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let raw = raw_of(&img, dir.path());
    assert_eq!(raw.len() as u64, SIZE);
    let server = QemuNbd::start(dir.path(), &["--format=qcow2", s(&img)]);

    let c = NbdClient::connect_unix(&server.socket).unwrap();
    assert!(c.structured_replies(), "qemu-nbd offers structured replies");
    assert_eq!(c.size(), SIZE);
    assert!(!c.has_context("base:allocation"));
    let got = read_all(&c);
    let first_diff = got.iter().zip(&raw).position(|(a, b)| a != b);
    assert!(first_diff.is_none(), "first difference at byte {first_diff:?}");

    // Small reads across the borders of data, holes and zeroes, and reads of one byte.
    for &(offset, len) in &[
        (MIB - 100, 300),
        (MIB + 64 * KIB - 1, 2),
        (3000 * KIB - 1, 5 * KIB + 2),
        (12 * MIB + 64 * KIB - 3, 7),
        (8 * MIB - 512, 192 * KIB + 1024),
        (SIZE - 1, 1),
        (0, 1),
    ] {
        let mut buf = vec![0x55u8; len as usize];
        c.read_exact_at(&mut buf, offset).unwrap();
        assert!(buf[..] == raw[offset as usize..(offset + len) as usize], "read {len} at {offset}");
    }

    // Reads past the end are refused, and the connection stays usable.
    let mut buf = vec![0u8; 4096];
    let e = c.read_exact_at(&mut buf, SIZE - 100).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    let e = c.read_exact_at(&mut buf, u64::MAX - 10).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert!(c.read_exact_at(&mut [], SIZE).is_ok());
    c.read_exact_at(&mut buf, SIZE - 4096).unwrap();
    assert!(buf[..] == raw[(SIZE - 4096) as usize..]);
    // Block status needs a context that was negotiated.
    let e = c.block_status("base:allocation", 0, 4096).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("base:allocation"), "{e}");
}

#[test]
fn base_allocation_equals_qemu_img_map() {
    require(&["qemu-nbd", "qemu-img", "qemu-io"]);
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let map = map_of(&img);
    let server = QemuNbd::start(dir.path(), &["--format=qcow2", s(&img)]);
    let c = NbdClient::connect_unix_export(&server.socket, "", &["base:allocation"]).unwrap();
    assert!(c.has_context("base:allocation"));
    assert!(!c.has_context("qemu:dirty-bitmap:b0"));

    let all = c.block_status("base:allocation", 0, SIZE).unwrap();
    assert_covers(&all, 0, SIZE);
    assert_eq!(all, map, "base:allocation differs from qemu-img map");
    // What the image holds, in the protocol's terms: never-written ranges are holes reading
    // as zeroes, written data is allocated data, explicitly zeroed clusters read as zeroes.
    assert_eq!(flags_at(&all, 0), STATE_HOLE | STATE_ZERO);
    assert_eq!(flags_at(&all, 30 * MIB), STATE_HOLE | STATE_ZERO);
    assert_eq!(flags_at(&all, MIB), 0);
    assert_eq!(flags_at(&all, 16 * MIB), 0);
    assert_eq!(flags_at(&all, SIZE - 1), 0);
    assert_ne!(flags_at(&all, 8 * MIB) & STATE_ZERO, 0);
    assert_ne!(flags_at(&all, 12 * MIB) & STATE_ZERO, 0);
    assert_eq!(flags_at(&all, 12 * MIB + 64 * KIB), 0);

    // Parts of the export: the extents are clipped to the range asked for.
    let part = c.block_status("base:allocation", MIB - 4096, 8192).unwrap();
    assert_eq!(
        part,
        vec![
            Extent { offset: MIB - 4096, len: 4096, flags: STATE_HOLE | STATE_ZERO },
            Extent { offset: MIB, len: 4096, flags: 0 }
        ]
    );
    for &(offset, len) in &[(1, 1), (MIB + 1, 7 * MIB), (SIZE - 4097, 4097), (17 * MIB, SIZE - 17 * MIB)] {
        let part = c.block_status("base:allocation", offset, len).unwrap();
        assert_covers(&part, offset, len);
        for e in &part {
            assert_eq!(flags_at(&all, e.offset), e.flags);
            assert_eq!(flags_at(&all, e.offset + e.len - 1), e.flags);
        }
    }
    assert!(c.block_status("base:allocation", 0, 0).unwrap().is_empty());
    let e = c.block_status("base:allocation", SIZE - 10, 11).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert!(c.block_status("qemu:dirty-bitmap:b0", 0, 4096).is_err());
    // Still usable after the refusals.
    assert_eq!(c.block_status("base:allocation", 0, SIZE).unwrap(), all);
}

/// A sparse qcow2 of 4 GiB + 5 MiB (more than a request's 32-bit length) with 128 KiB of data
/// past 2 GiB: (its folder, path, size, where the data is).
fn big_image() -> (tempfile::TempDir, std::path::PathBuf, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    let size = 4 * 1024 * MIB + 5 * MIB;
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), &size.to_string()]);
    let at = 2 * 1024 * MIB + 3 * MIB;
    run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P 7 {at} 128k"), s(&img)]);
    (dir, img, size, at)
}

#[test]
fn block_status_beyond_one_request() {
    // More than MAX_STATUS (1 GiB), and more than a request's 32-bit length: the client asks
    // several times.
    require(&["qemu-nbd", "qemu-img", "qemu-io"]);
    let (dir, img, size, at) = big_image();
    let server = QemuNbd::start(dir.path(), &["--format=qcow2", s(&img)]);
    let c = NbdClient::connect_unix_export(&server.socket, "", &["base:allocation"]).unwrap();
    let all = c.block_status("base:allocation", 0, size).unwrap();
    assert_eq!(
        all,
        vec![
            Extent { offset: 0, len: at, flags: STATE_HOLE | STATE_ZERO },
            Extent { offset: at, len: 128 * KIB, flags: 0 },
            Extent { offset: at + 128 * KIB, len: size - at - 128 * KIB, flags: STATE_HOLE | STATE_ZERO },
        ]
    );
    assert_eq!(all, map_of(&img));
    let mut buf = vec![0u8; 256 * KIB as usize];
    c.read_exact_at(&mut buf, at - 64 * KIB).unwrap();
    assert!(buf[..64 * KIB as usize].iter().all(|&b| b == 0));
    assert!(buf[64 * KIB as usize..192 * KIB as usize].iter().all(|&b| b == 7));
    assert!(buf[192 * KIB as usize..].iter().all(|&b| b == 0));
}

/// The granularity of bitmap `name` in `img`, from `qemu-img info`.
fn granularity(img: &Path, name: &str) -> u64 {
    let out = run("qemu-img", &["info", "--output=json", "-f", "qcow2", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bitmaps = v["format-specific"]["data"]["bitmaps"].as_array().expect("bitmaps");
    let b = bitmaps.iter().find(|b| b["name"] == name).expect("bitmap");
    b["granularity"].as_u64().unwrap()
}

#[test]
fn dirty_bitmap_reports_exactly_the_written_ranges() {
    require(&["qemu-nbd", "qemu-img", "qemu-io"]);
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let map = map_of(&img);
    let g = granularity(&img, "b0");
    assert_eq!(g, 64 * KIB, "qemu's default bitmap granularity (the cluster size)");
    let server = QemuNbd::start(dir.path(), &["--format=qcow2", "--bitmap=b0", s(&img)]);

    // Both contexts on one connection: the reply holds a chunk for each.
    let c = NbdClient::connect_unix_export(&server.socket, "", &["qemu:dirty-bitmap:b0", "base:allocation"]).unwrap();
    assert!(c.has_context("qemu:dirty-bitmap:b0") && c.has_context("base:allocation"));
    let dirty = c.block_status("qemu:dirty-bitmap:b0", 0, SIZE).unwrap();
    assert_covers(&dirty, 0, SIZE);

    // Expected: every granule a write touched, and nothing else.
    let mut expected = Vec::new();
    let mut pos = 0;
    let mut ranges: Vec<(u64, u64)> =
        WRITES.iter().map(|w| (w.offset / g * g, (w.offset + w.len).div_ceil(g) * g)).collect();
    ranges.sort();
    for (s, e) in ranges {
        let s = s.max(pos);
        if e <= s {
            continue;
        }
        if s > pos {
            expected.push(Extent { offset: pos, len: s - pos, flags: 0 });
        }
        expected.push(Extent { offset: s, len: e - s, flags: STATE_DIRTY });
        pos = e;
    }
    if pos < SIZE {
        expected.push(Extent { offset: pos, len: SIZE - pos, flags: 0 });
    }
    let expected = merged(&expected);
    assert_eq!(dirty, expected);
    // Allocated before the bitmap: data, but clean.
    assert_eq!(flags_at(&dirty, 16 * MIB), 0);

    // The allocation context on the same connection is unchanged by the second context.
    assert_eq!(c.block_status("base:allocation", 0, SIZE).unwrap(), map);
    // A part of the bitmap, starting and ending inside granules.
    let part = c.block_status("qemu:dirty-bitmap:b0", MIB + 100, 200 * KIB).unwrap();
    assert_eq!(
        part,
        vec![
            Extent { offset: MIB + 100, len: 64 * KIB - 100, flags: STATE_DIRTY },
            Extent { offset: MIB + 64 * KIB, len: 136 * KIB + 100, flags: 0 },
        ]
    );
    // And reads still work with contexts negotiated.
    let raw = raw_of(&img, dir.path());
    assert!(read_all(&c) == raw);
}

#[test]
fn missing_contexts_and_exports_are_named() {
    require(&["qemu-nbd", "qemu-img", "qemu-io"]);
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path());
    let server = QemuNbd::start(dir.path(), &["--format=qcow2", "--bitmap=b0", "--export-name=vm-disk", s(&img)]);

    // The named export, with its bitmap.
    let c = NbdClient::connect_unix_export(&server.socket, "vm-disk", &["qemu:dirty-bitmap:b0"]).unwrap();
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.export_name(), "vm-disk");
    assert_eq!(flags_at(&c.block_status("qemu:dirty-bitmap:b0", 0, SIZE).unwrap(), MIB), STATE_DIRTY);
    drop(c);

    // A bitmap the export lacks: a broken incremental chain, said so.
    let e = NbdClient::connect_unix_export(&server.socket, "vm-disk", &["base:allocation", "qemu:dirty-bitmap:nosuch"])
        .err()
        .expect("a missing bitmap is an error");
    let msg = format!("{e:#}");
    assert!(msg.contains("\"qemu:dirty-bitmap:nosuch\"") && msg.contains("no such dirty bitmap"), "{msg}");
    let e = NbdClient::connect_unix_export(&server.socket, "vm-disk", &["x-nosuch:thing"]).err().unwrap();
    assert!(format!("{e:#}").contains("x-nosuch:thing"), "{e:#}");

    // A wrong export name, with and without contexts, and the default export that this server
    // does not have.
    for contexts in [&[][..], &["base:allocation"][..]] {
        let e = NbdClient::connect_unix_export(&server.socket, "vm-dsk", contexts).err().unwrap();
        let msg = format!("{e:#}");
        assert!(msg.contains("no export named \"vm-dsk\""), "{msg}");
    }
    let e = NbdClient::connect_unix(&server.socket).err().unwrap();
    assert!(format!("{e:#}").contains("no export named \"\""), "{e:#}");

    // Nothing listening.
    let e = NbdClient::connect_unix(&dir.path().join("none.sock")).err().unwrap();
    assert!(format!("{e:#}").contains("none.sock"), "{e:#}");
}

/// `qemu-nbd` serving `img` through blkdebug, which fails every `event` with EIO.
fn start_failing(dir: &Path, img: &Path, event: &str) -> QemuNbd {
    let conf = dir.join(format!("{event}.conf"));
    std::fs::write(&conf, format!("[inject-error]\nevent = \"{event}\"\nerrno = \"5\"\n")).unwrap();
    let opts = format!("driver=qcow2,file.driver=blkdebug,file.config={},file.image.filename={}", s(&conf), s(img));
    QemuNbd::start(dir, &["--image-opts", &opts])
}

#[test]
fn server_errors_fail_one_request_and_broken_replies_the_connection() {
    require(&["qemu-nbd", "qemu-img", "qemu-io"]);
    let (dir, img, _size, at) = big_image();

    // Every L2 table load fails. Block status needs the L2 table of an allocated range, not
    // of one whose L1 entry is empty; a read asks for block status first (to send holes).
    // qemu answers both with an error chunk and a message, and carries on.
    let server = start_failing(dir.path(), &img, "l2_load");
    let c = NbdClient::connect_unix_export(&server.socket, "", &["base:allocation"]).unwrap();
    for _ in 0..3 {
        let e = c.block_status("base:allocation", at - MIB, 4 * MIB).unwrap_err();
        let inner = server_error(&e);
        assert_eq!(inner.errno, 5, "{e}");
        assert!(!inner.message.is_empty(), "qemu sends a message with its error: {e}");
        assert!(e.to_string().contains("EIO"), "{e}");
        let mut buf = vec![0u8; 64 * KIB as usize];
        let e = c.read_exact_at(&mut buf, at).unwrap_err();
        assert_eq!(server_error(&e).errno, 5, "{e}");
        assert!(e.to_string().contains("holes"), "{e}");
        // The connection carries on.
        let ok = c.block_status("base:allocation", 0, 1024 * MIB).unwrap();
        assert_eq!(ok, vec![Extent { offset: 0, len: 1024 * MIB, flags: STATE_HOLE | STATE_ZERO }]);
        let mut buf = vec![1u8; MIB as usize];
        c.read_exact_at(&mut buf, 5 * MIB).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
    drop(c);
    drop(server);

    // Every data read fails: qemu 7.2 hangs up in the middle of the reply rather than send an
    // error chunk, and the client says so from then on.
    let server = start_failing(dir.path(), &img, "read_aio");
    let c = NbdClient::connect_unix_export(&server.socket, "", &["base:allocation"]).unwrap();
    let mut buf = vec![1u8; 64 * KIB as usize];
    c.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let e = c.read_exact_at(&mut buf, at).unwrap_err();
    assert!(e.get_ref().and_then(|i| i.downcast_ref::<ServerError>()).is_none(), "{e}");
    let e = c.read_exact_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}");
    assert!(e.to_string().contains("dropped earlier"), "{e}");
    let e = c.block_status("base:allocation", 0, 4096).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}");
}
