//! `rime backup`: image volumes into a new snapshot.
//!
//! In a straight line: take the shared repository lock → load the chunk index once → open the
//! volumes (taking snapshots of protected ones) and decide their maps → write → publish the
//! manifest → release the lock. Retention is a separate step after a success.
//!
//! Order of writes, each durable before the next: packs (each followed by its index file) →
//! one volume index per volume → the manifest. Until the manifest exists nothing references the
//! new objects, so a backup that fails or is killed leaves every existing snapshot as it was.

use crate::archive::{archive_volume, ArchiveInput, PackSink};
use crate::capture::{capture, Capture, OpenVolume};
use crate::error::CommandError;
use crate::progress::Progress;
use crate::providers::Provider;
use crate::storage_stack;
use crate::vms::backup::{ResumeAt, VmBackup};
use anyhow::{bail, Context, Result};
use rime_consistency::hooks::{self, HookContext, Hooks, Stage};
use rime_consistency::job::CustomWriter;
use rime_consistency::writers::FsFreezeWriter;
use rime_repo::lock::LockMode;
use rime_repo::pack::{index_path, pack_path, FinishedPack};
use rime_repo::snapshot::volume_index_path;
use rime_repo::snapshot::PartitionEntry;
use rime_repo::volume_index::VolumeIndexWriter;
use rime_repo::{Compression, Consistency, Manifest, Repository, SnapshotId, VolumeEntry, WriterRecord};
use rime_volume::layout;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Only volumes not in use.
    Offline,
    /// Offline where possible, a snapshot where a volume is in use.
    #[default]
    Auto,
    /// Always through a snapshot.
    Online,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "offline" => Ok(Mode::Offline),
            "auto" => Ok(Mode::Auto),
            "online" => Ok(Mode::Online),
            other => bail!("unknown backup mode '{other}' (expected offline, auto or online)"),
        }
    }
}

/// What a backup does with the writers it finds (`--freeze`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Freeze {
    /// Hold every writer; one that cannot be held fails the backup (exit code 8).
    #[default]
    Required,
    /// Hold every writer that can be; for one that cannot, go on with a crash-consistent image
    /// of its data, recorded in the snapshot (`consistency.not_held`) and warned about.
    Try,
    /// Hold none: a crash-consistent snapshot (hooks still run).
    Never,
}

