//! `rime serve`: protect a volume. Opens it read-write through the copy-on-write engine,
//! exports it over NBD and/or FUSE, takes snapshot requests on the control socket, and runs in
//! the foreground until SIGINT or SIGTERM, then shuts down cleanly (the changed-block map stays
//! valid across the restart).
//!
//! A running server registers itself in `$RIME_RUN_DIR` (default `/run/rime/serve`) so that
//! `rime backup` finds the server of a volume named by its path or its FUSE file.

use crate::engine::{Engine, EngineConfig, SnapshotLimits};
use crate::fuse::FuseExport;
use crate::nbd::{Address, NbdServer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
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

/// What a running server publishes about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registration {
    pub pid: u32,
    pub volume: PathBuf,
    pub control: PathBuf,
    pub nbd: Vec<String>,
    pub fuse_file: Option<PathBuf>,
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("RIME_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/rime/serve"))
}

fn stem(volume: &Path) -> String {
    volume.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "volume".into())
}

/// The servers registered on this machine that are still running.
pub fn registrations() -> Vec<Registration> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir()) else {
        return out;
    };
    for e in entries.flatten() {
        if e.path().extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Ok(r) = serde_json::from_str::<Registration>(&text) else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(r.pid as i32, 0) } == 0 {
            out.push(r);
        }
    }
    out
}

/// The server protecting `path` (its volume, its FUSE file or its control socket), if any.
pub fn find_server(path: &Path) -> Option<Registration> {
    let canonical = std::fs::canonicalize(path).ok()?;
    registrations().into_iter().find(|r| {
        let same = |p: &Path| std::fs::canonicalize(p).is_ok_and(|c| c == canonical);
        same(&r.volume) || same(&r.control) || r.fuse_file.as_deref().is_some_and(same)
    })
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Serves until SIGINT/SIGTERM. `ready` is called once everything listens.
pub fn serve(opts: ServeOptions, ready: impl FnOnce(&Registration)) -> Result<()> {
    // Before any thread starts, so that every thread inherits the mask and only sigwait sees them.
    let signals = block_signals();
    let engine = Arc::new(Engine::open(&opts.volume, opts.engine.clone())?);
    let name = opts.export_name.clone().unwrap_or_else(|| stem(&opts.volume));
    let run = run_dir();
    let control = opts.control.clone().unwrap_or_else(|| run.join(format!("{name}.sock")));
    let nbd = NbdServer::new(engine.clone(), name.clone());
    let result = (|| -> Result<(Option<FuseExport>, PathBuf)> {
        for a in &opts.nbd {
            nbd.listen(&Address::parse(a))?;
        }
        let fuse = match &opts.fuse {
            Some(dir) => Some(FuseExport::mount(engine.clone(), dir, &name)?),
            None => None,
        };
        let fuse_file = fuse.as_ref().map(|f| f.file.clone());
        crate::control::ControlServer::with_backup_timeout(
            engine.clone(),
            opts.limits,
            fuse_file.clone(),
            opts.backup_timeout,
        )
        .listen(&control)?;
        let reg = Registration {
            pid: std::process::id(),
            volume: std::fs::canonicalize(&opts.volume).unwrap_or(opts.volume.clone()),
            control: control.clone(),
            nbd: opts.nbd.clone(),
            fuse_file,
        };
        std::fs::create_dir_all(&run).with_context(|| format!("create {}", run.display()))?;
        let reg_path = run.join(format!("{name}-{}.json", std::process::id()));
        std::fs::write(&reg_path, serde_json::to_vec_pretty(&reg)?)?;
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
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the blocked signals.
    unsafe { libc::sigwait(&signals, &mut sig) };
    tracing::info!("signal {sig}: shutting down");
    let _ = std::fs::remove_file(&reg_path);
    if let Some(f) = fuse.as_mut() {
        f.unmount();
    }
    let _ = std::fs::remove_file(&control);
    engine.shutdown().context("clean shutdown")?;
    Ok(())
}

/// Parses a byte size: `4096`, `64K`, `64M`, `4G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => anyhow::bail!("unknown size suffix in {s:?} (use K, M, G or T)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().with_context(|| format!("not a size: {s:?}"))?;
    n.checked_mul(mult).with_context(|| format!("size too large: {s:?}"))
}
