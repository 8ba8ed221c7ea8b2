//! Hooks: user commands run at the stages of a backup.
//!
//! A hook is a shell string (run by `/bin/sh -c`) or an argv array (run directly), with a
//! timeout. Volume names and other facts reach it only through the environment ([`HookContext`]),
//! never pasted into a command string. Its output (stdout and stderr, interleaved as written)
//! goes to the log line by line; the last lines of a failing hook go into its error.
//!
//! A hook that outlives its timeout is killed with its whole process group (SIGTERM, then
//! SIGKILL after 2 s), so a hanging freeze script cannot hold the backup.

use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default timeout of a hook.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of a failing hook's output kept for its error message.
const TAIL_LINES: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    BeforeSnapshot,
    AfterSnapshot,
    AfterBackup,
}

impl Stage {
    /// `RIME_STAGE`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::BeforeSnapshot => "before-snapshot",
            Stage::AfterSnapshot => "after-snapshot",
            Stage::AfterBackup => "after-backup",
        }
    }

    /// `PARAGON_BACKUPELVEL` (the misspelling is the original's; scripts test for it).
    fn paragon_level(self) -> &'static str {
        match self {
            Stage::BeforeSnapshot => "BEFOREBACKUP",
            Stage::AfterSnapshot => "AFTERSNAPSHOT",
            Stage::AfterBackup => "AFTERBACKUP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HookCommand {
    /// Run by `/bin/sh -c`.
    Shell(String),
    /// Run directly: program and arguments.
    Argv(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    pub command: HookCommand,
    pub timeout: Duration,
}

impl Hook {
    pub fn shell(command: &str, timeout: Duration) -> Hook {
        Hook { command: HookCommand::Shell(command.to_string()), timeout }
    }

    /// The command as written (shell string, or argv joined by spaces).
    pub fn describe(&self) -> String {
        match &self.command {
            HookCommand::Shell(s) => s.clone(),
            HookCommand::Argv(a) => a.join(" "),
        }
    }
}

/// The hooks of one backup, per stage, in the order they run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    pub before_snapshot: Vec<Hook>,
    pub after_snapshot: Vec<Hook>,
    pub after_backup: Vec<Hook>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.before_snapshot.is_empty() && self.after_snapshot.is_empty() && self.after_backup.is_empty()
    }

    pub fn of(&self, stage: Stage) -> &[Hook] {
        match stage {
            Stage::BeforeSnapshot => &self.before_snapshot,
            Stage::AfterSnapshot => &self.after_snapshot,
            Stage::AfterBackup => &self.after_backup,
        }
    }

    /// Appends `other`'s hooks after these (command line after job file).
    pub fn extend(&mut self, other: Hooks) {
        self.before_snapshot.extend(other.before_snapshot);
        self.after_snapshot.extend(other.after_snapshot);
        self.after_backup.extend(other.after_backup);
    }
}

/// What a hook is told, through its environment.
#[derive(Clone, Debug, Default)]
pub struct HookContext {
    /// A point-in-time snapshot is in use (rather than an offline backup).
    pub snapshot_active: bool,
    /// 0, or the error code of the failure so far (docs/CONSISTENCY.md).
    pub error: i32,
    /// The volumes of the backup, as named on the command line.
    pub volumes: Vec<String>,
    /// The new snapshot's id, once known.
    pub snapshot_id: Option<String>,
    /// Which snapshot providers are in use ("rime-serve", "offline", ...).
    pub provider: String,
}

