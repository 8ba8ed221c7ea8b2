//! `rime ls`: list a folder inside a backed-up volume, reading only the chunks it needs.

use crate::explorer::Explorer;
use crate::snapshot_reader::ReadStats;
use anyhow::Result;
use rime_explore::{FileTree, Kind, NodeId, Stat};
use rime_repo::Repository;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct LsOptions {
    pub snapshot: String,
    pub path: String,
    pub volume: Option<String>,
    pub cache_bytes: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LsEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits (with set-uid, set-gid, sticky), as a number.
    pub mode: u32,
    /// `ls -l` style, e.g. `-rw-r--r--`.
    pub permissions: String,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub inode: u64,
    /// Seconds since the epoch, and nanoseconds.
    pub mtime: i64,
    pub mtime_nsec: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<(u32, u32)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LsListing {
    pub snapshot: String,
    pub volume: String,
    pub filesystem: String,
    pub path: String,
    /// Whether `path` is a directory (its entries are listed) or a single node.
    pub directory: bool,
    pub entries: Vec<LsEntry>,
    pub seconds: f64,
    #[serde(flatten)]
    pub stats: ReadStats,
}

/// `ls -l` permission string.
pub fn permissions(kind: Kind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind.letter());
    let bit = |b: u32, c: char| if mode & b != 0 { c } else { '-' };
    let special = |x: bool, exec: bool, lower: char, upper: char| match (x, exec) {
        (true, true) => lower,
        (true, false) => upper,
        (false, true) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(mode & 0o4000 != 0, mode & 0o100 != 0, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(mode & 0o2000 != 0, mode & 0o010 != 0, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(mode & 0o1000 != 0, mode & 0o001 != 0, 't', 'T'));
    s
}

pub fn entry(fs: &dyn FileTree, name: String, st: &Stat) -> LsEntry {
    let target = if st.kind == Kind::Symlink {
        fs.read_link(st.id).ok().map(|t| String::from_utf8_lossy(&t).into_owned())
    } else {
        None
    };
    LsEntry {
        name,
        kind: st.kind.as_str(),
        size: st.size,
        mode: st.mode,
        permissions: permissions(st.kind, st.mode),
        uid: st.uid,
        gid: st.gid,
        nlink: st.nlink,
        inode: st.id,
        mtime: st.mtime.sec,
        mtime_nsec: st.mtime.nsec,
        target,
        rdev: st.rdev,
    }
}

pub fn ls(repo: Repository, opts: &LsOptions) -> Result<LsListing> {
    let started = Instant::now();
    let explorer = Explorer::open(repo, &opts.snapshot, opts.cache_bytes)?;
    let vol = explorer.open_volume(opts.volume.as_deref())?;
    let fs = vol.file_tree()?;
    let label = vol.selection.label();
    let Some(id) = rime_explore::resolve(fs.as_ref(), &opts.path)? else {
        return Err(crate::error::CommandError::PathNotFound(format!(
            "{}: no such file or directory in snapshot {} volume {label}",
            opts.path, &explorer.manifest.id
        ))
        .into());
    };
    let st = fs.stat(id)?;
    let mut entries = Vec::new();
    let directory = st.kind == Kind::Dir;
    if directory {
        for e in fs.read_dir(id)? {
            let name = e.name_lossy();
            match fs.stat(e.id) {
                Ok(st) => entries.push(entry(fs.as_ref(), name, &st)),
                Err(err) => tracing::warn!("{name}: {err:#}"),
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
    } else {
        let name = opts.path.trim_end_matches('/').rsplit('/').next().unwrap_or("").to_string();
        entries.push(entry(fs.as_ref(), name, &st));
    }
    Ok(LsListing {
        snapshot: explorer.manifest.id.clone(),
        volume: label,
        filesystem: fs.fs_type().to_string(),
        path: opts.path.clone(),
        directory,
        entries,
        seconds: started.elapsed().as_secs_f64(),
        stats: explorer.counter.stats(),
    })
}

/// The node a path names, for other commands.
pub fn lookup(fs: &dyn FileTree, path: &str) -> Result<Option<NodeId>> {
    rime_explore::resolve(fs, path)
}
