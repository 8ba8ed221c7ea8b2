//! Every file a domain is made of, and the domain XML left behind by domains no longer defined.
//!
//! A domain's files: its domain XML (libvirt's configuration file), each disk with its whole
//! backing chain, CD/DVD and floppy images, the NVRAM (UEFI variables), the managed-save image,
//! and the external files of its snapshots (disk overlays and memory). Each is listed once, under
//! the first role found for it. Paths come from libvirt's XML and the images' own headers.

use crate::domains::{self, Domain};
use crate::state::DomainState;
use crate::virsh::{Libvirt, VirtError};
use crate::xml::DomainXml;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a file is to its domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    DomainXml,
    Disk,
    Backing,
    Cdrom,
    Floppy,
    Nvram,
    ManagedSave,
    SnapshotDisk,
    SnapshotMemory,
}

impl Role {
    /// CD/DVD and floppy images (`--no-media` leaves them out of coverage).
    pub fn is_media(self) -> bool {
        matches!(self, Role::Cdrom | Role::Floppy)
    }

    /// The files libvirt keeps in its own directories (XML, NVRAM, managed-save image): a
    /// backup carries them into the snapshot when its volumes do not hold them, so they never
    /// make a domain partly covered. The rest is the domain's storage.
    pub fn is_carried(self) -> bool {
        matches!(self, Role::DomainXml | Role::Nvram | Role::ManagedSave)
    }

    pub fn label(self) -> &'static str {
        match self {
            Role::DomainXml => "domain XML",
            Role::Disk => "disk",
            Role::Backing => "backing file",
            Role::Cdrom => "CD/DVD image",
            Role::Floppy => "floppy image",
            Role::Nvram => "NVRAM",
            Role::ManagedSave => "managed-save image",
            Role::SnapshotDisk => "snapshot disk",
            Role::SnapshotMemory => "snapshot memory",
        }
    }
}

/// One file of a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFile {
    pub role: Role,
    /// The local path (for a network disk, "protocol:name").
    pub path: String,
    /// The guest device it backs ("vda"), for disks and media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A disk that is not a local file or device (a network disk): it cannot be imaged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    pub exists: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl VmFile {
    fn local(role: Role, path: impl Into<String>, target: Option<String>) -> VmFile {
        let path = path.into();
        let meta = std::fs::metadata(&path).ok();
        let size = meta.as_ref().map(|m| if m.is_file() { m.len() } else { block_size(Path::new(&path)).unwrap_or(0) });
        VmFile { role, path, target, network: false, exists: meta.is_some(), size }
    }
}

fn block_size(path: &Path) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(path).ok()?.seek(SeekFrom::End(0)).ok()
}

/// Where libvirt keeps domain XML and managed-save images for a connection.
#[derive(Clone, Debug)]
pub struct LibvirtDirs {
    pub config: PathBuf,
    pub save: PathBuf,
}

impl LibvirtDirs {
    /// The QEMU driver's directories: `/etc/libvirt/qemu` and `/var/lib/libvirt/qemu/save`
    /// for `qemu:///system`; under `~/.config/libvirt/qemu` for `qemu:///session`.
    pub fn of(lv: &Libvirt) -> LibvirtDirs {
        if lv.uri().contains("/session") {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            let config = home.join(".config/libvirt/qemu");
            return LibvirtDirs { save: config.join("save"), config };
        }
        LibvirtDirs { config: "/etc/libvirt/qemu".into(), save: "/var/lib/libvirt/qemu/save".into() }
    }

    pub fn managed_save(&self, name: &str) -> PathBuf {
        self.save.join(format!("{name}.save"))
    }

    pub fn domain_xml(&self, name: &str) -> PathBuf {
        self.config.join(format!("{name}.xml"))
    }
}

/// A domain, or domain XML left behind by one, with its files.
#[derive(Clone, Debug, Serialize)]
pub struct VmFiles {
    pub name: String,
    pub uuid: String,
    /// None: not connected (only its XML file is left).
    pub state: Option<DomainState>,
    pub persistent: bool,
    pub files: Vec<VmFile>,
    /// What could not be read (a backing chain, a snapshot's XML), in words.
    pub problems: Vec<String>,
}

fn push(files: &mut Vec<VmFile>, f: VmFile) {
    if !files.iter().any(|g| g.path == f.path) {
        files.push(f);
    }
}

/// The disks and media of a parsed XML, with their backing chains, and the NVRAM.
fn from_xml(lv: Option<&Libvirt>, xml: &DomainXml, files: &mut Vec<VmFile>, problems: &mut Vec<String>) {
    for d in &xml.disks {
        let role = match d.device.as_str() {
            "cdrom" => Role::Cdrom,
            "floppy" => Role::Floppy,
            _ => Role::Disk,
        };
        if let Some(net) = &d.network {
            files.push(VmFile {
                role,
                path: net.clone(),
                target: d.target.clone(),
                network: true,
                exists: true,
                size: None,
            });
            continue;
        }
        let source = match (&d.source, &d.pool_volume, lv) {
            (Some(s), _, _) => s.clone(),
            (None, Some((pool, vol)), Some(lv)) => {
                match lv.run(&format!("finding volume {vol} of pool {pool}"), ["vol-path", "--pool", pool, vol]) {
                    Ok(p) => p.trim().to_string(),
                    Err(e) => {
                        problems.push(e.to_string());
                        continue;
                    }
                }
            }
            _ => continue, // an empty drive
        };
        push(files, VmFile::local(role, &source, d.target.clone()));
        if !d.backing.is_empty() {
            for b in &d.backing {
                push(files, VmFile::local(Role::Backing, b, d.target.clone()));
            }
        } else if d.kind == "file" || d.kind == "volume" {
            match rime_volume::backing::chain(Path::new(&source)) {
                Ok(chain) => {
                    for b in chain {
                        match b.path {
                            Some(p) => {
                                push(files, VmFile::local(Role::Backing, p.display().to_string(), d.target.clone()))
                            }
                            None => problems.push(format!("{source}: backing file {} is not a local file", b.name)),
                        }
                    }
                }
                Err(e) if Path::new(&source).exists() => problems.push(format!("{e:#}")),
                Err(_) => {}
            }
        }
    }
    if let Some(nvram) = &xml.nvram {
        push(files, VmFile::local(Role::Nvram, nvram, None));
    }
}

