//! `rime writers [VOLUME...] [--job FILE]`: the writers whose data is on the volumes (the writer
//! metadata a backup uses): the filesystems mounted from them, which a backup freezes
//! (`fsfreeze`); the running PostgreSQL clusters whose files are on those filesystems, which it
//! checkpoints first; and a job's SQLite databases and custom writers, with the volume holding
//! each of their paths. Without volumes: the job's, or every volume `rime serve` protects.
//!
//! A backup chooses its writers with the same code ([`choose`]), so what `rime writers` lists is
//! what a backup holds. The rule for every writer that declares where its data is: all of it on
//! the backup's volumes, held; none of it, not this backup's writer; part of it, the backup is
//! refused (exit code 9), since the snapshot would hold half an application.

use crate::commands::backup::Mode;
use crate::error::CommandError;
use crate::providers::{self, Provider};
use anyhow::Result;
use rime_consistency::job::{CustomWriter, Job};
use rime_consistency::postgres::{self, Cluster, ClusterPath, Coverage, PostgresWriter};
use rime_consistency::sqlite::SqliteWriter;
use rime_consistency::writers::{devices_of, fsfreeze_writers, FsFreezeWriter};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct WriterReport {
    /// The volumes asked about (or every protected volume).
    pub volumes: Vec<String>,
    pub writers: Vec<WriterEntry>,
}

#[derive(Debug, Serialize)]
pub struct WriterEntry {
    pub name: String,
    pub kind: &'static str,
    /// The volumes holding its data.
    pub volumes: Vec<String>,
    /// fsfreeze: the block device, mount point and filesystem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// PostgreSQL: its data directory, WAL directory and tablespaces, each with the volume it
    /// is on (None: not on the backup's volumes, so a backup refuses the cluster).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<WriterPath>,
    /// What a backup does with it.
    pub freeze: String,
    pub thaw: &'static str,
}

#[derive(Debug, Serialize)]
pub struct WriterPath {
    pub role: String,
    pub path: String,
    pub volume: Option<String>,
}

fn fsfreeze_entry(w: &FsFreezeWriter) -> WriterEntry {
    WriterEntry {
        name: w.name(),
        kind: "fsfreeze",
        volumes: vec![w.volume.clone()],
        device: Some(w.device.display().to_string()),
        mount_point: Some(w.mount_point.display().to_string()),
        filesystem: Some(w.filesystem.clone()),
        paths: Vec::new(),
        freeze: "FIFREEZE (fsfreeze --freeze) after the before-snapshot hooks and the applications".into(),
        thaw: "FITHAW (fsfreeze --unfreeze) before the after-snapshot hooks, always",
    }
}

fn postgres_entry(c: &Cluster, frozen: &[FsFreezeWriter]) -> WriterEntry {
    let paths: Vec<WriterPath> = c
        .paths
        .iter()
        .map(|p| WriterPath {
            role: p.role.clone(),
            path: p.path.display().to_string(),
            volume: volume_holding(&p.path, frozen).map(str::to_string),
        })
        .collect();
    let mut volumes: Vec<String> = paths.iter().filter_map(|p| p.volume.clone()).collect();
    volumes.dedup();
    let freeze = match c.coverage(|p| volume_holding(p, frozen).is_some()) {
        Coverage::Partial { outside } => format!(
            "none: a backup refuses it, its {} not on these volumes",
            outside.iter().map(|p| p.role.as_str()).collect::<Vec<_>>().join(", ")
        ),
        _ => "CHECKPOINT (as the data directory's owner, over its socket), then fsfreeze of its filesystems".into(),
    };
    WriterEntry {
        name: c.name(),
        kind: "postgresql",
        volumes,
        device: None,
        mount_point: None,
        filesystem: None,
        paths,
        freeze,
        thaw: "with its filesystems (FITHAW)",
    }
}

/// The volume whose mounted filesystem (one of `mounted`) holds `path`.
fn volume_holding<'a>(path: &Path, mounted: &'a [FsFreezeWriter]) -> Option<&'a str> {
    let mount_point = rime_os::mounts::mount_point_of(path)?;
    mounted.iter().find(|w| w.mount_point == mount_point).map(|w| w.volume.as_str())
}

