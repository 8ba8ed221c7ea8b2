//! Stopping domains (managed save) and starting them again, many at once, with bounded waits.
//!
//! [`stop`]: every selected domain that is running, paused, blocked or pmsuspended is
//! managed-saved, all at once; one on its way there (starting, restoring, saving, shutting
//! down) is waited for first; then each is followed until it is saved or off. States are read
//! again every second; a save's own end is noticed within milliseconds. Past `max_wait` a save
//! still under way is aborted (`domjobabort`: the domain goes on running as it was) and
//! reported; nothing is left half-done.
//!
//! [`start`]: every saved domain is started from its managed-save image, all at once; with
//! `wait`, each is followed until it runs.

use crate::domains;
use crate::state::{DomainState, State, Treatment};
use crate::virsh::{Libvirt, Running, VirtError};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How often states are read while waiting.
pub const POLL: Duration = Duration::from_secs(1);
/// How often a running `virsh` is checked for its end.
const TICK: Duration = Duration::from_millis(20);

/// A domain to act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub uuid: String,
}

/// A domain that [`stop`] managed-saved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stopped {
    pub name: String,
    pub uuid: String,
    /// Its state before (as the state table names it: "running", "paused", ...).
    pub was: String,
    /// Milliseconds its save took.
    pub save_ms: f64,
    /// When the save was asked for (for the interruption it causes).
    #[serde(skip)]
    pub asked_at: Option<Instant>,
}

/// A domain left as it was, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Untouched {
    pub name: String,
    pub uuid: String,
    pub state: String,
    pub why: String,
}

/// A domain an action failed on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failed {
    pub name: String,
    pub uuid: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StopOutcome {
    pub stopped: Vec<Stopped>,
    pub untouched: Vec<Untouched>,
    pub failed: Vec<Failed>,
}

/// Where one domain is in [`stop`].
enum Step {
    /// Waiting for a transient state to settle.
    Waiting(DomainState),
    Saving {
        save: Running,
        was: String,
        asked: Instant,
    },
    Done,
}

