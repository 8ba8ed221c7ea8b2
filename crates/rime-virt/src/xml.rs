//! The parts of a domain's XML that name its files, and the rewrite of those paths.
//!
//! Read: name, UUID, every `<disk>` (its device, source, format, the `<backingStore>` chain
//! libvirt reports), the NVRAM file. Rewrite ([`rewrite_paths`]): the `file` attribute of every
//! disk source (backing stores included) and the NVRAM path, each replaced in place in the
//! original text, so everything else in the definition stays byte for byte. Edit ([`edit`]):
//! what an instant recovery changes (name, UUID, MAC addresses, disks moved onto other image
//! files, media ejected, NVRAM path), also in place.
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

/// A disk whose source becomes another local image file (an instant recovery's overlay, or the
/// copy it was moved to): its `<source>` is replaced, its `<driver type>` set, any
/// `<backingStore>` in the XML dropped (the new image's own header names its backing, if any).
#[derive(Clone, Debug)]
pub struct DiskSwap {
    /// The guest's name of the disk ("vda").
    pub target: String,
    pub file: String,
    /// Its image format ("qcow2").
    pub format: String,
}

/// What [`edit`] changes in a domain's XML; everything else stays byte for byte.
#[derive(Clone, Debug, Default)]
pub struct Edits {
    /// A new `<name>`.
    pub name: Option<String>,
    /// Drop `<uuid>` (libvirt makes a new one at define).
    pub drop_uuid: bool,
    /// Drop every `<interface>`'s `<mac>` (libvirt makes new addresses).
    pub drop_macs: bool,
    pub disks: Vec<DiskSwap>,
    /// Targets of CD/DVD or floppy drives to leave empty (their `<source>` dropped).
    pub eject: Vec<String>,
    /// A new NVRAM path.
    pub nvram: Option<String>,
}

