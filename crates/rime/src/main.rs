//! The `rime` command line: argument parsing and output only; the work is in `rime_core`.

#![forbid(unsafe_code)]

mod exit;
mod output;
mod progress_bar;
mod sample;
mod serve_cmd;
mod vm_cmd;
mod volume_tree;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rime_consistency::hooks::{Hook, Hooks};
use rime_core::commands::{backup, extract, forget, ls, mount, prune, restore, snapshots, verify};
use rime_core::retention::Policy;
use rime_repo::{Compression, Repository};
use rime_volume::fs::{CrossCheck, MapOptions};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "rime", version, about = "Hot, block-level backup for Linux servers and VM hosts")]
struct Cli {
    /// Repository: a directory path (or s3://bucket/prefix). Default: ~/.local/share/rime/repo
    #[arg(long, global = true, env = "RIME_REPO")]
    repo: Option<String>,
    /// Print one machine-readable JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Worker threads for hashing and compression (default: one per core).
    #[arg(long, global = true, value_parser = at_least_one)]
    threads: Option<usize>,
    /// Seconds to wait for a conflicting holder of the repository lock before giving up
    /// (exit code 3) when forgetting or pruning.
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    lock_wait: u64,
    #[command(subcommand)]
    command: Command,
}

/// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Create a repository (refuses an existing one).
    Init {
        /// Chunk size in bytes (power of two, 4 KiB to 16 MiB). Default 64 KiB.
        #[arg(long, value_parser = chunk_size)]
        chunk_size: Option<u32>,
    },
    /// Back up volumes into a new snapshot. With no volume, backs up a sample ext4 volume.
    Backup(Box<BackupArgs>),
    /// List snapshots.
    Snapshots {
        /// Also show each volume's layers: partitions, LVM physical and logical volumes,
        /// encryption, filesystems, and how each was mapped.
        #[arg(short, long)]
        long: bool,
    },
    /// Write a volume back, bit-exact, to a device or file; or, with --vm, put a VM back.
    Restore {
        snapshot: String,
        /// The device or file to write (not with --vm).
        #[arg(required_unless_present = "vm", conflicts_with = "vm")]
        target: Option<PathBuf>,
        #[arg(long)]
        volume: Option<String>,
        /// Put this VM back from a --vm-aware snapshot: its files, its definition, its saved
        /// state (docs/VMS.md).
        #[arg(long, value_name = "NAME", conflicts_with = "volume")]
        vm: Option<String>,
        /// With --vm: put every file into DIR (paths in the domain XML rewritten).
        #[arg(long, value_name = "DIR", requires = "vm")]
        to: Option<PathBuf>,
        /// With --vm: replace a defined (shut off) domain of that name and files in the way.
        #[arg(long, requires = "vm")]
        replace: bool,
        /// Write a raw image/device, or a new qcow2 image file.
        #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2"])]
        format: String,
    },
    /// Re-read and check every chunk that a snapshot (default: every snapshot) needs.
    Verify { snapshot: Option<String> },
    /// Remove snapshots by id or by retention policy.
    Forget {
        snapshots: Vec<String>,
        #[arg(long, value_parser = at_least_one)]
        keep_last: Option<usize>,
        #[arg(long, value_parser = at_least_one)]
        keep_daily: Option<usize>,
        #[arg(long, value_parser = at_least_one)]
        keep_weekly: Option<usize>,
        #[arg(long, value_parser = at_least_one)]
        keep_monthly: Option<usize>,
        /// Show what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Prune afterwards.
        #[arg(long)]
        prune: bool,
    },
    /// Delete data that no snapshot references.
    Prune,
    /// The writers whose data is on the volumes (default: the job's volumes, else every volume
    /// `rime serve` protects): what a backup freezes for its snapshot.
    Writers {
        volumes: Vec<PathBuf>,
        /// Also list this job file's SQLite databases and custom writers.
        #[arg(long, value_name = "FILE")]
        job: Option<PathBuf>,
        /// The job to use when the file holds several.
        #[arg(long, value_name = "NAME", requires = "job")]
        job_name: Option<String>,
    },
    /// List a folder inside a backed-up volume (image explorer).
    Ls {
        snapshot: String,
        /// Path inside the volume's filesystem.
        #[arg(default_value = "/")]
        path: String,
        /// Volume name, or NAME:N for partition N of a whole-disk volume (e.g. disk.img:2).
        #[arg(long)]
        volume: Option<String>,
        /// Show type, permissions, links, owner, size, modification time and symlink targets.
        #[arg(long, short = 'l')]
        long: bool,
        /// Chunk cache size in MiB (default 64).
        #[arg(long, value_name = "MIB")]
        cache_size: Option<u64>,
    },
    /// Restore files and folders from inside a backed-up volume into a directory.
    Extract {
        snapshot: String,
        /// Paths inside the volume's filesystem; each lands in DIR under its own name (/ = all).
        #[arg(required = true)]
        paths: Vec<String>,
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Volume name, or NAME:N for partition N of a whole-disk volume (e.g. disk.img:2).
        #[arg(long)]
        volume: Option<String>,
        /// Replace existing files in DIR.
        #[arg(long)]
        overwrite: bool,
        /// Chunk cache size in MiB (default 64).
        #[arg(long, value_name = "MIB")]
        cache_size: Option<u64>,
    },
    /// Read-only FUSE view of a snapshot: one image file per volume, and browsable file trees.
    /// Runs until unmounted (Ctrl-C, or `fusermount -u MOUNTPOINT`).
    Mount {
        snapshot: String,
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// Let other users read the view (FUSE allow_other).
        #[arg(long)]
        allow_other: bool,
        /// Chunk cache size in MiB (default 64).
        #[arg(long, value_name = "MIB")]
        cache_size: Option<u64>,
    },
    /// Virtual machines (libvirt): layout and coverage, stop and resume around a snapshot.
    Vm {
        #[command(subcommand)]
        command: vm_cmd::VmCommand,
    },
    /// Protect a volume: serve it over NBD and/or FUSE through the copy-on-write engine, with
    /// changed-block tracking, so that `rime backup --mode online` can image it while in use.
    Serve(serve_cmd::ServeArgs),
}

