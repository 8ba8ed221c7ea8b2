//! `rime backup --vm NAME...`: VMs backed up while they run, through libvirt's backup API in
//! pull mode, into one snapshot (docs/VMS.md, "Live backup").
//!
//! Per VM, in a straight line: find the checkpoint chain (Rime's own checkpoints for this
//! repository; one a backup created but never completed is deleted) → choose per disk between
//! full and incremental → freeze the guest's filesystems if its agent answers → begin the pull
//! backup, which creates the new checkpoint at the same instant → thaw → for each disk, read its
//! point-in-time export with Rime's NBD client: the partition table and filesystems through the
//! export, only used blocks that do not read as zeros, and for an incremental only the chunks
//! whose blocks the dirty bitmap marks → end the job. Then one manifest for all VMs; only after
//! it is written are the older checkpoints deleted.
//!
//! A VM that is shut off or saved is imaged from its disk files, nothing stopped.
//!
//! Invariants: a checkpoint is the base of an incremental only if a snapshot of this repository
//! records it and the used-block maps saved with it are intact; anything else (deleted by hand,
//! VM redefined, disk replaced or resized, libvirt refusing the bitmap) falls back to a full
//! backup of that disk with a warning, never to a wrong incremental. The backup job ends and the
//! guest is thawed on every path (drop guards). A failed backup leaves the repository as it was
//! and the previous checkpoint as the base of the next incremental.

use super::allocation::{self, SkipZeros, BASE_ALLOCATION};
use super::backup::carried_name;
use super::used_maps::UsedMaps;
use crate::archive::PackSink;
use crate::capture::OpenVolume;
use crate::commands::backup::{archive_all, BackupSummary, Planned};
use crate::error::CommandError;
use crate::incremental::{Materialized, Reuse};
use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use rime_nbd::NbdClient;
use rime_repo::lock::LockMode;
use rime_repo::{
    ChunkIndex, Compression, Consistency, FileInSnapshot, LiveBackupRecord, LiveDiskRecord, Manifest, Repository,
    SnapshotId, VmFileRecord, VmRecord, VmSection,
};
use rime_snapshot::Bitmap;
use rime_virt::checkpoints::{self, Checkpoint};
use rime_virt::files::Role;
use rime_virt::pull_backup::{self, PullBackup, PullDisk};
use rime_virt::{agent, domains, Domain, Libvirt, State};
use rime_volume::{layout, Volume, VolumeKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Granularity of the used-block maps kept with checkpoints and of the dirty bitmaps as Rime
/// reads them.
const BLOCK: u64 = 4096;

#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// VM names (or UUIDs).
    pub names: Vec<String>,
    /// Fail rather than take a crash-consistent backup of a running VM whose agent does not
    /// answer.
    pub require_agent: bool,
    pub tags: Vec<String>,
    pub compression: Compression,
    pub threads: usize,
    pub host: String,
    pub map_options: rime_volume::fs::MapOptions,
    /// Where QEMU keeps the old data of blocks guests overwrite during the backup.
    pub scratch_dir: PathBuf,
}

/// A disk of a VM to back up.
struct DiskPlan {
    target: String,
    /// The host file (or device).
    source: String,
    format: String,
    /// Incremental from the base, with its base volume's name; or why not.
    incremental: Result<String, String>,
}

/// What the chain of checkpoints offers one VM.
struct Chain {
    /// The newest checkpoint a snapshot of this repository records, with that snapshot.
    base: Option<(Checkpoint, Manifest)>,
    /// Every checkpoint of ours that a snapshot records (deleted once a newer one is done).
    completed: Vec<String>,
}

/// One VM's part of the snapshot, done.
struct VmDone {
    record: VmRecord,
    /// The checkpoint created, its used-block maps (per disk), kept once the manifest exists.
    checkpoint: Option<String>,
    maps: Vec<(String, Bitmap)>,
    /// Checkpoints to delete once the manifest exists.
    superseded: Vec<String>,
    uuid: String,
}