/// `xml` with `edits` made, each in place in the original text. A disk named in `edits.disks`
/// that the XML lacks is an error.
pub fn edit(xml: &str, edits: &Edits) -> Result<String, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(XmlError(format!("root element is <{}>, not <domain>", root.tag_name().name())));
    }
    let mut out: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    // An element removed with the indentation before it.
    let remove = |node: roxmltree::Node, out: &mut Vec<(std::ops::Range<usize>, String)>| {
        let mut range = node.range();
        if let Some(prev) = node.prev_sibling().filter(|p| p.is_text()) {
            if prev.text().is_some_and(|t| t.trim().is_empty()) {
                let line_start = xml[..range.start].rfind('\n').map(|i| i + 1).unwrap_or(range.start);
                if xml[line_start..range.start].trim().is_empty() {
                    range.start = line_start;
                }
            }
        }
        out.push((range, String::new()));
    };
    fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
        node.children().find(|c| c.has_tag_name(tag))
    }
    if let Some(name) = &edits.name {
        let n = child(root, "name").ok_or_else(|| XmlError("no <name>".into()))?;
        match n.first_child().filter(|c| c.is_text()) {
            Some(t) => out.push((t.range(), escape(name))),
            None => out.push((n.range(), format!("<name>{}</name>", escape(name)))),
        }
    }
    if edits.drop_uuid {
        if let Some(u) = child(root, "uuid") {
            remove(u, &mut out);
        }
    }
    let devices = child(root, "devices");
    if edits.drop_macs {
        for iface in devices.iter().flat_map(|d| d.children()).filter(|c| c.has_tag_name("interface")) {
            for mac in iface.children().filter(|c| c.has_tag_name("mac")) {
                remove(mac, &mut out);
            }
        }
    }
    let disks: Vec<roxmltree::Node> =
        devices.iter().flat_map(|d| d.children()).filter(|c| c.has_tag_name("disk")).collect();
    let target_of = |d: &roxmltree::Node| child(*d, "target").and_then(|t| t.attribute("dev")).map(str::to_string);
    for swap in &edits.disks {
        let disk = disks
            .iter()
            .find(|d| target_of(d).as_deref() == Some(swap.target.as_str()))
            .ok_or_else(|| XmlError(format!("no disk {}", swap.target)))?;
        match disk.attributes().find(|a| a.name() == "type") {
            Some(a) if a.value() != "file" => out.push((a.range_value(), "file".into())),
            Some(_) => {}
            None => {
                let at = disk.range().start + "<disk".len();
                out.push((at..at, " type='file'".into()));
            }
        }
        let source = format!("<source file='{}'/>", escape(&swap.file));
        let driver = child(*disk, "driver");
        if let Some(drv) = driver {
            match drv.attributes().find(|a| a.name() == "type") {
                Some(a) => out.push((a.range_value(), escape(&swap.format))),
                None => {
                    let at = drv.range().start + "<driver".len();
                    out.push((at..at, format!(" type='{}'", escape(&swap.format))));
                }
            }
        }
        let new_driver = match driver {
            Some(_) => String::new(),
            None => format!("<driver name='qemu' type='{}'/>", escape(&swap.format)),
        };
        match child(*disk, "source") {
            Some(src) => out.push((src.range(), format!("{new_driver}{source}"))),
            None => {
                let at = disk.range().end - "</disk>".len();
                if !xml[disk.range()].ends_with("</disk>") {
                    return Err(XmlError(format!("disk {} is an empty element", swap.target)));
                }
                out.push((at..at, format!("{new_driver}{source}")));
            }
        }
        for b in disk.children().filter(|c| c.has_tag_name("backingStore")) {
            remove(b, &mut out);
        }
    }
    for target in &edits.eject {
        if let Some(disk) = disks.iter().find(|d| target_of(d).as_deref() == Some(target.as_str())) {
            if let Some(src) = child(*disk, "source") {
                remove(src, &mut out);
            }
        }
    }
    if let Some(path) = &edits.nvram {
        let nvram = child(root, "os").and_then(|os| child(os, "nvram"));
        if let Some(n) = nvram {
            match (
                n.first_child().filter(|c| c.is_text() && !c.text().unwrap_or("").trim().is_empty()),
                child(n, "source"),
            ) {
                (Some(t), _) => out.push((t.range(), escape(path))),
                (None, Some(src)) => {
                    if let Some(a) = src.attributes().find(|a| a.name() == "file") {
                        out.push((a.range_value(), escape(path)));
                    }
                }
                (None, None) => {
                    let text = &xml[n.range()];
                    if text.ends_with("/>") {
                        let end = n.range().end;
                        out.push((end - 2..end, format!(">{}</nvram>", escape(path))));
                    } else {
                        let at = n.range().end - "</nvram>".len();
                        out.push((at..at, escape(path)));
                    }
                }
            }
        }
    }
    out.sort_by_key(|(r, _)| std::cmp::Reverse((r.start, r.end)));
    for pair in out.windows(2) {
        if pair[1].0.end > pair[0].0.start {
            return Err(XmlError("overlapping edits of the domain XML".into()));
        }
    }
    let mut text = xml.to_string();
    for (range, new) in out {
        text.replace_range(range, &new);
    }
    Ok(text)
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

    #[test]
    fn edits_swap_disks_rename_and_drop_identity() {
        let xml = XML.replace(
            "<devices>",
            "<devices>\n    <interface type='user'><mac address='52:54:00:aa:bb:cc'/><model type='virtio'/></interface>",
        );
        let edits = Edits {
            name: Some("copy <2>".into()),
            drop_uuid: true,
            drop_macs: true,
            disks: vec![DiskSwap { target: "vda".into(), file: "/run/x/vda.qcow2".into(), format: "qcow2".into() }],
            eject: vec!["hdc".into()],
            nvram: Some("/new/copy_VARS.fd".into()),
        };
        let out = edit(&xml, &edits).unwrap();
        let d = DomainXml::parse(&out).unwrap();
        assert_eq!(d.name, "copy <2>");
        assert_eq!(d.uuid, "");
        assert!(!out.contains("<mac"), "{out}");
        assert_eq!(d.disks[0].source.as_deref(), Some("/run/x/vda.qcow2"));
        assert!(d.disks[0].backing.is_empty(), "{out}");
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        assert_eq!(d.disks[1].source, None, "the CD drive is empty");
        assert_eq!(d.disks[2].network.as_deref(), Some("rbd:pool/img"), "other disks stay");
        assert_eq!(d.nvram.as_deref(), Some("/new/copy_VARS.fd"));
        assert!(out.contains("<model type='virtio'/>"));
        // A raw block disk without a driver element becomes a qcow2 file.
        let block = "<domain><name>b</name><devices><disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vdb'/></disk></devices></domain>";
        let swap = DiskSwap { target: "vdb".into(), file: "/o.qcow2".into(), format: "qcow2".into() };
        let out = edit(block, &Edits { disks: vec![swap.clone()], ..Edits::default() }).unwrap();
        let d = DomainXml::parse(&out).unwrap();
        assert_eq!((d.disks[0].kind.as_str(), d.disks[0].source.as_deref()), ("file", Some("/o.qcow2")));
        assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
        let missing = DiskSwap { target: "vdq".into(), ..swap };
        assert!(edit(block, &Edits { disks: vec![missing], ..Edits::default() }).is_err());
    }
}
