//! Job files: TOML, one table per job under `[jobs.<name>]`, declaring what a backup backs up
//! and the hooks around its snapshot. The scheduling daemon (a later issue) runs jobs from this
//! file; `rime backup --job FILE --job-name NAME` runs one now.
//!
//! ```toml
//! [jobs.nightly]
//! volumes = ["/dev/vg0/data", "/srv/vm/web.img"]
//! mode = "auto"                  # optional: offline, auto, online
//! hook_timeout = 60              # optional: seconds, the default for this job's hooks
//! sqlite = ["/srv/app/app.db"]   # optional: databases held by their write lock for the snapshot
//!
//! [[jobs.nightly.before_snapshot]]
//! run = "systemctl kill -s USR1 app"     # a shell string, run by /bin/sh -c
//! timeout = 30
//!
//! [[jobs.nightly.after_snapshot]]
//! run = ["/usr/local/bin/app-thaw", "--all"]   # or an argv array, run directly
//!
//! [[jobs.nightly.after_backup]]
//! run = "logger backup finished: $RIME_ERROR"
//!
//! [[jobs.nightly.writers]]                   # an application's own freeze, thaw and completion
//! name = "app"
//! paths = ["/srv/app/data"]                  # optional: where its data is (default: everywhere)
//! freeze = "app-ctl suspend"
//! thaw = "app-ctl resume"
//! complete = "app-ctl truncate-log"          # optional: only after a successful backup
//! ```
//!
//! Unknown keys are errors (a misspelt hook stage must not be ignored silently).

use crate::hooks::{Hook, HookCommand, Hooks, DEFAULT_TIMEOUT};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    jobs: BTreeMap<String, RawJob>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    #[serde(default)]
    volumes: Vec<PathBuf>,
    mode: Option<String>,
    hook_timeout: Option<f64>,
    #[serde(default)]
    sqlite: Vec<PathBuf>,
    #[serde(default)]
    before_snapshot: Vec<RawHook>,
    #[serde(default)]
    after_snapshot: Vec<RawHook>,
    #[serde(default)]
    after_backup: Vec<RawHook>,
    #[serde(default)]
    writers: Vec<RawWriter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWriter {
    name: String,
    #[serde(default)]
    paths: Vec<PathBuf>,
    freeze: HookCommand,
    thaw: HookCommand,
    complete: Option<HookCommand>,
    timeout: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    run: HookCommand,
    timeout: Option<f64>,
}

/// One job of a job file.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub name: String,
    pub volumes: Vec<PathBuf>,
    pub mode: Option<String>,
    pub hooks: Hooks,
    /// SQLite databases held consistent for the snapshot.
    pub sqlite: Vec<PathBuf>,
    /// Custom writers: an application's own freeze, thaw and completion commands.
    pub writers: Vec<CustomWriter>,
}

/// A custom writer of a job file: `freeze` runs after the before-snapshot hooks, `thaw` before
/// the after-snapshot ones (always, when its freeze was tried), `complete` only after a
/// successful backup. A backup holds it when its `paths` are on the backup's volumes (or when
/// it declares none).
#[derive(Clone, Debug, PartialEq)]
pub struct CustomWriter {
    pub name: String,
    /// Where its data lives: files or directories on the job's filesystems, or volumes.
    pub paths: Vec<PathBuf>,
    pub freeze: Hook,
    pub thaw: Hook,
    pub complete: Option<Hook>,
}

