//! Which snapshot provider takes each volume of a backup, and why (docs/CONSISTENCY.md,
//! "Snapshot providers"): `rime serve`'s engine for protected volumes, a reflink clone for an
//! image file in use on XFS or btrfs, or none (offline) for a volume nobody uses. `rime backup
//! --dry-run` prints these choices without taking anything; `--provider` forces one.

use crate::commands::backup::Mode;
use crate::inuse::{self, Usage};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    RimeServe,
    Reflink,
    Offline,
}

impl Provider {
    pub fn parse(s: &str) -> anyhow::Result<Option<Provider>> {
        Ok(match s {
            "auto" => None,
            "rime-serve" => Some(Provider::RimeServe),
            "reflink" => Some(Provider::Reflink),
            "offline" => Some(Provider::Offline),
            other => anyhow::bail!("unknown provider '{other}' (expected auto, rime-serve, reflink or offline)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Provider::RimeServe => "rime-serve",
            Provider::Reflink => "reflink",
            Provider::Offline => "offline",
        }
    }
}

/// The choice for one volume: a provider, or none (the backup of it would fail), and why.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub volume: String,
    pub provider: Option<Provider>,
    pub reason: String,
}

/// Whether `image`'s filesystem can reflink it: tries a clone, removed at once.
fn can_reflink(image: &Path) -> bool {
    crate::reflink::clone(image).ok().flatten().is_some()
}

/// Decides the provider for `path` under `mode` (and `forced`, from `--provider`), without
/// taking a snapshot.
pub fn choose(path: &Path, mode: Mode, forced: Option<Provider>) -> Choice {
    let volume = path.display().to_string();
    let choice = |provider, reason: String| Choice { volume: volume.clone(), provider, reason };
    if let Some(control) = crate::online::protected(path) {
        return match (mode, forced) {
            (Mode::Offline, _) => choice(None, "protected by rime serve, and --mode offline takes no snapshot".into()),
            (_, Some(p)) if p != Provider::RimeServe => {
                choice(None, format!("protected by rime serve, which --provider {} cannot bypass", p.name()))
            }
            _ => choice(
                Some(Provider::RimeServe),
                format!("protected by rime serve (control socket {})", control.display()),
            ),
        };
    }
    if forced == Some(Provider::RimeServe) {
        return choice(None, "not protected by rime serve".into());
    }
    if let Some(fs) = rime_volume::remote::network_filesystem(path) {
        return choice(None, format!("on a network filesystem ({fs})"));
    }
    let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    let usage = inuse::check(path);
    let want_snapshot = matches!(usage, Usage::InUse(_)) || mode == Mode::Online || forced == Some(Provider::Reflink);
    if want_snapshot && mode != Mode::Offline && forced != Some(Provider::Offline) && is_file {
        if can_reflink(path) {
            let why = match &usage {
                Usage::InUse(why) => format!("{why}; its filesystem makes reflink clones"),
                Usage::Idle => "its filesystem makes reflink clones".into(),
            };
            return choice(Some(Provider::Reflink), why);
        }
        if forced == Some(Provider::Reflink) {
            return choice(None, "its filesystem cannot make reflink clones (XFS with reflink, or btrfs, can)".into());
        }
    }
    match usage {
        Usage::InUse(why) => choice(None, format!("{why}, and no snapshot provider can take it")),
        Usage::Idle if mode == Mode::Online => {
            choice(None, "--mode online, and no snapshot provider can take it".into())
        }
        Usage::Idle => choice(Some(Provider::Offline), "not in use".into()),
    }
}
