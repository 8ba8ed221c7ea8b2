//! The SQLite writer: a database file (WAL or rollback journal) held consistent for the
//! snapshot by checkpointing its WAL and then holding its write lock (`BEGIN IMMEDIATE`) on one
//! connection until the thaw; readers go on, writers wait (their busy timeout) or fail busy.
//! If a commit slips in between the checkpoint and the lock, the lock is let go and the pair
//! retried, so the snapshot normally holds an empty WAL.
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
/// Checkpoint-then-lock tries before the lock is kept over a non-empty WAL.
const CHECKPOINT_ATTEMPTS: u32 = 50;

/// `<db>-wal`, where SQLite keeps a WAL-mode database's log.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push("-wal");
    PathBuf::from(name)
}

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
        let timeout_ms = LOCK_TIMEOUT.as_millis();
        let fail = |child: &mut Child, what: &str| {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            let _ = child.wait();
            format!("{}: {what}: {}", self.name(), err.trim())
        };
        if let Err(e) = stdin.write_all(format!(".timeout {timeout_ms}\n").as_bytes()) {
            return Err(fail(&mut child, &e.to_string()));
        }
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == HOLDING {
                    let _ = tx.send(());
                }
            }
        });
        // Checkpoint, then lock. Another writer may commit between the two (or readers may keep
        // the checkpoint from finishing): then the WAL is not empty under the lock, so let go and
        // try again, a bounded number of times; after that the lock is kept anyway (a database
        // and its WAL are consistent under the lock, only not checkpointed).
        let wal = wal_path(&self.db);
        for attempt in 1..=CHECKPOINT_ATTEMPTS {
            let step = format!("PRAGMA wal_checkpoint(TRUNCATE);\nBEGIN IMMEDIATE;\nSELECT '{HOLDING}';\n");
            if let Err(e) = stdin.write_all(step.as_bytes()) {
                return Err(fail(&mut child, &e.to_string()));
            }
            if rx.recv_timeout(LOCK_TIMEOUT + Duration::from_secs(5)).is_err() {
                return Err(fail(&mut child, "could not hold its write lock"));
            }
            let empty = std::fs::metadata(&wal).map_or(true, |m| m.len() == 0);
            if empty || attempt == CHECKPOINT_ATTEMPTS {
                if !empty {
                    tracing::info!("{}: its WAL is held un-checkpointed (writers kept committing)", self.name());
                }
                break;
            }
            if let Err(e) = stdin.write_all(b"ROLLBACK;\n") {
                return Err(fail(&mut child, &e.to_string()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.held = Some((child, stdin));
        Ok(())
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
