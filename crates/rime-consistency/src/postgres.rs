//! The PostgreSQL writer: every running cluster whose files are on a backup's volumes is held
//! consistent for the snapshot by a `CHECKPOINT`, then the freeze (FIFREEZE) of the filesystems
//! that hold its data directory, its WAL directory and its tablespaces, all captured at the
//! backup's one instant. The restored cluster starts by replaying its own WAL from that
//! checkpoint (crash recovery), which PostgreSQL guarantees for a simultaneous snapshot of all
//! its files; the checkpoint only keeps that replay short.
//!
//! Why not `pg_backup_start`/`pg_backup_stop`: that pair makes a backup that is consistent only
//! together with the WAL written until `pg_backup_stop` returns, whose end-of-backup record is
//! written *after* the snapshot. A restore would need that WAL from an archive (and the backup
//! label put back); without `archive_mode`, which Rime cannot assume, the restored cluster
//! would refuse to start ("WAL ends before end of online backup"). A snapshot of every file at
//! one instant needs neither.
//!
//! Found, not declared: a running postmaster is a `postgres` process whose working directory
//! (PostgreSQL changes into its data directory) holds a `postmaster.pid` naming it; that file
//! also gives its port and socket directory. Rime connects as the data directory's owner (the
//! cluster's superuser by `initdb`'s default) through that socket, with a clean environment,
//! so a stock `pg_hba.conf` (`local all postgres peer`) lets it in without a password.
//!
//! Invariants: a cluster is held only when every one of its paths is on a filesystem the backup
//! freezes; one only partly on the backup's volumes is refused ([`Coverage::Partial`]), since
//! its snapshot would be a data directory without its WAL or tablespaces.

use crate::hooks::{run_command, HookError, Stage};
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long the `CHECKPOINT` may take (it writes every dirty buffer).
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(120);
/// The first field of the line Rime's query prints, to find it among psql's output.
const TAG: &str = "rime-checkpoint";
const QUERY: &str = "SELECT 'rime-checkpoint', current_setting('server_version'), checkpoint_lsn, redo_lsn, \
                     timeline_id, pg_is_in_recovery() FROM pg_control_checkpoint()";

/// What `postmaster.pid` says (PostgreSQL 10 and later write these lines in this order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidFile {
    pub pid: u32,
    pub data_directory: PathBuf,
    pub port: u16,
    /// The first of `unix_socket_directories` (None: no Unix socket).
    pub socket_directory: Option<PathBuf>,
    /// The first of `listen_addresses`.
    pub listen_address: Option<String>,
}

impl PidFile {
    pub fn parse(text: &str) -> Option<PidFile> {
        let lines: Vec<&str> = text.lines().collect();
        let nonempty = |i: usize| lines.get(i).map(|l| l.trim()).filter(|l| !l.is_empty());
        Some(PidFile {
            pid: nonempty(0)?.parse().ok()?,
            data_directory: PathBuf::from(nonempty(1)?),
            port: nonempty(3)?.parse().ok()?,
            socket_directory: nonempty(4).map(PathBuf::from),
            listen_address: nonempty(5).and_then(|l| l.split(',').next()).map(|l| l.trim().to_string()),
        })
    }
}

/// One of a cluster's places on disk.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClusterPath {
    /// "data directory", "WAL directory", "tablespace 16384".
    pub role: String,
    pub path: PathBuf,
}

/// A running PostgreSQL cluster.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Cluster {
    pub data_directory: PathBuf,
    pub postmaster_pid: u32,
    pub port: u16,
    pub socket_directory: Option<PathBuf>,
    pub listen_address: Option<String>,
    #[serde(skip)]
    owner: (u32, u32),
    /// The data directory, the WAL directory and every tablespace, canonical.
    pub paths: Vec<ClusterPath>,
}

