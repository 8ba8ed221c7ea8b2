//! `rime serve`: arguments; the work is in `rime_serve::serve`.

use anyhow::Result;
use rime_serve::{serve, ServeOptions};
use rime_snapshot::engine::{EngineConfig, SnapshotLimits};
use rime_snapshot::store::StoreLimits;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Block device or raw image file to protect.
    volume: PathBuf,
    /// Export over NBD: HOST:PORT (TCP, e.g. 127.0.0.1:10809) or a unix socket path (unix:PATH). Repeatable.
    #[arg(long)]
    nbd: Vec<String>,
    /// Export as a single file in a FUSE mount at this folder (losetup on DIR/<name> works).
    #[arg(long, value_name = "DIR")]
    fuse: Option<PathBuf>,
    /// Control socket for backups (default: $RIME_RUN_DIR or /run/rime/serve, <name>.sock).
    #[arg(long, value_name = "SOCKET")]
    control: Option<PathBuf>,
    /// NBD export name and FUSE file name (default: the volume's file name).
    #[arg(long)]
    name: Option<String>,
    /// Folder of the persistent changed-block map.
    #[arg(long, default_value = "/var/lib/rime/cbt")]
    state_dir: PathBuf,
    /// Difference store: memory before spilling to a temporary file.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    store_memory: u64,
    /// Difference store cap (memory plus spill file); reaching it aborts the snapshot.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    store_cap: u64,
    /// Folder of the difference store's spill file.
    #[arg(long, default_value = "/var/tmp")]
    spill_dir: PathBuf,
    /// Write-inactivity period before a snapshot is taken, in milliseconds.
    #[arg(long, default_value_t = rime_snapshot::engine::DEFAULT_WIP.as_millis() as u64)]
    wip_ms: u64,
    /// Snapshot time limit (waiting for the write-inactivity period), in seconds.
    #[arg(long, default_value_t = 60.0)]
    snapshot_limit: f64,
    /// Drain limit (in-flight writes finishing at the snapshot instant), in seconds.
    #[arg(long, default_value_t = 10.0)]
    drain_limit: f64,
    /// Abort a snapshot whose backup has asked nothing for this many seconds (it hangs; a
    /// running backup asks every 2 s).
    #[arg(long, default_value_t = 30.0)]
    backup_timeout: f64,
    /// Test aid: copy the whole volume into DIR at every snapshot instant.
    #[arg(long, hide = true, value_name = "DIR")]
    dump_snapshots: Option<PathBuf>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let mut engine = EngineConfig::new(a.state_dir);
    engine.store = StoreLimits { memory: a.store_memory, cap: a.store_cap, spill_dir: a.spill_dir };
    engine.dump_dir = a.dump_snapshots;
    let limits = SnapshotLimits {
        wip: Duration::from_millis(a.wip_ms),
        limit: Duration::from_secs_f64(a.snapshot_limit),
        drain: Duration::from_secs_f64(a.drain_limit),
    };
    let opts = ServeOptions {
        volume: a.volume,
        nbd: a.nbd,
        fuse: a.fuse,
        control: a.control,
        export_name: a.name,
        engine,
        limits,
        backup_timeout: Duration::from_secs_f64(a.backup_timeout),
    };
    serve(opts, |reg| {
        let mut what = vec![format!("control {}", reg.control.display())];
        what.extend(reg.nbd.iter().map(|n| format!("nbd {n}")));
        if let Some(f) = &reg.fuse_file {
            what.push(format!("file {}", f.display()));
        }
        eprintln!("rime: serving {} ({})", reg.volume.display(), what.join(", "));
    })
}

/// A byte size: `4096`, `64K`, `64M`, `4G`, `1T` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size too large: {s:?}"))
}
