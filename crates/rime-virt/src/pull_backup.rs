//! libvirt's backup API in pull mode (`virDomainBackupBegin`): QEMU exports each disk's
//! point-in-time view over NBD on a unix socket while the VM keeps running, optionally with the
//! dirty bitmap since a checkpoint, and creates a new checkpoint at the same instant.
//!
//! Guest writes during the backup first copy the old data to a scratch file per disk (QEMU's
//! copy-before-write), so the export keeps showing the instant the backup began.
//!
//! Invariants: the job is ended (`domjobabort`, which for a pull backup is its normal end) by
//! [`PullBackup::end`] or on drop, so no export outlives the backup; the XML handed to libvirt
//! escapes every name; what libvirt reports back is parsed as untrusted input.

use crate::checkpoints::escape;
use crate::virsh::{Libvirt, VirtError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One disk to export.
#[derive(Clone, Debug)]
pub struct PullDisk {
    /// The guest's name for it ("vda").
    pub target: String,
    /// Export only what changed since the backup's base checkpoint (else everything).
    pub incremental: bool,
    /// Where QEMU keeps the old data of blocks the guest overwrites during the backup.
    pub scratch: PathBuf,
}

/// What one disk's export is called on the NBD server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub target: String,
    pub name: String,
    /// The NBD meta context with the changes since the base checkpoint
    /// (`qemu:dirty-bitmap:<bitmap>`), for an incremental export.
    pub dirty_context: Option<String>,
}

/// A pull-mode backup job under way.
pub struct PullBackup {
    lv: Libvirt,
    uuid: String,
    pub socket: PathBuf,
    pub exports: Vec<Export>,
    ended: bool,
}

/// Starts a pull backup of `disks` (the domain's other disks are left out) on `socket`, based on
/// the checkpoint `incremental` when given, creating the checkpoint described by
/// `checkpoint_xml` at the same instant when given. `work` is a folder QEMU can write to, for
/// the XML handed to virsh.
pub fn begin(
    lv: &Libvirt,
    uuid: &str,
    socket: &Path,
    disks: &[PullDisk],
    incremental: Option<&str>,
    checkpoint_xml: Option<&str>,
    work: &Path,
) -> Result<PullBackup, VirtError> {
    let mut xml = String::from("<domainbackup mode='pull'>");
    if let Some(base) = incremental {
        xml.push_str(&format!("<incremental>{}</incremental>", escape(base)));
    }
    let socket_text = socket.to_str().ok_or_else(|| VirtError::Failed("the NBD socket path is not UTF-8".into()))?;
    xml.push_str(&format!("<server transport='unix' socket='{}'/><disks>", escape(socket_text)));
    for d in disks {
        let scratch = d.scratch.to_str().ok_or_else(|| VirtError::Failed("a scratch path is not UTF-8".into()))?;
        let mode = if incremental.is_some() && !d.incremental { " backupmode='full'" } else { "" };
        xml.push_str(&format!(
            "<disk name='{}' backup='yes' type='file'{mode}><scratch file='{}'/></disk>",
            escape(&d.target),
            escape(scratch)
        ));
    }
    xml.push_str("</disks></domainbackup>");
    let write = |name: &str, text: &str| -> Result<PathBuf, VirtError> {
        let p = work.join(name);
        std::fs::write(&p, text).map_err(|e| VirtError::Failed(format!("writing {}: {e}", p.display())))?;
        Ok(p)
    };
    let backup_file = write("backup.xml", &xml)?;
    let mut args = vec!["backup-begin".into(), uuid.to_string(), backup_file.display().to_string()];
    if let Some(c) = checkpoint_xml {
        args.push(write("checkpoint.xml", c)?.display().to_string());
    }
    lv.run_for("starting the backup job", &args, Duration::from_secs(120))?;
    let mut job = PullBackup {
        lv: lv.clone(),
        uuid: uuid.to_string(),
        socket: socket.to_path_buf(),
        exports: Vec::new(),
        ended: false,
    };
    let described = lv.run("reading the backup job", ["backup-dumpxml", uuid])?;
    job.exports = parse_exports(&described).map_err(|e| VirtError::Failed(format!("the backup job: {e}")))?;
    for d in disks {
        if !job.exports.iter().any(|e| e.target == d.target) {
            return Err(VirtError::Failed(format!("libvirt exports no disk {:?} in the backup job", d.target)));
        }
    }
    Ok(job)
}

impl PullBackup {
    /// Ends the job: the exports close, the scratch files go.
    pub fn end(&mut self) -> Result<(), VirtError> {
        if std::mem::replace(&mut self.ended, true) {
            return Ok(());
        }
        match self.lv.run("ending the backup job", ["domjobabort", &self.uuid]) {
            Ok(_) => Ok(()),
            // Already over (the VM stopped, say): nothing is left to end.
            Err(VirtError::Failed(m)) if m.contains("no job") || m.contains("not active") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for PullBackup {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            tracing::warn!("{e}");
        }
    }
}

/// The socket of the backup job running on the domain, if there is one.
pub fn running_job_socket(lv: &Libvirt, uuid: &str) -> Result<Option<PathBuf>, VirtError> {
    match lv.run("looking for a running backup job", ["backup-dumpxml", uuid]) {
        Ok(xml) => Ok(parse_socket(&xml)),
        Err(VirtError::Failed(m)) if m.contains("no domain backup job") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Ends the backup job running on the domain (one a killed backup left behind).
pub fn abort(lv: &Libvirt, uuid: &str) -> Result<(), VirtError> {
    lv.run("ending a backup job", ["domjobabort", uuid]).map(drop)
}

fn parse_socket(xml: &str) -> Option<PathBuf> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let server = doc.root_element().children().find(|c| c.tag_name().name() == "server")?;
    server.attribute("socket").map(PathBuf::from)
}

fn parse_exports(xml: &str) -> Result<Vec<Export>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domainbackup" {
        return Err("not a backup job".into());
    }
    let mut out = Vec::new();
    for disks in root.children().filter(|c| c.tag_name().name() == "disks") {
        for d in disks.children().filter(|c| c.tag_name().name() == "disk") {
            if d.attribute("backup") == Some("no") {
                continue;
            }
            let target = d.attribute("name").ok_or("a disk without a name")?.to_string();
            let name = d.attribute("exportname").unwrap_or(&target).to_string();
            let dirty_context = match d.attribute("backupmode") {
                Some("incremental") => {
                    Some(format!("qemu:dirty-bitmap:{}", d.attribute("exportbitmap").ok_or("no exportbitmap")?))
                }
                _ => None,
            };
            out.push(Export { target, name, dirty_context });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_read_from_the_job() {
        let e = parse_exports(
            "<domainbackup mode='pull'><incremental>c1</incremental><server transport='unix' socket='/s'/><disks>\
             <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='c1' exportname='vda' exportbitmap='backup-vda'/>\
             <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb'/>\
             <disk name='vdc' backup='no'/></disks></domainbackup>",
        )
        .unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].dirty_context.as_deref(), Some("qemu:dirty-bitmap:backup-vda"));
        assert_eq!(e[1].dirty_context, None);
        assert!(parse_exports("<domainbackup><disks><disk backupmode='incremental' name='x'/></disks></domainbackup>")
            .is_err());
    }
}