/// How much of a cluster is on the filesystems a backup freezes.
#[derive(Debug, PartialEq, Eq)]
pub enum Coverage {
    /// None of it: not this backup's writer.
    Outside,
    /// All of it.
    Whole,
    /// Some of it; these paths are elsewhere.
    Partial { outside: Vec<ClusterPath> },
}

impl Coverage {
    /// The coverage of a writer with `total` paths, `outside` of them not held.
    pub fn of(outside: Vec<ClusterPath>, total: usize) -> Coverage {
        match outside.len() {
            0 => Coverage::Whole,
            n if n == total => Coverage::Outside,
            _ => Coverage::Partial { outside },
        }
    }
}

impl Cluster {
    /// The cluster whose postmaster `pid` runs in `data_directory`, if its `postmaster.pid`
    /// says so.
    pub fn at(data_directory: &Path, pid: u32) -> Option<Cluster> {
        let file = PidFile::parse(&std::fs::read_to_string(data_directory.join("postmaster.pid")).ok()?)?;
        if file.pid != pid {
            return None;
        }
        let data_directory = data_directory.canonicalize().ok()?;
        let meta = std::fs::metadata(&data_directory).ok()?;
        let mut paths = vec![ClusterPath { role: "data directory".into(), path: data_directory.clone() }];
        if let Ok(wal) = data_directory.join("pg_wal").canonicalize() {
            paths.push(ClusterPath { role: "WAL directory".into(), path: wal });
        }
        let mut tablespaces: Vec<ClusterPath> = std::fs::read_dir(data_directory.join("pg_tblspc"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let path = e.path().canonicalize().ok()?;
                Some(ClusterPath { role: format!("tablespace {}", e.file_name().to_string_lossy()), path })
            })
            .collect();
        tablespaces.sort_by(|a, b| a.role.cmp(&b.role));
        paths.extend(tablespaces);
        Some(Cluster {
            data_directory,
            postmaster_pid: pid,
            port: file.port,
            socket_directory: file.socket_directory,
            listen_address: file.listen_address,
            owner: (meta.uid(), meta.gid()),
            paths,
        })
    }

    pub fn name(&self) -> String {
        format!("postgresql {} (port {})", self.data_directory.display(), self.port)
    }

    /// Which of its paths `held` (on a filesystem the backup freezes) covers.
    pub fn coverage(&self, held: impl Fn(&Path) -> bool) -> Coverage {
        let outside: Vec<ClusterPath> = self.paths.iter().filter(|p| !held(&p.path)).cloned().collect();
        Coverage::of(outside, self.paths.len())
    }

    /// `psql` connected to the cluster as its data directory's owner, in a clean environment
    /// (no PG* variable of the caller's redirects it), failing on the first error.
    fn psql(&self) -> Command {
        let host = match (&self.socket_directory, self.listen_address.as_deref()) {
            (Some(dir), _) => dir.display().to_string(),
            (None, Some(a)) if !a.is_empty() && a != "*" => a.to_string(),
            (None, _) => "127.0.0.1".to_string(),
        };
        let mut cmd = Command::new("psql");
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
            .env("LC_ALL", "C")
            .env("PGCONNECT_TIMEOUT", "10")
            .current_dir("/")
            .uid(self.owner.0)
            .gid(self.owner.1)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "--field-separator=\t", "-d", "postgres", "-h"])
            .arg(host)
            .arg("-p")
            .arg(self.port.to_string());
        cmd
    }
}

/// Every PostgreSQL cluster running on this machine (that this process can see).
pub fn running_clusters() -> Vec<Cluster> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !matches!(comm.trim(), "postgres" | "postmaster") {
            continue;
        }
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else { continue };
        if let Some(cluster) = Cluster::at(&cwd, pid) {
            out.push(cluster);
        }
    }
    out.sort_by(|a, b| a.data_directory.cmp(&b.data_directory));
    out
}

/// A cluster held for one backup's snapshot.
pub struct PostgresWriter {
    pub cluster: Cluster,
    /// What the checkpoint reported, for the snapshot's metadata.
    pub details: BTreeMap<String, String>,
}

