//! The VMs of a `--vm-aware` backup: found on its volumes, stopped (managed save, all at once)
//! just before the snapshot, their carried files staged while they are stopped, started again
//! right after the snapshot (or after the backup, for comparison), and recorded in the snapshot.
//!
//! Carried files: the domain's definition (its inactive XML, with secrets, as libvirt would start
//! it), and its NVRAM and managed-save image when the backup's volumes do not hold them. They are
//! staged at the snapshot's instant (the save image by a hard link next to itself, so staging a
//! large memory image costs nothing and survives the start that removes it; the rest by copy)
//! and go into the snapshot as volumes of kind `vm-file`.
//!
//! Invariants: a domain this backup stopped is started again on every path: after the snapshot,
//! on a failure (`Drop`), and on SIGINT, SIGTERM or SIGHUP (an interrupt action that shares the
//! `pending` lock with [`VmBackup::resume`], so exactly one of them starts each domain). Staged
//! files are removed when this is dropped.

use super::layout::{self, Coverage, Criterion, HostLayout, VolumeSet};
use crate::error::CommandError;
use crate::interrupt::{self, Registered};
use crate::places;
use anyhow::{Context, Result};
use rime_repo::{FileInSnapshot, VmFileRecord, VmRecord, VmSection};
use rime_virt::control::{self, Started, Stopped, Target};
use rime_virt::files::{LibvirtDirs, Role};
use rime_virt::{domains, Libvirt, State, Treatment};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When the VMs a backup stopped are started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ResumeAt {
    /// Right after the snapshot: the interruption does not depend on the volumes' size.
    #[default]
    AfterSnapshot,
    /// After the whole backup (how the scripts of the product Rime modernises ran; for
    /// measuring the difference).
    AfterBackup,
}

impl ResumeAt {
    pub fn parse(s: &str) -> Result<ResumeAt> {
        match s {
            "after-snapshot" => Ok(ResumeAt::AfterSnapshot),
            "after-backup" => Ok(ResumeAt::AfterBackup),
            other => anyhow::bail!("unknown --vm-resume '{other}' (expected after-snapshot or after-backup)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ResumeAt::AfterSnapshot => "after-snapshot",
            ResumeAt::AfterBackup => "after-backup",
        }
    }
}

#[derive(Clone, Debug)]
pub struct VmAwareOptions {
    pub criterion: Criterion,
    pub media: bool,
    pub resume: ResumeAt,
    /// Longest wait for the saves (and for the starts).
    pub max_wait: Duration,
    /// `--vm-live`: running VMs are not stopped; their disks are read through libvirt's backup
    /// API (docs/VMS.md, "Live backup") into the same snapshot.
    pub live: bool,
}

/// A carried file staged for the snapshot.
struct Staged {
    uuid: String,
    role: Role,
    host_path: String,
    /// What the backup reads.
    read_from: PathBuf,
    /// A hard link this backup made (removed afterwards).
    link: bool,
}

/// The domains a backup stopped and has not started again yet.
type Pending = Arc<Mutex<Vec<Target>>>;

pub struct VmBackup {
    lv: Libvirt,
    opts: VmAwareOptions,
    /// The backup's volumes, for placing files.
    set: VolumeSet,
    layout: HostLayout,
    /// Indices into `layout.domains` of the domains this backup takes.
    taken: Vec<usize>,
    /// Domains only partly on the volumes that the criterion leaves alone (recorded as such).
    left_out: Vec<usize>,
    pending: Pending,
    _interrupt: Option<Registered>,
    stopped: Vec<Stopped>,
    started: Vec<Started>,
    staging: Option<tempfile::TempDir>,
    staged: Vec<Staged>,
    /// Domains that did not start again, and why.
    pub resume_errors: Vec<String>,
    pub warnings: Vec<String>,
}

fn vm_error(e: impl std::fmt::Display) -> anyhow::Error {
    CommandError::Vm(e.to_string()).into()
}

impl VmBackup {
    /// Finds the domains on `volumes` (as the backup names them) and which of them this backup
    /// takes. A domain only partly there is left alone under the full criterion, with a warning.
    pub fn find(volumes: &[PathBuf], opts: VmAwareOptions) -> Result<VmBackup> {
        let lv = Libvirt::connect().map_err(vm_error)?;
        remove_stale_links(&lv);
        let layout = layout::host_layout(&lv, volumes, opts.media)?;
        let (mut taken, mut left_out) = (Vec::new(), Vec::new());
        let mut warnings = Vec::new();
        for (i, vm) in layout.domains.iter().enumerate() {
            let coverage = vm.coverage.unwrap_or(Coverage::NotAffected);
            if opts.criterion.takes(coverage) {
                if vm.state == "crashed" {
                    warnings.push(format!("VM {:?} has crashed: it is backed up as it is", vm.name));
                }
                taken.push(i);
            } else if coverage == Coverage::Partial {
                left_out.push(i);
                let outside = vm.uncovered(opts.media);
                warnings.push(format!(
                    "VM {:?} is only partly on the volumes of this backup ({} not): it is not covered by this backup and was left as it is",
                    vm.name,
                    outside
                ));
            }
        }
        Ok(VmBackup {
            set: VolumeSet::new(volumes)?,
            lv,
            opts,
            layout,
            taken,
            left_out,
            pending: Arc::default(),
            _interrupt: None,
            stopped: Vec::new(),
            started: Vec::new(),
            staging: None,
            staged: Vec::new(),
            resume_errors: Vec::new(),
            warnings,
        })
    }

