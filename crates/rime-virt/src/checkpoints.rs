//! Domain checkpoints (libvirt's `virDomainCheckpoint*`): the points in time a running VM's
//! persistent dirty bitmaps count from.
//!
//! Rime names its own checkpoints `rime.<owner>.<stamp>`: `<owner>` is a short id of the
//! repository the backup wrote to (two repositories backing up one VM never touch each other's
//! chain), `<stamp>` the UTC time it was taken, to the millisecond, so names sort by age. A name
//! of any other shape is someone else's and is never deleted.
//!
//! Invariants: a checkpoint is addressed by name on a domain addressed by UUID; the XML libvirt
//! returns is parsed as untrusted input (a missing element is an error, never a panic).

use crate::virsh::{Libvirt, VirtError};

const PREFIX: &str = "rime.";

/// One checkpoint of a domain, as libvirt describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: String,
    pub parent: Option<String>,
    /// Seconds since the epoch, as libvirt recorded it.
    pub created: i64,
    /// (disk target, bitmap name) for each disk that tracks changes from this checkpoint.
    pub bitmaps: Vec<(String, String)>,
}

/// The name of a new checkpoint for the repository `owner` (see the module comment).
pub fn new_name(owner: &str, now: std::time::SystemTime) -> String {
    let ms = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("{PREFIX}{}.{ms:015}", short_owner(owner))
}

/// Whether `name` is a checkpoint Rime made for the repository `owner`.
pub fn is_ours(name: &str, owner: &str) -> bool {
    name.strip_prefix(PREFIX).and_then(|rest| rest.split_once('.')).is_some_and(|(o, stamp)| {
        o == short_owner(owner) && stamp.len() == 15 && stamp.bytes().all(|b| b.is_ascii_digit())
    })
}

fn short_owner(owner: &str) -> String {
    owner.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect()
}

/// Every checkpoint of the domain, oldest first.
pub fn list(lv: &Libvirt, uuid: &str) -> Result<Vec<Checkpoint>, VirtError> {
    let names = lv.run("listing checkpoints", ["checkpoint-list", uuid, "--name", "--topological"])?;
    let mut all = Vec::new();
    for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
        let xml = lv.run("reading a checkpoint", ["checkpoint-dumpxml", uuid, name, "--no-domain"])?;
        all.push(parse(&xml).map_err(|e| VirtError::Failed(format!("checkpoint {name:?}: {e}")))?);
    }
    all.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
    Ok(all)
}

/// Deletes one checkpoint's metadata and bitmaps; libvirt merges its bitmaps into its parent's,
/// so incrementals from older checkpoints stay exact. A checkpoint whose bitmap is already gone
/// from the disk (the image was replaced) loses its metadata only.
pub fn delete(lv: &Libvirt, uuid: &str, name: &str) -> Result<(), VirtError> {
    let what = format!("deleting checkpoint {name:?}");
    match lv.run(&what, ["checkpoint-delete", uuid, name]) {
        Ok(_) => Ok(()),
        Err(VirtError::Failed(m))
            if m.contains("not found in backing chain") || m.contains("missing or broken bitmap") =>
        {
            lv.run(&what, ["checkpoint-delete", uuid, name, "--metadata"]).map(drop)
        }
        Err(e) => Err(e),
    }
}

/// The checkpoint XML for a new checkpoint over the given disks (`bitmap`: the disk tracks
/// changes; others are listed with `checkpoint='no'`).
pub fn xml(name: &str, disks: &[(String, bool)]) -> String {
    let mut s = format!("<domaincheckpoint><name>{}</name><description>rime backup</description><disks>", escape(name));
    for (target, bitmap) in disks {
        let mode = if *bitmap { "bitmap" } else { "no" };
        s.push_str(&format!("<disk name='{}' checkpoint='{mode}'/>", escape(target)));
    }
    s.push_str("</disks></domaincheckpoint>");
    s
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn parse(xml: &str) -> Result<Checkpoint, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domaincheckpoint" {
        return Err("not a checkpoint".into());
    }
    let name = text(child(root, "name")).ok_or("no name")?;
    let parent = child(root, "parent").and_then(|p| text(child(p, "name")));
    let created = text(child(root, "creationTime")).and_then(|t| t.parse().ok()).unwrap_or(0);
    let mut bitmaps = Vec::new();
    if let Some(disks) = child(root, "disks") {
        for d in disks.children().filter(|c| c.tag_name().name() == "disk") {
            if d.attribute("checkpoint") == Some("bitmap") {
                let target = d.attribute("name").ok_or("a disk without a name")?;
                let bitmap = d.attribute("bitmap").unwrap_or(&name);
                bitmaps.push((target.to_string(), bitmap.to_string()));
            }
        }
    }
    Ok(Checkpoint { name, parent, created, bitmaps })
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.tag_name().name() == tag)
}

fn text(n: Option<roxmltree::Node<'_, '_>>) -> Option<String> {
    n.and_then(|n| n.text()).map(|t| t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_told_apart_by_owner_and_shape() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_796_687_499_123);
        let n = new_name("9f3c-21ab-77de-0011-abcd", now);
        assert_eq!(n, "rime.9f3c21ab77de.001796687499123");
        assert!(is_ours(&n, "9f3c-21ab-77de-0011-abcd"));
        assert!(!is_ours(&n, "another-repo"));
        assert!(!is_ours("rime.9f3c21ab77de.17966", "9f3c-21ab-77de-0011-abcd"));
        assert!(!is_ours("virtnbdbackup.0", "9f3c-21ab-77de-0011-abcd"));
    }

    #[test]
    fn checkpoint_xml_is_read_defensively() {
        let c = parse(
            "<domaincheckpoint><name>rime.a.1</name><parent><name>rime.a.0</name></parent>\
             <creationTime>17</creationTime><disks><disk name='vda' checkpoint='bitmap' bitmap='rime.a.1'/>\
             <disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>",
        )
        .unwrap();
        assert_eq!(c.parent.as_deref(), Some("rime.a.0"));
        assert_eq!(c.bitmaps, vec![("vda".to_string(), "rime.a.1".to_string())]);
        assert!(parse("<domain/>").is_err());
        assert!(parse("<domaincheckpoint/>").is_err());
        assert!(parse("<<").is_err());
        assert_eq!(xml("a'b", &[("vda".into(), true)]).matches("&apos;").count(), 1);
    }
}
