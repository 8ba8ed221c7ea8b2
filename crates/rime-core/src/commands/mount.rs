//! `rime mount`: a read-only FUSE view of a snapshot, served straight from the repository.
//!
//! ```text
//! MOUNTPOINT/
//!   <volume>               one file per backed-up volume, as large as the volume: `mount -o
//!                          loop,ro` it (any filesystem the kernel knows, XFS and btrfs
//!                          included), or `losetup -P -r` it for a whole disk
//!   <volume>.replayed      ext3/ext4 whose journal a mount would replay: the volume replayed
//!                          and marked clean, so that `mount -o loop,ro` shows what a
//!                          read-write mount would (a read-only mount cannot replay)
//!   <volume>.files/        the volume's file tree, for filesystems Rime reads (ext2/3/4, FAT,
//!                          NTFS, btrfs), as a mount shows it (after journal replay)
//!   <volume>.part<N>.files/  the file tree of partition N of a whole-disk volume
//! ```
//!
//! The command runs in the foreground until the file system is unmounted: Ctrl-C (SIGINT),
//! SIGTERM or SIGHUP unmount it and exit 0, and so does `fusermount -u MOUNTPOINT` (or
//! `umount`) from outside. A mount point that does not exist, is not an empty directory, or is
//! already a mount point is refused with a one-line error.

use crate::explorer::{Explorer, Selection};
use crate::snapshot_reader::ReadStats;
use anyhow::Result;
use rime_fuse::SnapshotView;
use rime_repo::Repository;
use rime_volume::fs::ext4_journal::ExtVolume;
use rime_volume::Region;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub snapshot: String,
    pub mountpoint: PathBuf,
    pub cache_bytes: Option<u64>,
    /// Let other users read the view (FUSE `allow_other`).
    pub allow_other: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MountedVolume {
    /// File name under the mount point.
    pub image: String,
    /// ext whose journal awaits replay: a second image, replayed and marked clean.
    pub replayed_image: Option<String>,
    pub size: u64,
    /// Browsable trees: (directory name, filesystem).
    pub trees: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MountSummary {
    pub snapshot: String,
    pub mountpoint: String,
    pub volumes: Vec<MountedVolume>,
    pub seconds: f64,
    #[serde(flatten)]
    pub stats: ReadStats,
}

/// Mounts, serves until unmounted or signalled, and returns what was served. `ready` is
/// called once the view is mounted.
pub fn mount(repo: Repository, opts: &MountOptions, ready: &dyn Fn(&MountSummary)) -> Result<MountSummary> {
    let started = Instant::now();
    rime_os::mounts::check_mountpoint(&opts.mountpoint)?;
    let explorer = Explorer::open(repo, &opts.snapshot, opts.cache_bytes)?;
    let manifest = explorer.manifest.clone();

    let mut images = Vec::new();
    let mut trees = Vec::new();
    let mut volumes = Vec::new();
    let mut seen_lvs = Vec::new();
    for v in &manifest.volumes {
        let reader = explorer.reader(v)?;
        let mut mounted =
            MountedVolume { image: v.name.clone(), replayed_image: None, size: v.size, trees: Vec::new() };
        // Each selection is opened once: (tree directory name, label for messages, its bytes).
        let mut opened: Vec<(String, String, Region)> = Vec::new();
        let mut open = |dir_name: String, sel: Selection| {
            let label = sel.label();
            match explorer.open_selection(sel) {
                Ok(o) => {
                    opened.push((dir_name, label, o.region.clone()));
                    Some(o.region)
                }
                Err(e) => {
                    tracing::warn!("volume {label}: {e:#}");
                    None
                }
            }
        };
        open(format!("{}.files", v.name), Selection { volume: v.clone(), partition: None, lv: None });
        for p in &v.partitions {
            let sel = Selection { volume: v.clone(), partition: Some(p.clone()), lv: None };
            open(format!("{}.part{}.files", v.name, p.number), sel);
        }
        // Logical volumes: each as an image file (what a loop mount takes) and, where Rime reads
        // its filesystem, as a tree. An LV on several PVs is listed under the first only.
        for sel in crate::explorer::logical_volumes(&manifest).into_iter().filter(|s| s.volume.name == v.name) {
            let lv = sel.lv.as_ref().expect("logical_volumes returns LVs");
            let key = (lv.vg_uuid.clone(), lv.entry.uuid.clone());
            if !lv.entry.visible || seen_lvs.contains(&key) || lv.entry.role != "data" {
                continue;
            }
            seen_lvs.push(key);
            // device-mapper's naming: VG-LV, with hyphens inside either name doubled.
            let dm_name = format!("{}-{}", lv.vg.replace('-', "--"), lv.entry.name.replace('-', "--"));
            let base = match &sel.partition {
                Some(p) => format!("{}.part{}.{dm_name}", v.name, p.number),
                None => format!("{}.{dm_name}", v.name),
            };
            if let Some(region) = open(format!("{base}.files"), sel) {
                images.push((format!("{base}.img"), region));
            }
        }
        for (dir_name, label, region) in opened {
            match rime_explore::open(&region) {
                Ok(Some(fs)) => {
                    mounted.trees.push((dir_name.clone(), fs.fs_type().to_string()));
                    trees.push((dir_name, fs));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("volume {label}: its filesystem cannot be browsed: {e:#}"),
            }
        }
        let image = Region::from_source(reader, v.name.clone(), v.size);
        // An ext volume whose journal a mount would replay also appears replayed and marked
        // clean: a read-only loop mount cannot replay it, and `noload` would show it stale.
        if let Some(replayed) = ExtVolume::open(&image).ok().flatten().and_then(|e| e.replayed_image().ok().flatten()) {
            let name = format!("{}.replayed", v.name);
            mounted.replayed_image = Some(name.clone());
            images.push((name, replayed));
        }
        images.push((v.name.clone(), image));
        volumes.push(mounted);
    }

    let view = SnapshotView {
        images,
        trees,
        time: SystemTime::from(manifest.time),
        fs_name: format!("rime:{}", &manifest.id),
        allow_other: opts.allow_other,
    };
    let summary = |stats| MountSummary {
        snapshot: manifest.id.clone(),
        mountpoint: opts.mountpoint.display().to_string(),
        volumes: volumes.clone(),
        seconds: started.elapsed().as_secs_f64(),
        stats,
    };
    rime_fuse::serve_snapshot_view(view, &opts.mountpoint, &mut || ready(&summary(explorer.counter.stats())))?;
    Ok(summary(explorer.counter.stats()))
}
