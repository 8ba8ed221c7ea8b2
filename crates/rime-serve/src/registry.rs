//! Where running servers are found: each registers itself as `<name>-<pid>.json` in
//! `$RIME_RUN_DIR` (default `/run/rime/serve`) so that `rime backup` finds the server of a
//! volume named by its path, its FUSE file or its control socket. Entries of processes that
//! no longer run are ignored.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// The servers registered on this machine that are still running.
pub fn registrations() -> Vec<Registration> {
    let Ok(entries) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_str::<Registration>(&std::fs::read_to_string(e.path()).ok()?).ok())
        .filter(|r| rime_os::process::is_alive(r.pid))
        .collect()
}

/// The server protecting `path` (its volume, its FUSE file or its control socket), if any.
pub fn find_server(path: &Path) -> Option<Registration> {
    let canonical = std::fs::canonicalize(path).ok()?;
    registrations().into_iter().find(|r| {
        let same = |p: &Path| std::fs::canonicalize(p).is_ok_and(|c| c == canonical);
        same(&r.volume) || same(&r.control) || r.fuse_file.as_deref().is_some_and(same)
    })
}

/// Publishes `reg` under `name`; returns the entry's path (removed at shutdown). Written to a
/// temporary name and renamed, so a reader never sees half an entry.
pub fn register(name: &str, reg: &Registration) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let dir = run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{name}-{}.json", reg.pid));
    let tmp = dir.join(format!(".{name}-{}.json.tmp", reg.pid));
    std::fs::write(&tmp, serde_json::to_vec_pretty(reg)?).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("publish {}", path.display()))?;
    Ok(path)
}
