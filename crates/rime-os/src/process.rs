//! Processes.

/// Whether process `pid` exists (signal 0: nothing is sent).
pub fn is_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    rustix::process::Pid::from_raw(pid).is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// The effective user is root (device nodes and owners can be restored).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The real user and group (the owner shown for synthetic files).
pub fn real_ids() -> (u32, u32) {
    (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw())
}

/// This machine's host name (recorded in snapshots and lock objects).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Sends `signal` to every process of process group `pgid` (errors ignored: the group may be
/// gone already).
pub fn signal_group(pgid: u32, signal: crate::signals::Signal) {
    if let Ok(pgid) = i32::try_from(pgid) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}

/// Sends `signal` to process `pid` (errors ignored: it may be gone already).
pub fn signal(pid: u32, signal: crate::signals::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Makes the calling process the leader of a new session (no controlling terminal, its own
/// process group), so that a terminal's hangup or Ctrl-C never reaches it: what a daemon
/// started by a command does first.
pub fn new_session() -> std::io::Result<()> {
    rustix::process::setsid().map(drop).map_err(std::io::Error::from)
}

/// The arguments process `pid` was started with (`/proc/PID/cmdline`); None if it is gone.
pub fn command_line(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
}