/// The external files of a domain's snapshots: disk overlays and memory images.
fn snapshot_files(lv: &Libvirt, uuid: &str, files: &mut Vec<VmFile>, problems: &mut Vec<String>) {
    let names = match domains::snapshot_names(lv, uuid) {
        Ok(n) => n,
        Err(e) => return problems.push(e.to_string()),
    };
    for name in names {
        let xml = match domains::snapshot_xml(lv, uuid, &name) {
            Ok(x) => x,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let Ok(doc) = roxmltree::Document::parse(&xml) else {
            problems.push(format!("snapshot {name:?}: unreadable XML"));
            continue;
        };
        let root = doc.root_element();
        for m in root.children().filter(|c| c.has_tag_name("memory")) {
            if let (Some("external"), Some(file)) = (m.attribute("snapshot"), m.attribute("file")) {
                push(files, VmFile::local(Role::SnapshotMemory, file, None));
            }
        }
        let disks = root.children().filter(|c| c.has_tag_name("disks")).flat_map(|d| d.children());
        for d in disks.filter(|c| c.has_tag_name("disk") && c.attribute("snapshot") == Some("external")) {
            let source = d.children().find(|c| c.has_tag_name("source")).and_then(|s| s.attribute("file"));
            if let Some(file) = source {
                push(files, VmFile::local(Role::SnapshotDisk, file, d.attribute("name").map(str::to_string)));
            }
        }
    }
}

/// Every file of `domain`.
pub fn of_domain(lv: &Libvirt, dirs: &LibvirtDirs, domain: &Domain) -> VmFiles {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    if domain.persistent {
        push(&mut files, VmFile::local(Role::DomainXml, dirs.domain_xml(&domain.name).display().to_string(), None));
    }
    from_xml(Some(lv), &domain.parsed, &mut files, &mut problems);
    // A running domain's live XML may differ from its definition (media changed, a disk moved
    // by blockcopy): the definition's files are its files too.
    if domain.persistent && domain.state.is_active() {
        match domains::definition(lv, &domain.uuid).map(|x| DomainXml::parse(&x)) {
            Ok(Ok(inactive)) => from_xml(Some(lv), &inactive, &mut files, &mut problems),
            Ok(Err(e)) => problems.push(e.to_string()),
            Err(e) => problems.push(e.to_string()),
        }
    }
    let save = dirs.managed_save(&domain.name);
    if domain.state.saved || save.exists() {
        push(&mut files, VmFile::local(Role::ManagedSave, save.display().to_string(), None));
    }
    snapshot_files(lv, &domain.uuid, &mut files, &mut problems);
    VmFiles {
        name: domain.name.clone(),
        uuid: domain.uuid.clone(),
        state: Some(domain.state.clone()),
        persistent: domain.persistent,
        files,
        problems,
    }
}

/// Domain XML files in libvirt's configuration directory that belong to no defined domain
/// ("not connected"), each with the files its XML names.
pub fn left_behind(dirs: &LibvirtDirs, domains: &[Domain]) -> Vec<VmFiles> {
    let Ok(entries) = std::fs::read_dir(&dirs.config) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml") && p.is_file())
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let Ok(xml) = DomainXml::parse(&text) else { continue };
        if domains.iter().any(|d| d.uuid == xml.uuid || (d.persistent && d.name == xml.name)) {
            continue;
        }
        let mut files = vec![VmFile::local(Role::DomainXml, path.display().to_string(), None)];
        let mut problems = Vec::new();
        from_xml(None, &xml, &mut files, &mut problems);
        out.push(VmFiles { name: xml.name, uuid: xml.uuid, state: None, persistent: true, files, problems });
    }
    out
}

/// Every domain on the host with its files, then the XML left behind.
pub fn host(lv: &Libvirt) -> Result<Vec<VmFiles>, VirtError> {
    let dirs = LibvirtDirs::of(lv);
    let domains = domains::list(lv)?;
    let mut out: Vec<VmFiles> = domains.iter().map(|d| of_domain(lv, &dirs, d)).collect();
    out.extend(left_behind(&dirs, &domains));
    Ok(out)
}

/// The numeric user and group QEMU runs as under `qemu:///system`: `user` and `group` in
/// `/etc/libvirt/qemu.conf`, else Debian's default `libvirt-qemu` with its primary group. None
/// when that user is root or unknown here. Files and sockets QEMU must open are given to it.
pub fn qemu_process_ids() -> Option<(u32, u32)> {
    let conf = std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default();
    let setting = |key: &str| {
        conf.lines().map(str::trim).filter(|l| !l.starts_with('#')).find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let user = setting("user").unwrap_or_else(|| "libvirt-qemu".into());
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let lookup = |table: &str, name: &str| -> Option<(u32, Option<u32>)> {
        if let Some(n) = name.strip_prefix('+') {
            return Some((n.parse().ok()?, None));
        }
        table.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok())))?
        })
    };
    let (uid, primary) = lookup(&passwd, &user)?;
    let gid = match setting("group") {
        Some(g) => lookup(&std::fs::read_to_string("/etc/group").unwrap_or_default(), &g)?.0,
        None => primary?,
    };
    (uid != 0).then_some((uid, gid))
}
