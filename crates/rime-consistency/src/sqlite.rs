//! The SQLite writer: a database file (WAL or rollback journal) held consistent for the
//! snapshot by checkpointing its WAL and then holding its write lock (`BEGIN IMMEDIATE`) on one
//! connection until the thaw; readers go on, writers wait (their busy timeout) or fail busy.
//!
//! Run through the `sqlite3` tool (`-bail`, so a lock it cannot get is an error, not a silent
//! go-ahead), with its connection held open over a pipe. The lock is released by `ROLLBACK`
//! at the thaw, or when the process ends (also if Rime dies).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long getting the write lock may take (other writers finish their transactions).
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
const HOLDING: &str = "rime-holding-the-write-lock";

pub struct SqliteWriter {
    pub db: PathBuf,
    held: Option<(Child, ChildStdin)>,
}

impl SqliteWriter {
    pub fn new(db: &Path) -> SqliteWriter {
        SqliteWriter { db: db.to_path_buf(), held: None }
    }

    pub fn name(&self) -> String {
        format!("sqlite {}", self.db.display())
    }

    /// Checkpoints the WAL, then takes the write lock and holds it.
    pub fn freeze(&mut self) -> Result<(), String> {
        let mut child = Command::new("sqlite3")
            .args(["-batch", "-bail"])
            .arg(&self.db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: cannot run sqlite3: {e}", self.name()))?;
        let mut stdin = child.stdin.take().expect("piped");
        let script = format!(
            ".timeout {}\nPRAGMA wal_checkpoint(TRUNCATE);\nBEGIN IMMEDIATE;\nSELECT '{HOLDING}';\n",
            LOCK_TIMEOUT.as_millis()
        );
        stdin.write_all(script.as_bytes()).map_err(|e| format!("{}: {e}", self.name()))?;
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == HOLDING {
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(LOCK_TIMEOUT + Duration::from_secs(5)) {
            Ok(()) => {
                self.held = Some((child, stdin));
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let _ = child.wait();
                Err(format!("{}: could not hold its write lock: {}", self.name(), err.trim()))
            }
        }
    }

    /// Releases the write lock.
    pub fn thaw(&mut self) -> Result<(), String> {
        let Some((mut child, mut stdin)) = self.held.take() else { return Ok(()) };
        let _ = stdin.write_all(b"ROLLBACK;\n.quit\n");
        drop(stdin);
        match child.wait() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("{}: sqlite3 ended with {s} at the thaw (the lock is released)", self.name())),
            Err(e) => Err(format!("{}: {e}", self.name())),
        }
    }
}

impl Drop for SqliteWriter {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            tracing::warn!("{e}");
        }
    }
}
