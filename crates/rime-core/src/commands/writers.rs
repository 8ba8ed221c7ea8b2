//! `rime writers [VOLUME...]`: the writers whose data is on the volumes (the writer metadata a
//! backup uses): the filesystems mounted from them, which a backup freezes (`fsfreeze`), and the
//! running PostgreSQL clusters whose files are on those filesystems, which it checkpoints first.
//! Without volumes: every volume `rime serve` protects on this machine.
//!
//! A backup asks the same two questions ([`freeze_targets`], [`postgres_writers`]), so what
//! `rime writers` lists is what a backup holds.

use crate::commands::backup::Mode;
use crate::error::CommandError;
use crate::providers::{self, Provider};
use anyhow::Result;
use rime_consistency::postgres::{self, Cluster, Coverage, PostgresWriter};
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

/// The volume whose frozen filesystem holds `path`.
fn volume_holding<'a>(path: &Path, frozen: &'a [FsFreezeWriter]) -> Option<&'a str> {
    let mount_point = rime_os::mounts::mount_point_of(path)?;
    frozen.iter().find(|w| w.mount_point == mount_point).map(|w| w.volume.as_str())
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
            Some(Provider::Offline) | None => None,
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

pub fn writers(volumes: &[PathBuf]) -> Result<WriterReport> {
    let asked: Vec<PathBuf> = if volumes.is_empty() {
        rime_serve::registry::registrations().into_iter().map(|r| r.volume).collect()
    } else {
        volumes.to_vec()
    };
    let frozen = freeze_targets(&providers::plan(&asked, Mode::Auto, None));
    let mut entries: Vec<WriterEntry> = postgres::running_clusters()
        .iter()
        .filter(|c| c.coverage(|p| volume_holding(p, &frozen).is_some()) != Coverage::Outside)
        .map(|c| postgres_entry(c, &frozen))
        .collect();
    entries.extend(frozen.iter().map(fsfreeze_entry));
    Ok(WriterReport { volumes: asked.iter().map(|v| v.display().to_string()).collect(), writers: entries })
}