    /// With `--vm-live`: the taken domains that run (running, paused, blocked), backed up
    /// through libvirt's backup API rather than stopped.
    pub fn live_uuids(&self) -> Vec<String> {
        if !self.opts.live {
            return Vec::new();
        }
        self.taken
            .iter()
            .map(|&i| &self.layout.domains[i])
            .filter(|vm| {
                vm.domain_state
                    .as_ref()
                    .is_some_and(|s| matches!(s.state, State::Running | State::Paused | State::Blocked))
            })
            .map(|vm| vm.uuid.clone())
            .collect()
    }

    pub fn libvirt(&self) -> &Libvirt {
        &self.lv
    }

    /// Whether this backup takes any domain (it then counts in the freeze window).
    pub fn takes_any(&self) -> bool {
        !self.taken.is_empty()
    }

    /// Whether any domain was stopped (the providers are planned again afterwards: a stopped
    /// VM no longer holds its images).
    pub fn stopped_any(&self) -> bool {
        !self.stopped.is_empty()
    }

    /// Managed-saves the taken domains that are running (or on their way), all at once. If any
    /// cannot be saved, those saved are started again and the backup fails.
    pub fn stop(&mut self) -> Result<(), CommandError> {
        let targets: Vec<Target> = self
            .taken
            .iter()
            .map(|&i| &self.layout.domains[i])
            .filter(|vm| {
                vm.domain_state.as_ref().is_some_and(|s| matches!(s.treatment(), Treatment::Stop | Treatment::WaitOut))
            })
            .filter(|vm| !self.live_uuids().contains(&vm.uuid))
            .map(|vm| Target { name: vm.name.clone(), uuid: vm.uuid.clone() })
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        // Registered before the first save is asked for: an interruption during the saves
        // waits for them to settle and starts every domain that ended up saved.
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = targets.clone();
        let (lv, pending, max_wait) = (self.lv.clone(), self.pending.clone(), self.opts.max_wait);
        self._interrupt = Some(interrupt::on_interrupt(move || start_pending(&lv, &pending, max_wait)));
        let outcome = control::stop(&self.lv, &targets, self.opts.max_wait, &|n| tracing::info!("{n}"));
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) =
            outcome.stopped.iter().map(|s| Target { name: s.name.clone(), uuid: s.uuid.clone() }).collect();
        self.stopped = outcome.stopped;
        if let Some(f) = outcome.failed.first() {
            let others = outcome.failed.len() - 1;
            let more = if others > 0 { format!(" (and {others} more)") } else { String::new() };
            self.resume();
            let back = if self.stopped.is_empty() {
                String::new()
            } else {
                "; the VMs it had stopped were started again".into()
            };
            return Err(CommandError::Vm(format!(
                "VM {:?} could not be stopped for the snapshot: {}{more}{back}",
                f.name, f.error
            )));
        }
        Ok(())
    }

    /// Stages the carried files of the taken domains (while they are stopped; see the module
    /// comment).
    pub fn stage(&mut self) -> Result<(), CommandError> {
        self.stage_files().map_err(|e| CommandError::Vm(format!("{e:#}")))
    }

