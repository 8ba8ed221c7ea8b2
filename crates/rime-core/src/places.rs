//! Volumes as administrators name them, and the volume a file lives on.
//!
//! A volume is named as a block device (`/dev/sdb1`, a `/dev/disk/by-*` link), an image file,
//! a mount point (the device mounted there), or a loop device. [`volume_name`] turns a mount
//! point into its device, and a loop device (or FUSE file) that carries a volume `rime serve`
//! protects into that volume: the name a backup reads. [`identity`] goes one step further for
//! comparisons: a loop device that maps a whole image file *is* that file, so "the same
//! volume" means one thing in the VM layout, its coverage and the backup.
//!
//! [`place_of`] walks the other way, from a file to its volume: the mount that holds it, the
//! device mounted there, a loop device's backing file, and the served volume behind a FUSE
//! file; with the path of the file inside that volume's filesystem, so the file can be found
//! in the volume's image later. A file that is on no volume (tmpfs, a network share) says why.

use serde::Serialize;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("{} is a directory but not a mount point; name the mount point, its device or an image file", .0.display())]
    NotAMountPoint(PathBuf),
    #[error("{} is mounted from {source_name}, which is not a volume (a block device or image file)", .path.display())]
    NotOnAVolume { path: PathBuf, source_name: String },
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The file a loop device maps whole (offset 0, no size limit); None for other devices.
pub fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.canonicalize().ok()?.file_name()?.to_string_lossy().into_owned();
    let dir = Path::new("/sys/block").join(&name).join("loop");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().map(|s| s.trim().to_string());
    let backing = read("backing_file")?;
    let whole = read("offset").is_none_or(|o| o == "0") && read("sizelimit").is_none_or(|s| s == "0");
    whole.then(|| PathBuf::from(backing))
}

/// The whole disk a partition device belongs to, and its number (`/dev/loop3p2` → loop3, 2).
pub fn partition_of(device: &Path) -> Option<(PathBuf, u32)> {
    let name = device.canonicalize().ok()?.file_name()?.to_string_lossy().into_owned();
    let sys = Path::new("/sys/class/block").join(&name);
    let number: u32 = std::fs::read_to_string(sys.join("partition")).ok()?.trim().parse().ok()?;
    let disk = sys.canonicalize().ok()?.parent()?.file_name()?.to_string_lossy().into_owned();
    Some((Path::new("/dev").join(disk), number))
}

/// The volume a backup reads for an administrator's name (see the module comment).
pub fn volume_name(name: &Path) -> Result<PathBuf, NameError> {
    let Ok(meta) = std::fs::metadata(name) else { return Ok(name.to_path_buf()) };
    if meta.is_dir() {
        let canonical = name.canonicalize().unwrap_or_else(|_| name.to_path_buf());
        let entry = rime_os::mounts::mount_entry_of(&canonical)
            .filter(|m| m.mount_point == canonical)
            .ok_or_else(|| NameError::NotAMountPoint(name.to_path_buf()))?;
        let source = PathBuf::from(&entry.source);
        if !(is_block_device(&source) || source.is_file()) {
            return Err(NameError::NotOnAVolume { path: name.to_path_buf(), source_name: entry.source });
        }
        return volume_name(&source);
    }
    if meta.file_type().is_block_device() {
        if let Some(served) = loop_backing_file(name).and_then(|f| rime_serve::find_server(&f)) {
            return Ok(served.volume);
        }
        return Ok(name.to_path_buf());
    }
    if meta.is_file() {
        if let Some(served) = rime_serve::find_server(name) {
            return Ok(served.volume);
        }
    }
    Ok(name.to_path_buf())
}

/// What a volume is, for telling two names of it apart: canonical, with a loop device that
/// maps a whole file taken as the file (and a served volume's FUSE file as the volume).
pub fn identity(volume: &Path) -> PathBuf {
    let named = volume_name(volume).unwrap_or_else(|_| volume.to_path_buf());
    let canonical = named.canonicalize().unwrap_or(named);
    if is_block_device(&canonical) {
        if let Some(file) = loop_backing_file(&canonical) {
            return identity(&file);
        }
    }
    canonical
}

/// Where a file lives.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Place {
    /// The volume holding it, as a backup names it (None: it is on no volume).
    pub volume: Option<PathBuf>,
    /// The block device (the file itself, for a disk that is a device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<PathBuf>,
    /// The file's path inside the volume's filesystem (None: the file is the whole volume).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inside: Option<PathBuf>,
    /// Why it is on no volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_on_a_volume: Option<String>,
}

/// The volume that holds `path` (see the module comment).
pub fn place_of(path: &Path) -> Place {
    if is_block_device(path) {
        let volume = volume_name(path).unwrap_or_else(|_| path.to_path_buf());
        return Place { volume: Some(volume), device: Some(path.to_path_buf()), ..Place::default() };
    }
    // A missing file is placed by its folder: where it would be.
    let probe = std::iter::successors(Some(path), |p| p.parent()).find(|p| p.exists()).unwrap_or(Path::new("/"));
    let canonical = probe
        .canonicalize()
        .unwrap_or_else(|_| probe.to_path_buf())
        .join(path.strip_prefix(probe).unwrap_or(Path::new("")));
    if let Some(fs) = rime_volume::remote::network_filesystem(probe) {
        return Place {
            not_on_a_volume: Some(format!("on a network filesystem ({fs}): it cannot be imaged consistently here")),
            ..Place::default()
        };
    }
    let Some(mount) = rime_os::mounts::mount_entry_of(probe) else {
        return Place { not_on_a_volume: Some("on no mounted filesystem".into()), ..Place::default() };
    };
    let source = PathBuf::from(&mount.source);
    if !is_block_device(&source) {
        return Place {
            mount_point: Some(mount.mount_point.clone()),
            not_on_a_volume: Some(format!(
                "on a {} filesystem ({}), which is not on a volume",
                mount.fstype, mount.source
            )),
            ..Place::default()
        };
    }
    Place {
        volume: Some(volume_name(&source).unwrap_or_else(|_| source.clone())),
        inside: mount.path_inside(&canonical),
        device: Some(source),
        mount_point: Some(mount.mount_point),
        not_on_a_volume: None,
    }
}

/// Whether `volume` (an [`identity`]) holds a file at `place`: `Some(None)` when the file's
/// volume is that volume, `Some(Some(n))` when it is partition `n` of it.
pub fn holds(volume: &Path, place: &Place) -> Option<Option<u32>> {
    let on = place.volume.as_deref()?;
    if identity(on) == volume {
        return Some(None);
    }
    let (disk, number) = partition_of(place.device.as_deref()?)?;
    (identity(&disk) == volume).then_some(Some(number))
}