impl PostgresWriter {
    pub fn new(cluster: Cluster) -> PostgresWriter {
        let mut details = BTreeMap::new();
        details.insert("method".into(), "CHECKPOINT, then fsfreeze of its filesystems at the backup's instant".into());
        details
            .insert("restore".into(), "start the restored data directory: it replays its WAL (crash recovery)".into());
        for p in &cluster.paths {
            details.insert(p.role.clone(), p.path.display().to_string());
        }
        details.insert("port".into(), cluster.port.to_string());
        PostgresWriter { cluster, details }
    }

    pub fn name(&self) -> String {
        self.cluster.name()
    }

    /// Writes every dirty buffer out (`CHECKPOINT`) and records the checkpoint; the freeze of
    /// the filesystems that follows holds the cluster still.
    pub fn checkpoint(&mut self) -> Result<(), String> {
        let mut cmd = self.cluster.psql();
        cmd.args(["-c", "CHECKPOINT", "-c", QUERY]);
        let described = format!("psql -c CHECKPOINT ({})", self.name());
        let lines = run_command(cmd, &described, Stage::BeforeSnapshot, CHECKPOINT_TIMEOUT)
            .map_err(|e| format!("{}: {}", self.name(), describe(e)))?;
        let fields: Vec<&str> = lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(TAG).and_then(|rest| rest.strip_prefix('\t')))
            .ok_or_else(|| format!("{}: the checkpoint was not reported: {}", self.name(), lines.join(" | ")))?
            .split('\t')
            .collect();
        for (key, value) in
            ["server_version", "checkpoint_lsn", "redo_lsn", "timeline", "in_recovery"].iter().zip(fields)
        {
            self.details.insert((*key).into(), value.to_string());
        }
        Ok(())
    }
}

fn describe(e: HookError) -> String {
    match e {
        HookError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "psql is not installed (Debian: postgresql-client)".into()
        }
        e => e.to_string().replacen("before-snapshot hook ", "", 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postmaster_pid_lines_are_read_in_order() {
        let text = "4242\n/srv/pg/data\n1764800000\n5433\n/run/postgresql\n127.0.0.1,::1\n  5433001    3\nready   \n";
        let f = PidFile::parse(text).unwrap();
        assert_eq!(f.pid, 4242);
        assert_eq!(f.data_directory, Path::new("/srv/pg/data"));
        assert_eq!(f.port, 5433);
        assert_eq!(f.socket_directory.as_deref(), Some(Path::new("/run/postgresql")));
        assert_eq!(f.listen_address.as_deref(), Some("127.0.0.1"));
        // No Unix socket, no listen address; and a file cut short (being written) is no cluster.
        let f = PidFile::parse("7\n/d\n1\n5432\n\n\n").unwrap();
        assert_eq!((f.socket_directory, f.listen_address), (None, None));
        assert_eq!(PidFile::parse("7\n/d\n"), None);
        assert_eq!(PidFile::parse("x\n/d\n1\n5432\n"), None);
    }

    #[test]
    fn a_cluster_split_across_held_and_other_filesystems_is_partial() {
        let path = |role: &str, p: &str| ClusterPath { role: role.into(), path: p.into() };
        let cluster = Cluster {
            data_directory: "/a/data".into(),
            postmaster_pid: 1,
            port: 5432,
            socket_directory: None,
            listen_address: None,
            owner: (101, 104),
            paths: vec![
                path("data directory", "/a/data"),
                path("WAL directory", "/b/wal"),
                path("tablespace 1", "/a/ts"),
            ],
        };
        assert_eq!(cluster.coverage(|_| true), Coverage::Whole);
        assert_eq!(cluster.coverage(|_| false), Coverage::Outside);
        assert_eq!(
            cluster.coverage(|p| p.starts_with("/a")),
            Coverage::Partial { outside: vec![path("WAL directory", "/b/wal")] }
        );
    }
}
