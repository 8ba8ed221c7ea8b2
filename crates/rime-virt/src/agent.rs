//! The QEMU guest agent: whether it answers, and freezing and thawing the guest's filesystems
//! (`virDomainFSFreeze`/`virDomainFSThaw`) around the instant a backup begins.
//!
//! Invariants: every call is bounded (a guest that does not answer costs at most
//! [`AGENT_TIMEOUT`]); a freeze that succeeded is thawed by [`Frozen`]'s drop if the caller did
//! not thaw it, so a failed backup never leaves a guest frozen.

use crate::virsh::{Libvirt, VirtError};
use std::time::Duration;

/// Longest wait for the agent to answer a ping.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a freeze (the guest flushes its filesystems first) or a thaw.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the guest agent answers a ping; `Err` with libvirt's reason when it does not.
pub fn ping(lv: &Libvirt, uuid: &str) -> Result<(), VirtError> {
    let timeout = AGENT_TIMEOUT.as_secs().to_string();
    lv.run_for(
        "asking the guest agent",
        ["qemu-agent-command", uuid, r#"{"execute":"guest-ping"}"#, "--timeout", &timeout],
        AGENT_TIMEOUT + Duration::from_secs(5),
    )
    .map(drop)
}

/// The guest's filesystems, frozen until [`Frozen::thaw`] or drop.
pub struct Frozen {
    lv: Libvirt,
    uuid: String,
    /// How many filesystems the guest froze.
    pub count: u32,
    thawed: bool,
}

/// Freezes every filesystem the guest has mounted.
pub fn freeze(lv: &Libvirt, uuid: &str) -> Result<Frozen, VirtError> {
    let out = lv.run_verbose("freezing the guest's filesystems", ["domfsfreeze", uuid], FREEZE_TIMEOUT)?;
    // "Froze 2 filesystem(s)"
    let count = out.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or(0);
    Ok(Frozen { lv: lv.clone(), uuid: uuid.to_string(), count, thawed: false })
}

impl Frozen {
    pub fn thaw(mut self) -> Result<(), VirtError> {
        self.thawed = true;
        thaw(&self.lv, &self.uuid)
    }
}

fn thaw(lv: &Libvirt, uuid: &str) -> Result<(), VirtError> {
    lv.run_for("thawing the guest's filesystems", ["domfsthaw", uuid], FREEZE_TIMEOUT).map(drop)
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            if let Err(e) = thaw(&self.lv, &self.uuid) {
                tracing::warn!("{e}");
            }
        }
    }
}
