//! `rime vm layout|stop|resume|instant-restore`: arguments and output; the work is in
//! `rime_core::commands::vm` and `rime_core::vms::instant`.

use crate::output::{print_json, quoted, size};
use anyhow::{Context, Result};
use clap::{ArgGroup, Subcommand};
use rime_core::commands::vm::{self, ResumeSelection, StopOptions, StopReport, StopSelection};
use rime_core::vms::instant::{self, CancelSummary, FinishSummary, InstantOptions, InstantSummary, ListedInstant};
use rime_core::vms::layout::{Criterion, HostLayout, VmLayout};
use rime_repo::{Repository, VmSection};
use rime_virt::control::StartOutcome;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Every libvirt domain (and domain XML left behind) with its state and files, and the
    /// volume holding each file; with --volumes, each VM's coverage by them.
    #[command(group(ArgGroup::new("source").args(["volumes", "snapshot"])))]
    Layout {
        /// Volumes: block devices, image files, mount points, or loop devices of served volumes.
        #[arg(long, num_args = 1.., value_name = "VOLUME")]
        volumes: Vec<PathBuf>,
        /// Leave CD/DVD and floppy images out of coverage.
        #[arg(long)]
        no_media: bool,
        /// The VMs as a snapshot recorded them (needs the repository).
        #[arg(long, value_name = "ID")]
        snapshot: Option<String>,
        /// One line per VM.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Managed-save the selected running or paused domains, all at once, and wait until each is
    /// saved. Prints exactly the domains it stopped (for `rime vm resume --from`).
    #[command(group(ArgGroup::new("which").required(true).args(["all", "volumes", "names"])))]
    Stop {
        /// Every domain on the host.
        #[arg(long)]
        all: bool,
        /// The domains on these volumes (see --criterion).
        #[arg(long, num_args = 1.., value_name = "VOLUME")]
        volumes: Vec<PathBuf>,
        /// Domains by their exact names.
        #[arg(long, num_args = 1.., value_name = "NAME")]
        names: Vec<String>,
        /// full: only domains whose files are all on the volumes; partial: also domains with
        /// some of their files there.
        #[arg(long, default_value = "full", value_parser = ["full", "partial"])]
        criterion: String,
        /// Count CD/DVD and floppy images as the domains' files (the default).
        #[arg(long, overrides_with = "no_media")]
        media: bool,
        /// Leave CD/DVD and floppy images out of coverage.
        #[arg(long, overrides_with = "media")]
        no_media: bool,
        /// Longest wait for the saves, in seconds.
        #[arg(long, default_value_t = 300, value_name = "SECONDS")]
        max_wait: u64,
        /// Say what happens as it happens (on stderr).
        #[arg(long, short)]
        verbose: bool,
        /// Print only the domains stopped.
        #[arg(long, short, conflicts_with = "verbose")]
        quiet: bool,
    },
    /// Start saved domains again from their saved state.
    #[command(group(ArgGroup::new("which").required(true).args(["all", "names", "from"])))]
    Resume {
        /// Every domain that has a managed-save image.
        #[arg(long)]
        all: bool,
        /// Domains by their exact names.
        #[arg(long, num_args = 1.., value_name = "NAME")]
        names: Vec<String>,
        /// The domains a `rime vm stop` printed (its text or JSON), from FILE or - (stdin).
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// Wait until each domain runs (the default).
        #[arg(long, overrides_with = "no_wait")]
        wait: bool,
        /// Return once libvirt has been asked.
        #[arg(long, overrides_with = "wait")]
        no_wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 300, value_name = "SECONDS")]
        max_wait: u64,
        /// Print only the domains started.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Run a VM straight from a `rime backup --vm` snapshot: its disks are served from the
    /// repository (read-only, over NBD) under local overlays that take its writes, so it runs
    /// before any data is copied. --finish copies the disks to local images while it runs;
    /// --cancel throws it away; --list shows what runs this way.
    #[command(group(ArgGroup::new("action").required(true).args(["snapshot", "finish", "cancel", "list"])))]
    InstantRestore {
        /// The snapshot to run the VM from.
        #[arg(requires = "vm")]
        snapshot: Option<String>,
        /// The VM's name (or UUID) in the snapshot.
        #[arg(long, value_name = "NAME", requires = "snapshot")]
        vm: Option<String>,
        /// Run it under this new name (libvirt gives it a new UUID and MAC addresses).
        #[arg(long = "as", value_name = "NEW", requires = "snapshot")]
        as_name: Option<String>,
        /// Where the overlays go (default /var/lib/rime/instant).
        #[arg(long, value_name = "DIR", requires = "snapshot")]
        overlay_dir: Option<PathBuf>,
        /// Chunk cache of each disk, in MiB (default 64).
        #[arg(long, value_name = "MIB", requires = "snapshot")]
        cache_size: Option<u64>,
        /// Copy the disks of this instant recovery to local qcow2 images while it runs (libvirt
        /// block copy), move its definition onto them, stop serving.
        #[arg(long, value_name = "NAME")]
        finish: Option<String>,
        /// With --finish: put the disks into DIR (default: their paths at backup time).
        #[arg(long, value_name = "DIR", requires = "finish")]
        to: Option<PathBuf>,
        /// Destroy and undefine this instant recovery's domain, remove its overlays, stop
        /// serving.
        #[arg(long, value_name = "NAME")]
        cancel: Option<String>,
        /// The instant recoveries on this host.
        #[arg(long, visible_alias = "status")]
        list: bool,
    },
    /// The server behind `instant-restore` (started by it, detached).
    #[command(hide = true)]
    InstantServe {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
}

