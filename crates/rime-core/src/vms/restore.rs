//! `rime restore --vm NAME SNAPSHOT`: a VM put back from a `--vm-aware` snapshot, so that it
//! runs again as it was saved.
//!
//! Checks first, writes second: the VM must be in the snapshot with every file (a missing CD/DVD
//! or floppy image that is still on the host is used in place, with a warning); a defined domain
//! of that name, or a file at a destination, is refused unless `--replace` (and a domain that is
//! running is always refused). Then every file is written under a temporary name beside its
//! destination (disks and backing files through the image explorer, carried files and whole
//! volumes by a volume restore); only when all are written is the old domain undefined, each file
//! renamed into place and the domain defined. With `--to DIR` every file goes into DIR, the
//! domain XML's paths are rewritten and each qcow2 overlay is rebased (`qemu-img rebase -u`) onto
//! its backing file's new path. A VM that was running or paused at backup time comes back saved
//! (its managed-save image restored paused and saved again, so libvirt knows it), and starts where
//! it was; one that was off comes back off.

use super::backup::carried_name;
use crate::commands::extract::{self, ExtractOptions};
use crate::commands::restore::{self, RestoreOptions, TargetFormat};
use crate::error::CommandError;
use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use rime_repo::{FileInSnapshot, Manifest, Repository, VmFileRecord, VmRecord};
use rime_virt::files::{LibvirtDirs, Role};
use rime_virt::{domains, Libvirt};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct VmRestoreOptions {
    pub snapshot: String,
    pub name: String,
    /// Put every file into this directory (paths in the domain XML rewritten).
    pub to: Option<PathBuf>,
    /// Replace a defined domain of that name (shut off) and files in the way.
    pub replace: bool,
    pub threads: usize,
}

#[derive(Debug, Serialize)]
pub struct RestoredFile {
    pub role: String,
    /// Its path at backup time.
    pub from: String,
    /// Where it was written.
    pub to: String,
}

#[derive(Debug, Serialize)]
pub struct VmRestoreSummary {
    pub snapshot: String,
    pub name: String,
    pub uuid: String,
    /// Its state at backup time.
    pub state_at_backup: String,
    /// Its state now ("saved": it starts where it was; "shut off").
    pub state: String,
    pub files: Vec<RestoredFile>,
    /// Whether a domain of that name was replaced.
    pub replaced: bool,
    pub warnings: Vec<String>,
}

fn refused(msg: String) -> anyhow::Error {
    CommandError::VmRefused(msg).into()
}

/// One file to put back.
struct Planned<'a> {
    record: &'a VmFileRecord,
    at: &'a FileInSnapshot,
    dest: PathBuf,
}

/// The temporary name a file is written under before it is renamed into place.
fn temporary(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".rime-restore-{}-{name}", std::process::id()))
}

/// The VM's record, or an error naming the VMs the snapshot has.
pub(crate) fn find_vm<'m>(manifest: &'m Manifest, name: &str) -> Result<&'m VmRecord> {
    let vms = manifest.vms.as_ref().ok_or_else(|| {
        refused(format!("snapshot {} records no VMs (it was not taken with --vm-aware)", &manifest.id[..8]))
    })?;
    vms.domains.iter().find(|d| d.name == name || d.uuid == name).ok_or_else(|| {
        let names: Vec<String> = vms.domains.iter().map(|d| format!("{:?}", d.name)).collect();
        CommandError::PathNotFound(format!(
            "snapshot {} has no VM {name:?} (it has: {})",
            &manifest.id[..8],
            if names.is_empty() { "none".into() } else { names.join(", ") }
        ))
        .into()
    })
}

/// Where each file goes: its own path, or into `to` under its own name (made unique).
fn destinations(files: &[&VmFileRecord], to: Option<&Path>) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let mut taken: Vec<PathBuf> = Vec::new();
    for f in files {
        let original = PathBuf::from(&f.path);
        let dest = match to {
            None => original,
            Some(dir) => {
                let base =
                    original.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| f.role.clone());
                let mut dest = dir.join(&base);
                let mut n = 2;
                while taken.contains(&dest) {
                    dest = dir.join(format!("{n}-{base}"));
                    n += 1;
                }
                dest
            }
        };
        taken.push(dest.clone());
        out.insert(f.path.clone(), dest);
    }
    out
}