impl Freeze {
    pub fn parse(s: &str) -> Result<Freeze> {
        match s {
            "auto" => Ok(Freeze::Required),
            "try" => Ok(Freeze::Try),
            "never" => Ok(Freeze::Never),
            other => bail!("unknown --freeze '{other}' (expected auto, try or never)"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub volumes: Vec<PathBuf>,
    pub tags: Vec<String>,
    pub compression: Compression,
    pub all_blocks: bool,
    /// Paths inside the volumes' filesystems whose data is left out.
    pub exclude_files: Vec<String>,
    pub mode: Mode,
    pub threads: usize,
    pub host: String,
    /// How the used-block maps are made (cross-checks).
    pub map_options: rime_volume::fs::MapOptions,
    /// Commands run around the snapshot.
    pub hooks: Hooks,
    /// Which writers are held for the snapshot, and what a failure to hold one means.
    pub freeze: Freeze,
    /// `--provider`: the snapshot provider every volume must use (None: the best available).
    pub provider: Option<crate::providers::Provider>,
    /// SQLite databases to hold consistent (write lock) for the snapshot.
    pub sqlite: Vec<PathBuf>,
    /// Custom writers (from a job file): their freeze, thaw and completion commands.
    pub custom_writers: Vec<CustomWriter>,
    /// `--vm-aware`: stop the VMs on the volumes for the snapshot and record them.
    pub vm: Option<crate::vms::backup::VmAwareOptions>,
}

#[derive(Debug, Serialize)]
pub struct BackupSummary {
    pub snapshot: String,
    pub manifest: Manifest,
    /// Snapshots removed by `--keep-last` (filled by the retention step that follows).
    pub forgotten: Vec<String>,
    pub pruned: Option<super::prune::PruneSummary>,
    pub warnings: Vec<String>,
    /// Failures after the snapshot was saved (a VM that did not start again): the snapshot is
    /// good, but the command fails (exit code 10).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Backs up `opts.volumes` into a new snapshot, in a straight line: lock, load what the backup
/// needs once, read the volumes (taking snapshots of protected ones), write, publish. Retention
/// (`--keep-last`) is a separate step, [`super::forget::keep_last`], run after a success.
///
/// Hooks (docs/CONSISTENCY.md) run around the snapshot: before-snapshot (a failure aborts the
/// backup, but what follows still runs, so a half-done freeze is undone), the snapshot of every
/// volume, after-snapshot always (its failures are warnings), then the data is imaged only if
/// the snapshot succeeded, and after-backup runs with the outcome.
pub fn backup(repo: &Repository, opts: &BackupOptions, progress: &dyn Progress) -> Result<BackupSummary> {
    // Volumes as the administrator named them (a mount point, a loop device of a served
    // volume) become what is read.
    let volumes: Vec<PathBuf> = opts.volumes.iter().map(|v| crate::places::volume_name(v)).collect::<Result<_, _>>()?;
    let opts = &BackupOptions { volumes, ..opts.clone() };
    let plan = crate::providers::plan(&opts.volumes, opts.mode, opts.provider);
    let mut ctx = HookContext {
        volumes: opts.volumes.iter().map(|v| v.display().to_string()).collect(),
        provider: provider_names(&plan),
        ..HookContext::default()
    };
    // A writer only partly on the volumes fails the backup here, before anything is frozen.
    let chosen =
        super::writers::choose(&opts.volumes, &plan, opts.freeze != Freeze::Never, &opts.sqlite, &opts.custom_writers);
    let custom: Vec<CustomWriter> = chosen.as_ref().map(|c| c.custom.clone()).unwrap_or_default();
    // The VMs on the volumes, found before anything is frozen.
    let vms = opts.vm.clone().map(|o| crate::vms::backup::VmBackup::find(&opts.volumes, o)).transpose();
    let mut result = match (chosen, vms) {
        (Ok(mut chosen), Ok(mut vms)) => {
            backup_with_hooks(repo, opts, &plan, &mut chosen, vms.as_mut(), progress, &mut ctx)
        }
        (Err(e), _) => Err(e.into()),
        (_, Err(e)) => Err(e),
    };
    ctx.error = result.as_ref().err().map_or(0, crate::error::exit_code);
    // Writers hear the outcome; only a success lets them run their completion action.
    if let Ok(summary) = result.as_mut() {
        // Only the writers that were held (under --freeze try, one may not have been).
        let held: Vec<String> =
            summary.manifest.consistency.iter().flat_map(|c| &c.writers).map(|w| w.name.clone()).collect();
        for w in custom.iter().filter(|w| held.contains(&w.name)) {
            let Some(complete) = &w.complete else { continue };
            if let Err(e) = hooks::run_hook(complete, Stage::AfterBackup, &ctx) {
                let warning = format!("writer {}: {e}", w.name);
                progress.warn(&warning);
                summary.warnings.push(warning);
            }
        }
    }
    // After-backup: always, with the outcome; its failures are warnings (the backup is done).
    let failures = hooks::run_stage(&opts.hooks, Stage::AfterBackup, &ctx, false);
    match result {
        Ok(mut summary) => {
            for f in failures {
                let w = format!("{f}");
                progress.warn(&w);
                summary.warnings.push(w);
            }
            Ok(summary)
        }
        Err(e) => Err(e),
    }
}

/// With filesystems frozen, no write may reach a protected volume between the moment the
/// snapshot was asked for and its instant: the engine counts them. A write there means a writer
/// was not held (a filesystem not found, or the volume written directly), so the snapshot is
/// dropped rather than passed off as application-consistent.
fn writes_during_freeze(writers: &[FsFreezeWriter], capture: &Capture) -> Result<Option<String>> {
    if !writers.iter().any(FsFreezeWriter::was_held) {
        return Ok(None);
    }
    for ov in &capture.volumes {
        let Some(source) = &ov.online else { continue };
        let during = source.writes_now()?.saturating_sub(source.writes_before);
        if during > 0 {
            return Ok(Some(format!(
                "{during} writes reached {} while its filesystems were frozen for the snapshot",
                ov.volume.path.display()
            )));
        }
    }
    Ok(None)
}

/// A writer that could not be held: under `--freeze try` the backup goes on (its data only
/// crash-consistent, recorded), else it fails the backup like a failed freeze.
fn writer_failed(mode: Freeze, error: String, failure: &mut Option<CommandError>, not_held: &mut Vec<String>) {
    if mode == Freeze::Try {
        tracing::warn!("{error}; going on crash-consistent for its data (--freeze try)");
        not_held.push(error);
    } else if failure.is_none() {
        *failure = Some(CommandError::HookFailed(error));
    }
}

/// The volumes that have mounted filesystems, all of them held still.
fn fully_frozen(volumes: &[PathBuf], writers: &[FsFreezeWriter]) -> Vec<PathBuf> {
    volumes
        .iter()
        .filter(|v| {
            let mut on = writers.iter().filter(|w| Path::new(&w.volume) == v.as_path()).peekable();
            on.peek().is_some() && on.all(FsFreezeWriter::was_held)
        })
        .cloned()
        .collect()
}

/// Which snapshot providers the volumes will use, for `RIME_PROVIDER`. The capture plans again
/// after the before-snapshot hooks, which may change what is in use (a hook that stops a VM).
fn provider_names(plan: &[crate::providers::Choice]) -> String {
    let mut names: Vec<&str> = plan.iter().filter_map(|c| c.provider.map(Provider::name)).collect();
    names.sort_unstable();
    names.dedup();
    names.join(" ")
}

fn backup_with_hooks(
    repo: &Repository,
    opts: &BackupOptions,
    plan: &[crate::providers::Choice],
    chosen: &mut super::writers::Chosen,
    mut vms: Option<&mut VmBackup>,
    progress: &dyn Progress,
    ctx: &mut HookContext,
) -> Result<BackupSummary> {
    if opts.volumes.is_empty() {
        bail!("no volume to back up");
    }
    if opts.all_blocks && !opts.exclude_files.is_empty() {
        bail!("--exclude-file cannot be combined with --all-blocks");
    }
    let started = Instant::now();
    let mut warnings = Vec::new();
    let mut warn = |w: String| {
        progress.warn(&w);
        warnings.push(w);
    };

    // 1. Lock: from here until the manifest is written, no forget or prune removes what this
    //    backup reads (a base snapshot) or deduplicates against.
    // 2. Load the chunk index, once: deduplication and incremental reuse both consult it.
    let (lock, index) = lock_and_load_index(repo, &mut warn)?;
    // 3. Snapshot, between the hooks: before-snapshot (freeze), open every volume (snapshots of
    //    protected ones), after-snapshot (thaw) whatever happened.
    //    Writers (the filesystems mounted from the volumes taken by snapshot) freeze after the
    //    hooks and thaw before the after-snapshot hooks, so applications flush first and resume
    //    last.
    std::mem::take(&mut chosen.skipped).into_iter().for_each(&mut warn);
    let super::writers::Chosen { custom, sqlite: databases, postgres: clusters, filesystems: writers, .. } = chosen;
    if let Some(v) = vms.as_mut() {
        std::mem::take(&mut v.warnings).into_iter().for_each(&mut warn);
    }
    let something_frozen = !(opts.hooks.before_snapshot.is_empty()
        && vms.as_ref().is_none_or(|v| !v.takes_any())
        && writers.is_empty()
        && databases.is_empty()
        && clusters.is_empty()
        && custom.is_empty());
    let freeze_started = Instant::now();
    let before = hooks::run_stage(&opts.hooks, Stage::BeforeSnapshot, ctx, true);
    // A failed before-snapshot hook always aborts; a writer that cannot be held aborts unless
    // `--freeze try` (then `not_held` says which, and the backup goes on).
    let mut failure = before.into_iter().next().map(|f| CommandError::HookFailed(f.to_string()));
    let mut not_held: Vec<String> = Vec::new();
    let mut failed_writers: Vec<String> = Vec::new();
    // VMs first: their memory saved, their disks at rest, their carried files staged.
    if let (None, Some(v)) = (&failure, vms.as_mut()) {
        failure = v.stop().and_then(|()| v.stage()).err();
    }
    // Applications first (their data flushed and held), then the filesystems under them.
    let mut tried_custom = 0;
    for w in custom.iter() {
        if failure.is_some() {
            break;
        }
        tried_custom += 1;
        if let Err(e) = hooks::run_hook(&w.freeze, Stage::BeforeSnapshot, ctx) {
            failed_writers.push(w.name.clone());
            writer_failed(opts.freeze, format!("writer {}: {e}", w.name), &mut failure, &mut not_held);
        }
    }
    for d in databases.iter_mut() {
        if failure.is_some() {
            break;
        }
        if let Err(e) = d.freeze() {
            failed_writers.push(d.name());
            writer_failed(opts.freeze, e, &mut failure, &mut not_held);
        }
    }
    // A database server writes its dirty buffers out; the freeze of its filesystems holds it.
    for c in clusters.iter_mut() {
        if failure.is_some() {
            break;
        }
        if let Err(e) = c.checkpoint() {
            failed_writers.push(c.name());
            writer_failed(opts.freeze, e, &mut failure, &mut not_held);
        }
    }
    // The plan made before the hooks holds unless a hook or custom writer ran, which may have
    // changed what is in use (a VM stopped); planning again now keeps it out of the filesystems'
    // freeze.
    let replanned;
    let vms_stopped = vms.as_ref().is_some_and(|v| v.stopped_any());
    let plan = if opts.hooks.before_snapshot.is_empty() && custom.is_empty() && !vms_stopped {
        plan
    } else {
        replanned = crate::providers::plan(&opts.volumes, opts.mode, opts.provider);
        &replanned[..]
    };
    // The filesystems freeze together: each FIFREEZE waits for its own flush, so one after
    // another would add their flushes up inside the window.
    if failure.is_none() {
        let errors: Vec<String> = std::thread::scope(|scope| {
            let freezing: Vec<_> = writers.iter_mut().map(|w| scope.spawn(move || w.freeze())).collect();
            freezing
                .into_iter()
                .filter_map(|h| h.join().unwrap_or_else(|_| Err("a freeze panicked".into())).err())
                .collect()
        });
        for e in errors {
            writer_failed(opts.freeze, format!("freezing {e}"), &mut failure, &mut not_held);
        }
    }
    failed_writers.extend(writers.iter().filter(|w| !w.was_held()).map(|w| w.name()));
    // Interrupted while they are frozen, the filesystems this backup froze are thawed first.
    let frozen_here: Vec<PathBuf> = writers.iter().filter(|w| w.frozen_here()).map(|w| w.mount_point.clone()).collect();
    let thaw_on_interrupt = (!frozen_here.is_empty()).then(|| {
        crate::interrupt::on_interrupt(move || frozen_here.iter().for_each(|m| drop(rime_os::freeze::thaw(m))))
    });
    let opened = match failure {
        Some(f) => Err(anyhow::Error::new(f)),
        None => capture(&opts.volumes, plan, &fully_frozen(&opts.volumes, writers)).and_then(|c| {
            match writes_during_freeze(writers, &c)? {
                None => Ok(c),
                // A writer Rime does not know kept writing: not application-consistent.
                Some(w) if opts.freeze == Freeze::Try => {
                    not_held.push(format!("{w}: a writer Rime does not know was not held"));
                    Ok(c)
                }
                Some(w) => Err(CommandError::WritesNotSuspended(format!("{w}; the snapshot was dropped")).into()),
            }
        }),
    };
    // Thaws and after-snapshot hooks learn how the snapshot went.
    ctx.snapshot_active = opened.as_ref().is_ok_and(|c| c.volumes.iter().any(|ov| ov.provider.is_snapshot()));
    ctx.error = opened.as_ref().err().map_or(0, crate::error::exit_code);
    for w in writers.iter_mut() {
        if let Err(e) = w.thaw() {
            warn(format!("{e} (the backup goes on)"));
        }
    }
    drop(thaw_on_interrupt);
    for d in databases.iter_mut() {
        if let Err(e) = d.thaw() {
            warn(format!("{e} (the backup goes on)"));
        }
    }
    // Every custom writer whose freeze was tried is thawed, last frozen first.
    for w in custom[..tried_custom].iter().rev() {
        if let Err(e) = hooks::run_hook(&w.thaw, Stage::AfterSnapshot, ctx) {
            warn(format!("writer {}: {e} (the backup goes on)", w.name));
        }
    }
    // VMs last, right after the snapshot: their interruption does not grow with the volumes.
    if let Some(v) = vms.as_mut().filter(|v| v.resume_at() == ResumeAt::AfterSnapshot || opened.is_err()) {
        v.resume();
    }
    for f in hooks::run_stage(&opts.hooks, Stage::AfterSnapshot, ctx, false) {
        warn(format!("{f} (the backup goes on)"));
    }
    let freeze_window_ms = something_frozen.then(|| freeze_started.elapsed().as_secs_f64() * 1000.0);
    let mut held: Vec<WriterRecord> = writers
        .iter()
        .map(|w| WriterRecord { kind: "fsfreeze".into(), name: w.name(), details: Default::default() })
        .collect();
    held.extend(clusters.iter().map(|c| WriterRecord {
        kind: "postgresql".into(),
        name: c.name(),
        details: c.details.clone(),
    }));
    held.extend(databases.iter().map(|d| WriterRecord {
        kind: "sqlite".into(),
        name: d.name(),
        details: Default::default(),
    }));
    held.extend(custom[..tried_custom].iter().map(|w| WriterRecord {
        kind: "custom".into(),
        name: w.name.clone(),
        details: Default::default(),
    }));
    if !writers.is_empty() {
        let names: Vec<String> = writers.iter().map(|w| w.name()).collect();
        tracing::info!("froze and thawed: {}", names.join(", "));
    }
    // If the snapshot failed, no data is read.
    let Capture { mut volumes, coherent, instant, gate_closed_ms, capture_ms } = opened?;
    // `--vm-live`: the running VMs' backup jobs begin right after the volumes' snapshot.
    let snapshot = SnapshotId::random();
    let live_setup = match vms.as_ref().filter(|v| !v.live_uuids().is_empty()) {
        Some(v) => Some(LiveSetup::new(repo, opts, v.libvirt().clone())?),
        None => None,
    };
    let mut live_vms = Vec::new();
    if let (Some(v), Some(setup)) = (vms.as_ref(), live_setup.as_ref()) {
        let mut names: Vec<String> = volumes.iter().map(|ov| ov.name.clone()).collect();
        let ctx = setup.context(repo, &index, &snapshot, progress);
        for uuid in v.live_uuids() {
            let domain = rime_virt::domains::get(v.libvirt(), &uuid)?;
            live_vms.push(ctx.begin(&domain, &mut names, &mut warn)?);
        }
    }
    // The VM files the volumes do not hold go into the snapshot beside them.
    let imaged = volumes.len();
    if let Some(v) = vms.as_ref() {
        for (name, host_path, read_from) in v.carried() {
            volumes.push(OpenVolume::carried(&host_path, &read_from, name)?);
        }
    }
    tracing::info!("captured in {capture_ms:.0} ms: {instant}");
    held.retain(|r| !failed_writers.contains(&r.name));
    for n in &not_held {
        warn(format!("{n}; its data is only crash-consistent in this snapshot (--freeze try)"));
    }
    let consistency =
        Consistency { coherent, instant, freeze_window_ms, gate_closed_ms, capture_ms, writers: held, not_held };
    // 4. Read: decide the maps.
    // The volumes mapped by their contents are mapped together: a volume group may span them.
    let mapped: Vec<usize> = (0..volumes.len()).filter(|&i| !volumes[i].carried && !opts.all_blocks).collect();
    let regions: Vec<_> = mapped.iter().map(|&i| volumes[i].volume.region()).collect();
    let mut by_contents = layout::map_volumes(&regions, &opts.map_options).into_iter();
    let mut layouts = Vec::new();
    for ov in &volumes {
        let mut layout = if ov.carried {
            layout::all_blocks("a VM file carried into the snapshot")
        } else if opts.all_blocks {
            layout::all_blocks("all blocks (--all-blocks)")
        } else {
            by_contents
                .next()
                .expect("one layout per mapped volume")
                .with_context(|| format!("{}", ov.volume.path.display()))?
        };
        layout.warnings.drain(..).for_each(&mut warn);
        layouts.push(layout);
    }
    let mut exclusion_warnings = Vec::new();
    let excluded = crate::exclusions::apply(&mut layouts, &opts.exclude_files, &mut exclusion_warnings)?;
    exclusion_warnings.into_iter().for_each(&mut warn);
    // Protected volumes: the map is final now; narrow their snapshots' protection areas.
    let mut online = Vec::new();
    for (ov, layout) in volumes.iter().zip(layouts.iter_mut()) {
        online.push(match &ov.online {
            Some(source) => Some(crate::online::prepare(repo, &index, source.clone(), &ov.volume, &mut layout.map)?),
            None => None,
        });
    }
    let mut planned: Vec<Planned> = volumes
        .into_iter()
        .zip(layouts)
        .zip(excluded)
        .zip(online.iter_mut())
        .map(|(((volume, layout), excluded), online)| {
            let note = online.as_ref().map(|o| o.describe());
            Planned { volume, layout, excluded, note, reuse: online.as_mut().and_then(|o| o.reuse()) }
        })
        .collect();
    planned.extend(live_vms.iter_mut().flat_map(|v| v.planned()));

    // 5. Write: packs, then one volume index per volume.
    ctx.snapshot_id = Some(snapshot.0.clone());
    let mut sink = PackSink::new(repo.backend.clone(), index, repo.config.pack_size as u64);
    let result = archive_all(repo, opts.compression, opts.threads, planned, 0, &snapshot, &mut sink, progress);
    let result = result.and_then(|done| sink.flush().map(|_| done));
    // With --vm-resume after-backup, the VMs run again once all data is written.
    if let Some(v) = vms.as_mut() {
        v.resume();
    }
    let entries = match result {
        Ok((entries, map_warnings)) => {
            map_warnings.into_iter().for_each(&mut warn);
            entries
        }
        Err(e) => {
            let published = sink.abandon();
            drop(lock);
            cleanup_failed(repo, &snapshot, &published, started);
            return Err(e);
        }
    };
    // 6. Publish: the manifest makes the snapshot exist.
    let mut vm_record = vms.as_ref().map(|v| {
        let names = opts.volumes.iter().zip(&entries[..imaged]);
        v.record(&names.map(|(p, e)| (p.display().to_string(), e.name.clone())).collect())
    });
    let mut live_done = Vec::new();
    for vm in live_vms {
        let disks = vm.disk_files(&entries);
        let uuid = vm.uuid().to_string();
        let (live, done) = vm.finish()?;
        if let Some(section) = vm_record.as_mut() {
            crate::vms::backup::apply_live(section, &uuid, live, disks);
        }
        live_done.push(done);
    }
    if let Some(setup) = &live_setup {
        crate::vms::live::keep_maps(&setup.maps, &live_done, &mut warn);
    }
    let manifest =
        new_manifest(&snapshot, opts.host.clone(), opts.tags.clone(), entries, started, consistency, vm_record);
    // An interruption's undo may have thawed the filesystems before the snapshot: never publish.
    if let Err(e) = publish(repo, &manifest, sink, lock, started) {
        if let Some(setup) = &live_setup {
            crate::vms::live::forget_maps(&setup.maps, &live_done);
        }
        return Err(e);
    }
    if let Some(setup) = &live_setup {
        crate::vms::live::delete_superseded(&setup.lv, &setup.maps, &live_done, &mut warn);
    }
    for o in online.iter().flatten() {
        if let Err(e) = o.finish(&snapshot.0) {
            warn(format!(
                "backup succeeded, but rime serve did not take note of it (the next backup reads everything): {e:#}"
            ));
        }
    }
    let errors = vms.map(|v| std::mem::take(&mut v.resume_errors)).unwrap_or_default();
    Ok(BackupSummary { snapshot: snapshot.0, manifest, forgotten: Vec::new(), pruned: None, warnings, errors })
}

/// What `--vm-live` needs for the running VMs of a `--vm-aware` backup.
struct LiveSetup {
    lv: rime_virt::Libvirt,
    opts: crate::vms::live::LiveOptions,
    maps: crate::vms::used_maps::UsedMaps,
    manifests: Vec<Manifest>,
}

impl LiveSetup {
    fn new(repo: &Repository, opts: &BackupOptions, lv: rime_virt::Libvirt) -> Result<LiveSetup> {
        let live = crate::vms::live::LiveOptions {
            names: Vec::new(),
            require_agent: false,
            tags: opts.tags.clone(),
            compression: opts.compression,
            threads: opts.threads,
            host: opts.host.clone(),
            map_options: opts.map_options,
            scratch_dir: crate::vms::live::DEFAULT_SCRATCH_DIR.into(),
        };
        let (manifests, _) = repo.manifests()?;
        Ok(LiveSetup { lv, opts: live, maps: crate::vms::used_maps::UsedMaps::open(), manifests })
    }

    fn context<'a>(
        &'a self,
        repo: &'a Repository,
        index: &'a Arc<rime_repo::ChunkIndex>,
        snapshot: &'a SnapshotId,
        progress: &'a dyn Progress,
    ) -> crate::vms::live::VmContext<'a> {
        crate::vms::live::VmContext {
            repo,
            index,
            lv: &self.lv,
            opts: &self.opts,
            maps: &self.maps,
            snapshot,
            manifests: &self.manifests,
            progress,
        }
    }
}

/// A volume with its map decided.
pub(crate) struct Planned<'a> {
    pub volume: OpenVolume,
    pub layout: layout::Layout,
    pub excluded: Vec<rime_repo::snapshot::ExcludedFile>,
    /// How it was captured, appended to the map's description in the manifest.
    pub note: Option<String>,
    /// What an incremental backup takes from an earlier snapshot instead of the volume.
    pub reuse: Option<&'a mut crate::incremental::Reuse>,
}

/// Images each planned volume in turn (its snapshot volume number is `first_number` plus its
/// place in `planned`),
/// returning their manifest entries and the maps' warnings.
#[allow(clippy::too_many_arguments)]
pub(crate) fn archive_all(
    repo: &Repository,
    compression: Compression,
    threads: usize,
    planned: Vec<Planned<'_>>,
    first_number: usize,
    snapshot: &SnapshotId,
    sink: &mut PackSink,
    progress: &dyn Progress,
) -> Result<(Vec<VolumeEntry>, Vec<String>)> {
    let mut warnings = Vec::new();
    let chunk_size = repo.config.chunk_size;
    let mut entries = Vec::new();
    for (i, Planned { volume: ov, layout, excluded, note, reuse }) in planned.into_iter().enumerate() {
        let number = first_number + i;
        let volume = &ov.volume;
        let filesystem = layout.map.filesystem().map(str::to_string);
        let mut map = layout.map;
        let mut map_description = map.describe();
        if let Some(n) = note {
            map_description = format!("{map_description}; {n}");
        }
        if ov.reflink.is_some() {
            map_description = format!("{map_description}; point-in-time reflink clone of the image in use");
        }
        let mut prior = reuse.map(|r| r.prior_fn());
        let mut vidx = VolumeIndexWriter::create(repo.backend.as_ref(), chunk_size, volume.size)?;
        progress.begin(&ov.name, volume.size);
        let input = ArchiveInput {
            volume,
            map: map.as_mut(),
            chunk_size,
            compression,
            threads,
            prior: prior.as_mut().map(|f| f as &mut (dyn FnMut(u64) -> Result<Option<crate::archive::Prior>> + Send)),
        };
        let stats = match archive_volume(input, sink, &mut vidx, progress) {
            Ok(stats) => stats,
            Err(e) => {
                vidx.abandon();
                progress.end();
                return Err(e.context(format!("backing up {}", volume.path.display())));
            }
        };
        progress.end();
        for w in map.take_warnings() {
            let w = format!("{}: {w}", volume.path.display());
            progress.warn(&w);
            warnings.push(w);
        }
        let index_path = volume_index_path(snapshot, number);
        let digest = vidx.finish(repo.backend.as_ref(), &index_path)?;
        entries.push(VolumeEntry {
            name: ov.name.clone(),
            source: volume.path.display().to_string(),
            kind: if ov.carried { rime_repo::VM_FILE_KIND.to_string() } else { volume.kind.as_str() },
            provider: Some(ov.provider.name().to_string()),
            captured_at: ov.captured_at,
            size: volume.size,
            chunk_size,
            filesystem,
            map: map_description,
            used_bytes: stats.used_bytes,
            read_bytes: stats.read_bytes,
            added_bytes: stats.added_bytes,
            chunks: stats.chunks,
            zero_chunks: stats.zero_chunks,
            new_chunks: stats.new_chunks,
            excluded,
            partition_table: layout.table,
            partitions: layout
                .partitions
                .into_iter()
                .map(|p| PartitionEntry {
                    number: p.partition.number,
                    start: p.partition.start,
                    size: p.partition.len,
                    type_id: p.partition.type_id,
                    name: p.partition.name,
                    filesystem: p.filesystem,
                    map: p.map,
                    lvm: p.lvm.map(|pv| storage_stack::pv_entry(pv, &format!("{}:{}", ov.name, p.partition.number))),
                    encrypted: p.encrypted.map(storage_stack::encryption_entry),
                })
                .collect(),
            lvm: layout.lvm.map(|pv| storage_stack::pv_entry(pv, &ov.name)),
            encrypted: layout.encrypted.map(storage_stack::encryption_entry),
            index: index_path,
            index_digest: digest,
        });
    }
    Ok((entries, warnings))
}

/// The manifest of a backup that started at `started` and is about to be published.
pub(crate) fn new_manifest(
    snapshot: &SnapshotId,
    host: String,
    tags: Vec<String>,
    volumes: Vec<VolumeEntry>,
    started: Instant,
    consistency: Consistency,
    vms: Option<rime_repo::VmSection>,
) -> Manifest {
    Manifest {
        format_version: rime_repo::FORMAT_VERSION,
        id: snapshot.0.clone(),
        time: chrono::Utc::now(),
        host,
        tags,
        volumes,
        duration: started.elapsed().as_secs_f64(),
        rime_version: env!("CARGO_PKG_VERSION").to_string(),
        consistency: Some(consistency),
        vms,
    }
}

/// The shared lock a backup holds until its manifest is written, and the chunk index it
/// deduplicates against (unreadable pack indexes are warnings).
pub(crate) fn lock_and_load_index(
    repo: &Repository,
    warn: &mut dyn FnMut(String),
) -> Result<(rime_repo::lock::RepoLock, Arc<rime_repo::ChunkIndex>)> {
    let lock = repo.lock(LockMode::Shared, "backup", Duration::from_secs(30))?;
    let (index, bad) = repo.load_index()?;
    for b in bad {
        warn(format!("ignoring unreadable pack index {}: {}", b.path, b.reason));
    }
    Ok((lock, Arc::new(index)))
}

/// Writes the manifest (unless the backup was interrupted: an interruption's undo may have
/// thawed what the snapshot needed frozen), then releases the lock. On failure everything the
/// backup wrote is removed, so the repository is as it was.
pub(crate) fn publish(
    repo: &Repository,
    manifest: &Manifest,
    sink: PackSink,
    lock: rime_repo::lock::RepoLock,
    started: Instant,
) -> Result<()> {
    let saved = match crate::interrupt::interrupted() {
        true => Err(anyhow::anyhow!("interrupted")),
        false => repo.save_manifest(manifest),
    };
    if let Err(e) = saved {
        let published = sink.abandon();
        drop(lock);
        let snapshot = SnapshotId(manifest.id.clone());
        cleanup_failed(repo, &snapshot, &published, started);
        return Err(e.context("writing the snapshot manifest"));
    }
    drop(lock);
    Ok(())
}

/// Removes what a failed backup published, so the repository is as it was. A pack is removed
/// only when no snapshot made since this backup started references it: a concurrent backup may
/// have deduplicated against it. Needs the exclusive lock; if another backup holds the shared
/// lock, the leftovers stay for `prune`.
pub(crate) fn cleanup_failed(repo: &Repository, snapshot: &SnapshotId, published: &[FinishedPack], started: Instant) {
    let Ok(_lock) = repo.lock(LockMode::Exclusive, "backup (removing what it wrote)", Duration::ZERO) else {
        return;
    };
    let _ = repo.remove_snapshot(snapshot);
    if published.is_empty() {
        return;
    }
    let since = chrono::Utc::now() - chrono::Duration::from_std(started.elapsed()).unwrap_or_default();
    let result = (|| -> Result<()> {
        let (all, bad) = repo.manifests()?;
        if !bad.is_empty() {
            bail!("unreadable manifests");
        }
        let recent: Vec<Manifest> = all.into_iter().filter(|m| m.time >= since).collect();
        let referenced = crate::references::referenced_ids(repo, &recent)?;
        for pack in published {
            if pack.entries.iter().any(|e| referenced.contains(&e.id)) {
                continue;
            }
            repo.backend.remove(&index_path(&pack.id)).context("remove pack index")?;
            repo.backend.remove(&pack_path(&pack.id)).context("remove pack")?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("could not remove the failed backup's packs ({e:#}); `rime prune` will");
    }
}