pub fn backup_vms(repo: &Repository, opts: &LiveOptions, progress: &dyn Progress) -> Result<BackupSummary> {
    if opts.names.is_empty() {
        bail!("no VM to back up");
    }
    let started = Instant::now();
    let lv = Libvirt::connect()?;
    let all = domains::list(&lv)?;
    let mut chosen: Vec<&Domain> = Vec::new();
    for name in &opts.names {
        let d = all
            .iter()
            .find(|d| &d.name == name)
            .or_else(|| all.iter().find(|d| d.uuid.eq_ignore_ascii_case(name)))
            .ok_or_else(|| rime_virt::control::no_such(name))?;
        if !chosen.iter().any(|c| c.uuid == d.uuid) {
            chosen.push(d);
        }
    }
    let mut warnings = Vec::new();
    let mut warn = |w: String| {
        progress.warn(&w);
        warnings.push(w);
    };

    let lock = repo.lock(LockMode::Shared, "backup", Duration::from_secs(30))?;
    let (index, bad) = repo.load_index()?;
    for b in bad {
        warn(format!("ignoring unreadable pack index {}: {}", b.path, b.reason));
    }
    let index = Arc::new(index);
    let (manifests, _) = repo.manifests()?;
    let maps = UsedMaps::open();
    let snapshot = SnapshotId::random();
    let mut sink = PackSink::new(repo.backend.clone(), index.clone(), repo.config.pack_size as u64);
    let mut entries = Vec::new();
    let mut done: Vec<VmDone> = Vec::new();
    let mut names_taken: Vec<String> = Vec::new();
    let mut failure = None;
    for domain in &chosen {
        let ctx = VmContext {
            repo,
            index: &index,
            lv: &lv,
            opts,
            maps: &maps,
            snapshot: &snapshot,
            manifests: &manifests,
            progress,
        };
        match ctx.back_up(domain, &mut sink, entries.len(), &mut names_taken, &mut warn) {
            Ok((vm_entries, vm)) => {
                entries.extend(vm_entries);
                done.push(vm);
            }
            Err(e) => {
                failure = Some(e.context(format!("backing up VM {:?}", domain.name)));
                break;
            }
        }
    }
    let flushed = match failure {
        Some(e) => Err(e),
        None => sink.flush().map(drop),
    };
    if let Err(e) = flushed {
        let published = sink.abandon();
        drop(lock);
        crate::commands::backup::cleanup_failed(repo, &snapshot, &published, started);
        return Err(e);
    }
    // The maps of the new checkpoints go first: a checkpoint a manifest records always has them.
    for vm in &done {
        if let Some(c) = &vm.checkpoint {
            for (target, used) in &vm.maps {
                if let Err(e) = maps.save(&vm.uuid, c, target, BLOCK, used) {
                    warn(format!("could not keep the used-block map of {target} ({e:#}): its next backup is full"));
                }
            }
        }
    }
    let manifest = Manifest {
        format_version: rime_repo::FORMAT_VERSION,
        id: snapshot.0.clone(),
        time: chrono::Utc::now(),
        host: opts.host.clone(),
        tags: opts.tags.clone(),
        volumes: entries,
        duration: started.elapsed().as_secs_f64(),
        rime_version: env!("CARGO_PKG_VERSION").to_string(),
        consistency: Some(Consistency {
            coherent: done.len() <= 1,
            instant: match done.len() {
                1 => "one VM's disks at the instant its backup job began".into(),
                n => format!("{n} VMs, each at the instant its own backup job began"),
            },
            ..Consistency::default()
        }),
        vms: Some(VmSection {
            criterion: "named".into(),
            media: false,
            resume: "not stopped".into(),
            uri: lv.uri().to_string(),
            domains: done.iter().map(|d| d.record.clone()).collect(),
        }),
    };
    let saved = match crate::interrupt::interrupted() {
        true => Err(anyhow!("interrupted")),
        false => repo.save_manifest(&manifest),
    };
    if let Err(e) = saved {
        let published = sink.abandon();
        drop(lock);
        crate::commands::backup::cleanup_failed(repo, &snapshot, &published, started);
        for vm in &done {
            if let Some(c) = &vm.checkpoint {
                maps.forget(&vm.uuid, c);
            }
        }
        return Err(e.context("writing the snapshot manifest"));
    }
    drop(lock);
    // The new checkpoints are the bases now: the older ones of this repository go.
    for vm in &done {
        for old in &vm.superseded {
            match checkpoints::delete(&lv, &vm.uuid, old) {
                Ok(()) => maps.forget(&vm.uuid, old),
                Err(e) => {
                    warn(format!("VM {:?}: could not delete the superseded checkpoint {old}: {e}", vm.record.name))
                }
            }
        }
    }
    Ok(BackupSummary {
        snapshot: snapshot.0,
        manifest,
        forgotten: Vec::new(),
        pruned: None,
        warnings,
        errors: Vec::new(),
    })
}