/// A count of at least 1 (`--threads`, `--keep-*`), refused by the parser otherwise.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A chunk size: a power of two from 4 KiB to 16 MiB.
fn chunk_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n.is_power_of_two() && (4096..=16 << 20).contains(&n) {
        Ok(n)
    } else {
        Err("must be a power of two from 4096 to 16777216".into())
    }
}

fn main() {
    let cli = Cli::parse();
    // `rime serve` is a daemon: its log says what it did (snapshots taken, aborted, gates let
    // go). Commands report through their own output and log only errors unless RIME_LOG asks.
    let default = match cli.command {
        Command::Serve(_) => tracing_subscriber::filter::LevelFilter::INFO,
        Command::Vm { command: vm_cmd::VmCommand::InstantServe { .. } } => {
            tracing_subscriber::filter::LevelFilter::INFO
        }
        _ => tracing_subscriber::filter::LevelFilter::ERROR,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(default.into())
                .with_env_var("RIME_LOG")
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve_cmd::run(args).map(|()| 0),
        command => run(Cli { command, ..cli }),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("rime: {msg}");
            std::process::exit(exit::code(&e));
        }
    }
}

/// The embedded default repository and sample volume live here.
fn data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("rime"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; pass --repo")?;
    Ok(PathBuf::from(home).join(".local/share/rime"))
}

fn repo_location(cli_repo: &Option<String>) -> Result<(String, bool)> {
    match cli_repo {
        Some(r) if !r.is_empty() => Ok((r.clone(), false)),
        _ => Ok((data_dir()?.join("repo").display().to_string(), true)),
    }
}

