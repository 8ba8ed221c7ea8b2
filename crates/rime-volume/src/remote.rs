//! Image files on network filesystems: Rime refuses them, because their writers may be on other
//! hosts, where no lock, open-file check or snapshot of this host can see them.
//!
//! Known by the `statfs(2)` magic of the filesystem holding the file (NFS, SMB/CIFS, Ceph, AFS,
//! 9P, ...), and for FUSE, which has one magic for every filesystem, by the mount's type in
//! `/proc/self/mountinfo` (`fuse.sshfs`, `fuse.rclone`, ...).

use std::path::Path;

const NETWORK_MAGICS: &[(u64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x00C3_6400, "Ceph"),
    (0x5346_414F, "AFS"),
    (0x0102_1997, "9P"),
    (0x7375_7245, "Coda"),
    (0x564C, "NCP"),
    (0x0BD0_0BD0, "Lustre"),
    (0x0116_1970, "GFS2"),
    (0x7461_636F, "OCFS2"),
];
const FUSE_MAGIC: u64 = 0x6573_5546;
/// FUSE filesystems that reach other machines.
const REMOTE_FUSE: &[&str] = &[
    "sshfs",
    "rclone",
    "s3fs",
    "gcsfuse",
    "goofys",
    "davfs",
    "glusterfs",
    "cephfs",
    "ceph-fuse",
    "curlftpfs",
    "smbnetfs",
    "afpfs",
    "blobfuse",
    "blobfuse2",
    "juicefs",
    "moosefs",
    "mfs",
    "lizardfs",
    "gvfsd-fuse",
    "httpfs",
    "sftpfs",
];

/// The network filesystem holding `path`, if it is on one.
pub fn network_filesystem(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let magic = rime_os::files::filesystem_magic(&file).ok()?;
    if let Some((_, name)) = NETWORK_MAGICS.iter().find(|(m, _)| *m == magic) {
        return Some((*name).to_string());
    }
    if magic == FUSE_MAGIC {
        let fstype = rime_os::mounts::filesystem_type_of(path)?;
        let subtype = fstype.strip_prefix("fuse.").unwrap_or(&fstype);
        if REMOTE_FUSE.contains(&subtype) {
            return Some(format!("{subtype} (FUSE)"));
        }
    }
    None
}