/// The backup's volume that holds a writer's declared `path`: a filesystem mounted from one of
/// them, or one of the volumes itself (a writer may declare a raw volume or image file).
fn volume_of_path(path: &Path, mounted: &[FsFreezeWriter], volumes: &[PathBuf]) -> Option<String> {
    let canonical = path.canonicalize().ok();
    let named = volumes.iter().find(|v| v.as_path() == path || v.canonicalize().ok() == canonical);
    named.map(|v| v.display().to_string()).or_else(|| volume_holding(path, mounted).map(str::to_string))
}

/// The coverage rule for a writer's declared paths (see the module comment).
fn coverage_of(paths: &[PathBuf], mounted: &[FsFreezeWriter], volumes: &[PathBuf]) -> Coverage {
    let outside: Vec<ClusterPath> = paths
        .iter()
        .filter(|p| volume_of_path(p, mounted, volumes).is_none())
        .map(|p| ClusterPath { role: "path".into(), path: p.clone() })
        .collect();
    Coverage::of(outside, paths.len())
}

/// The writers one backup holds, in the order they freeze.
pub struct Chosen {
    pub custom: Vec<CustomWriter>,
    pub sqlite: Vec<SqliteWriter>,
    pub postgres: Vec<PostgresWriter>,
    /// The filesystems to freeze (empty with `--freeze never`).
    pub filesystems: Vec<FsFreezeWriter>,
    /// Declared writers left out, and why (the backup reports them as warnings).
    pub skipped: Vec<String>,
}

/// Chooses the writers of a backup of `volumes` (planned as `plan`): the declared ones whose data
/// is on its volumes, the PostgreSQL clusters found there and, with `freeze`, the filesystems.
pub fn choose(
    volumes: &[PathBuf],
    plan: &[providers::Choice],
    freeze: bool,
    sqlite: &[PathBuf],
    custom: &[CustomWriter],
) -> Result<Chosen, CommandError> {
    let mounted = freeze_targets(plan);
    let mut chosen = Chosen {
        custom: Vec::new(),
        sqlite: Vec::new(),
        postgres: Vec::new(),
        filesystems: Vec::new(),
        skipped: Vec::new(),
    };
    for w in custom {
        match coverage_of(&w.paths, &mounted, volumes) {
            _ if w.paths.is_empty() => chosen.custom.push(w.clone()),
            Coverage::Whole => chosen.custom.push(w.clone()),
            Coverage::Outside => chosen
                .skipped
                .push(format!("writer {}: its paths are not on the volumes of this backup; not held", w.name)),
            Coverage::Partial { outside } => {
                let elsewhere: Vec<String> = outside.iter().map(|p| p.path.display().to_string()).collect();
                return Err(CommandError::WriterSplit(format!(
                    "writer {} is only partly on the volumes of this backup: {} not; back up all of its volumes together",
                    w.name,
                    elsewhere.join(", ")
                )));
            }
        }
    }
    for db in sqlite {
        match volume_of_path(db, &mounted, volumes) {
            Some(_) => chosen.sqlite.push(SqliteWriter::new(db)),
            None => {
                chosen.skipped.push(format!("sqlite {}: not on the volumes of this backup; not held", db.display()))
            }
        }
    }
    if freeze {
        chosen.postgres = postgres_writers(&mounted)?;
        chosen.filesystems = mounted;
    }
    Ok(chosen)
}

/// The filesystems mounted from the volumes that a backup takes by snapshot (`plan`): through
/// loop devices on `rime serve`'s FUSE files for protected volumes, on the image files for
/// reflink and btrfs snapshots. What a backup's freeze must hold still. Offline volumes have
/// none (a mounted volume is in use, and refused).
pub fn freeze_targets(plan: &[providers::Choice]) -> Vec<FsFreezeWriter> {
    let mut devices = Vec::new();
    for choice in plan {
        let volume = PathBuf::from(&choice.volume);
        let carrier = match choice.provider {
            Some(Provider::RimeServe) => rime_serve::find_server(&volume).and_then(|r| r.fuse_file),
            Some(Provider::Reflink | Provider::BtrfsSnapshot) => Some(volume),
            Some(Provider::Offline | Provider::LibvirtBackup) | None => None,
        };
        if let Some(file) = carrier {
            devices.extend(devices_of(&file).into_iter().map(|d| (choice.volume.clone(), d)));
        }
    }
    fsfreeze_writers(&devices)
}