struct VmContext<'a> {
    repo: &'a Repository,
    index: &'a Arc<ChunkIndex>,
    lv: &'a Libvirt,
    opts: &'a LiveOptions,
    maps: &'a UsedMaps,
    snapshot: &'a SnapshotId,
    manifests: &'a [Manifest],
    progress: &'a dyn Progress,
}

impl VmContext<'_> {
    fn back_up(
        &self,
        domain: &Domain,
        sink: &mut PackSink,
        first_volume: usize,
        names_taken: &mut Vec<String>,
        warn: &mut dyn FnMut(String),
    ) -> Result<(Vec<rime_repo::VolumeEntry>, VmDone)> {
        let uuid = domain.uuid.as_str();
        let running = matches!(domain.state.state, State::Running | State::Paused | State::Blocked);
        let mut vm_warnings = Vec::new();
        let mut note = |w: String, vm_warnings: &mut Vec<String>| {
            warn(format!("VM {:?}: {w}", domain.name));
            vm_warnings.push(w);
        };
        // The disks, with what the chain offers each.
        let chain = self.chain(domain, &mut |w| note(w, &mut vm_warnings))?;
        let mut disks = self.plan_disks(domain, &chain)?;
        if disks.is_empty() {
            bail!("VM {:?} has no disk Rime can read (local files or block devices)", domain.name);
        }
        for d in &disks {
            if let Err(why) = &d.incremental {
                // A raw disk is always full (the snapshot says why); only a broken chain warns.
                if chain.base.is_some() && d.format == "qcow2" {
                    note(format!("{}: full backup: {why}", d.target), &mut vm_warnings);
                }
            }
        }
        // The carried files: the definition (as libvirt would start it) and NVRAM.
        let staging = tempfile::Builder::new().prefix("rime-vm-").tempdir_in(staging_parent())?;
        let mut carried: Vec<(Role, String, PathBuf)> = Vec::new();
        let xml = if domain.persistent { domains::definition(self.lv, uuid)? } else { domain.xml.clone() };
        let xml_copy = staging.path().join("domain.xml");
        std::fs::write(&xml_copy, xml.as_bytes())?;
        let xml_host = rime_virt::files::LibvirtDirs::of(self.lv).domain_xml(&domain.name);
        carried.push((Role::DomainXml, xml_host.display().to_string(), xml_copy));
        // A VM never started has no NVRAM file yet (libvirt makes it from its template).
        if let Some(nvram) = domain.parsed.nvram.as_ref().filter(|n| Path::new(n).exists()) {
            let copy = staging.path().join("nvram");
            std::fs::copy(nvram, &copy).with_context(|| format!("copying NVRAM {nvram}"))?;
            carried.push((Role::Nvram, nvram.clone(), copy));
        }

        let (mut opened, job, checkpoint, consistency) = if running {
            self.open_live(domain, &mut disks, &chain, &mut |w| note(w, &mut vm_warnings))?
        } else {
            let opened = self.open_offline(domain, &mut disks)?;
            let why = format!("{}: read from its disk files, nothing stopped", domain.state.label());
            (opened, None, None, ("crash-consistent".to_string(), why))
        };

        // Map each disk through its export, then image it.
        let mut planned_disks = Vec::new();
        let mut used_maps = Vec::new();
        let mut reuses: Vec<Option<Reuse>> = Vec::new();
        let mut disk_records = Vec::new();
        for (d, (volume, client, dirty)) in disks.iter().zip(opened.drain(..)) {
            let mut layout = layout::map_volume(&volume.region(), &self.opts.map_options)
                .with_context(|| format!("mapping disk {} of VM {:?}", d.target, domain.name))?;
            if let Some(c) = &client {
                layout.map = Box::new(SkipZeros::new(std::mem::replace(&mut layout.map, Box::new(NoMap)), c.clone()));
            }
            let (used, partial) = (Bitmap::new(volume.size.div_ceil(BLOCK)), Bitmap::new(volume.size.div_ceil(BLOCK)));
            let materialized = Materialized::build(layout.map.as_mut(), volume.size, BLOCK, &used, &partial)
                .with_context(|| format!("mapping the used blocks of disk {}", d.target))?;
            layout.map = Box::new(materialized);
            let reuse = match (&d.incremental, &client, &dirty, &chain.base) {
                (Ok(base_volume), Some(c), Some(ctx), Some((cp, base))) => {
                    let base_of = Base { volume: base_volume, checkpoint: cp, snapshot: base };
                    self.reuse(domain, d, &base_of, c, ctx, &used, &partial, volume.size)?
                }
                _ => None,
            };
            let mode = if reuse.is_some() { "incremental" } else { "full" };
            let reason = match (&d.incremental, reuse.is_some()) {
                (Err(why), _) => Some(why.clone()),
                (Ok(_), false) => Some("the earlier snapshot offers nothing to reuse".to_string()),
                _ => None,
            };
            let name = unique_name(&domain.name, &d.target, names_taken);
            disk_records.push(LiveDiskRecord {
                target: d.target.clone(),
                volume: name.clone(),
                mode: mode.into(),
                reason,
            });
            used_maps.push((d.target.clone(), used));
            reuses.push(reuse);
            planned_disks.push((OpenVolume::vm_disk(volume, name.clone()), layout));
        }
        let mut planned: Vec<Planned> = Vec::new();
        for ((ov, layout), reuse) in planned_disks.into_iter().zip(reuses.iter_mut()) {
            let note = Some(match (&job, reuse.as_ref()) {
                (Some(_), Some(r)) => format!("live through libvirt's backup API; {}", r.describe()),
                (Some(_), None) => "live through libvirt's backup API".to_string(),
                (None, _) => "from the disk file of a VM that was not running".to_string(),
            });
            planned.push(Planned { volume: ov, layout, excluded: Vec::new(), note, reuse: reuse.as_mut() });
        }
        for (role, host, read_from) in &carried {
            let ov = OpenVolume::carried(Path::new(host), read_from, carried_name(uuid, *role))?;
            planned.push(Planned {
                volume: ov,
                layout: layout::all_blocks("a VM file carried into the snapshot"),
                excluded: Vec::new(),
                note: None,
                reuse: None,
            });
        }
        let (vm_entries, map_warnings) = archive_all(
            self.repo,
            self.opts.compression,
            self.opts.threads,
            planned,
            first_volume,
            self.snapshot,
            sink,
            self.progress,
        )?;
        for w in map_warnings {
            note(w, &mut vm_warnings);
        }
        if let Some(mut j) = job {
            j.end()?;
        }
        let mut files = Vec::new();
        files.push(file(Role::DomainXml, &carried[0].1, None, None, whole(carried_name(uuid, Role::DomainXml)), None));
        for (d, rec) in disks.iter().zip(&disk_records) {
            let size = vm_entries.iter().find(|e| e.name == rec.volume).map(|e| e.size);
            let at = whole(rec.volume.clone());
            files.push(file(Role::Disk, &d.source, Some(d.target.clone()), size, at, Some(d.format.clone())));
        }
        if let Some((_, host, _)) = carried.iter().find(|c| c.0 == Role::Nvram) {
            files.push(file(Role::Nvram, host, None, None, whole(carried_name(uuid, Role::Nvram)), None));
        }
        let state = domain.state.label().to_string();
        let live = LiveBackupRecord {
            method: if running { "libvirt-pull" } else { "disk-files" }.into(),
            checkpoint: checkpoint.clone(),
            base_snapshot: chain
                .base
                .as_ref()
                .map(|(_, m)| m.id.clone())
                .filter(|_| disk_records.iter().any(|r| r.mode == "incremental")),
            base_checkpoint: chain
                .base
                .as_ref()
                .map(|(c, _)| c.name.clone())
                .filter(|_| disk_records.iter().any(|r| r.mode == "incremental")),
            consistency: consistency.0,
            consistency_detail: consistency.1,
            disks: disk_records,
        };
        let record = VmRecord {
            name: domain.name.clone(),
            uuid: uuid.to_string(),
            state: state.clone(),
            state_in_snapshot: state,
            coverage: "full".into(),
            persistent: domain.persistent,
            action: if running {
                "backed up while running (libvirt backup API, pull mode)".into()
            } else {
                "backed up from its disk files".into()
            },
            interruption_ms: None,
            complete: true,
            files,
            warnings: vm_warnings,
            live: Some(live),
        };
        // Once this snapshot exists, the checkpoints it supersedes go; without a new one (raw
        // disks only, or a VM not running) the chain stays as it was.
        let superseded = if checkpoint.is_some() { chain.completed.clone() } else { Vec::new() };
        let done = VmDone { record, checkpoint, maps: used_maps, superseded, uuid: uuid.to_string() };
        Ok((vm_entries, done))
    }

    /// Rime's checkpoints of this VM for this repository: the ones a snapshot records, and the
    /// newest of those as the base. Ours that no snapshot records were left by a backup that
    /// failed or was killed: they are deleted (libvirt merges their bitmaps into their parent's,
    /// so the base stays exact).
    fn chain(&self, domain: &Domain, warn: &mut dyn FnMut(String)) -> Result<Chain> {
        let owner = &self.repo.config.id;
        let recorded = |name: &str| {
            self.manifests
                .iter()
                .filter(|m| {
                    m.vms.as_ref().is_some_and(|s| {
                        s.domains.iter().any(|v| {
                            v.uuid == domain.uuid && v.live.as_ref().and_then(|l| l.checkpoint.as_deref()) == Some(name)
                        })
                    })
                })
                .max_by_key(|m| m.time)
                .cloned()
        };
        let listed = if matches!(domain.state.state, State::Running | State::Paused | State::Blocked | State::ShutOff) {
            checkpoints::list(self.lv, &domain.uuid)?
        } else {
            checkpoints::list(self.lv, &domain.uuid).unwrap_or_default()
        };
        let mut base: Option<(Checkpoint, Manifest)> = None;
        let mut completed = Vec::new();
        for c in listed.into_iter().filter(|c| checkpoints::is_ours(&c.name, owner)) {
            match recorded(&c.name) {
                Some(m) => {
                    completed.push(c.name.clone());
                    if base.as_ref().is_none_or(|(b, _)| b.created <= c.created) {
                        base = Some((c, m));
                    }
                }
                None => {
                    warn(format!(
                        "deleting checkpoint {}: no snapshot of this repository records it (a backup that did not complete, or a snapshot since forgotten)",
                        c.name
                    ));
                    checkpoints::delete(self.lv, &domain.uuid, &c.name)?;
                    self.maps.forget(&domain.uuid, &c.name);
                }
            }
        }
        if base.is_none() {
            // The newest snapshot of this VM names a checkpoint libvirt no longer has.
            let newest = self
                .manifests
                .iter()
                .filter_map(|m| {
                    let vm = m.vms.as_ref()?.domains.iter().find(|v| v.uuid == domain.uuid)?;
                    Some((m.time, vm.live.as_ref()?.checkpoint.clone()?))
                })
                .max();
            if let Some((_, name)) = newest {
                warn(format!(
                    "checkpoint {name} of its last backup is gone from libvirt (deleted, or the VM was redefined): full backup"
                ));
            }
        }
        Ok(Chain { base, completed })
    }

    /// The VM's disks Rime reads, each with whether it can be incremental.
    fn plan_disks(&self, domain: &Domain, chain: &Chain) -> Result<Vec<DiskPlan>> {
        let mut out = Vec::new();
        for disk in domain.parsed.disks.iter().filter(|d| matches!(d.device.as_str(), "disk" | "lun")) {
            let (Some(target), Some(source)) = (&disk.target, &disk.source) else {
                bail!(
                    "VM {:?} has a disk Rime cannot read ({}): only local files and block devices",
                    domain.name,
                    disk.network.as_deref().unwrap_or(&disk.kind)
                );
            };
            let format = disk.format.clone().unwrap_or_else(|| "raw".into());
            let incremental = match &chain.base {
                None => Err("no earlier checkpoint of this repository".to_string()),
                Some(_) if format != "qcow2" => Err(format!("a {format} disk keeps no persistent dirty bitmap")),
                Some((cp, m)) => self.base_volume(domain, target, source, cp, m),
            };
            out.push(DiskPlan { target: target.clone(), source: source.clone(), format, incremental });
        }
        Ok(out)
    }

    /// The volume of `base` holding this disk, if the disk can count its changes from there.
    fn base_volume(
        &self,
        domain: &Domain,
        target: &str,
        source: &str,
        cp: &Checkpoint,
        base: &Manifest,
    ) -> Result<String, String> {
        if !cp.bitmaps.iter().any(|(t, _)| t == target) {
            return Err(format!("checkpoint {} tracks no changes on it", cp.name));
        }
        let vm = base.vms.as_ref().and_then(|s| s.domains.iter().find(|v| v.uuid == domain.uuid));
        let live = vm.and_then(|v| v.live.as_ref()).ok_or("the base snapshot has no record of it")?;
        let rec = live.disks.iter().find(|d| d.target == target).ok_or("the base snapshot did not back it up")?;
        let file = vm.and_then(|v| v.files.iter().find(|f| f.role == "disk" && f.target.as_deref() == Some(target)));
        if file.is_none_or(|f| f.path != source) {
            return Err("it is another file than in the base snapshot (disk replaced)".into());
        }
        Ok(rec.volume.clone())
    }

    /// Begins the pull backup (freezing the guest around its start when the agent answers) and
    /// connects to each disk's export. Returns the volumes, the job, the new checkpoint and the
    /// consistency reached.
    fn open_live(
        &self,
        domain: &Domain,
        disks: &mut [DiskPlan],
        chain: &Chain,
        warn: &mut dyn FnMut(String),
    ) -> Result<LiveOpened> {
        let uuid = &domain.uuid;
        self.end_abandoned_job(domain, warn)?;
        // The socket and the scratch files live where QEMU (another user) may write.
        let work = self.opts.scratch_dir.join(format!("{}-{}", uuid, std::process::id()));
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let work_guard = RemoveOnDrop(work.clone());
        open_to_qemu(&work)?;
        let socket = work.join("nbd.sock");
        let checkpoint = disks
            .iter()
            .any(|d| d.format == "qcow2")
            .then(|| checkpoints::new_name(&self.repo.config.id, std::time::SystemTime::now()));
        let checkpoint_xml = checkpoint.as_ref().map(|name| {
            let marks: Vec<(String, bool)> = domain
                .parsed
                .disks
                .iter()
                .filter_map(|d| {
                    d.target.clone().map(|t| {
                        (t, disks.iter().any(|p| p.target == *d.target.as_ref().unwrap() && p.format == "qcow2"))
                    })
                })
                .collect();
            checkpoints::xml(name, &marks)
        });
        let pull: Vec<PullDisk> = disks
            .iter()
            .map(|d| PullDisk {
                target: d.target.clone(),
                incremental: d.incremental.is_ok(),
                scratch: work.join(format!("{}.scratch", d.target.replace('/', "_"))),
            })
            .collect();
        let base =
            chain.base.as_ref().map(|(c, _)| c.name.clone()).filter(|_| disks.iter().any(|d| d.incremental.is_ok()));

        // Application consistency: the agent freezes the guest's filesystems for the instant.
        let agent = agent::ping(self.lv, uuid);
        if let (Err(e), true) = (&agent, self.opts.require_agent) {
            return Err(CommandError::Vm(format!(
                "VM {:?}: the guest agent does not answer ({e}) and --require-agent was given",
                domain.name
            ))
            .into());
        }
        let frozen = match &agent {
            Ok(()) => match agent::freeze(self.lv, uuid) {
                Ok(f) => Some(f),
                Err(e) if self.opts.require_agent => {
                    return Err(CommandError::Vm(format!("VM {:?}: {e}", domain.name)).into());
                }
                Err(e) => {
                    warn(format!("the guest agent answers but could not freeze: {e}; crash-consistent"));
                    None
                }
            },
            Err(_) => None,
        };
        let frozen_count = frozen.as_ref().map(|f| f.count);
        let began =
            pull_backup::begin(self.lv, uuid, &socket, &pull, base.as_deref(), checkpoint_xml.as_deref(), &work);
        let job = match (began, &base) {
            (Ok(j), _) => j,
            // The bitmap is missing or inconsistent (a disk replaced, QEMU crashed): full.
            (Err(e), Some(b)) => {
                warn(format!("libvirt refused an incremental from checkpoint {b} ({e}): full backup"));
                for d in disks.iter_mut() {
                    if d.incremental.is_ok() {
                        d.incremental = Err(format!("libvirt refused the bitmap of checkpoint {b}"));
                    }
                }
                let pull: Vec<PullDisk> = pull.into_iter().map(|p| PullDisk { incremental: false, ..p }).collect();
                pull_backup::begin(self.lv, uuid, &socket, &pull, None, checkpoint_xml.as_deref(), &work)?
            }
            (Err(e), None) => return Err(e.into()),
        };
        let thawed = frozen.map(|f| f.thaw());
        let consistency = match (frozen_count, thawed, &agent) {
            (Some(n), Some(Ok(())), _) => (
                "application-consistent".to_string(),
                format!("the guest agent froze {n} filesystem(s) for the instant the backup began"),
            ),
            (Some(_), Some(Err(e)), _) => {
                warn(format!("thawing the guest: {e}"));
                ("application-consistent".to_string(), format!("frozen by the guest agent; the thaw reported: {e}"))
            }
            (_, _, Err(e)) => ("crash-consistent".to_string(), format!("the guest agent does not answer: {e}")),
            _ => ("crash-consistent".to_string(), "the guest agent could not freeze".to_string()),
        };
        let mut opened = Vec::new();
        for d in disks.iter() {
            let export = job.exports.iter().find(|e| e.target == d.target).expect("checked by begin");
            let dirty = export.dirty_context.clone().filter(|_| d.incremental.is_ok());
            let mut contexts = vec![BASE_ALLOCATION];
            if let Some(ctx) = &dirty {
                contexts.push(ctx);
            }
            let client = NbdClient::connect_unix_export(&job.socket, &export.name, &contexts)
                .with_context(|| format!("reading the export of disk {}", d.target))?;
            let client = Arc::new(client);
            let kind = VolumeKind::DiskImage(d.format.clone());
            let volume = Volume::from_source(PathBuf::from(&d.source), kind, client.size(), client.clone());
            opened.push((volume, Some(client), dirty));
        }
        Ok((opened, Some(LiveJob { job, _folder: work_guard }), checkpoint, consistency))
    }

    /// A backup job a killed Rime left running (its socket in a folder of ours named after a
    /// process that is gone) is ended; any other job is someone else's, and this backup fails.
    fn end_abandoned_job(&self, domain: &Domain, warn: &mut dyn FnMut(String)) -> Result<()> {
        let Some(socket) = pull_backup::running_job_socket(self.lv, &domain.uuid)? else { return Ok(()) };
        let folder = socket.parent().filter(|f| f.parent() == Some(self.opts.scratch_dir.as_path()));
        let owner = folder
            .and_then(|f| f.file_name()?.to_str()?.rsplit('-').next()?.parse::<u32>().ok())
            .filter(|pid| !rime_os::process::is_alive(*pid));
        match (folder, owner) {
            (Some(f), Some(pid)) => {
                warn(format!("ending the backup job left by a Rime that stopped (process {pid})"));
                pull_backup::abort(self.lv, &domain.uuid)?;
                let _ = std::fs::remove_dir_all(f);
                Ok(())
            }
            _ => Err(CommandError::Vm(format!(
                "VM {:?} already has a backup job running (exporting on {}); wait for it, or end it with `virsh domjobabort`",
                domain.name,
                socket.display()
            ))
            .into()),
        }
    }

    /// A VM that is not running: its disk images read directly (qemu-nbd for image formats).
    fn open_offline(&self, domain: &Domain, disks: &mut [DiskPlan]) -> Result<Opened> {
        let mut out = Vec::new();
        for d in disks.iter_mut() {
            if d.incremental.is_ok() {
                d.incremental = Err(format!("{}: read whole from its disk file", domain.state.label()));
            }
            let v = Volume::open(Path::new(&d.source), false)
                .with_context(|| format!("opening disk {} of VM {:?}", d.target, domain.name))?;
            out.push((v, None, None));
        }
        Ok(out)
    }

    /// What this disk's backup takes from the base snapshot: chunks whose blocks the dirty
    /// bitmap leaves clean and whose used blocks are the base's.
    #[allow(clippy::too_many_arguments)]
    fn reuse(
        &self,
        domain: &Domain,
        d: &DiskPlan,
        base: &Base<'_>,
        client: &NbdClient,
        dirty_context: &str,
        used: &Bitmap,
        partial: &Bitmap,
        size: u64,
    ) -> Result<Option<Reuse>> {
        let Some(entry) = base.snapshot.volumes.iter().find(|v| v.name == base.volume) else { return Ok(None) };
        if entry.size != size {
            return Ok(None);
        }
        let bits = size.div_ceil(BLOCK);
        let Some(prev_used) = self.maps.load(&domain.uuid, &base.checkpoint.name, &d.target, BLOCK, bits)? else {
            return Ok(None);
        };
        let changed = allocation::dirty_blocks(client, dirty_context, BLOCK)?;
        let id = base.snapshot.id.clone();
        Reuse::find(self.repo, self.index, id, entry, BLOCK, changed, &prev_used, used, partial)
    }
}

