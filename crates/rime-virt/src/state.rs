//! libvirt's domain states, and the state table a backup works by (docs/VMS.md):
//!
//! | state | backup |
//! |---|---|
//! | shut off; shut off with a managed-save image (saved) | safe: backed up as it is |
//! | running, paused, blocked, pmsuspended | stopped first (managed save keeps memory) |
//! | starting, shutting down, saving, restoring (transient) | waited out first |
//! | crashed | reported, backed up as it is, with a warning |
//!
//! States are read from `virsh domstate --reason` in the C locale; the managed-save flag from
//! libvirt's own list of domains that have one.

use serde::{Deserialize, Serialize};

/// libvirt's `virDomainState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    NoState,
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    PmSuspended,
}

/// What a backup does with a domain in a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Treatment {
    /// Its files are at rest: back them up as they are.
    Safe,
    /// Its memory is live: managed-save it first.
    Stop,
    /// On its way somewhere: wait until it settles, then decide again.
    WaitOut,
    /// Crashed: back up as it is, with a warning.
    AsIs,
}

/// A domain's state with libvirt's reason, and whether it has a managed-save image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    pub state: State,
    /// libvirt's reason, in its words ("booted", "user", "saved", "starting up", ...).
    pub reason: String,
    /// A managed-save image exists: the domain starts again from it.
    pub saved: bool,
}

impl DomainState {
    /// Parses `virsh domstate --reason` ("running (booted)", "shut off (saved)").
    pub fn parse(text: &str, saved: bool) -> Option<DomainState> {
        let text = text.trim();
        let (word, reason) = match text.split_once(" (") {
            Some((w, r)) => (w, r.trim_end_matches(')')),
            None => (text, "unknown"),
        };
        let state = match word {
            "no state" => State::NoState,
            "running" => State::Running,
            "idle" | "blocked" => State::Blocked,
            "paused" => State::Paused,
            "in shutdown" => State::ShuttingDown,
            "shut off" => State::ShutOff,
            "crashed" => State::Crashed,
            "pmsuspended" => State::PmSuspended,
            _ => return None,
        };
        Some(DomainState { state, reason: reason.to_string(), saved })
    }

    /// The state as the table names it.
    pub fn label(&self) -> &'static str {
        match self.state {
            State::ShutOff if self.saved => "saved",
            State::ShutOff => "shut off",
            State::Running => "running",
            State::Blocked => "blocked",
            State::Paused if self.reason == "starting up" => "starting",
            State::Paused if self.reason == "saving" => "saving",
            State::Paused => "paused",
            State::PmSuspended => "pmsuspended",
            State::ShuttingDown => "shutting down",
            State::NoState => "starting",
            State::Crashed => "crashed",
        }
    }

    pub fn treatment(&self) -> Treatment {
        match self.label() {
            "saved" | "shut off" => Treatment::Safe,
            "running" | "blocked" | "paused" | "pmsuspended" => Treatment::Stop,
            "crashed" => Treatment::AsIs,
            _ => Treatment::WaitOut,
        }
    }

    /// Active: a QEMU process runs for it.
    pub fn is_active(&self) -> bool {
        !matches!(self.state, State::ShutOff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, saved: bool) -> (&'static str, Treatment) {
        let d = DomainState::parse(s, saved).unwrap();
        (d.label(), d.treatment())
    }

    #[test]
    fn the_state_table() {
        assert_eq!(t("shut off (saved)", true), ("saved", Treatment::Safe));
        assert_eq!(t("shut off (shutdown)", false), ("shut off", Treatment::Safe));
        assert_eq!(t("running (booted)", false), ("running", Treatment::Stop));
        assert_eq!(t("paused (user)", false), ("paused", Treatment::Stop));
        assert_eq!(t("idle", false), ("blocked", Treatment::Stop));
        assert_eq!(t("pmsuspended (unknown)", false), ("pmsuspended", Treatment::Stop));
        assert_eq!(t("paused (starting up)", false), ("starting", Treatment::WaitOut));
        assert_eq!(t("paused (saving)", false), ("saving", Treatment::WaitOut));
        assert_eq!(t("in shutdown (user)", false), ("shutting down", Treatment::WaitOut));
        assert_eq!(t("crashed (panicked)", false), ("crashed", Treatment::AsIs));
        assert!(DomainState::parse("exploded", false).is_none());
    }
}
