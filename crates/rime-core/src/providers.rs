//! Which snapshot provider takes each volume of a backup, and why (docs/CONSISTENCY.md,
//! "Snapshot providers"), tried in this order: storage-native (a read-only btrfs subvolume
//! snapshot when several image files of the backup live in one subvolume, else a reflink clone
//! for an image file in use on XFS or btrfs), `rime serve`'s engine for protected volumes, or
//! none (offline) for a volume nobody uses. `rime backup --dry-run` prints the plan without
//! taking anything; `--provider` forces one. The backup itself follows the same plan
//! ([`plan`]), so what `--dry-run` says is what a backup does.

use crate::commands::backup::Mode;
use crate::error::CommandError;
use crate::inuse::{self, Usage};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    BtrfsSnapshot,
    Reflink,
    RimeServe,
    Offline,
    /// A VM's disk through libvirt's backup API (`rime backup --vm`); never chosen by `plan`.
    LibvirtBackup,
}

impl Provider {
    pub fn parse(s: &str) -> anyhow::Result<Option<Provider>> {
        Ok(match s {
            "auto" => None,
            "btrfs-snapshot" => Some(Provider::BtrfsSnapshot),
            "reflink" => Some(Provider::Reflink),
            "rime-serve" => Some(Provider::RimeServe),
            "offline" => Some(Provider::Offline),
            other => anyhow::bail!(
                "unknown provider '{other}' (expected auto, btrfs-snapshot, reflink, rime-serve or offline)"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Provider::BtrfsSnapshot => "btrfs-snapshot",
            Provider::Reflink => "reflink",
            Provider::RimeServe => "rime-serve",
            Provider::Offline => "offline",
            Provider::LibvirtBackup => "libvirt-backup",
        }
    }

    /// A point-in-time snapshot (rather than an offline read).
    pub fn is_snapshot(self) -> bool {
        self != Provider::Offline
    }
}

/// The choice for one volume: a provider, or none (the backup of it would fail), and why.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub volume: String,
    pub provider: Option<Provider>,
    pub reason: String,
    /// For `btrfs-snapshot`: the subvolume whose snapshot holds the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subvolume: Option<PathBuf>,
    /// Why the backup must refuse the volume (when `provider` is None).
    #[serde(skip)]
    refusal: Option<Refusal>,
}

#[derive(Clone, Debug)]
enum Refusal {
    /// The one-line error of a volume in use or not takeable (exit code 6).
    InUse(String),
    /// On a network filesystem (exit code 6, its own error).
    Remote(String),
}

impl Choice {
    /// The error a backup of this volume fails with, if it has no provider.
    pub fn refusal(&self) -> Option<anyhow::Error> {
        Some(match self.refusal.as_ref()? {
            Refusal::InUse(msg) => CommandError::VolumeInUse(msg.clone()).into(),
            Refusal::Remote(fs) => {
                rime_volume::VolumeError::RemoteFilesystem { path: PathBuf::from(&self.volume), fs: fs.clone() }.into()
            }
        })
    }
}

/// Whether `image`'s filesystem can reflink it: tries a clone, removed at once.
fn can_reflink(image: &Path) -> bool {
    crate::reflink::clone(image).ok().flatten().is_some()
}

/// The providers for all volumes of one backup. Image files that would be cloned one by one
/// but share a btrfs subvolume are taken by one read-only snapshot of it instead: one instant
/// for all of them.
pub fn plan(paths: &[PathBuf], mode: Mode, forced: Option<Provider>) -> Vec<Choice> {
    let mut choices: Vec<Choice> = paths.iter().map(|p| choose(p, mode, forced)).collect();
    if forced.is_none() || forced == Some(Provider::BtrfsSnapshot) {
        let subvolumes: Vec<Option<PathBuf>> = choices
            .iter()
            .zip(paths)
            .map(|(c, p)| match c.provider {
                Some(Provider::Reflink | Provider::BtrfsSnapshot) => crate::btrfs_snapshot::subvolume_of(p),
                _ => None,
            })
            .collect();
        for (i, c) in choices.iter_mut().enumerate() {
            let Some(sub) = &subvolumes[i] else { continue };
            let sharing = subvolumes.iter().filter(|s| s.as_ref() == Some(sub)).count();
            if sharing >= 2 || forced == Some(Provider::BtrfsSnapshot) {
                c.provider = Some(Provider::BtrfsSnapshot);
                c.reason = format!(
                    "{}; {sharing} image file(s) of this backup in btrfs subvolume {}: one read-only subvolume snapshot takes them at one instant",
                    c.reason,
                    sub.display()
                );
                c.subvolume = Some(sub.clone());
            }
        }
    }
    if let Some(p) = forced {
        for c in choices.iter_mut().filter(|c| c.provider.is_some_and(|q| q != p)) {
            let why = format!("--provider {} cannot take it: {}", p.name(), c.reason);
            c.refusal = Some(Refusal::InUse(format!("{}: {why}", c.volume)));
            c.provider = None;
            c.reason = why;
        }
    }
    choices
}

/// Decides the provider for `path` alone under `mode` (and `forced`, from `--provider`),
/// without taking a snapshot. [`plan`] is this for a whole backup.
pub fn choose(path: &Path, mode: Mode, forced: Option<Provider>) -> Choice {
    let volume = path.display().to_string();
    let choice =
        |provider, reason: String| Choice { volume: volume.clone(), provider, reason, subvolume: None, refusal: None };
    let refuse = |reason: String, error: String| Choice {
        volume: volume.clone(),
        provider: None,
        reason,
        subvolume: None,
        refusal: Some(Refusal::InUse(error)),
    };
    if let Some(control) = crate::online::protected(path) {
        return match (mode, forced) {
            (Mode::Offline, _) => refuse(
                "protected by rime serve, and --mode offline takes no snapshot".into(),
                format!(
                    "{volume} is protected by rime serve and may be written at any moment; --mode offline backs up only volumes not in use"
                ),
            ),
            (_, Some(p)) if p != Provider::RimeServe => {
                let why = format!("protected by rime serve, which --provider {} cannot bypass", p.name());
                refuse(why.clone(), format!("{volume}: {why}"))
            }
            _ => choice(
                Some(Provider::RimeServe),
                format!("protected by rime serve (control socket {})", control.display()),
            ),
        };
    }
    if forced == Some(Provider::RimeServe) {
        let why = "--provider rime-serve cannot take it: not protected by rime serve".to_string();
        return refuse(why.clone(), format!("{volume}: {why}"));
    }
    // Checked before anything else touches the file: a lock or an open-file scan here says
    // nothing of writers on the host that serves it.
    if let Some(fs) = rime_volume::remote::network_filesystem(path) {
        return Choice {
            volume: volume.clone(),
            provider: None,
            reason: format!("on a network filesystem ({fs})"),
            subvolume: None,
            refusal: Some(Refusal::Remote(fs)),
        };
    }
    let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let usage = inuse::check(path);
    let storage_forced = matches!(forced, Some(Provider::Reflink | Provider::BtrfsSnapshot));
    let want_snapshot = matches!(usage, Usage::InUse(_)) || mode == Mode::Online || storage_forced;
    if want_snapshot && mode != Mode::Offline && forced != Some(Provider::Offline) && is_file {
        if can_reflink(path) {
            let why = match &usage {
                Usage::InUse(why) => format!("{why}; its filesystem makes reflink clones"),
                Usage::Idle => "its filesystem makes reflink clones".into(),
            };
            return choice(Some(Provider::Reflink), why);
        }
        if storage_forced {
            let why = format!(
                "--provider {} cannot take it: its filesystem cannot make reflink clones or snapshots (XFS with reflink, or btrfs, can)",
                forced.map_or("", Provider::name)
            );
            return refuse(why.clone(), format!("{volume}: {why}"));
        }
    }
    match usage {
        Usage::InUse(why) => refuse(
            format!("{why}, and no snapshot provider can take it"),
            match mode {
                Mode::Offline => format!("{why}; --mode offline backs up only volumes not in use"),
                Mode::Auto | Mode::Online => format!(
                    "{why}, and no snapshot provider can take a consistent image of it; \
                     stop its users, or protect it with `rime serve`"
                ),
            },
        ),
        Usage::Idle if mode == Mode::Online => refuse(
            "--mode online, and no snapshot provider can take it".into(),
            format!(
                "--mode online needs a snapshot provider for {volume}; none is available for it (rime serve, or a reflink clone or btrfs snapshot of an image file on XFS or btrfs)"
            ),
        ),
        Usage::Idle => choice(Some(Provider::Offline), "not in use".into()),
    }
}