pub fn run(command: VmCommand, location: &str, repo: impl FnOnce() -> Result<Repository>, json: bool) -> Result<i32> {
    let started = Instant::now();
    match command {
        VmCommand::Layout { volumes, no_media, snapshot, quiet } => {
            if let Some(id) = snapshot {
                let (id, vms) = vm::layout_of_snapshot(&repo()?, &id)?;
                print_snapshot_layout(&id, &vms, quiet, json);
            } else {
                print_layout(&vm::layout(&volumes, !no_media)?, quiet, json);
            }
        }
        VmCommand::Stop { all, volumes, names, criterion, no_media, max_wait, verbose, quiet, .. } => {
            let select = if all {
                StopSelection::All
            } else if !volumes.is_empty() {
                StopSelection::Volumes(volumes)
            } else {
                StopSelection::Names(names)
            };
            let opts = StopOptions {
                select,
                criterion: Criterion::parse(&criterion)?,
                media: !no_media,
                max_wait: Duration::from_secs(max_wait),
            };
            let note = |n: &str| {
                if verbose {
                    eprintln!("rime: {n}");
                }
            };
            let report = vm::stop(&opts, &note)?;
            print_stop(&report, quiet, json);
            if let Some(e) = vm::stop_failure(&report) {
                return Err(e);
            }
        }
        VmCommand::Resume { all, names, from, no_wait, max_wait, quiet, .. } => {
            let select = if all {
                ResumeSelection::All
            } else if let Some(file) = from {
                let mut text = String::new();
                if file.as_os_str() == "-" {
                    std::io::stdin().read_to_string(&mut text).context("reading the stop's output from stdin")?;
                } else {
                    text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                }
                ResumeSelection::From(text)
            } else {
                ResumeSelection::Names(names)
            };
            let outcome = vm::resume(&select, !no_wait, Duration::from_secs(max_wait))?;
            print_resume(&outcome, quiet, json);
            if let Some(e) = vm::resume_failure(&outcome) {
                return Err(e);
            }
        }
        VmCommand::InstantRestore { snapshot, vm, as_name, overlay_dir, cache_size, finish, to, cancel, list } => {
            if list {
                print_instant_list(&instant::list(), json);
            } else if let Some(name) = finish {
                print_finish(&instant::finish(&name, to.as_deref())?, json);
            } else if let Some(name) = cancel {
                print_cancel(&instant::cancel(&name)?, json);
            } else {
                let (snapshot, vm) = snapshot.zip(vm).context("name the snapshot and the VM (--vm NAME)")?;
                let exe = std::env::current_exe().context("finding the rime binary")?;
                let location = absolute_location(location)?;
                let opts = InstantOptions {
                    snapshot,
                    vm,
                    as_name,
                    overlay_root: overlay_dir.map(|d| std::path::absolute(&d)).transpose()?,
                    cache_bytes: cache_size.map(|m| m << 20),
                    server: vec![
                        exe.into_os_string(),
                        "--repo".into(),
                        location.clone().into(),
                        "vm".into(),
                        "instant-serve".into(),
                    ],
                    started,
                };
                print_instant(&instant::instant_restore(&location, &opts)?, json);
            }
        }
        VmCommand::InstantServe { state } => instant::serve(&state)?,
    }
    Ok(0)
}

