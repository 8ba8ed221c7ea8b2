//! Capturing every volume of one backup, following the providers' plan
//! ([`crate::providers::plan`]), at one instant where the providers allow it.
//!
//! Order: offline volumes are opened first (exclusively, with QEMU's image locks held), so a
//! refusal comes before any write gate closes → the snapshots of all `rime serve` volumes are
//! taken in parallel, each server closing its write gate after its own write-inactivity
//! period and *keeping it closed* (a held snapshot) → the storage-native snapshots (btrfs
//! subvolume snapshots, reflink clones) are taken while every gate is still closed → every gate
//! is reopened. Why that is one instant: a write left out of one snapshot waits at its gate
//! until all gates reopen, after every snapshot, so no write that depends on it (issued after
//! it completed) can be in any snapshot. A gate is held for at most [`GATE_HOLD_LIMIT`]; past
//! it the server lets writes through and aborts its snapshot, and the backup fails rather than
//! pass off volumes of different instants as one.
//!
//! Invariants: every snapshot, clone and held gate taken here is released when the returned
//! volumes are dropped, and at once on any failure; the record says truthfully whether the
//! volumes are of one instant.

use crate::btrfs_snapshot::{self, SubvolumeSnapshot};
use crate::error::CommandError;
use crate::providers::{self, Provider};
use anyhow::{Context, Result};
use rime_serve::SnapshotSource;
use rime_snapshot::engine::epoch_now;
use rime_volume::Volume;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a served volume's write gate stays closed while the other volumes are captured.
pub const GATE_HOLD_LIMIT: Duration = Duration::from_secs(10);

/// One volume, open for reading at its captured instant.
pub struct OpenVolume {
    pub volume: Volume,
    pub name: String,
    pub provider: Provider,
    /// Seconds since the Unix epoch of its snapshot instant (None: read offline).
    pub captured_at: Option<f64>,
    /// A protected volume's snapshot (`rime serve`), which `volume` reads.
    pub online: Option<Arc<SnapshotSource>>,
    /// For an image file read offline: the open file holding QEMU's "write not shared" lock
    /// until the backup ends.
    _qemu_guard: Option<std::fs::File>,
    /// An image file read through its reflink clone (removed when this is dropped).
    pub reflink: Option<crate::reflink::Clone>,
    /// An image file read inside a btrfs subvolume snapshot (deleted with its last volume).
    _subvolume_snapshot: Option<Arc<SubvolumeSnapshot>>,
    /// A VM file the backup carried into the snapshot (not a volume of the host).
    pub carried: bool,
}

impl OpenVolume {
    /// A VM file staged at the snapshot's instant (`read_from`), imaged under its host path.
    pub fn carried(host_path: &Path, read_from: &Path, name: String) -> Result<OpenVolume> {
        let file = std::fs::File::open(read_from).with_context(|| format!("open {}", read_from.display()))?;
        let size = file.metadata()?.len();
        let volume = Volume::from_source(host_path.to_path_buf(), rime_volume::VolumeKind::File, size, Arc::new(file));
        Ok(OpenVolume {
            volume,
            name,
            provider: Provider::Offline,
            captured_at: None,
            online: None,
            _qemu_guard: None,
            reflink: None,
            _subvolume_snapshot: None,
            carried: true,
        })
    }
}

impl OpenVolume {
    /// A VM's disk read through libvirt's point-in-time export (or its file, for a VM not
    /// running), under the snapshot volume name `name`.
    pub fn vm_disk(volume: Volume, name: String) -> OpenVolume {
        OpenVolume {
            volume,
            name,
            provider: Provider::LibvirtBackup,
            captured_at: Some(epoch_now()),
            online: None,
            _qemu_guard: None,
            reflink: None,
            _subvolume_snapshot: None,
            carried: false,
        }
    }
}

/// Every volume of a backup, captured.
pub struct Capture {
    pub volumes: Vec<OpenVolume>,
    /// The volumes are of one instant (or were not written at all).
    pub coherent: bool,
    /// Why, in words, for the snapshot's metadata.
    pub instant: String,
    /// Milliseconds the served volumes' write gates were closed (first closing to last
    /// reopening); None when no served volume was snapshotted.
    pub gate_closed_ms: Option<f64>,
    /// Milliseconds taking every snapshot took.
    pub capture_ms: f64,
}

/// How long a served volume whose every filesystem is frozen must be quiet before its gate
/// closes: the freeze already stopped and flushed its writes (FIFREEZE returns after the flush),
/// and the engine's write count proves afterwards that none came, so the usual write-inactivity
/// period only lengthens the freeze window.
pub const FROZEN_WIP: Duration = Duration::from_millis(10);