pub fn restore_vm(repo: &Repository, opts: &VmRestoreOptions, progress: &dyn Progress) -> Result<VmRestoreSummary> {
    let manifest = repo.resolve(&opts.snapshot)?;
    let vm = find_vm(&manifest, &opts.name)?;
    let mut warnings = Vec::new();
    // 1. Every file must be in the snapshot (media still on the host may be used in place).
    let mut missing = Vec::new();
    for f in vm.files.iter().filter(|f| f.in_snapshot.is_none()) {
        let media = matches!(f.role.as_str(), "cdrom" | "floppy");
        if media && Path::new(&f.path).exists() && opts.to.is_none() {
            warnings.push(format!("{} {} is not in the snapshot; the one on this host is used", f.role, f.path));
        } else {
            missing.push(format!("{} {}", f.role, f.path));
        }
    }
    let devices: Vec<&str> = vm
        .files
        .iter()
        .filter(|f| f.in_snapshot.as_ref().is_some_and(|a| a.path.is_none()) && f.path.starts_with("/dev/"))
        .map(|f| f.path.as_str())
        .collect();
    if !devices.is_empty() {
        return Err(refused(format!(
            "VM {:?} has whole block devices as disks ({}): restore each with `rime restore SNAPSHOT DEVICE --volume NAME`, and define the domain from its XML",
            vm.name,
            devices.join(", ")
        )));
    }
    if !missing.is_empty() {
        return Err(refused(format!(
            "VM {:?} cannot be restored from snapshot {}: its {} {} not in the snapshot",
            vm.name,
            &manifest.id[..8],
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        )));
    }
    // 2. The domain and the files in the way.
    let lv = Libvirt::connect()?;
    let dirs = LibvirtDirs::of(&lv);
    let existing = domains::list(&lv)?.into_iter().find(|d| d.name == vm.name || d.uuid == vm.uuid);
    if let Some(d) = &existing {
        if !opts.replace {
            return Err(refused(format!(
                "a domain named {:?} is defined on this host ({}); add --replace to replace it",
                d.name,
                d.state.label()
            )));
        }
        if d.state.is_active() {
            return Err(refused(format!(
                "domain {:?} is {}: shut it down (or save it) before replacing it",
                d.name,
                d.state.label()
            )));
        }
    }
    let xml_record = vm.files.iter().find(|f| f.role == "domain-xml").and_then(|f| f.in_snapshot.as_ref());
    let xml_volume = xml_record.map(|a| a.volume.clone()).unwrap_or_else(|| carried_name(&vm.uuid, Role::DomainXml));
    let written: Vec<&VmFileRecord> = vm
        .files
        .iter()
        .filter(|f| f.in_snapshot.is_some() && !matches!(f.role.as_str(), "domain-xml" | "managed-save"))
        .collect();
    if let Some(dir) = &opts.to {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let dests = destinations(&written, opts.to.as_deref());
    let plan: Vec<Planned> = written
        .iter()
        .map(|f| Planned { record: f, at: f.in_snapshot.as_ref().expect("filtered"), dest: dests[&f.path].clone() })
        .collect();
    for p in &plan {
        whole_image_format(p.record)?;
    }
    let in_the_way: Vec<String> =
        plan.iter().filter(|p| p.dest.exists()).map(|p| p.dest.display().to_string()).collect();
    if !in_the_way.is_empty() && !opts.replace {
        return Err(refused(format!(
            "restoring VM {:?} would overwrite {}; add --replace, or restore elsewhere with --to DIR",
            vm.name,
            in_the_way.join(", ")
        )));
    }
    for p in &plan {
        if let Some(parent) = p.dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
    }

    // 3. Write everything under temporary names; on any failure remove them, change nothing.
    let scratch = tempfile::Builder::new().prefix("rime-vm-restore-").tempdir().context("scratch directory")?;
    let mut temps: Vec<PathBuf> = Vec::new();
    let result = (|| -> Result<(String, Option<PathBuf>)> {
        for p in &plan {
            let tmp = temporary(&p.dest);
            temps.push(tmp.clone());
            let format = whole_image_format(p.record)?;
            put_file(repo, &manifest, p.at, &tmp, format, opts.threads, progress)
                .with_context(|| format!("restoring {} {}", p.record.role, p.record.path))?;
        }
        let xml_file = scratch.path().join("domain.xml");
        let at = FileInSnapshot { volume: xml_volume.clone(), partition: None, path: None };
        put_file(repo, &manifest, xml_record.unwrap_or(&at), &xml_file, TargetFormat::Raw, opts.threads, progress)
            .context("restoring the domain XML")?;
        let xml = std::fs::read_to_string(&xml_file).context("reading the domain XML")?;
        let save = match vm.files.iter().find(|f| f.role == "managed-save").and_then(|f| f.in_snapshot.as_ref()) {
            Some(at) if vm.state_in_snapshot == "saved" => {
                let tmp = temporary(&dirs.managed_save(&vm.name));
                temps.push(tmp.clone());
                put_file(repo, &manifest, at, &tmp, TargetFormat::Raw, opts.threads, progress)
                    .context("restoring the managed-save image")?;
                Some(tmp)
            }
            _ => None,
        };
        Ok((xml, save))
    })();
    let (xml, save) = match result {
        Ok(r) => r,
        Err(e) => {
            temps.iter().for_each(|t| drop(std::fs::remove_file(t)));
            return Err(e);
        }
    };
    // 4. Rewrite the paths (for --to), rebase overlays onto their backing files' new paths.
    let moves: HashMap<String, String> = plan
        .iter()
        .filter(|p| Path::new(&p.record.path) != p.dest)
        .map(|p| (p.record.path.clone(), p.dest.display().to_string()))
        .collect();
    let xml = if moves.is_empty() { xml } else { rime_virt::xml::rewrite_paths(&xml, &moves)?.0 };
    let rebased = rebase_overlays(&plan, &moves);
    if let Err(e) = rebased {
        temps.iter().for_each(|t| drop(std::fs::remove_file(t)));
        return Err(e);
    }
    // 5. Commit: undefine the old domain, rename into place, define, restore the saved state.
    let replaced = existing.is_some();
    if let Some(d) = &existing {
        domains::undefine(&lv, &d.uuid, false)?;
    }
    for p in &plan {
        std::fs::rename(temporary(&p.dest), &p.dest)
            .with_context(|| format!("moving {} into place", p.dest.display()))?;
    }
    let xml_path = scratch.path().join("define.xml");
    std::fs::write(&xml_path, &xml)?;
    lv.run(&format!("defining domain {}", vm.name), [std::ffi::OsStr::new("define"), xml_path.as_os_str()])?;
    let uuid = rime_virt::xml::DomainXml::parse(&xml).map(|x| x.uuid).unwrap_or_else(|_| vm.uuid.clone());
    let state = match save {
        Some(tmp) => {
            let outcome = restore_saved_state(&lv, &uuid, &tmp, &xml_path, !moves.is_empty(), &vm.state);
            let _ = std::fs::remove_file(&tmp);
            outcome
                .with_context(|| format!("domain {:?} is defined, but its saved state was not restored", vm.name))?;
            "saved".to_string()
        }
        None => domains::state(&lv, &uuid).map(|s| s.label().to_string()).unwrap_or_else(|_| "shut off".into()),
    };
    let files = plan
        .iter()
        .map(|p| RestoredFile {
            role: p.record.role.clone(),
            from: p.record.path.clone(),
            to: p.dest.display().to_string(),
        })
        .collect();
    Ok(VmRestoreSummary {
        snapshot: manifest.id.clone(),
        name: vm.name.clone(),
        uuid,
        state_at_backup: vm.state.clone(),
        state,
        files,
        replaced,
        warnings,
    })
}

/// How a file the snapshot holds as a whole volume is written: a disk of a live backup (the
/// guest's view) in its host image format again; anything else byte for byte.
fn whole_image_format(record: &VmFileRecord) -> Result<TargetFormat> {
    match record.format.as_deref() {
        None | Some("raw") => Ok(TargetFormat::Raw),
        Some("qcow2") => Ok(TargetFormat::Qcow2),
        Some(other) => Err(refused(format!(
            "disk {} was a {other} image; Rime writes disks back as raw or qcow2 only: restore its volume with `rime restore SNAPSHOT FILE --volume NAME --format qcow2` and convert it",
            record.path
        ))),
    }
}

/// Writes one file of the snapshot to `dest` (a new file): from inside a volume's filesystem
/// through the image explorer, or a whole volume (in `format`).
fn put_file(
    repo: &Repository,
    m: &Manifest,
    at: &FileInSnapshot,
    dest: &Path,
    format: TargetFormat,
    threads: usize,
    progress: &dyn Progress,
) -> Result<()> {
    let volume = match at.partition {
        Some(n) => format!("{}:{n}", at.volume),
        None => at.volume.clone(),
    };
    let Some(inside) = &at.path else {
        let opts = RestoreOptions {
            snapshot: m.id.clone(),
            target: dest.to_path_buf(),
            volume: Some(volume),
            threads,
            format,
        };
        restore::restore(repo, &opts, progress)?;
        return Ok(());
    };
    // The explorer writes the file under its own name into a folder; it is moved from there.
    let parent = dest.parent().unwrap_or(Path::new("."));
    let folder = tempfile::Builder::new().prefix(".rime-restore-").tempdir_in(parent).context("temporary folder")?;
    let opts = ExtractOptions {
        snapshot: m.id.clone(),
        paths: vec![inside.clone()],
        to: folder.path().to_path_buf(),
        volume: Some(volume),
        overwrite: false,
        cache_bytes: None,
    };
    let summary = extract::extract(repo.clone(), &opts)?;
    if let Some(s) = summary.skipped.first() {
        bail!("{}: {}", s.path, s.reason);
    }
    let name = Path::new(inside).file_name().ok_or_else(|| anyhow!("{inside} names no file"))?;
    std::fs::rename(folder.path().join(name), dest).with_context(|| format!("moving {}", dest.display()))
}

/// Points every restored qcow2 overlay whose backing file moved at the backing file's new path
/// (`qemu-img rebase -u`: the header only, the data is the same).
fn rebase_overlays(plan: &[Planned], moves: &HashMap<String, String>) -> Result<()> {
    if moves.is_empty() {
        return Ok(());
    }
    for p in plan {
        let tmp = temporary(&p.dest);
        let Ok(Some((name, format))) = rime_volume::backing::qcow2_backing(&tmp) else { continue };
        let original = Path::new(&p.record.path).parent().unwrap_or(Path::new("/")).join(&name);
        let Some(new) = moves.get(&original.display().to_string()).or_else(|| moves.get(&name)) else { continue };
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["rebase", "-u", "-f", "qcow2", "-b"]).arg(new);
        if let Some(f) = &format {
            cmd.args(["-F", f]);
        }
        let out = cmd.arg(&tmp).output().context("run qemu-img rebase (install qemu-utils)")?;
        if !out.status.success() {
            bail!("qemu-img rebase {}: {}", p.dest.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// Gives the defined domain its saved state back: the image's XML rewritten if paths moved,
/// restored paused (nothing runs) and managed-saved again, so libvirt lists it as saved and
/// starts it where it was (running or paused, as at backup time).
fn restore_saved_state(lv: &Libvirt, uuid: &str, image: &Path, xml: &Path, moved: bool, was: &str) -> Result<()> {
    if moved {
        lv.run(
            "rewriting the paths in the managed-save image",
            [std::ffi::OsStr::new("save-image-define"), image.as_os_str(), xml.as_os_str()],
        )?;
    }
    lv.run_for(
        "restoring the saved state (paused)",
        [std::ffi::OsStr::new("restore"), image.as_os_str(), std::ffi::OsStr::new("--paused")],
        std::time::Duration::from_secs(600),
    )?;
    let then = if was == "paused" { "--paused" } else { "--running" };
    lv.run_for(
        "saving it as libvirt's managed save",
        ["managedsave", "--domain", uuid, then],
        std::time::Duration::from_secs(600),
    )
    .inspect_err(|_| {
        // Never leave a restored guest half-resumed: it stays paused, and is destroyed if
        // its save failed, so its disks are as restored.
        let _ = lv.run("stopping the half-restored domain", ["destroy", "--domain", uuid]);
    })?;
    Ok(())
}