    fn stage_files(&mut self) -> Result<()> {
        let dirs = LibvirtDirs::of(&self.lv);
        let staging =
            tempfile::Builder::new().prefix("rime-vm-").tempdir_in(staging_parent()).context("staging VM files")?;
        for &i in &self.taken {
            let vm = &self.layout.domains[i];
            if vm.domain_state.is_none() {
                // Not connected: its XML file is its definition; carried unless the volumes hold it.
                let xml = vm.files.iter().find(|f| f.file.role == Role::DomainXml);
                if let Some(f) = xml.filter(|f| self.set.holder(&f.place).is_none() && !vm.uuid.is_empty()) {
                    let path = PathBuf::from(&f.file.path);
                    let (read_from, link) = stage_file(&path, staging.path(), &vm.uuid, Role::DomainXml)?;
                    let host_path = f.file.path.clone();
                    self.staged.push(Staged {
                        uuid: vm.uuid.clone(),
                        role: Role::DomainXml,
                        host_path,
                        read_from,
                        link,
                    });
                }
                continue;
            }
            let xml = if vm.persistent { domains::definition(&self.lv, &vm.uuid) } else { Ok(String::new()) };
            let xml = match xml {
                Ok(x) if !x.is_empty() => x,
                Ok(_) => domains::get(&self.lv, &vm.uuid).map(|d| d.xml).map_err(vm_error)?,
                Err(e) => return Err(vm_error(e)),
            };
            let xml_copy = staging.path().join(format!("{}.xml", vm.uuid));
            std::fs::write(&xml_copy, xml.as_bytes()).with_context(|| format!("staging {}", xml_copy.display()))?;
            let host_xml =
                if vm.persistent { dirs.domain_xml(&vm.name).display().to_string() } else { "(transient)".into() };
            self.staged.push(Staged {
                uuid: vm.uuid.clone(),
                role: Role::DomainXml,
                host_path: host_xml,
                read_from: xml_copy,
                link: false,
            });
            let nvram = rime_virt::xml::DomainXml::parse(&xml).ok().and_then(|x| x.nvram);
            let save = dirs.managed_save(&vm.name);
            for (role, path) in [(Role::Nvram, nvram.map(PathBuf::from)), (Role::ManagedSave, Some(save))] {
                let Some(path) = path.filter(|p| p.is_file()) else { continue };
                if self.set.holder(&places::place_of(&path)).is_some() {
                    continue; // in a volume image already
                }
                let (read_from, link) = stage_file(&path, staging.path(), &vm.uuid, role)?;
                self.staged.push(Staged {
                    uuid: vm.uuid.clone(),
                    role,
                    host_path: path.display().to_string(),
                    read_from,
                    link,
                });
            }
        }
        self.staging = Some(staging);
        Ok(())
    }

    /// The staged files, each with the name its volume gets in the snapshot.
    pub fn carried(&self) -> Vec<(String, PathBuf, PathBuf)> {
        self.staged
            .iter()
            .map(|s| (carried_name(&s.uuid, s.role), PathBuf::from(&s.host_path), s.read_from.clone()))
            .collect()
    }

    /// Starts again every domain this backup stopped; failures are kept in `resume_errors`.
    pub fn resume(&mut self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let targets = std::mem::take(&mut *pending);
        if targets.is_empty() {
            return;
        }
        let outcome = control::start(&self.lv, &targets, true, self.opts.max_wait);
        drop(pending);
        for f in outcome.failed {
            self.resume_errors.push(format!("VM {:?} did not start again: {}", f.name, f.error));
        }
        // One that runs already was started by someone else: nothing is lost. One that is off
        // lost its saved state to someone else: the administrator must hear of it.
        for u in outcome.untouched.into_iter().filter(|u| u.state == "shut off") {
            self.resume_errors.push(format!("VM {:?} was not started again: it {}", u.name, u.why));
        }
        self.started.extend(outcome.started);
    }

    pub fn resume_at(&self) -> ResumeAt {
        self.opts.resume
    }