fn seconds(v: f64, what: &str) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        bail!("{what} must be between 0 and 86400 seconds, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// Parses a job file's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Job>> {
    let file: File = toml::from_str(text).with_context(|| format!("job file {origin}"))?;
    let mut jobs = Vec::new();
    for (name, raw) in file.jobs {
        let default = match raw.hook_timeout {
            Some(t) => seconds(t, &format!("jobs.{name}.hook_timeout"))?,
            None => DEFAULT_TIMEOUT,
        };
        let convert = |list: Vec<RawHook>, stage: &str| -> Result<Vec<Hook>> {
            list.into_iter()
                .enumerate()
                .map(|(i, h)| {
                    if let HookCommand::Argv(a) = &h.run {
                        if a.is_empty() {
                            bail!("jobs.{name}.{stage}[{i}]: an empty argv");
                        }
                    }
                    let timeout = match h.timeout {
                        Some(t) => seconds(t, &format!("jobs.{name}.{stage}[{i}].timeout"))?,
                        None => default,
                    };
                    Ok(Hook { command: h.run, timeout })
                })
                .collect()
        };
        let hooks = Hooks {
            before_snapshot: convert(raw.before_snapshot, "before_snapshot")?,
            after_snapshot: convert(raw.after_snapshot, "after_snapshot")?,
            after_backup: convert(raw.after_backup, "after_backup")?,
        };
        let mut writers = Vec::new();
        for (i, w) in raw.writers.into_iter().enumerate() {
            let timeout = match w.timeout {
                Some(t) => seconds(t, &format!("jobs.{name}.writers[{i}].timeout"))?,
                None => default,
            };
            let hook = |command: HookCommand, what: &str| -> Result<Hook> {
                if matches!(&command, HookCommand::Argv(a) if a.is_empty()) {
                    bail!("jobs.{name}.writers[{i}].{what}: an empty argv");
                }
                Ok(Hook { command, timeout })
            };
            writers.push(CustomWriter {
                freeze: hook(w.freeze, "freeze")?,
                thaw: hook(w.thaw, "thaw")?,
                complete: w.complete.map(|c| hook(c, "complete")).transpose()?,
                name: w.name,
                paths: w.paths,
            });
        }
        jobs.push(Job { name, volumes: raw.volumes, mode: raw.mode, hooks, sqlite: raw.sqlite, writers });
    }
    Ok(jobs)
}

/// The job `name` of the file at `path` (the only one when `name` is `None` and there is one).
pub fn load(path: &Path, name: Option<&str>) -> Result<Job> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read job file {}", path.display()))?;
    let jobs = parse(&text, &path.display().to_string())?;
    match name {
        Some(n) => {
            jobs.into_iter().find(|j| j.name == n).with_context(|| format!("no job {n:?} in {}", path.display()))
        }
        None if jobs.len() == 1 => Ok(jobs.into_iter().next().expect("one job")),
        None => bail!("{} holds {} jobs; name one with --job-name", path.display(), jobs.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("job.rs").lines().filter_map(|l| l.strip_prefix("//! ")).collect::<Vec<_>>();
        let start = text.iter().position(|l| *l == "```toml").unwrap() + 1;
        let end = text.iter().position(|l| *l == "```").unwrap();
        let jobs = parse(&text[start..end].join("\n"), "example").unwrap();
        assert_eq!(jobs.len(), 1);
        let j = &jobs[0];
        assert_eq!(j.name, "nightly");
        assert_eq!(j.volumes.len(), 2);
        assert_eq!(j.writers[0].paths, [PathBuf::from("/srv/app/data")]);
        assert_eq!(j.hooks.before_snapshot[0].timeout, Duration::from_secs(30));
        assert_eq!(j.hooks.after_snapshot[0].timeout, Duration::from_secs(60), "the job's default");
        assert_eq!(
            j.hooks.after_snapshot[0].command,
            HookCommand::Argv(vec!["/usr/local/bin/app-thaw".into(), "--all".into()])
        );
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(parse("[jobs.a]\nbefore_snaphot = []\n", "t").is_err(), "a misspelt stage");
        assert!(parse("[[jobs.a.before_snapshot]]\nrun = []\n", "t").is_err(), "an empty argv");
        assert!(parse("[[jobs.a.before_snapshot]]\nrun = \"x\"\ntimeout = -1\n", "t").is_err());
        assert!(parse("[[jobs.a.before_snapshot]]\nrun = 5\n", "t").is_err());
    }
}