fn print_layout(l: &HostLayout, quiet: bool, json: bool) {
    if json {
        return print_json(l);
    }
    if l.domains.is_empty() {
        println!("no domains on {}", l.uri);
        return;
    }
    for vm in &l.domains {
        let coverage = vm.coverage.map(|c| c.label()).unwrap_or("");
        if quiet {
            println!("{:<14} {:<13} {}", vm.state, coverage, quoted(&vm.name));
            continue;
        }
        print_vm_header(vm, coverage);
        for f in &vm.files {
            let what = match &f.file.target {
                Some(t) => format!("{} {t}", f.file.role.label()),
                None => f.file.role.label().to_string(),
            };
            let size = f.file.size.map(|s| format!(" ({})", size(s))).unwrap_or_default();
            let missing = if f.file.exists { "" } else { " MISSING" };
            println!("  {what:<20} {}{size}{missing}", f.file.path);
            let place = match (&f.place.volume, &f.place.not_on_a_volume) {
                (Some(v), _) => {
                    let mut s = format!("on {}", v.display());
                    if let Some(d) = f.place.device.as_ref().filter(|d| *d != v) {
                        s.push_str(&format!(" (device {})", d.display()));
                    }
                    if let Some(m) = &f.place.mount_point {
                        s.push_str(&format!(", mounted at {}", m.display()));
                    }
                    s
                }
                (None, Some(why)) => why.clone(),
                (None, None) => "a network disk: on no local volume".to_string(),
            };
            let covered = match (&f.covered_by, l.volumes.is_empty(), f.file.role.is_carried()) {
                (Some(v), _, _) => format!("; covered by {v}"),
                (None, false, true) => "; carried into the snapshot by a backup".into(),
                (None, false, false) => "; NOT on the volumes".into(),
                _ => String::new(),
            };
            println!("  {:<20} {place}{covered}", "");
        }
        for p in &vm.problems {
            println!("  problem: {p}");
        }
        println!();
    }
}

fn print_vm_header(vm: &VmLayout, coverage: &str) {
    let kind = if vm.persistent { "defined" } else { "transient" };
    let reason = vm
        .reason
        .as_ref()
        .filter(|r| *r != &vm.state && *r != "unknown")
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    let coverage = if coverage.is_empty() { String::new() } else { format!("; coverage: {coverage}") };
    println!("VM {}  {}{reason}, {kind}, uuid {}{coverage}", quoted(&vm.name), vm.state, vm.uuid);
}

fn print_snapshot_layout(id: &str, vms: &VmSection, quiet: bool, json: bool) {
    if json {
        return print_json(&serde_json::json!({"snapshot": id, "vms": vms}));
    }
    for vm in &vms.domains {
        if quiet {
            println!("{:<14} {:<8} {:<13} {}", vm.state, vm.state_in_snapshot, vm.coverage, quoted(&vm.name));
            continue;
        }
        let pause = vm.interruption_ms.map(|ms| format!(", interrupted {:.1} s", ms / 1000.0)).unwrap_or_default();
        println!(
            "VM {}  {} at backup, {} in the snapshot; coverage: {}; {}{pause}",
            quoted(&vm.name),
            vm.state,
            vm.state_in_snapshot,
            vm.coverage,
            vm.action
        );
        for f in &vm.files {
            let what = match &f.target {
                Some(t) => format!("{} {t}", f.role),
                None => f.role.clone(),
            };
            let at = match &f.in_snapshot {
                Some(s) => {
                    let volume = match s.partition {
                        Some(p) => format!("{}:{p}", s.volume),
                        None => s.volume.clone(),
                    };
                    match &s.path {
                        Some(p) => format!("in the snapshot: {p} on volume {volume}"),
                        None => format!("in the snapshot: volume {volume}"),
                    }
                }
                None => "NOT in the snapshot".to_string(),
            };
            println!("  {what:<20} {}\n  {:<20} {at}", f.path, "");
        }
        if let Some(l) = &vm.live {
            print_live(l);
        }
        if !vm.complete {
            println!("  not every file is in the snapshot: `rime restore --vm` refuses this VM");
        }
        println!();
    }
}

/// How `rime backup --vm` read the VM: consistency, checkpoint, each disk's mode.
fn print_live(l: &rime_repo::LiveBackupRecord) {
    println!("  {} ({}): {}", l.consistency, l.method, l.consistency_detail);
    if let Some(c) = &l.checkpoint {
        println!("  checkpoint {c}: the base of the next incremental");
    }
    for d in &l.disks {
        let how = match (&d.reason, &l.base_snapshot) {
            (None, Some(base)) => format!("incremental from snapshot {}", &base[..base.len().min(8)]),
            (Some(why), _) => format!("{}: {why}", d.mode),
            (None, None) => d.mode.clone(),
        };
        println!("  disk {:<15} {how}", d.target);
    }
}