impl HookContext {
    fn env(&self, stage: Stage) -> Vec<(&'static str, String)> {
        let yes = if self.snapshot_active { "yes" } else { "no" };
        let volumes = self.volumes.join(" ");
        vec![
            ("RIME_STAGE", stage.name().into()),
            ("RIME_SNAPSHOT_ACTIVE", yes.into()),
            ("RIME_ERROR", self.error.to_string()),
            ("RIME_VOLUMES", volumes.clone()),
            ("RIME_SNAPSHOT_ID", self.snapshot_id.clone().unwrap_or_default()),
            ("RIME_PROVIDER", self.provider.clone()),
            ("PARAGON_VSSACTIVE", yes.to_ascii_uppercase()),
            ("PARAGON_BACKUPELVEL", stage.paragon_level().into()),
            ("PARAGON_BACKUPERROR", self.error.clamp(0, 65536).to_string()),
            ("VOLUME_NAME_LIST", volumes),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{stage} hook `{command}` could not start: {source}")]
    Spawn { stage: &'static str, command: String, source: std::io::Error },
    #[error("{stage} hook `{command}` failed ({status}){}", tail_text(.tail))]
    Failed { stage: &'static str, command: String, status: String, tail: Vec<String> },
    #[error("{stage} hook `{command}` did not finish within {} s and was killed{}", .timeout.as_secs_f64(), tail_text(.tail))]
    TimedOut { stage: &'static str, command: String, timeout: Duration, tail: Vec<String> },
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; its last output: {}", tail.join(" | "))
    }
}

/// Runs every hook of `stage` in order; stops at the first failure when `stop_at_failure`,
/// else runs them all. Returns the failures (empty: all succeeded).
pub fn run_stage(hooks: &Hooks, stage: Stage, ctx: &HookContext, stop_at_failure: bool) -> Vec<HookError> {
    let mut failures = Vec::new();
    for hook in hooks.of(stage) {
        if let Err(e) = run_hook(hook, stage, ctx) {
            tracing::warn!("{e}");
            failures.push(e);
            if stop_at_failure {
                break;
            }
        }
    }
    failures
}

/// Runs one hook to completion or timeout.
pub fn run_hook(hook: &Hook, stage: Stage, ctx: &HookContext) -> Result<(), HookError> {
    let mut cmd = match &hook.command {
        HookCommand::Shell(s) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
        HookCommand::Argv(a) => {
            let mut c = Command::new(a.first().map(String::as_str).unwrap_or(""));
            c.args(a.iter().skip(1));
            c
        }
    };
    cmd.envs(ctx.env(stage));
    run_command(cmd, &hook.describe(), stage, hook.timeout).map(drop)
}

/// Runs `cmd` (a hook, or a writer's own command) to completion or `timeout`, its output to the
/// log; returns its last lines (stdout and stderr interleaved) on success.
pub fn run_command(
    mut cmd: Command,
    described: &str,
    stage: Stage,
    timeout: Duration,
) -> Result<Vec<String>, HookError> {
    let started = Instant::now();
    let described = described.to_string();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let spawn_err = |source| HookError::Spawn { stage: stage.name(), command: described.clone(), source };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // Both streams go to the log, and the last lines are kept for an error message.
    let tail: Arc<Mutex<Vec<String>>> = Arc::default();
    let readers: Vec<_> = [
        child.stdout.take().map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let (tail, name) = (tail.clone(), stage.name());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                tracing::info!("{name} hook: {line}");
                let mut t = tail.lock().unwrap();
                t.push(line);
                if t.len() > TAIL_LINES {
                    t.remove(0);
                }
            }
        })
    })
    .collect();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= timeout => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let Some(status) = status else {
        kill_group(&mut child);
        drain(readers);
        let tail = tail.lock().unwrap().clone();
        return Err(HookError::TimedOut { stage: stage.name(), command: described, timeout, tail });
    };
    drain(readers);
    tracing::debug!("{} hook `{described}` took {:.3} s", stage.name(), started.elapsed().as_secs_f64());
    if status.success() {
        return Ok(tail.lock().unwrap().clone());
    }
    let tail = tail.lock().unwrap().clone();
    Err(HookError::Failed { stage: stage.name(), command: described, status: status.to_string(), tail })
}

/// Waits (up to 2 s) for the output readers: a hook's background child may keep its output
/// open after the hook itself exited; the backup does not wait for that child.
fn drain(readers: Vec<std::thread::JoinHandle<()>>) {
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && !readers.iter().all(|r| r.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM to the hook's process group, SIGKILL after 2 s if it is still there.
fn kill_group(child: &mut std::process::Child) {
    let pgid = child.id();
    rime_os::process::signal_group(pgid, rime_os::signals::Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            // The leader is gone; the rest of its group gets SIGKILL anyway.
            rime_os::process::signal_group(pgid, rime_os::signals::Signal::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    rime_os::process::signal_group(pgid, rime_os::signals::Signal::SIGKILL);
    let _ = child.wait();
}
