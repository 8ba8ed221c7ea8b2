//! Why a snapshot operation failed, in kinds a caller can tell apart (the control server maps
//! each to a protocol error kind, and `rime backup` to an exit code).

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("a snapshot of this volume is already in progress")]
    Busy,
    #[error(
        "no write-inactivity period of {} ms occurred within the snapshot time limit of {} s: the volume is written to \
         without pause; retry when it is quieter, or lower the write-inactivity period",
        .wip.as_millis(), .limit.as_secs_f64()
    )]
    NoQuietPeriod { wip: Duration, limit: Duration },
    #[error("in-flight writes did not drain within the drain limit of {} s; the snapshot was not taken", .0.as_secs_f64())]
    DrainTimeout(Duration),
    #[error("the snapshot was aborted: {0}")]
    Aborted(String),
    #[error("snapshot {0} is not active")]
    NotActive(u64),
    #[error("snapshot {0} holds no write gate")]
    NotHeld(u64),
    #[error("{what} of {got} blocks for a volume of {want}")]
    WrongSize { what: &'static str, got: u64, want: u64 },
    #[error("range {offset}+{len} is outside the volume")]
    OutOfRange { offset: u64, len: u64 },
    #[error("I/O on the volume or the difference store: {0}")]
    Io(#[from] std::io::Error),
    #[error("changed-block map: {0:#}")]
    ChangedBlockMap(anyhow::Error),
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