fn print_stop(r: &StopReport, quiet: bool, json: bool) {
    if json {
        return print_json(r);
    }
    for s in &r.outcome.stopped {
        println!(
            "stopped {} uuid={} was={} save={:.1}s",
            quoted(&s.name),
            s.uuid,
            s.was.replace(' ', "-"),
            s.save_ms / 1000.0
        );
    }
    if quiet {
        return;
    }
    for u in &r.outcome.untouched {
        eprintln!("rime: left {} as it is: {}", quoted(&u.name), u.why);
    }
    for l in &r.left_out {
        eprintln!("rime: left {} as it is: {}", quoted(&l.name), l.why);
    }
    for f in r.outcome.failed.iter().skip(1) {
        eprintln!("rime: {} was not stopped: {}", quoted(&f.name), f.error);
    }
}

fn print_resume(o: &StartOutcome, quiet: bool, json: bool) {
    if json {
        return print_json(o);
    }
    for s in &o.started {
        let how = match (&s.state, s.start_ms) {
            (Some(state), Some(ms)) => format!(" state={} ({:.1} s)", state.replace(' ', "-"), ms / 1000.0),
            _ => " (asked; not waited for)".to_string(),
        };
        println!("started {} uuid={}{how}", quoted(&s.name), s.uuid);
    }
    if quiet {
        return;
    }
    for u in &o.untouched {
        eprintln!("rime: left {} as it is: it {}", quoted(&u.name), u.why);
    }
    for f in o.failed.iter().skip(1) {
        eprintln!("rime: {} was not started: {}", quoted(&f.name), f.error);
    }
}

/// A local repository's path made absolute (the server runs in `/`); other locations as given.
fn absolute_location(location: &str) -> Result<String> {
    if location.contains("://") {
        return Ok(location.to_string());
    }
    Ok(std::path::absolute(location).with_context(|| format!("repository {location}"))?.display().to_string())
}

fn print_instant(s: &InstantSummary, json: bool) {
    if json {
        return print_json(s);
    }
    for w in &s.warnings {
        eprintln!("rime: warning: {w}");
    }
    println!(
        "running {} uuid={} from snapshot {} (VM {}) in {:.1} s",
        quoted(&s.name),
        s.uuid,
        &s.snapshot[..8],
        quoted(&s.vm),
        s.seconds_to_running
    );
    for d in &s.disks {
        println!(
            "  {:<6} {} over {} ({}), writes in {}",
            d.target,
            d.volume,
            d.socket.display(),
            size(d.size),
            d.overlay.display()
        );
    }
    println!("  server pid {}; finish with `rime vm instant-restore --finish {}`", s.server_pid, quoted(&s.name));
}

fn print_finish(s: &FinishSummary, json: bool) {
    if json {
        return print_json(s);
    }
    for d in &s.disks {
        println!("{} {}: {} ({})", quoted(&s.name), d.target, d.path, d.how);
    }
    println!(
        "finished {} uuid={} in {:.1} s: it runs from local disks; the server is stopped",
        quoted(&s.name),
        s.uuid,
        s.seconds
    );
}

fn print_cancel(s: &CancelSummary, json: bool) {
    if json {
        return print_json(s);
    }
    println!(
        "cancelled {}: removed {}",
        quoted(&s.name),
        if s.removed.is_empty() { "nothing".to_string() } else { s.removed.join(", ") }
    );
}

fn print_instant_list(l: &[ListedInstant], json: bool) {
    if json {
        return print_json(&l);
    }
    if l.is_empty() {
        println!("no instant recoveries");
        return;
    }
    for i in l {
        let server = match i.server_pid {
            Some(pid) => format!("server pid {pid}"),
            None => "server NOT running".into(),
        };
        println!(
            "{} {} from snapshot {} (VM {}) since {}; {server}",
            quoted(&i.state.name),
            i.domain_state.as_deref().unwrap_or("not defined"),
            &i.state.snapshot[..8],
            quoted(&i.state.vm),
            i.state.started_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
        for d in &i.state.disks {
            println!("  {:<6} {} ({}), writes in {}", d.target, d.volume, size(d.size), d.overlay.display());
        }
    }
}