/// Captures `paths` as `plan` ([`providers::plan`] of them) decides. `frozen`: the volumes whose
/// every mounted filesystem the backup froze (their wait is [`FROZEN_WIP`]).
pub fn capture(paths: &[PathBuf], plan: &[providers::Choice], frozen: &[PathBuf]) -> Result<Capture> {
    let started = Instant::now();
    assert_eq!(plan.len(), paths.len(), "one choice per volume");
    if let Some(refusal) = plan.iter().find_map(|c| c.refusal()) {
        return Err(refusal);
    }
    let of = |p: Provider| -> Vec<usize> { (0..paths.len()).filter(|&i| plan[i].provider == Some(p)).collect() };
    let (offline, served) = (of(Provider::Offline), of(Provider::RimeServe));
    let storage: Vec<usize> = (0..paths.len())
        .filter(|&i| matches!(plan[i].provider, Some(Provider::Reflink | Provider::BtrfsSnapshot)))
        .collect();
    let mut slots: Vec<Option<OpenVolume>> = (0..paths.len()).map(|_| None).collect();

    for &i in &offline {
        slots[i] = Some(open_offline(&paths[i])?);
    }
    // Gates are held only when there is something else to capture at the same instant.
    let hold = (!served.is_empty() && served.len() + storage.len() >= 2).then_some(GATE_HOLD_LIMIT);
    let controls: Vec<(PathBuf, Option<Duration>)> = served
        .iter()
        .map(|&i| {
            let control = crate::online::protected(&paths[i]).context("the rime serve process went away")?;
            Ok((control, frozen.contains(&paths[i]).then_some(FROZEN_WIP)))
        })
        .collect::<Result<_>>()?;
    let sources = begin_all(&controls, hold)?;
    let storage_result = capture_storage(paths, plan, &storage, &mut slots);
    let mut gate_closed_ms = None;
    if !sources.is_empty() {
        let first_closed = sources.iter().map(|s| s.info.gate_closed_at).fold(f64::INFINITY, f64::min);
        let mut last_opened = 0f64;
        for s in &sources {
            if hold.is_some() {
                let release = s.release_gate().map_err(|e| {
                    CommandError::SnapshotFailed(format!(
                        "the snapshot of {} could not be held at one instant with the backup's other volumes: {e}",
                        s.volume.display()
                    ))
                })?;
                last_opened = last_opened.max(release.opened_at);
            } else {
                last_opened = last_opened.max(s.info.gate_closed_at + s.info.gate_closed_ms / 1000.0);
            }
        }
        gate_closed_ms = Some(((last_opened - first_closed) * 1000.0).max(0.0));
    }
    storage_result?;
    for (&i, source) in served.iter().zip(sources) {
        let source = Arc::new(source);
        let volume = crate::online::volume_of(&source);
        slots[i] = Some(OpenVolume {
            name: String::new(),
            provider: Provider::RimeServe,
            captured_at: Some(source.taken_at),
            volume,
            online: Some(source),
            _qemu_guard: None,
            reflink: None,
            _subvolume_snapshot: None,
            carried: false,
        });
    }

    let reflinks = of(Provider::Reflink).len();
    let (coherent, instant) = describe_instant(offline.len(), served.len(), storage.len(), reflinks, plan);
    let mut volumes: Vec<OpenVolume> = Vec::new();
    for slot in slots {
        let mut v = slot.expect("every planned volume is opened");
        v.name = unique_name(&volumes, &v.volume.path);
        volumes.push(v);
    }
    Ok(Capture { volumes, coherent, instant, gate_closed_ms, capture_ms: started.elapsed().as_secs_f64() * 1000.0 })
}

/// Takes the snapshots of all served volumes in parallel; on any failure, every one taken is
/// dropped again (which reopens its gate and aborts it).
/// Each control socket comes with its write-inactivity period (None: the server's default).
fn begin_all(controls: &[(PathBuf, Option<Duration>)], hold: Option<Duration>) -> Result<Vec<SnapshotSource>> {
    let results: Vec<Result<SnapshotSource>> = std::thread::scope(|scope| {
        let handles: Vec<_> = controls
            .iter()
            .map(|(c, wip)| scope.spawn(move || SnapshotSource::begin_with(c, *wip, None, None, hold)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("snapshot thread panicked"))))
            .collect()
    });
    results.into_iter().collect()
}

