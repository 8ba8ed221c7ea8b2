//! `rime writers [VOLUME...]`: the writers whose data is on the volumes (the writer metadata
//! a backup would use): for now the filesystems mounted from volumes that `rime serve` protects,
//! which a backup freezes (`fsfreeze`) for its snapshot. Without volumes: every protected volume
//! on this machine.

use anyhow::Result;
use rime_consistency::writers::{devices_of, fsfreeze_writers, FsFreezeWriter};
use serde::Serialize;
use std::path::PathBuf;

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
    /// The volume holding its data.
    pub volume: String,
    pub device: String,
    pub mount_point: String,
    pub filesystem: String,
    /// What a backup does with it.
    pub freeze: &'static str,
    pub thaw: &'static str,
}

fn entry(w: &FsFreezeWriter) -> WriterEntry {
    WriterEntry {
        name: w.name(),
        kind: "fsfreeze",
        volume: w.volume.clone(),
        device: w.device.display().to_string(),
        mount_point: w.mount_point.display().to_string(),
        filesystem: w.filesystem.clone(),
        freeze: "FIFREEZE (fsfreeze --freeze) after the before-snapshot hooks",
        thaw: "FITHAW (fsfreeze --unfreeze) before the after-snapshot hooks, always",
    }
}

/// The filesystems mounted from the protected volumes among `volumes` (through loop devices on
/// their `rime serve` FUSE files): what a backup's freeze must hold still.
pub fn freeze_targets(volumes: &[PathBuf]) -> Vec<FsFreezeWriter> {
    let mut devices = Vec::new();
    for v in volumes {
        if let Some(fuse) = rime_serve::find_server(v).and_then(|r| r.fuse_file) {
            devices.extend(devices_of(&fuse).into_iter().map(|d| (v.display().to_string(), d)));
        }
    }
    fsfreeze_writers(&devices)
}

pub fn writers(volumes: &[PathBuf]) -> Result<WriterReport> {
    let asked: Vec<PathBuf> = if volumes.is_empty() {
        rime_serve::registry::registrations().into_iter().map(|r| r.volume).collect()
    } else {
        volumes.to_vec()
    };
    let found = freeze_targets(&asked);
    Ok(WriterReport {
        volumes: asked.iter().map(|v| v.display().to_string()).collect(),
        writers: found.iter().map(entry).collect(),
    })
}
