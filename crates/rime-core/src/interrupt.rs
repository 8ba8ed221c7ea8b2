//! SIGINT, SIGTERM and SIGHUP while a command has changed the host: what it changed is put back
//! (filesystems thawed, VMs started again), then the process exits with 128 + the signal.
//!
//! A command registers an undo action for as long as the change lasts ([`on_interrupt`]; the
//! returned guard deregisters it). The signals are taken by `signal-hook`'s thread rather than a
//! blocked mask, so child processes (hooks, `virsh`) start with the default dispositions.
//! Actions run last registered first, in that thread, while the command's own threads may still
//! run: an action and the code it backs up must share a lock, so one of them does the undo; and
//! from the signal on, [`interrupted`] is true, so a backup publishes no snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

type Action = Box<dyn Fn() + Send + 'static>;

static ACTIONS: Mutex<Vec<(u64, Action)>> = Mutex::new(Vec::new());
static NEXT: Mutex<u64> = Mutex::new(0);
static INSTALL: Once = Once::new();
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A signal has arrived: the process is putting back its changes and will exit. Work still
/// running in other threads must not publish anything from here on (a snapshot whose freeze
/// the undo may have cut short).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Deregisters its action when dropped.
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut actions) = ACTIONS.lock() {
            actions.retain(|(id, _)| *id != self.0);
        }
    }
}

fn install() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    INSTALL.call_once(|| {
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot take SIGINT/SIGTERM ({e}); an interrupted command cannot undo its changes");
                return;
            }
        };
        std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("rime: interrupted (signal {signal}); putting back what this command changed");
                run_all();
                std::process::exit(128 + signal);
            }
        });
    });
}

/// Runs every registered action, last first (also what an interruption does).
fn run_all() {
    let actions = match ACTIONS.lock() {
        Ok(mut a) => std::mem::take(&mut *a),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    for (_, action) in actions.iter().rev() {
        action();
    }
}

/// Registers `undo` to run if the process is interrupted before the guard is dropped.
pub fn on_interrupt(undo: impl Fn() + Send + 'static) -> Registered {
    install();
    let id = {
        let mut n = NEXT.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        *n
    };
    ACTIONS.lock().unwrap_or_else(|p| p.into_inner()).push((id, Box::new(undo)));
    Registered(id)
}