/// Reflink clones and btrfs subvolume snapshots, one snapshot per subvolume.
fn capture_storage(
    paths: &[PathBuf],
    plan: &[providers::Choice],
    storage: &[usize],
    slots: &mut [Option<OpenVolume>],
) -> Result<()> {
    let mut subvolume_snapshots: HashMap<PathBuf, (Arc<SubvolumeSnapshot>, f64)> = HashMap::new();
    for &i in storage {
        let path = &paths[i];
        let provider = plan[i].provider.expect("planned");
        let (read_from, captured_at, reflink, subvolume_snapshot) = if provider == Provider::BtrfsSnapshot {
            let sub = plan[i].subvolume.clone().context("a btrfs snapshot is planned with its subvolume")?;
            let (snap, at) = match subvolume_snapshots.get(&sub) {
                Some(s) => s.clone(),
                None => {
                    let s = (Arc::new(btrfs_snapshot::take(&sub)?), epoch_now());
                    subvolume_snapshots.insert(sub, s.clone());
                    s
                }
            };
            (snap.image(path)?, at, None, Some(snap))
        } else {
            let clone = crate::reflink::clone(path)?.ok_or_else(|| {
                CommandError::SnapshotFailed(format!(
                    "{}: its filesystem no longer makes reflink clones",
                    path.display()
                ))
            })?;
            (clone.path.clone(), epoch_now(), Some(clone), None)
        };
        let mut volume = Volume::open(&read_from, false)?;
        volume.path = path.to_path_buf();
        slots[i] = Some(OpenVolume {
            volume,
            name: String::new(),
            provider,
            captured_at: Some(captured_at),
            online: None,
            _qemu_guard: None,
            reflink,
            _subvolume_snapshot: subvolume_snapshot,
            carried: false,
        });
    }
    Ok(())
}

/// An idle volume, read directly: exclusively (the kernel refuses it if someone mounts the
/// device meanwhile) and, for an image file, with QEMU's "write is not shared" lock held for
/// the whole backup, so no VM starts writing it meanwhile.
fn open_offline(path: &Path) -> Result<OpenVolume> {
    let qemu_guard = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
            rime_os::qemu_locks::refuse_qemu_writers(&f).map_err(|e| {
                CommandError::VolumeInUse(format!("{} is being opened for writing by QEMU ({e})", path.display()))
            })?;
            Some(f)
        }
        _ => None,
    };
    Ok(OpenVolume {
        volume: Volume::open(path, true)?,
        name: String::new(),
        provider: Provider::Offline,
        captured_at: None,
        online: None,
        _qemu_guard: qemu_guard,
        reflink: None,
        _subvolume_snapshot: None,
        carried: false,
    })
}

fn describe_instant(
    offline: usize,
    served: usize,
    storage: usize,
    reflinks: usize,
    plan: &[providers::Choice],
) -> (bool, String) {
    if served + storage == 0 {
        return (true, format!("{offline} volume(s) not in use, read offline with their users locked out"));
    }
    let subvolumes: std::collections::HashSet<_> = plan.iter().filter_map(|c| c.subvolume.as_ref()).collect();
    // Storage-native snapshots do not hold their images' writers: two of them are two instants.
    let storage_instants = subvolumes.len() + reflinks;
    if storage_instants >= 2 {
        return (
            false,
            format!(
                "{storage_instants} storage snapshots ({reflinks} reflink clone(s), {} btrfs subvolume snapshot(s)) were \
                 taken one after another: each is crash-consistent on its own, but they are of one instant only if \
                 hooks or writers held their users (image files in one btrfs subvolume are taken by one snapshot)",
                subvolumes.len()
            ),
        );
    }
    let mut parts = Vec::new();
    if served > 0 {
        parts.push(match served {
            1 => "the write gate of 1 rime serve volume was closed".to_string(),
            n => format!("the write gates of {n} rime serve volumes were closed together"),
        });
    }
    if !subvolumes.is_empty() {
        parts.push(format!("{} btrfs subvolume snapshot(s) taken", subvolumes.len()));
    }
    if reflinks == 1 {
        parts.push("1 reflink clone taken".into());
    }
    let mut text = format!("one instant: {}", parts.join(", "));
    if served > 0 && served + storage >= 2 {
        text.push_str(" while every gate was held");
    }
    if offline > 0 {
        text.push_str(&format!("; {offline} volume(s) not in use, read offline"));
    }
    (true, text)
}

fn unique_name(existing: &[OpenVolume], path: &Path) -> String {
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "volume".into());
    let mut name = base.clone();
    let mut n = 2;
    while existing.iter().any(|v| v.name == name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}