    /// The record for the snapshot: `volume_names` maps each of the backup's volumes (as named)
    /// to its name in the snapshot.
    pub fn record(&self, volume_names: &HashMap<String, String>) -> VmSection {
        let mut domains = Vec::new();
        let all = self.taken.iter().map(|&i| (i, true)).chain(self.left_out.iter().map(|&i| (i, false)));
        for (i, taken) in all {
            let vm = &self.layout.domains[i];
            let stopped = self.stopped.iter().find(|s| s.uuid == vm.uuid);
            let started = self.started.iter().find(|s| s.uuid == vm.uuid);
            let mut files: Vec<VmFileRecord> = vm
                .files
                .iter()
                .filter(|f| f.file.role != Role::ManagedSave)
                .map(|f| {
                    file_record(
                        f.file.role,
                        &f.file.path,
                        f.file.target.clone(),
                        f.file.size,
                        &f.place,
                        self.locate(&vm.uuid, f.file.role, &f.place, volume_names),
                    )
                })
                .collect();
            // The managed-save image as it is at the snapshot (made by the stop, if it was).
            let save = LibvirtDirs::of(&self.lv).managed_save(&vm.name);
            let saved_now = stopped.is_some() || vm.domain_state.as_ref().is_some_and(|s| s.saved);
            if saved_now {
                let place = places::place_of(&save);
                let size = self
                    .staged
                    .iter()
                    .find(|s| s.uuid == vm.uuid && s.role == Role::ManagedSave)
                    .and_then(|s| std::fs::metadata(&s.read_from).ok())
                    .map(|m| m.len());
                files.push(file_record(
                    Role::ManagedSave,
                    &save.display().to_string(),
                    None,
                    size,
                    &place,
                    self.locate(&vm.uuid, Role::ManagedSave, &place, volume_names),
                ));
            }
            // A defined domain's definition is always carried (as libvirt would start it).
            let carried_xml =
                FileInSnapshot { volume: carried_name(&vm.uuid, Role::DomainXml), partition: None, path: None };
            let defined = taken && vm.domain_state.is_some();
            if let Some(x) = files.iter_mut().find(|f| f.role == "domain-xml").filter(|_| defined) {
                x.in_snapshot = Some(carried_xml);
            } else if defined {
                files.insert(
                    0,
                    VmFileRecord {
                        role: "domain-xml".into(),
                        path: "(transient)".into(),
                        in_snapshot: Some(carried_xml),
                        ..VmFileRecord::default()
                    },
                );
            }
            let complete = files.iter().all(|f| {
                f.in_snapshot.is_some() || (!self.opts.media && matches!(f.role.as_str(), "cdrom" | "floppy"))
            });
            let state_in_snapshot = match (stopped, &vm.domain_state) {
                (Some(_), _) => "saved".to_string(),
                (None, Some(s)) => s.label().to_string(),
                (None, None) => "not connected".to_string(),
            };
            let action = match (stopped, started) {
                (Some(_), Some(_)) => {
                    format!("saved for the snapshot, started again {}", self.opts.resume.name().replace('-', " "))
                }
                (Some(_), None) => "saved for the snapshot; not started again".to_string(),
                (None, _) if !taken => {
                    "only partly on the volumes: not covered by this backup, left as it was".to_string()
                }
                (None, _) if vm.state == "crashed" => "crashed: backed up as it was".to_string(),
                (None, _) => format!("{}: backed up as it was", vm.state),
            };
            domains.push(VmRecord {
                name: vm.name.clone(),
                uuid: vm.uuid.clone(),
                state: vm.state.clone(),
                state_in_snapshot,
                coverage: vm.coverage.map_or("not affected", |c| c.label()).to_string(),
                persistent: vm.persistent,
                action,
                interruption_ms: match (stopped.and_then(|s| s.asked_at), started.and_then(|s| s.running_at)) {
                    (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_secs_f64() * 1000.0),
                    _ => None,
                },
                complete,
                files,
                warnings: vm.problems.clone(),
                live: None,
            });
        }
        VmSection {
            criterion: self.opts.criterion.name().into(),
            media: self.opts.media,
            resume: self.opts.resume.name().into(),
            uri: self.lv.uri().to_string(),
            domains,
        }
    }

