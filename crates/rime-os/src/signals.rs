//! Signals taken synchronously: block them before any thread starts (threads inherit the mask,
//! so no other thread is interrupted), then wait for one in the thread that decides what to do.

pub use nix::sys::signal::Signal;
use nix::sys::signal::{SigSet, SigmaskHow};

/// A set of signals blocked in the calling thread (and every thread it starts afterwards).
pub struct BlockedSignals {
    set: SigSet,
}

impl BlockedSignals {
    /// Blocks `signals` in the calling thread. Call before starting threads.
    pub fn block(signals: &[Signal]) -> std::io::Result<BlockedSignals> {
        let mut set = SigSet::empty();
        for &s in signals {
            set.add(s);
        }
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        Ok(BlockedSignals { set })
    }

    /// Waits until one of the blocked signals arrives.
    pub fn wait(&self) -> Signal {
        loop {
            if let Ok(s) = self.set.wait() {
                return s;
            }
        }
    }
}

/// Sends `signal` to this process (a watcher thread waking the thread that waits).
pub fn raise_in_process(signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), signal);
}
