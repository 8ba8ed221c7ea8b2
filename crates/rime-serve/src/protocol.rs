//! The control protocol between `rime serve` and a backup, shared by both ends.
//!
//! One JSON object per line in each direction over a unix socket; a [`Reply::Read`] line is
//! followed by exactly `len` raw bytes of the snapshot view. Requests are tagged by `"op"`,
//! replies by `"reply"`; bitmaps travel as [`WireBitmap`] (block count and hex) and are checked
//! against the volume's block count on receipt. The first request of a connection should be
//! [`Request::Status`], whose reply carries [`PROTOCOL_VERSION`]: a client refuses a server of
//! another version instead of misreading it.
//!
//! Ownership: a snapshot belongs to the connection that began it. When that connection closes
//! (the backup ended or died) the snapshot is aborted at once; when the backup asks nothing for
//! the backup timeout (it hangs), it is aborted too. The backup pings every 2 s.

use rime_snapshot::cbt::CbtOrigin;
use rime_snapshot::engine::{GateRelease, SnapshotInfo, Status};
use rime_snapshot::{Bitmap, SnapshotError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Bumped on any change a peer of the other version would misread.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest single `read`; larger reads are split by the client.
pub const MAX_READ: u64 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Who serves what; replies [`Reply::Status`].
    Status,
    /// Take a snapshot (limits in milliseconds; the server's defaults where absent); replies
    /// [`Reply::Snapshot`]. With `hold_ms`, the write gate stays closed after the snapshot
    /// instant until [`Request::Release`] (for one coherent instant across several servers), at
    /// most that long: past it the gate opens and the snapshot is aborted.
    Begin {
        wip_ms: Option<u64>,
        limit_ms: Option<u64>,
        drain_ms: Option<u64>,
        #[serde(default)]
        hold_ms: Option<u64>,
    },
    /// Opens the write gate a held snapshot keeps closed; replies [`Reply::Released`].
    Release {
        id: u64,
    },
    /// Read the snapshot view; with `archive`, what is read leaves the protection area.
    /// Replies [`Reply::Read`] and the bytes.
    Read {
        id: u64,
        offset: u64,
        len: u64,
        archive: bool,
    },
    /// The protection area becomes `area`.
    Protect {
        id: u64,
        area: WireBitmap,
    },
    /// Archived without being read here: leaves the protection area.
    Archived {
        id: u64,
        offset: u64,
        len: u64,
    },
    /// Blocks with saved copies (at most `max`); replies [`Reply::Buffered`].
    Buffered {
        id: u64,
        max: u64,
    },
    /// Blocks changed since the changed-block map's base; replies [`Reply::Changes`].
    Changes {
        id: u64,
    },
    /// Ends the snapshot. With `backup` (the backup succeeded) the changed-block map becomes
    /// relative to it (`used`: blocks it imaged); `partial` blocks are re-read next time.
    End {
        id: u64,
        backup: Option<String>,
        used: Option<WireBitmap>,
        partial: Option<WireBitmap>,
    },
    Abort {
        id: u64,
    },
    /// The backup is alive.
    Ping {
        id: u64,
    },
    /// The changed-block map now; replies [`Reply::Cbt`].
    Cbt,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status { protocol: u32, status: Status, volume: PathBuf, fuse_file: Option<PathBuf>, pid: u32 },
    Snapshot { snapshot: SnapshotInfo },
    Read { len: u64, store_bytes: u64, store_cap: u64 },
    Released { release: GateRelease },
    Buffered { blocks: Vec<u64> },
    Changes { base: Option<String>, changed: WireBitmap, used: Option<WireBitmap> },
    Cbt { base: Option<String>, changed_blocks: u64, origin: CbtOrigin, changed: WireBitmap },
    Done,
    Error { kind: ErrorKind, message: String },
}

/// What went wrong, for a caller that must tell failures apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not a request of this protocol version, or a malformed one.
    BadRequest,
    /// Another snapshot of the volume is in progress.
    Busy,
    /// No write-inactivity period within the limit, or writes did not drain.
    NotQuiet,
    /// The snapshot was aborted (store full, backup timeout, server shutdown).
    Aborted,
    /// No such active snapshot.
    NotActive,
    /// I/O on the volume, the difference store or the changed-block map failed.
    Io,
}

impl ErrorKind {
    pub fn of(e: &SnapshotError) -> ErrorKind {
        match e {
            SnapshotError::Busy => ErrorKind::Busy,
            SnapshotError::NoQuietPeriod { .. } | SnapshotError::DrainTimeout(_) => ErrorKind::NotQuiet,
            SnapshotError::Aborted(_) => ErrorKind::Aborted,
            SnapshotError::NotActive(_) | SnapshotError::NotHeld(_) => ErrorKind::NotActive,
            SnapshotError::WrongSize { .. } | SnapshotError::OutOfRange { .. } => ErrorKind::BadRequest,
            SnapshotError::Io(_) | SnapshotError::ChangedBlockMap(_) => ErrorKind::Io,
        }
    }
}

/// A bitmap on the wire: its length in blocks and its bytes in hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBitmap {
    pub blocks: u64,
    pub hex: String,
}

impl From<&Bitmap> for WireBitmap {
    fn from(b: &Bitmap) -> WireBitmap {
        WireBitmap { blocks: b.len(), hex: b.to_hex() }
    }
}

impl WireBitmap {
    /// The bitmap, if it is well formed and covers exactly `blocks` blocks.
    pub fn to_bitmap(&self, blocks: u64) -> Result<Bitmap, String> {
        if self.blocks != blocks {
            return Err(format!("a bitmap of {} blocks for a volume of {blocks}", self.blocks));
        }
        Bitmap::from_hex(blocks, &self.hex).ok_or_else(|| format!("not a bitmap of {blocks} blocks"))
    }
}

/// One message as its line (newline included).
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("protocol messages always serialize");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_form() {
        let r = Request::Read { id: 3, offset: 4096, len: 65536, archive: true };
        let line = String::from_utf8(encode(&r)).unwrap();
        assert_eq!(line, "{\"op\":\"read\",\"id\":3,\"offset\":4096,\"len\":65536,\"archive\":true}\n");
        assert_eq!(serde_json::from_str::<Request>(line.trim()).unwrap(), r);
        let begin: Request = serde_json::from_str(r#"{"op":"begin","wip_ms":50}"#).unwrap();
        assert_eq!(begin, Request::Begin { wip_ms: Some(50), limit_ms: None, drain_ms: None, hold_ms: None });
    }

    #[test]
    fn unknown_operations_and_fields_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","id":1,"force":true}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"read","id":1}"#).is_err(), "missing fields");
    }

    #[test]
    fn bitmaps_of_another_volume_are_refused() {
        let b = Bitmap::new(100);
        b.set(7);
        let wire = WireBitmap::from(&b);
        assert!(wire.to_bitmap(100).unwrap().get(7));
        assert!(wire.to_bitmap(101).is_err());
        let lying = WireBitmap { blocks: 100, hex: "00".into() };
        assert!(lying.to_bitmap(100).is_err(), "hex too short for its block count");
    }

    #[test]
    fn error_replies_carry_their_kind() {
        let reply = Reply::Error { kind: ErrorKind::of(&SnapshotError::Busy), message: "busy".into() };
        let line = String::from_utf8(encode(&reply)).unwrap();
        assert_eq!(line, "{\"reply\":\"error\",\"kind\":\"busy\",\"message\":\"busy\"}\n");
    }
}