/// `rime backup`.
#[derive(clap::Args)]
struct BackupArgs {
    /// Block devices, image files, mount points, or loop devices of served volumes.
    volumes: Vec<PathBuf>,
    #[arg(long = "tag")]
    tags: Vec<String>,
    #[arg(long, default_value = "normal", value_parser = ["none", "fast", "normal", "best"])]
    compression: String,
    /// offline, auto or online (default auto, or the job's).
    #[arg(long, value_parser = ["offline", "auto", "online"])]
    mode: Option<String>,
    /// Image every block, not only those the filesystem uses.
    #[arg(long)]
    all_blocks: bool,
    /// Leave out the data of this file (a path inside the volume's filesystem, e.g.
    /// /swapfile); it is restored with its size, reading as zeros. Repeatable.
    #[arg(long = "exclude-file", value_name = "PATH")]
    exclude_files: Vec<String>,
    /// Cyclic backup: keep the last N snapshots of this set of volumes, prune the rest.
    #[arg(long, value_parser = at_least_one)]
    keep_last: Option<usize>,
    /// Check allocation records against the files using them before trusting them (ext
    /// block bitmaps against in-use inodes, a FAT against its directories). auto: where
    /// nothing else vouches for them (ext without metadata_csum, a FAT marked dirty).
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    cross_check: String,
    /// Run before the snapshot (freeze an application), by /bin/sh -c; repeatable. A failure
    /// or timeout aborts the backup; the after-snapshot and after-backup hooks still run.
    #[arg(long = "before-snapshot", value_name = "CMD")]
    before_snapshot: Vec<String>,
    /// Run after the snapshot (thaw), always, also when the snapshot failed; repeatable.
    #[arg(long = "after-snapshot", value_name = "CMD")]
    after_snapshot: Vec<String>,
    /// Run after the backup with its outcome in RIME_ERROR; repeatable.
    #[arg(long = "after-backup", value_name = "CMD")]
    after_backup: Vec<String>,
    /// Hold the writers found on the volumes for the snapshot: the filesystems mounted from
    /// them (fsfreeze) and the PostgreSQL clusters there (CHECKPOINT first). auto: one that
    /// cannot be held fails the backup; try: go on, its data crash-consistent (recorded and
    /// warned); never: a crash-consistent snapshot.
    #[arg(long, default_value = "auto", value_parser = ["auto", "try", "never"])]
    freeze: String,
    /// The snapshot provider every volume must use: btrfs-snapshot, reflink, rime-serve or
    /// offline (default auto: the best available for each).
    #[arg(long, default_value = "auto", value_parser = ["auto", "btrfs-snapshot", "reflink", "rime-serve", "offline"])]
    provider: String,
    /// Hold this SQLite database consistent for the snapshot (WAL checkpoint, then its write
    /// lock until the thaw); repeatable.
    #[arg(long = "sqlite", value_name = "DB")]
    sqlite: Vec<PathBuf>,
    /// Say which provider each volume would use, and why; back up nothing.
    #[arg(long)]
    dry_run: bool,
    /// Timeout of each command-line hook, in seconds.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    hook_timeout: f64,
    /// A job file (TOML, docs/CONSISTENCY.md): volumes, mode and hooks of a job.
    #[arg(long, value_name = "FILE")]
    job: Option<PathBuf>,
    /// The job to run from --job (needed when the file holds several).
    #[arg(long, value_name = "NAME", requires = "job")]
    job_name: Option<String>,
    /// Find the VMs on the volumes, managed-save the running ones for the snapshot, start
    /// them again right after it, and record them (docs/VMS.md).
    #[arg(long)]
    vm_aware: bool,
    /// full: take only VMs whose files are all on the volumes; partial: also VMs partly there.
    #[arg(long, default_value = "full", value_parser = ["full", "partial"], requires = "vm_aware")]
    vm_criterion: String,
    /// Leave CD/DVD and floppy images out of the VMs' coverage.
    #[arg(long, requires = "vm_aware")]
    vm_no_media: bool,
    /// When stopped VMs start again: after-snapshot (default) or after-backup.
    #[arg(long, default_value = "after-snapshot", value_parser = ["after-snapshot", "after-backup"], requires = "vm_aware")]
    vm_resume: String,
    /// Longest wait for the VMs' saves (and starts), in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECONDS", requires = "vm_aware")]
    vm_max_wait: u64,
    /// Do not stop the running VMs: read their disks through libvirt's backup API into the same
    /// snapshot, with incrementals from their checkpoints (docs/VMS.md).
    #[arg(long, requires = "vm_aware")]
    vm_live: bool,
    /// Back up this VM (name or UUID) while it runs, through libvirt's backup API, with
    /// incrementals from its last checkpoint; a VM not running is read from its disk files.
    /// Repeatable; all go into one snapshot (docs/VMS.md).
    #[arg(long = "vm", value_name = "NAME", conflicts_with_all = ["volumes", "vm_aware", "job"])]
    vms: Vec<String>,
    /// With --vm: fail rather than back up a running VM whose guest agent does not answer
    /// (crash-consistent otherwise).
    #[arg(long, requires = "vms")]
    require_agent: bool,
    /// With --vm: where QEMU keeps the old data of blocks a guest overwrites during its
    /// backup (and the export's socket).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/rime/vm-backup", requires = "vms")]
    scratch_dir: PathBuf,
}