/// The running PostgreSQL clusters whose files are on `frozen`'s filesystems, to checkpoint
/// before the freeze. A cluster only partly there fails the backup (exit code 9): its snapshot
/// would be a data directory without its WAL or tablespaces.
pub fn postgres_writers(frozen: &[FsFreezeWriter]) -> Result<Vec<PostgresWriter>, CommandError> {
    let mut out = Vec::new();
    for cluster in postgres::running_clusters() {
        match cluster.coverage(|p| volume_holding(p, frozen).is_some()) {
            Coverage::Outside => {}
            Coverage::Whole => out.push(PostgresWriter::new(cluster)),
            Coverage::Partial { outside } => {
                let elsewhere: Vec<String> =
                    outside.iter().map(|p| format!("its {} {}", p.role, p.path.display())).collect();
                return Err(CommandError::WriterSplit(format!(
                    "{} is only partly on the volumes of this backup: {} {} not; back up all of its volumes together",
                    cluster.name(),
                    elsewhere.join(", "),
                    if outside.len() == 1 { "is" } else { "are" }
                )));
            }
        }
    }
    Ok(out)
}

/// A job's declared writer (SQLite or custom), with the volume of each of its paths.
fn declared_entry(
    name: String,
    kind: &'static str,
    paths: &[PathBuf],
    mounted: &[FsFreezeWriter],
    volumes: &[PathBuf],
    freeze: String,
    thaw: &'static str,
) -> WriterEntry {
    let paths: Vec<WriterPath> = paths
        .iter()
        .map(|p| WriterPath {
            role: "path".into(),
            path: p.display().to_string(),
            volume: volume_of_path(p, mounted, volumes),
        })
        .collect();
    let mut on: Vec<String> = paths.iter().filter_map(|p| p.volume.clone()).collect();
    if paths.is_empty() {
        on = volumes.iter().map(|v| v.display().to_string()).collect();
    }
    on.dedup();
    let freeze = match (paths.is_empty(), paths.iter().filter(|p| p.volume.is_none()).count()) {
        (false, n) if n == paths.len() => "none: not on these volumes".to_string(),
        (false, n) if n > 0 => "none: a backup refuses it, only part of it is on these volumes".to_string(),
        _ => freeze,
    };
    WriterEntry { name, kind, volumes: on, device: None, mount_point: None, filesystem: None, paths, freeze, thaw }
}

/// The report of `rime writers`: `volumes` (default: `job`'s, else every protected volume) and
/// the writers of `job`, if given.
pub fn writers(volumes: &[PathBuf], job: Option<&Job>) -> Result<WriterReport> {
    let asked: Vec<PathBuf> = match (volumes.is_empty(), job) {
        (false, _) => volumes.to_vec(),
        (true, Some(j)) => j.volumes.clone(),
        (true, None) => rime_serve::registry::registrations().into_iter().map(|r| r.volume).collect(),
    };
    let mounted = freeze_targets(&providers::plan(&asked, Mode::Auto, None));
    let mut entries = Vec::new();
    if let Some(job) = job {
        for w in &job.writers {
            let freeze = format!("`{}` after the before-snapshot hooks", w.freeze.describe());
            entries.push(declared_entry(
                w.name.clone(),
                "custom",
                &w.paths,
                &mounted,
                &asked,
                freeze,
                "its thaw command, always",
            ));
        }
        for db in &job.sqlite {
            let name = SqliteWriter::new(db).name();
            let freeze = "WAL checkpoint, then its write lock (BEGIN IMMEDIATE) held".to_string();
            entries.push(declared_entry(
                name,
                "sqlite",
                std::slice::from_ref(db),
                &mounted,
                &asked,
                freeze,
                "ROLLBACK, always",
            ));
        }
    }
    entries.extend(
        postgres::running_clusters()
            .iter()
            .filter(|c| c.coverage(|p| volume_holding(p, &mounted).is_some()) != Coverage::Outside)
            .map(|c| postgres_entry(c, &mounted)),
    );
    entries.extend(mounted.iter().map(fsfreeze_entry));
    Ok(WriterReport { volumes: asked.iter().map(|v| v.display().to_string()).collect(), writers: entries })
}
