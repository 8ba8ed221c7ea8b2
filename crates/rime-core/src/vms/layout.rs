//! The VM layout of a host: every domain (and domain XML left behind), every file of each, the
//! volume holding each file, and each domain's coverage by a set of volumes.
//!
//! Coverage counts a domain's storage: disks with their backing chains, snapshots' external
//! files, and CD/DVD and floppy images unless `media` is off. The files libvirt keeps in its own
//! directories (domain XML, NVRAM, managed-save image) are carried into a snapshot by the backup
//! when its volumes do not hold them, so they never make a domain partly covered. A network disk
//! is on no volume, so a domain with one is at best partly covered.

use crate::places::{self, Place};
use anyhow::Result;
use rime_virt::files::{self, Role, VmFile};
use rime_virt::Libvirt;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Coverage {
    /// Every counted file is on the volumes.
    Full,
    /// Some are, some are not.
    Partial,
    /// None is.
    NotAffected,
}

impl Coverage {
    pub fn label(self) -> &'static str {
        match self {
            Coverage::Full => "full",
            Coverage::Partial => "partial",
            Coverage::NotAffected => "not affected",
        }
    }
}

/// `--criterion`: which domains a stop or a backup takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Criterion {
    /// Only domains whose files are all on the volumes.
    #[default]
    Full,
    /// Also domains with some of their files there.
    Partial,
}

impl Criterion {
    pub fn parse(s: &str) -> Result<Criterion> {
        match s {
            "full" => Ok(Criterion::Full),
            "partial" => Ok(Criterion::Partial),
            other => anyhow::bail!("unknown criterion '{other}' (expected full or partial)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Criterion::Full => "full",
            Criterion::Partial => "partial",
        }
    }

    pub fn takes(self, c: Coverage) -> bool {
        match self {
            Criterion::Full => c == Coverage::Full,
            Criterion::Partial => c != Coverage::NotAffected,
        }
    }
}

/// One file of a domain and where it lives.
#[derive(Clone, Debug, Serialize)]
pub struct PlacedFile {
    #[serde(flatten)]
    pub file: VmFile,
    #[serde(flatten)]
    pub place: Place,
    /// The volume of the set asked about that holds it (None: none does, or no set was given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub covered_by: Option<String>,
    /// The partition of that volume that holds it, when the volume is a whole disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
}

/// One domain (or domain XML left behind) with its files placed.
#[derive(Clone, Debug, Serialize)]
pub struct VmLayout {
    pub name: String,
    pub uuid: String,
    /// As the state table names it ("running", "saved", ...), or "not connected".
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub persistent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
    pub files: Vec<PlacedFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    #[serde(skip)]
    pub domain_state: Option<rime_virt::DomainState>,
}

impl VmLayout {
    /// The files that count for coverage (see the module comment).
    pub fn counted(&self, media: bool) -> impl Iterator<Item = &PlacedFile> {
        self.files.iter().filter(move |f| !f.file.role.is_carried() && (media || !f.file.role.is_media()))
    }

    /// The paths of the counted files that the volumes do not hold, for messages.
    pub fn uncovered(&self, media: bool) -> String {
        let paths: Vec<&str> =
            self.counted(media).filter(|f| f.covered_by.is_none()).map(|f| f.file.path.as_str()).collect();
        paths.join(", ")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct HostLayout {
    pub uri: String,
    /// The volumes coverage is given for (as named).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    pub media: bool,
    pub domains: Vec<VmLayout>,
}

/// A set of volumes, each as named and as what it is ([`places::identity`]).
pub struct VolumeSet(Vec<(String, PathBuf)>);

impl VolumeSet {
    pub fn new(names: &[PathBuf]) -> Result<VolumeSet> {
        let mut out = Vec::new();
        for n in names {
            if !n.exists() {
                return Err(rime_volume::VolumeError::NotFound(n.clone()).into());
            }
            places::volume_name(n)?;
            out.push((n.display().to_string(), places::identity(n)));
        }
        Ok(VolumeSet(out))
    }

    /// The named volume holding a file at `place`, and the partition of it.
    pub fn holder(&self, place: &Place) -> Option<(String, Option<u32>)> {
        self.0.iter().find_map(|(name, id)| places::holds(id, place).map(|p| (name.clone(), p)))
    }
}

fn place(file: VmFile, set: Option<&VolumeSet>) -> PlacedFile {
    let place = if file.network { Place::default() } else { places::place_of(Path::new(&file.path)) };
    let held = set.and_then(|s| s.holder(&place));
    PlacedFile { file, place, covered_by: held.as_ref().map(|h| h.0.clone()), partition: held.and_then(|h| h.1) }
}

/// The coverage of a domain's counted files.
pub fn coverage_of(vm: &VmLayout, media: bool) -> Coverage {
    let (mut total, mut covered) = (0, 0);
    for f in vm.counted(media) {
        total += 1;
        covered += usize::from(f.covered_by.is_some());
    }
    match covered {
        0 => Coverage::NotAffected,
        n if n == total => Coverage::Full,
        _ => Coverage::Partial,
    }
}

/// The layout of every domain on the host; with `volumes`, each one's coverage by them.
pub fn host_layout(lv: &Libvirt, volumes: &[PathBuf], media: bool) -> Result<HostLayout> {
    let set = if volumes.is_empty() { None } else { Some(VolumeSet::new(volumes)?) };
    let mut domains = Vec::new();
    for vm in files::host(lv)? {
        let mut layout = VmLayout {
            state: vm.state.as_ref().map_or("not connected", |s| s.label()).to_string(),
            reason: vm.state.as_ref().map(|s| s.reason.clone()),
            domain_state: vm.state,
            name: vm.name,
            uuid: vm.uuid,
            persistent: vm.persistent,
            coverage: None,
            files: vm.files.into_iter().map(|f| place(f, set.as_ref())).collect(),
            problems: vm.problems,
        };
        if set.is_some() {
            layout.coverage = Some(coverage_of(&layout, media));
        }
        domains.push(layout);
    }
    Ok(HostLayout {
        uri: lv.uri().to_string(),
        volumes: volumes.iter().map(|v| v.display().to_string()).collect(),
        media,
        domains,
    })
}

/// A role as the snapshot records it ("managed-save").
pub fn role_name(role: Role) -> String {
    serde_json::to_value(role).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}