/// `--keep-last`: retention is its own step, after a successful backup; its failure does not
/// undo the backup.
fn keep_only_last(
    repo: &Repository,
    summary: &mut backup::BackupSummary,
    n: usize,
    progress: &dyn rime_core::Progress,
) {
    match rime_core::commands::forget::keep_last(repo, &summary.manifest, n, progress) {
        Ok(cycled) => {
            summary.forgotten = cycled.forgotten;
            summary.pruned = cycled.pruned;
        }
        Err(e) => {
            let w = format!("backup succeeded but old snapshots were not removed: {e:#}");
            progress.warn(&w);
            summary.warnings.push(w);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let threads = cli.threads.unwrap_or_else(rime_core::default_threads).max(1);
    let (location, is_default) = repo_location(&cli.repo)?;
    let progress = progress_bar::for_terminal(cli.json);
    let lock_wait = Duration::from_secs(cli.lock_wait);
    match cli.command {
        Command::Init { chunk_size } => {
            let repo = rime_core::commands::init::init(&location, chunk_size)?;
            output::init(&repo, cli.json);
        }
        Command::Backup(args) => {
            let BackupArgs {
                volumes,
                tags,
                compression,
                mode,
                all_blocks,
                exclude_files,
                keep_last,
                cross_check,
                before_snapshot,
                after_snapshot,
                after_backup,
                hook_timeout,
                job,
                job_name,
                freeze,
                provider,
                dry_run,
                sqlite,
                vm_aware,
                vm_criterion,
                vm_no_media,
                vm_resume,
                vm_max_wait,
                vm_live,
                vms,
                require_agent,
                scratch_dir,
            } = *args;
            if !vms.is_empty() {
                let repo = Repository::open(&location)?;
                let opts = rime_core::vms::live::LiveOptions {
                    names: vms,
                    require_agent,
                    tags,
                    compression: Compression::parse(&compression)?,
                    threads,
                    host: rime_core::hostname(),
                    map_options: MapOptions { cross_check: CrossCheck::parse(&cross_check)? },
                    scratch_dir,
                };
                let mut summary = rime_core::vms::live::backup_vms(&repo, &opts, progress.as_ref())?;
                if let Some(n) = keep_last {
                    keep_only_last(&repo, &mut summary, n, progress.as_ref());
                }
                output::backup(&summary, cli.json);
                return Ok(0);
            }
            let mut volumes = volumes;
            let mut hooks = Hooks::default();
            let mut mode = mode;
            let mut job_sqlite = Vec::new();
            let mut custom_writers = Vec::new();
            if let Some(file) = &job {
                let job = rime_consistency::job::load(file, job_name.as_deref())?;
                if volumes.is_empty() {
                    volumes = job.volumes.clone();
                }
                mode = mode.or(job.mode.clone());
                hooks = job.hooks;
                job_sqlite = job.sqlite;
                custom_writers = job.writers;
            }
            if !(hook_timeout.is_finite() && hook_timeout > 0.0) {
                bail!("--hook-timeout must be a positive number of seconds");
            }
            let timeout = Duration::from_secs_f64(hook_timeout);
            let shell = |cmds: Vec<String>| cmds.iter().map(|c| Hook::shell(c, timeout)).collect::<Vec<_>>();
            hooks.extend(Hooks {
                before_snapshot: shell(before_snapshot),
                after_snapshot: shell(after_snapshot),
                after_backup: shell(after_backup),
            });
            if volumes.is_empty() {
                let sample = sample::ensure_sample_volume(&data_dir()?)?;
                if !cli.json {
                    eprintln!("no volume named: backing up the sample ext4 volume {}", sample.display());
                }
                volumes.push(sample);
            }
            let mode = backup::Mode::parse(mode.as_deref().unwrap_or("auto"))?;
            let provider = rime_core::providers::Provider::parse(&provider)?;
            if dry_run {
                let choices = rime_core::providers::plan(&volumes, mode, provider);
                output::providers(&choices, cli.json);
                return Ok(if choices.iter().all(|c| c.provider.is_some()) { 0 } else { 6 });
            }
            let repo = if is_default && !std::path::Path::new(&location).join("config.json").exists() {
                if !cli.json {
                    eprintln!("creating the default repository {location}");
                }
                rime_core::commands::init::init(&location, None)?
            } else {
                Repository::open(&location)?
            };
            let opts = backup::BackupOptions {
                volumes,
                tags,
                compression: Compression::parse(&compression)?,
                all_blocks,
                exclude_files,
                mode,
                threads,
                host: rime_core::hostname(),
                map_options: MapOptions { cross_check: CrossCheck::parse(&cross_check)? },
                hooks,
                freeze: rime_core::commands::backup::Freeze::parse(&freeze)?,
                provider,
                sqlite: job_sqlite.into_iter().chain(sqlite).collect(),
                custom_writers,
                vm: if vm_aware {
                    Some(rime_core::vms::backup::VmAwareOptions {
                        criterion: rime_core::vms::layout::Criterion::parse(&vm_criterion)?,
                        media: !vm_no_media,
                        resume: rime_core::vms::backup::ResumeAt::parse(&vm_resume)?,
                        max_wait: Duration::from_secs(vm_max_wait),
                        live: vm_live,
                    })
                } else {
                    None
                },
            };
            let mut summary = backup::backup(&repo, &opts, progress.as_ref())?;
            if let Some(n) = keep_last {
                keep_only_last(&repo, &mut summary, n, progress.as_ref());
            }
            output::backup(&summary, cli.json);
            if let Some(e) = summary.errors.first() {
                // The snapshot is saved; a VM it stopped did not start again.
                for other in &summary.errors[1..] {
                    eprintln!("rime: {other}");
                }
                bail!(rime_core::CommandError::Vm(format!("snapshot {} saved, but {e}", &summary.snapshot[..8])));
            }
        }
        Command::Snapshots { long } => {
            let repo = Repository::open(&location)?;
            output::snapshots(&snapshots::list(&repo)?, cli.json, long);
        }
        Command::Restore { snapshot, target, volume, format, vm: Some(name), to, replace } => {
            let repo = Repository::open(&location)?;
            let _ = (target, volume, format);
            let opts = rime_core::vms::restore::VmRestoreOptions { snapshot, name, to, replace, threads };
            output::restore_vm(&rime_core::vms::restore::restore_vm(&repo, &opts, progress.as_ref())?, cli.json);
        }
        Command::Restore { snapshot, target, volume, format, .. } => {
            let target = target.context("name the device or file to restore to")?;
            let repo = Repository::open(&location)?;
            let format = if format == "qcow2" { restore::TargetFormat::Qcow2 } else { restore::TargetFormat::Raw };
            let opts = restore::RestoreOptions { snapshot, target, volume, threads, format };
            output::restore(&restore::restore(&repo, &opts, progress.as_ref())?, cli.json);
        }
        Command::Verify { snapshot } => {
            let repo = Repository::open(&location)?;
            let report = verify::verify(&repo, snapshot.as_deref(), threads, progress.as_ref())?;
            output::verify(&report, cli.json);
            if !report.ok() {
                return Ok(1);
            }
        }
        Command::Forget { snapshots, keep_last, keep_daily, keep_weekly, keep_monthly, dry_run, prune: and_prune } => {
            let repo = Repository::open(&location)?;
            let policy = Policy { keep_last, keep_daily, keep_weekly, keep_monthly };
            if !snapshots.is_empty() && !policy.is_empty() {
                bail!("name snapshots or give a --keep-* policy, not both");
            }
            let removed = if snapshots.is_empty() {
                let decisions = forget::forget_policy(&repo, &policy, dry_run, lock_wait)?;
                output::forget_decisions(&decisions, dry_run, cli.json && !and_prune);
                decisions.into_iter().filter(|d| !d.keep).map(|d| d.id).collect()
            } else if dry_run {
                bail!("--dry-run applies to --keep-* policies");
            } else {
                let ids = forget::forget_ids(&repo, &snapshots, lock_wait)?;
                output::forgotten(&ids, cli.json && !and_prune);
                ids
            };
            if and_prune && !dry_run {
                let summary = prune::prune(&repo, progress.as_ref(), lock_wait)?;
                output::prune(&summary, Some(&removed), cli.json);
            }
        }
        Command::Ls { snapshot, path, volume, long, cache_size } => {
            let repo = Repository::open(&location)?;
            let opts = ls::LsOptions { snapshot, path, volume, cache_bytes: cache_size.map(|m| m << 20) };
            output::ls(&ls::ls(repo, &opts)?, long, cli.json);
        }
        Command::Extract { snapshot, paths, to, volume, overwrite, cache_size } => {
            let repo = Repository::open(&location)?;
            let opts = extract::ExtractOptions {
                snapshot,
                paths,
                to,
                volume,
                overwrite,
                cache_bytes: cache_size.map(|m| m << 20),
            };
            let summary = extract::extract(repo, &opts)?;
            output::extract(&summary, cli.json);
            if !summary.skipped.is_empty() {
                return Ok(2);
            }
        }
        Command::Mount { snapshot, mountpoint, allow_other, cache_size } => {
            let repo = Repository::open(&location)?;
            let opts =
                mount::MountOptions { snapshot, mountpoint, cache_bytes: cache_size.map(|m| m << 20), allow_other };
            let json = cli.json;
            let summary = mount::mount(repo, &opts, &|s| output::mounted(s, json))?;
            output::unmounted(&summary, cli.json);
        }
        Command::Writers { volumes, job, job_name } => {
            let job = job.map(|f| rime_consistency::job::load(&f, job_name.as_deref())).transpose()?;
            output::writers(&rime_core::commands::writers::writers(&volumes, job.as_ref())?, cli.json);
        }
        Command::Prune => {
            let repo = Repository::open(&location)?;
            output::prune(&prune::prune(&repo, progress.as_ref(), lock_wait)?, None, cli.json);
        }
        Command::Vm { command } => {
            return vm_cmd::run(command, &location, || Ok(Repository::open(&location)?), cli.json)
        }
        Command::Serve(_) => unreachable!("handled in main"),
    }
    Ok(0)
}