    /// Where the snapshot holds a file: inside a backed-up volume, or carried.
    fn locate(
        &self,
        uuid: &str,
        role: Role,
        place: &places::Place,
        names: &HashMap<String, String>,
    ) -> Option<FileInSnapshot> {
        if let Some((volume, partition)) = self.set.holder(place) {
            return Some(FileInSnapshot {
                volume: names.get(&volume)?.clone(),
                partition,
                path: place.inside.as_ref().map(|p| p.display().to_string()),
            });
        }
        self.staged.iter().any(|s| s.uuid == uuid && s.role == role).then(|| FileInSnapshot {
            volume: carried_name(uuid, role),
            partition: None,
            path: None,
        })
    }
}

fn file_record(
    role: Role,
    path: &str,
    target: Option<String>,
    size: Option<u64>,
    place: &places::Place,
    at: Option<FileInSnapshot>,
) -> VmFileRecord {
    VmFileRecord {
        role: layout::role_name(role),
        path: path.to_string(),
        target,
        size,
        volume: place.volume.as_ref().map(|v| v.display().to_string()),
        mount_point: place.mount_point.as_ref().map(|m| m.display().to_string()),
        in_snapshot: at,
        format: None,
    }
}

/// The snapshot volume name of a carried file.
pub fn carried_name(uuid: &str, role: Role) -> String {
    format!("vm-{uuid}-{}", layout::role_name(role))
}

/// Where copies are staged: beside the repository's usual temporary files, not in memory.
fn staging_parent() -> PathBuf {
    std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// A managed-save image is linked next to itself (no copy of the guest's memory; the link
/// outlives the start that deletes the image); anything else is copied into `staging`.
fn stage_file(path: &Path, staging: &Path, uuid: &str, role: Role) -> Result<(PathBuf, bool)> {
    if role == Role::ManagedSave {
        let link = path.with_file_name(format!(".rime-staged-{}-{uuid}.save", std::process::id()));
        let _ = std::fs::remove_file(&link);
        if std::fs::hard_link(path, &link).is_ok() {
            return Ok((link, true));
        }
    }
    let copy = staging.join(format!("{uuid}-{}", layout::role_name(role)));
    std::fs::copy(path, &copy).with_context(|| format!("staging {}", path.display()))?;
    Ok((copy, false))
}

/// The interrupt action: let saves under way settle, then start every pending domain that is
/// saved.
fn start_pending(lv: &Libvirt, pending: &Pending, max_wait: Duration) {
    let targets = std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()));
    let deadline = Instant::now() + max_wait;
    for t in &targets {
        while Instant::now() < deadline {
            match domains::state(lv, &t.uuid) {
                Ok(s) if s.treatment() == Treatment::WaitOut => std::thread::sleep(Duration::from_millis(200)),
                _ => break,
            }
        }
    }
    let outcome = control::start(lv, &targets, true, max_wait);
    for s in outcome.started {
        eprintln!("rime: started VM {:?} again", s.name);
    }
    for f in outcome.failed {
        eprintln!("rime: VM {:?} did not start again: {}", f.name, f.error);
    }
}

impl Drop for VmBackup {
    fn drop(&mut self) {
        self.resume();
        for e in &self.resume_errors {
            tracing::error!("{e}");
        }
        for s in self.staged.iter().filter(|s| s.link) {
            let _ = std::fs::remove_file(&s.read_from);
        }
    }
}

/// Removes hard links left in libvirt's save directory by backups that were killed.
pub fn remove_stale_links(lv: &Libvirt) {
    let dir = LibvirtDirs::of(lv).save;
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".rime-staged-") else { continue };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A VM of a `--vm-aware` backup that `--vm-live` read through libvirt's backup API: its disks
/// are the snapshot volumes of the live export (not the files inside the volume images, which
/// were written to as the snapshot was taken), it was not stopped, and its record says how.
pub fn apply_live(section: &mut VmSection, uuid: &str, live: rime_repo::LiveBackupRecord, disks: Vec<VmFileRecord>) {
    let Some(vm) = section.domains.iter_mut().find(|d| d.uuid == uuid) else { return };
    for f in vm.files.iter_mut().filter(|f| f.role == "disk") {
        if let Some(d) = disks.iter().find(|d| d.target == f.target) {
            f.in_snapshot = d.in_snapshot.clone();
            f.format = d.format.clone();
            f.size = d.size;
        }
    }
    vm.state_in_snapshot = vm.state.clone();
    vm.action = "backed up while running through libvirt's backup API (--vm-live): not stopped".into();
    vm.interruption_ms = None;
    vm.live = Some(live);
}