/// Where an incremental disk counts from.
struct Base<'a> {
    /// Its volume in the base snapshot.
    volume: &'a str,
    checkpoint: &'a Checkpoint,
    snapshot: &'a Manifest,
}

/// A backup job and the folder of its socket and scratch files, removed once the job has ended.
struct LiveJob {
    job: PullBackup,
    _folder: RemoveOnDrop,
}

impl LiveJob {
    fn end(&mut self) -> Result<()> {
        Ok(self.job.end()?)
    }
}

type Opened = Vec<(Volume, Option<Arc<NbdClient>>, Option<String>)>;
/// The volumes, the backup job, the new checkpoint and the consistency reached (kind, why).
type LiveOpened = (Opened, Option<LiveJob>, Option<String>, (String, String));

/// A map that maps nothing (a placeholder while the real one is wrapped).
struct NoMap;

impl rime_volume::usedmap::UsedMap for NoMap {
    fn filesystem(&self) -> Option<&str> {
        None
    }
    fn describe(&self) -> String {
        String::new()
    }
    fn used_ranges(&mut self, _: u64, _: u64, _: &mut Vec<std::ops::Range<u64>>) -> Result<()> {
        Ok(())
    }
}

fn whole(volume: String) -> Option<FileInSnapshot> {
    Some(FileInSnapshot { volume, partition: None, path: None })
}

fn file(
    role: Role,
    path: &str,
    target: Option<String>,
    size: Option<u64>,
    at: Option<FileInSnapshot>,
    format: Option<String>,
) -> VmFileRecord {
    VmFileRecord {
        role: super::layout::role_name(role),
        path: path.to_string(),
        target,
        size,
        volume: None,
        mount_point: None,
        in_snapshot: at,
        format,
    }
}

/// `<vm>.<disk>`, with anything but letters, digits, `.`, `_` and `-` replaced, made unique.
fn unique_name(vm: &str, target: &str, taken: &mut Vec<String>) -> String {
    let clean = |s: &str| {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect::<String>()
    };
    let base = format!("{}.{}", clean(vm), clean(target));
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.push(name.clone());
    name
}

fn staging_parent() -> PathBuf {
    std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// QEMU runs as its own user: the folder of the socket and scratch files must be its to write.
fn open_to_qemu(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .with_context(|| format!("opening {} to QEMU", dir.display()))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
