//! The parts of a domain's XML that name its files, and the rewrite of those paths.
//!
//! Read: name, UUID, every `<disk>` (its device, source, format, the `<backingStore>` chain
//! libvirt reports), the NVRAM file. Rewrite ([`rewrite_paths`]): the `file` attribute of every
//! disk source (backing stores included) and the NVRAM path, each replaced in place in the
//! original text, so everything else in the definition stays byte for byte.
//!
//! The XML comes from libvirt or from a snapshot; it is parsed as untrusted input: a missing or
//! odd element is reported, never a panic.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A disk of a domain, as its XML describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// "disk", "cdrom", "floppy" or "lun".
    pub device: String,
    /// The disk's type: "file", "block", "volume", "network", "dir", ...
    pub kind: String,
    /// The guest's name for it ("vda", "hdc", "fda").
    pub target: Option<String>,
    /// The file or block device it reads (None: an empty drive, or not a local path).
    pub source: Option<String>,
    /// A storage pool's volume: (pool, volume).
    pub pool_volume: Option<(String, String)>,
    /// A network disk: "protocol:name".
    pub network: Option<String>,
    /// The image format ("qcow2", "raw").
    pub format: Option<String>,
    pub readonly: bool,
    /// Backing files listed in the XML (libvirt fills this in for running domains).
    pub backing: Vec<String>,
}

impl Disk {
    /// Removable media: a CD/DVD or floppy image.
    pub fn is_media(&self) -> bool {
        matches!(self.device.as_str(), "cdrom" | "floppy")
    }
}

/// What a domain's XML says about its files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainXml {
    pub name: String,
    pub uuid: String,
    pub disks: Vec<Disk>,
    /// The NVRAM (UEFI variables) file.
    pub nvram: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("domain XML: {0}")]
pub struct XmlError(String);

fn text_of(node: roxmltree::Node, child: &str) -> Option<String> {
    node.children().find(|c| c.has_tag_name(child)).and_then(|c| c.text()).map(|t| t.trim().to_string())
}

/// The path a `<source>` names: `file=`, `dev=` or `dir=`.
fn source_path(source: roxmltree::Node) -> Option<String> {
    ["file", "dev", "dir"].iter().find_map(|a| source.attribute(*a)).map(str::to_string)
}

/// The `<backingStore>` chain under `node`, nearest first.
fn backing_chain(node: roxmltree::Node) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = node;
    while let Some(b) = at.children().find(|c| c.has_tag_name("backingStore")) {
        if let Some(p) = b.children().find(|c| c.has_tag_name("source")).and_then(source_path) {
            out.push(p);
        }
        at = b;
        if out.len() > 256 {
            break;
        }
    }
    out
}

