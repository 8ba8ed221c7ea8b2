//! Against Rime's own NBD server. For an export that does not report its zeros it has no
//! structured replies: the client falls back to simple replies, and refuses metadata contexts
//! (they need structured replies). For one that does, structured replies and `base:allocation`.

use rime_nbd::client::ServerError;
use rime_nbd::{Address, Export, NbdClient, NbdServer};
use rime_testkit::Rng;
use std::sync::Arc;

/// An in-memory export whose reads of the byte at `bad` fail with EIO.
struct Memory {
    data: Vec<u8>,
    bad: u64,
}

impl Export for Memory {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn description(&self) -> &str {
        "test"
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if (offset..offset + buf.len() as u64).contains(&self.bad) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(1))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(1))
    }
    fn trim(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(1))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn simple_replies_when_the_server_has_no_structured_replies() {
    let dir = tempfile::tempdir().unwrap();
    let size = (9 << 20) + 12345;
    let data = Rng::new(11).bytes(size);
    let bad = 7 << 20;
    let server = NbdServer::new(Arc::new(Memory { data: data.clone(), bad }), "mem".into());
    let sock = dir.path().join("rime.sock");
    server.listen(&Address::Unix(sock.clone())).unwrap();

    for name in ["", "mem"] {
        let c = NbdClient::connect_unix_export(&sock, name, &[]).unwrap();
        assert!(!c.structured_replies());
        assert_eq!(c.size(), size as u64);
        // Below the failing byte: several 4 MiB requests, then an unaligned tail.
        let mut buf = vec![0u8; bad as usize];
        c.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..] == data[..bad as usize]);
        let mut tail = vec![0u8; size - bad as usize - 1];
        c.read_exact_at(&mut tail, bad + 1).unwrap();
        assert!(tail[..] == data[bad as usize + 1..]);
        // The server's error fails that read, not the connection.
        let mut b = [0u8; 10];
        let e = c.read_exact_at(&mut b, bad - 5).unwrap_err();
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<ServerError>()).expect("a server error");
        assert_eq!(inner.errno, 5);
        c.read_exact_at(&mut b, bad - 10).unwrap();
        assert!(b[..] == data[bad as usize - 10..bad as usize]);
        let e = c.read_exact_at(&mut b, size as u64 - 9).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(c.block_status("base:allocation", 0, 512).is_err());
    }

    let e = NbdClient::connect_unix_export(&sock, "mem", &["base:allocation"]).err().unwrap();
    assert!(format!("{e:#}").contains("refused structured replies"), "{e:#}");
    let e = NbdClient::connect_unix_export(&sock, "other", &[]).err().unwrap();
    assert!(format!("{e:#}").contains("no export named \"other\""), "{e:#}");
}

/// A read-only export that reports its zero ranges: every odd MiB reads as zeros.
struct Sparse {
    data: Vec<u8>,
    bad: u64,
}

impl Sparse {
    fn new(size: usize, bad: u64) -> Sparse {
        let mut data = Rng::new(12).bytes(size);
        for (i, mib) in data.chunks_mut(1 << 20).enumerate() {
            if i % 2 == 1 {
                mib.fill(0);
            }
        }
        Sparse { data, bad }
    }
}

impl Export for Sparse {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn description(&self) -> &str {
        "sparse"
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if (offset..offset + buf.len() as u64).contains(&self.bad) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> std::io::Result<()> {
        panic!("a read-only export is never written")
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> std::io::Result<()> {
        panic!("a read-only export is never written")
    }
    fn trim(&self, _: u64, _: u64) -> std::io::Result<()> {
        panic!("a read-only export is never trimmed")
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        true
    }
    fn reports_zeros(&self) -> bool {
        true
    }
    fn zero_extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let upto = (((pos >> 20) + 1) << 20).min(offset + len);
            runs.push((upto - pos, (pos >> 20) % 2 == 1));
            pos = upto;
        }
        Ok(runs)
    }
}

#[test]
fn an_export_that_reports_zeros_gets_structured_replies_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let size = 6 << 20;
    let bad = (4 << 20) + 100;
    let export = Arc::new(Sparse::new(size, bad));
    let server = NbdServer::new(export.clone(), "sparse".into());
    let sock = dir.path().join("rime.sock");
    server.listen(&Address::Unix(sock.clone())).unwrap();

    let c = NbdClient::connect_unix_export(&sock, "sparse", &["base:allocation"]).unwrap();
    assert!(c.structured_replies() && c.has_context("base:allocation"));
    let extents = c.block_status("base:allocation", 512, (3 << 20) - 512).unwrap();
    let want = [(512, (1 << 20) - 512, 0), (1 << 20, 1 << 20, 3), (2 << 20, 1 << 20, 0)];
    let got: Vec<(u64, u64, u32)> = extents.iter().map(|e| (e.offset, e.len, e.flags)).collect();
    assert_eq!(got, want);
    // Reads come as structured replies; a failed read is an error for that read only.
    let mut buf = vec![0u8; 4 << 20];
    c.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..] == export.data[..4 << 20]);
    let mut b = [0u8; 10];
    let e = c.read_exact_at(&mut b, bad - 5).unwrap_err();
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<ServerError>()).expect("a server error");
    assert_eq!(inner.errno, 5);
    c.read_exact_at(&mut b, bad + 1).unwrap();
    assert!(b[..] == export.data[bad as usize + 1..bad as usize + 11]);
    // A second connection, without a metadata context, reads too.
    let plain = NbdClient::connect_unix_export(&sock, "sparse", &[]).unwrap();
    plain.read_exact_at(&mut b, 7).unwrap();
    assert!(b[..] == export.data[7..17]);
}
