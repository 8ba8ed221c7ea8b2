//! `rime vm layout|stop|resume`: the host's VMs, their files and coverage; managed save of a
//! selection of them (for a before-snapshot hook, or by hand) and their start again.
//!
//! `stop` prints exactly the domains it stopped, one line each
//! (`stopped "NAME" uuid=UUID was=STATE`), or `--json`; `resume --from` reads either back, so
//! a stop's output given to a resume puts back exactly what the stop took down.

use crate::error::CommandError;
use crate::vms::layout::{self, Coverage, Criterion, HostLayout};
use anyhow::{bail, Result};
use rime_repo::{Repository, VmSection};
use rime_virt::control::{self, StartOutcome, StopOutcome, Target};
use rime_virt::{domains, Libvirt};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// Which domains a stop takes.
#[derive(Clone, Debug)]
pub enum StopSelection {
    All,
    /// The domains on these volumes, by the criterion.
    Volumes(Vec<PathBuf>),
    Names(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct StopOptions {
    pub select: StopSelection,
    pub criterion: Criterion,
    pub media: bool,
    pub max_wait: Duration,
}

/// A domain the selection left out, and why (only partly on the volumes).
#[derive(Clone, Debug, Serialize)]
pub struct LeftOut {
    pub name: String,
    pub uuid: String,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct StopReport {
    #[serde(flatten)]
    pub outcome: StopOutcome,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<LeftOut>,
}

fn connect() -> Result<Libvirt> {
    Ok(Libvirt::connect()?)
}

/// `rime vm layout`: every domain with its files; with `volumes`, each one's coverage.
pub fn layout(volumes: &[PathBuf], media: bool) -> Result<HostLayout> {
    layout::host_layout(&connect()?, volumes, media)
}

/// `rime vm layout --snapshot ID`: the VMs as a snapshot recorded them.
pub fn layout_of_snapshot(repo: &Repository, snapshot: &str) -> Result<(String, VmSection)> {
    let manifest = repo.resolve(snapshot)?;
    match manifest.vms {
        Some(vms) => Ok((manifest.id, vms)),
        None => bail!("snapshot {} was not taken with --vm-aware: it records no VMs", &manifest.id[..8]),
    }
}

/// The domains named exactly, or an error naming the first one that is not on the host.
fn by_names(lv: &Libvirt, names: &[String]) -> Result<Vec<Target>> {
    let all = domains::list(lv)?;
    names
        .iter()
        .map(|n| {
            all.iter()
                .find(|d| &d.name == n)
                .map(|d| Target { name: d.name.clone(), uuid: d.uuid.clone() })
                .ok_or_else(|| control::no_such(n).into())
        })
        .collect()
}

/// `rime vm stop`: managed-saves the selected domains that run (see [`control::stop`]).
pub fn stop(opts: &StopOptions, note: &dyn Fn(&str)) -> Result<StopReport> {
    let lv = connect()?;
    let mut left_out = Vec::new();
    let targets = match &opts.select {
        StopSelection::All => domains::list(&lv)?.into_iter().map(|d| Target { name: d.name, uuid: d.uuid }).collect(),
        StopSelection::Names(names) => by_names(&lv, names)?,
        StopSelection::Volumes(volumes) => {
            let host = layout::host_layout(&lv, volumes, opts.media)?;
            let mut targets = Vec::new();
            for vm in host.domains.iter().filter(|vm| vm.domain_state.is_some()) {
                let coverage = vm.coverage.unwrap_or(Coverage::NotAffected);
                if opts.criterion.takes(coverage) {
                    targets.push(Target { name: vm.name.clone(), uuid: vm.uuid.clone() });
                } else if coverage == Coverage::Partial {
                    let outside = vm.uncovered(opts.media);
                    left_out.push(LeftOut {
                        name: vm.name.clone(),
                        uuid: vm.uuid.clone(),
                        why: format!("only partly on these volumes ({} not); --criterion partial takes it", outside),
                    });
                }
            }
            targets
        }
    };
    let outcome = control::stop(&lv, &targets, opts.max_wait, note);
    Ok(StopReport { outcome, left_out })
}

/// The error for a stop that could not stop every domain (after its output was printed).
pub fn stop_failure(report: &StopReport) -> Option<anyhow::Error> {
    let f = report.outcome.failed.first()?;
    let more = report.outcome.failed.len() - 1;
    let more = if more > 0 { format!(" (and {more} more)") } else { String::new() };
    Some(CommandError::Vm(format!("VM {:?} was not stopped: {}{more}", f.name, f.error)).into())
}

/// Which domains a resume starts.
#[derive(Clone, Debug)]
pub enum ResumeSelection {
    /// Every domain that has a managed-save image.
    All,
    Names(Vec<String>),
    /// The domains a stop's output (text or JSON) names.
    From(String),
}

/// The domains a stop's output names: its JSON document, or its `stopped` lines.
pub fn parse_stop_output(text: &str) -> Result<Vec<Target>> {
    if text.trim_start().starts_with('{') {
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a stop's JSON output: {e}"))?;
        let stopped = doc
            .get("stopped")
            .and_then(|s| s.as_array())
            .ok_or_else(|| anyhow::anyhow!("no \"stopped\" list in the JSON"))?;
        return stopped
            .iter()
            .map(|s| {
                let field = |k: &str| s.get(k).and_then(|v| v.as_str()).map(str::to_string);
                Ok(Target {
                    name: field("name").unwrap_or_default(),
                    uuid: field("uuid").ok_or_else(|| anyhow::anyhow!("a stopped domain without uuid"))?,
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("stopped ") else { continue };
        let mut names = serde_json::Deserializer::from_str(rest).into_iter::<String>();
        let Some(Ok(name)) = names.next() else { bail!("unreadable line in the stop's output: {line}") };
        let after = &rest[names.byte_offset()..];
        let uuid = after.split_whitespace().find_map(|w| w.strip_prefix("uuid=")).unwrap_or_default().to_string();
        out.push(Target { name, uuid });
    }
    Ok(out)
}

/// `rime vm resume`: starts the selected saved domains (see [`control::start`]).
pub fn resume(select: &ResumeSelection, wait: bool, max_wait: Duration) -> Result<StartOutcome> {
    let lv = connect()?;
    let targets: Vec<Target> = match select {
        ResumeSelection::All => domains::list(&lv)?
            .into_iter()
            .filter(|d| d.state.saved)
            .map(|d| Target { name: d.name, uuid: d.uuid })
            .collect(),
        ResumeSelection::Names(names) => by_names(&lv, names)?,
        ResumeSelection::From(text) => {
            let named = parse_stop_output(text)?;
            // A line without a UUID (written by hand) is found by its name.
            let (with, without): (Vec<Target>, Vec<Target>) = named.into_iter().partition(|t| !t.uuid.is_empty());
            let names: Vec<String> = without.into_iter().map(|t| t.name).collect();
            [with, by_names(&lv, &names)?].concat()
        }
    };
    Ok(control::start(&lv, &targets, wait, max_wait))
}

/// The error for a resume that did not start every domain.
pub fn resume_failure(outcome: &StartOutcome) -> Option<anyhow::Error> {
    let f = outcome.failed.first()?;
    Some(CommandError::Vm(format!("VM {:?} was not started again: {}", f.name, f.error)).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stops_output_reads_back() {
        let text = "stopped \"web \\\"1\\\" é\" uuid=5c976ed6-c24c-4131-8076-6105a35e5bf4 was=running\nnoise\nstopped \"db\" uuid=11111111-2222-3333-4444-555555555555 was=paused\n";
        let t = parse_stop_output(text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "web \"1\" é");
        assert_eq!(t[0].uuid, "5c976ed6-c24c-4131-8076-6105a35e5bf4");
        assert_eq!(t[1].name, "db");
        let json =
            r#"{"stopped":[{"name":"a b","uuid":"u1","was":"running","save_ms":1.0}],"untouched":[],"failed":[]}"#;
        assert_eq!(parse_stop_output(json).unwrap(), vec![Target { name: "a b".into(), uuid: "u1".into() }]);
        assert!(parse_stop_output("stopped nonsense").is_err());
    }
}