impl DomainXml {
    pub fn parse(xml: &str) -> Result<DomainXml, XmlError> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
        let root = doc.root_element();
        if !root.has_tag_name("domain") {
            return Err(XmlError(format!("root element is <{}>, not <domain>", root.tag_name().name())));
        }
        let name = text_of(root, "name").ok_or_else(|| XmlError("no <name>".into()))?;
        let uuid = text_of(root, "uuid").unwrap_or_default();
        let mut disks = Vec::new();
        if let Some(devices) = root.children().find(|c| c.has_tag_name("devices")) {
            for d in devices.children().filter(|c| c.has_tag_name("disk")) {
                let source = d.children().find(|c| c.has_tag_name("source"));
                let kind = d.attribute("type").unwrap_or("file").to_string();
                let network = (kind == "network")
                    .then(|| {
                        source.map(|s| {
                            format!("{}:{}", s.attribute("protocol").unwrap_or("?"), s.attribute("name").unwrap_or(""))
                        })
                    })
                    .flatten();
                let pool_volume = (kind == "volume")
                    .then(|| {
                        source
                            .and_then(|s| Some((s.attribute("pool")?.to_string(), s.attribute("volume")?.to_string())))
                    })
                    .flatten();
                disks.push(Disk {
                    device: d.attribute("device").unwrap_or("disk").to_string(),
                    source: if network.is_some() || pool_volume.is_some() {
                        None
                    } else {
                        source.and_then(source_path)
                    },
                    kind,
                    target: d
                        .children()
                        .find(|c| c.has_tag_name("target"))
                        .and_then(|t| t.attribute("dev"))
                        .map(str::to_string),
                    pool_volume,
                    network,
                    format: d
                        .children()
                        .find(|c| c.has_tag_name("driver"))
                        .and_then(|t| t.attribute("type"))
                        .map(str::to_string),
                    readonly: d.children().any(|c| c.has_tag_name("readonly")),
                    backing: backing_chain(d),
                });
            }
        }
        let nvram = root
            .children()
            .find(|c| c.has_tag_name("os"))
            .and_then(|os| os.children().find(|c| c.has_tag_name("nvram")))
            .and_then(|n| {
                n.text().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).or_else(|| {
                    n.children()
                        .find(|c| c.has_tag_name("source"))
                        .and_then(|s| s.attribute("file"))
                        .map(str::to_string)
                })
            });
        Ok(DomainXml { name, uuid, disks, nvram })
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `xml` with every disk source file (backing stores included) and the NVRAM path found in
/// `moves` replaced by its new path. Returns the new text and the paths it replaced.
pub fn rewrite_paths(xml: &str, moves: &HashMap<String, String>) -> Result<(String, Vec<String>), XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let mut replaced = Vec::new();
    for node in doc.descendants() {
        let in_disk = node.ancestors().any(|a| a.has_tag_name("disk"));
        if node.has_tag_name("source") && in_disk {
            for attr in node.attributes().filter(|a| matches!(a.name(), "file" | "dev" | "dir")) {
                if let Some(new) = moves.get(attr.value()) {
                    edits.push((attr.range_value(), escape(new)));
                    replaced.push(attr.value().to_string());
                }
            }
        }
        let in_os = node.ancestors().any(|a| a.has_tag_name("os"));
        if node.has_tag_name("nvram") && in_os {
            if let Some(text) = node.first_child().filter(|c| c.is_text()) {
                if let Some(new) = moves.get(text.text().unwrap_or("").trim()) {
                    edits.push((text.range(), escape(new)));
                    replaced.push(text.text().unwrap_or("").trim().to_string());
                }
            }
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut out = xml.to_string();
    for (range, new) in edits {
        out.replace_range(range, &new);
    }
    Ok((out, replaced))
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu'>
  <name>web &quot;1&quot; é</name>
  <uuid>5c976ed6-c24c-4131-8076-6105a35e5bf4</uuid>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/a &amp; b/top.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/srv/base.qcow2'/><backingStore/></backingStore>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/srv/cd.iso'/><target dev='hdc'/><readonly/></disk>
    <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vdb'/></disk>
    <disk type='file' device='floppy'><target dev='fda'/></disk>
  </devices>
</domain>"#;

    #[test]
    fn files_are_read_from_the_xml() {
        let d = DomainXml::parse(XML).unwrap();
        assert_eq!(d.name, "web \"1\" é");
        assert_eq!(d.nvram.as_deref(), Some("/var/lib/libvirt/qemu/nvram/web_VARS.fd"));
        assert_eq!(d.disks.len(), 4);
        assert_eq!(d.disks[0].source.as_deref(), Some("/srv/a & b/top.qcow2"));
        assert_eq!(d.disks[0].backing, vec!["/srv/base.qcow2".to_string()]);
        assert!(d.disks[1].is_media() && d.disks[1].readonly);
        assert_eq!(d.disks[2].network.as_deref(), Some("rbd:pool/img"));
        assert_eq!(d.disks[3].source, None);
        assert!(DomainXml::parse("<network/>").is_err());
        assert!(DomainXml::parse("<domain").is_err());
    }

    #[test]
    fn rewrite_changes_only_the_named_paths() {
        let moves: HashMap<String, String> = [
            ("/srv/a & b/top.qcow2".to_string(), "/new/dir's/top.qcow2".to_string()),
            ("/srv/base.qcow2".to_string(), "/new/base.qcow2".to_string()),
            ("/var/lib/libvirt/qemu/nvram/web_VARS.fd".to_string(), "/new/web_VARS.fd".to_string()),
        ]
        .into();
        let (out, replaced) = rewrite_paths(XML, &moves).unwrap();
        assert_eq!(replaced.len(), 3);
        let d = DomainXml::parse(&out).unwrap();
        assert_eq!(d.disks[0].source.as_deref(), Some("/new/dir's/top.qcow2"));
        assert_eq!(d.disks[0].backing, vec!["/new/base.qcow2".to_string()]);
        assert_eq!(d.nvram.as_deref(), Some("/new/web_VARS.fd"));
        assert_eq!(d.disks[1].source.as_deref(), Some("/srv/cd.iso"));
        assert!(out.contains("OVMF_CODE_4M.fd"), "the firmware is not the VM's file");
    }
}