/// Managed-saves every domain of `targets` that needs it (see the module comment); `note`
/// hears what happens, for `--verbose`.
pub fn stop(lv: &Libvirt, targets: &[Target], max_wait: Duration, note: &dyn Fn(&str)) -> StopOutcome {
    let deadline = Instant::now() + max_wait;
    let mut out = StopOutcome::default();
    let mut steps: Vec<(Target, Step)> = Vec::new();
    for t in targets {
        match domains::state(lv, &t.uuid) {
            Ok(s) => steps.push((t.clone(), Step::Waiting(s))),
            Err(e) => out.failed.push(failed(t, e.to_string())),
        }
    }
    let mut last_poll = Instant::now();
    loop {
        for (t, step) in steps.iter_mut() {
            let next = match step {
                Step::Waiting(state) => match state.treatment() {
                    Treatment::Safe | Treatment::AsIs => {
                        let why = if state.treatment() == Treatment::AsIs {
                            "crashed: backed up as it is".to_string()
                        } else {
                            format!("{}: nothing to stop", state.label())
                        };
                        out.untouched.push(Untouched {
                            name: t.name.clone(),
                            uuid: t.uuid.clone(),
                            state: state.label().into(),
                            why,
                        });
                        Some(Step::Done)
                    }
                    Treatment::Stop if state.state == State::PmSuspended => {
                        // libvirt cannot save a suspended guest's memory: wake it, then save it.
                        note(&format!("waking {} from pmsuspended before saving it", t.name));
                        if let Err(e) = lv.run(&format!("waking {}", t.name), ["dompmwakeup", "--domain", &t.uuid]) {
                            out.failed.push(failed(t, e.to_string()));
                            Some(Step::Done)
                        } else {
                            None
                        }
                    }
                    Treatment::Stop => {
                        note(&format!("saving {} ({})", t.name, state.label()));
                        let what = format!("saving domain {}", t.name);
                        match lv.spawn(&what, ["managedsave", "--domain", &t.uuid]) {
                            Ok(save) => Some(Step::Saving { save, was: state.label().into(), asked: Instant::now() }),
                            Err(e) => {
                                out.failed.push(failed(t, e.to_string()));
                                Some(Step::Done)
                            }
                        }
                    }
                    Treatment::WaitOut => None,
                },
                Step::Saving { save, was, asked } => match save.poll() {
                    None => None,
                    Some(result) => {
                        match result.and_then(|_| domains::state(lv, &t.uuid)) {
                            Ok(s) if s.treatment() == Treatment::Safe => out.stopped.push(Stopped {
                                name: t.name.clone(),
                                uuid: t.uuid.clone(),
                                was: was.clone(),
                                save_ms: asked.elapsed().as_secs_f64() * 1000.0,
                                asked_at: Some(*asked),
                            }),
                            Ok(s) => out.failed.push(failed(t, format!("after its save it is {}", s.label()))),
                            Err(e) => out.failed.push(failed(t, e.to_string())),
                        }
                        Some(Step::Done)
                    }
                },
                Step::Done => None,
            };
            if let Some(n) = next {
                *step = n;
            }
        }
        if steps.iter().all(|(_, s)| matches!(s, Step::Done)) {
            break;
        }
        if Instant::now() >= deadline {
            for (t, step) in steps.iter_mut() {
                match std::mem::replace(step, Step::Done) {
                    Step::Saving { save, was, asked } => late_save(lv, t, save, was, asked, max_wait, &mut out),
                    Step::Waiting(s) => out
                        .failed
                        .push(failed(t, format!("still {} after {} s; not stopped", s.label(), max_wait.as_secs()))),
                    Step::Done => {}
                }
            }
            break;
        }
        std::thread::sleep(TICK);
        if last_poll.elapsed() >= POLL {
            last_poll = Instant::now();
            for (t, step) in steps.iter_mut() {
                if let Step::Waiting(state) = step {
                    match domains::state(lv, &t.uuid) {
                        Ok(s) => *state = s,
                        Err(e) => {
                            out.failed.push(failed(t, e.to_string()));
                            *step = Step::Done;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Longest wait for a save to end once it has been asked to abort.
const ABORT_GRACE: Duration = Duration::from_secs(60);

/// A save still under way at the deadline: asked to abort (the domain then goes on as it was),
/// and followed to its end, since it may finish anyway. A domain that ended up saved is listed
/// as stopped (so a resume puts it back) and the lateness is still a failure.
fn late_save(
    lv: &Libvirt,
    t: &Target,
    mut save: Running,
    was: String,
    asked: Instant,
    max_wait: Duration,
    out: &mut StopOutcome,
) {
    let _ = lv.run(&format!("aborting the save of {}", t.name), ["domjobabort", "--domain", &t.uuid]);
    let grace = Instant::now() + ABORT_GRACE;
    while save.poll().is_none() {
        if Instant::now() >= grace {
            save.kill();
            break;
        }
        std::thread::sleep(TICK);
    }
    let late = format!("not saved within {} s", max_wait.as_secs());
    match domains::state(lv, &t.uuid) {
        Ok(s) if s.saved => {
            out.stopped.push(Stopped {
                name: t.name.clone(),
                uuid: t.uuid.clone(),
                was,
                save_ms: asked.elapsed().as_secs_f64() * 1000.0,
                asked_at: Some(asked),
            });
            out.failed.push(failed(t, format!("{late}; its save ended after the deadline, so it is saved")));
        }
        Ok(s) => out.failed.push(failed(t, format!("{late}; its save was aborted and it is {}", s.label()))),
        Err(e) => out.failed.push(failed(t, format!("{late}; {e}"))),
    }
}

fn failed(t: &Target, error: String) -> Failed {
    Failed { name: t.name.clone(), uuid: t.uuid.clone(), error }
}

/// A domain [`start`] started.
#[derive(Clone, Debug, Serialize)]
pub struct Started {
    pub name: String,
    pub uuid: String,
    /// Its state afterwards ("running", or "paused" when it was saved paused); None without
    /// waiting.
    pub state: Option<String>,
    /// Milliseconds until it ran again (with waiting).
    pub start_ms: Option<f64>,
    #[serde(skip)]
    pub running_at: Option<Instant>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StartOutcome {
    pub started: Vec<Started>,
    pub untouched: Vec<Untouched>,
    pub failed: Vec<Failed>,
}

/// Starts every saved domain of `targets` from its managed-save image, all at once. With
/// `wait`, follows each until it runs, at most `max_wait`; without, returns once libvirt has
/// been asked.
pub fn start(lv: &Libvirt, targets: &[Target], wait: bool, max_wait: Duration) -> StartOutcome {
    let deadline = Instant::now() + max_wait;
    let mut out = StartOutcome::default();
    let mut starting: Vec<(Target, Running, Instant)> = Vec::new();
    for t in targets {
        match domains::state(lv, &t.uuid) {
            Ok(s) if s.saved => {
                match lv.spawn(&format!("starting domain {}", t.name), ["start", "--domain", &t.uuid]) {
                    Ok(r) => starting.push((t.clone(), r, Instant::now())),
                    Err(e) => out.failed.push(failed(t, e.to_string())),
                }
            }
            Ok(s) => out.untouched.push(Untouched {
                name: t.name.clone(),
                uuid: t.uuid.clone(),
                state: s.label().into(),
                why: if s.is_active() { "runs already".into() } else { "has no saved state; left off".into() },
            }),
            Err(e) => out.failed.push(failed(t, e.to_string())),
        }
    }
    if !wait {
        out.started.extend(starting.into_iter().map(|(t, _, _)| Started {
            name: t.name,
            uuid: t.uuid,
            state: None,
            start_ms: None,
            running_at: None,
        }));
        return out;
    }
    while !starting.is_empty() {
        let mut i = 0;
        while i < starting.len() {
            let Some(result) = starting[i].1.poll() else {
                i += 1;
                continue;
            };
            let (t, _, asked) = starting.swap_remove(i);
            match result.and_then(|_| domains::state(lv, &t.uuid)) {
                Ok(s) if s.is_active() => out.started.push(Started {
                    name: t.name,
                    uuid: t.uuid,
                    state: Some(s.label().into()),
                    start_ms: Some(asked.elapsed().as_secs_f64() * 1000.0),
                    running_at: Some(Instant::now()),
                }),
                Ok(s) => out.failed.push(failed(&t, format!("after its start it is {}", s.label()))),
                Err(e) => out.failed.push(failed(&t, e.to_string())),
            }
        }
        if Instant::now() >= deadline {
            for (t, mut r, _) in starting.drain(..) {
                // The start goes on in libvirt; only the wait ends.
                r.kill();
                out.failed.push(failed(&t, format!("did not run again within {} s", max_wait.as_secs())));
            }
            break;
        }
        std::thread::sleep(TICK);
    }
    out
}

/// The error for a domain that is not on the host.
pub fn no_such(name: &str) -> VirtError {
    VirtError::NoDomain(name.to_string())
}
