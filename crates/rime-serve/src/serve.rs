//! `rime serve`: protect a volume. Opens it read-write through the copy-on-write engine,
//! exports it over NBD and/or FUSE, takes snapshot requests on the control socket, and runs in
//! the foreground until SIGINT or SIGTERM, then shuts down cleanly (the changed-block map stays
//! valid across the restart).
//!
//! A running server registers itself in `$RIME_RUN_DIR` (default `/run/rime/serve`) so that
//! `rime backup` finds the server of a volume named by its path or its FUSE file.

use crate::control::ControlServer;
use crate::export::VolumeExport;
use crate::registry::{register, run_dir, Registration};
use anyhow::{Context, Result};
use rime_fuse::FuseExport;
use rime_nbd::{Address, NbdServer};
use rime_os::signals::{BlockedSignals, Signal};
use rime_snapshot::engine::{Engine, EngineConfig, SnapshotLimits};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub volume: PathBuf,
    pub nbd: Vec<String>,
    pub fuse: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub export_name: Option<String>,
    pub engine: EngineConfig,
    pub limits: SnapshotLimits,
    /// A snapshot whose backup asks nothing for this long (it hangs) is aborted.
    pub backup_timeout: std::time::Duration,
}

fn stem(volume: &Path) -> String {
    volume.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "volume".into())
}

/// Serves until SIGINT/SIGTERM. `ready` is called once everything listens.
pub fn serve(opts: ServeOptions, ready: impl FnOnce(&Registration)) -> Result<()> {
    // Before any thread starts, so that every thread inherits the mask and only sigwait sees them.
    let signals = BlockedSignals::block(&[Signal::SIGINT, Signal::SIGTERM])?;
    let engine = Arc::new(Engine::open(&opts.volume, opts.engine.clone())?);
    let export = Arc::new(VolumeExport(engine.clone()));
    let name = opts.export_name.clone().unwrap_or_else(|| stem(&opts.volume));
    let run = run_dir();
    let control = opts.control.clone().unwrap_or_else(|| run.join(format!("{name}.sock")));
    let nbd = NbdServer::new(export.clone(), name.clone());
    let result = (|| -> Result<(Option<FuseExport>, PathBuf)> {
        for a in &opts.nbd {
            nbd.listen(&Address::parse(a))?;
        }
        let fuse = match &opts.fuse {
            Some(dir) => Some(FuseExport::mount(export.clone(), dir, &name)?),
            None => None,
        };
        let fuse_file = fuse.as_ref().map(|f| f.file.clone());
        ControlServer::with_backup_timeout(engine.clone(), opts.limits, fuse_file.clone(), opts.backup_timeout)
            .listen(&control)?;
        let reg = Registration {
            pid: std::process::id(),
            volume: std::fs::canonicalize(&opts.volume).unwrap_or(opts.volume.clone()),
            control: control.clone(),
            nbd: opts.nbd.clone(),
            fuse_file,
        };
        let reg_path = register(&name, &reg)?;
        ready(&reg);
        Ok((fuse, reg_path))
    })();
    let (mut fuse, reg_path) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = engine.shutdown();
            return Err(e);
        }
    };
    let sig = signals.wait();
    tracing::info!("{sig}: shutting down");
    let _ = std::fs::remove_file(&reg_path);
    if let Some(f) = fuse.as_mut() {
        f.unmount();
    }
    let _ = std::fs::remove_file(&control);
    engine.shutdown().context("clean shutdown")?;
    Ok(())
}
