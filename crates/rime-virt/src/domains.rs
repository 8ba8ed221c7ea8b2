//! The domains on a host, defined or transient, each with its state and XML.

use crate::state::DomainState;
use crate::virsh::{Libvirt, VirtError};
use crate::xml::DomainXml;
use serde::Serialize;

/// One domain as libvirt knows it now.
#[derive(Clone, Debug, Serialize)]
pub struct Domain {
    pub uuid: String,
    pub name: String,
    pub state: DomainState,
    /// Defined (has a configuration that outlives it); false for a transient domain.
    pub persistent: bool,
    /// Its XML as libvirt describes it now (the live one while it runs).
    #[serde(skip)]
    pub xml: String,
    #[serde(skip)]
    pub parsed: DomainXml,
}

fn uuids(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// The UUIDs libvirt lists with `extra` filter flags (`--transient`, `--with-managed-save`).
fn listed(lv: &Libvirt, extra: &[&str]) -> Result<Vec<String>, VirtError> {
    let mut args = vec!["list", "--all", "--uuid"];
    args.extend_from_slice(extra);
    Ok(uuids(&lv.run("listing domains", args)?))
}

/// Every domain on the host, in libvirt's order.
pub fn list(lv: &Libvirt) -> Result<Vec<Domain>, VirtError> {
    let all = listed(lv, &[])?;
    let transient = listed(lv, &["--transient"])?;
    let mut out = Vec::new();
    for uuid in all {
        match read(lv, &uuid, !transient.contains(&uuid)) {
            Ok(d) => out.push(d),
            // Gone between the list and the look: it is not on the host any more.
            Err(VirtError::NoDomain(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The domain named `name` (or, failing that, with the UUID `name`), as it is now; one listing
/// of names rather than a read of every domain on the host.
pub fn find(lv: &Libvirt, name: &str) -> Result<Domain, VirtError> {
    // Quick path: virsh resolves the name (it would also take an id or a UUID, so the domain it
    // finds must bear the name); `list --uuid --name` costs seconds on a busy host.
    if let Ok(out) = lv.run("looking up a domain", ["domuuid", "--domain", name]) {
        if let Ok(d) = get(lv, out.trim()) {
            if d.name == name || d.uuid.eq_ignore_ascii_case(name) {
                return Ok(d);
            }
        }
    }
    let listing = lv.run("listing domains", ["list", "--all", "--uuid", "--name"])?;
    let pairs: Vec<(&str, &str)> = listing.lines().filter_map(|l| l.trim_start().split_once(' ')).collect();
    let uuid = pairs
        .iter()
        .find(|(_, n)| *n == name)
        .or_else(|| pairs.iter().find(|(u, _)| u.eq_ignore_ascii_case(name)))
        .map(|(u, _)| u.to_string())
        .ok_or_else(|| crate::control::no_such(name))?;
    get(lv, &uuid)
}

/// The domain with this UUID, as it is now.
pub fn get(lv: &Libvirt, uuid: &str) -> Result<Domain, VirtError> {
    let transient = listed(lv, &["--transient"])?;
    read(lv, uuid, !transient.iter().any(|u| u == uuid))
}

fn read(lv: &Libvirt, uuid: &str, persistent: bool) -> Result<Domain, VirtError> {
    let xml = lv.run(&format!("reading domain {uuid}"), ["dumpxml", "--security-info", "--domain", uuid])?;
    let parsed = DomainXml::parse(&xml).map_err(|e| VirtError::Failed(format!("domain {uuid}: {e}")))?;
    let state = state(lv, uuid)?;
    Ok(Domain { uuid: uuid.to_string(), name: parsed.name.clone(), state, persistent, xml, parsed })
}

/// The domain's state now, with whether it has a managed-save image.
pub fn state(lv: &Libvirt, uuid: &str) -> Result<DomainState, VirtError> {
    let what = format!("reading the state of domain {uuid}");
    let text = lv.run(&what, ["domstate", "--reason", "--domain", uuid])?;
    let saved = text.starts_with("shut off") && has_managed_save(lv, uuid)?;
    DomainState::parse(&text, saved)
        .ok_or_else(|| VirtError::Failed(format!("{what}: unknown state '{}'", text.trim())))
}

/// Whether the domain has a managed-save image.
pub fn has_managed_save(lv: &Libvirt, uuid: &str) -> Result<bool, VirtError> {
    let info = lv.run(&format!("reading domain {uuid}"), ["dominfo", "--domain", uuid])?;
    Ok(info.lines().any(|l| l.starts_with("Managed save:") && l.trim_end().ends_with("yes")))
}

/// The definition libvirt would start the domain from (inactive XML, with secrets such as
/// display passwords, so a restore defines it exactly as it was).
pub fn definition(lv: &Libvirt, uuid: &str) -> Result<String, VirtError> {
    lv.run(
        &format!("reading the definition of domain {uuid}"),
        ["dumpxml", "--inactive", "--security-info", "--domain", uuid],
    )
}

/// The names of the domain's snapshots (libvirt's own metadata).
pub fn snapshot_names(lv: &Libvirt, uuid: &str) -> Result<Vec<String>, VirtError> {
    let text =
        lv.run(&format!("listing the snapshots of domain {uuid}"), ["snapshot-list", "--name", "--domain", uuid])?;
    Ok(text.lines().filter(|l| !l.is_empty()).map(str::to_string).collect())
}

/// One snapshot's XML.
pub fn snapshot_xml(lv: &Libvirt, uuid: &str, snapshot: &str) -> Result<String, VirtError> {
    lv.run(
        &format!("reading snapshot {snapshot:?} of domain {uuid}"),
        ["snapshot-dumpxml", "--domain", uuid, "--snapshotname", snapshot],
    )
}

/// Undefines a (stopped) domain with its managed-save image and its snapshot and checkpoint
/// metadata; its NVRAM file is removed with it (`remove_nvram`) or kept.
pub fn undefine(lv: &Libvirt, uuid: &str, remove_nvram: bool) -> Result<(), VirtError> {
    let nvram = if remove_nvram { "--nvram" } else { "--keep-nvram" };
    let args =
        ["undefine", "--domain", uuid, "--managed-save", "--snapshots-metadata", "--checkpoints-metadata", nvram];
    lv.run(&format!("undefining domain {uuid}"), args).map(drop)
}
