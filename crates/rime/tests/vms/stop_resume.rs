//! `rime vm stop` and `rime vm resume`: exactly the selected domains are saved, the output says
//! which, and a resume from that output puts back exactly those.

use crate::common::{rime_command, rime_raw, Env};
use crate::vm_support::*;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

/// `rime vm resume ARGS --from -` with `input` on stdin.
fn resume_from_stdin(input: &str) -> (Option<i32>, String, String) {
    let mut child = rime_command()
        .args(["vm", "resume", "--from", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running domain `name` with one raw disk at `disk`.
fn running(env: &Env, name: &str, disks: &[Disk]) -> TestDomain {
    let d = TestDomain::define(env.dir.path(), &domain_xml(name, disks, false, ""));
    d.start();
    d
}

#[test]
fn a_stop_by_volume_and_the_resume_from_its_output_touch_exactly_the_same_domains() {
    let _lv = shared();
    let env = Env::new();
    open_up(&env);
    let vol = Volume::new(&env, "vms", 64, false);
    let t = tag("stop");
    for f in ["a.raw", "b.raw", "p.raw", "c.raw"] {
        raw(&vol.path(f), 2048);
    }
    let outside = env.path("outside.iso");
    raw(&outside, 256);
    let a = running(&env, &format!("{t} a \"quoted\" é"), &[Disk::Raw(&vol.path("a.raw"))]);
    let b = running(&env, &format!("{t} b $(touch oops)"), &[Disk::Raw(&vol.path("b.raw"))]);
    b.suspend();
    let p = running(&env, &format!("{t} partial"), &[Disk::Raw(&vol.path("p.raw")), Disk::Cdrom(&outside)]);
    let c = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} off"), &[Disk::Raw(&vol.path("c.raw"))], false, ""),
    );

    let stop = rime_raw(&["vm", "stop", "--volumes", vol.mount_point()]).ok();
    let lines: Vec<&str> = stop.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "exactly the running and the paused domain:\n{}", stop.stdout);
    let line_of = |d: &TestDomain| {
        lines
            .iter()
            .find(|l| l.contains(&d.uuid))
            .copied()
            .unwrap_or_else(|| panic!("{} not stopped: {lines:?}", d.name))
    };
    assert!(line_of(&a).starts_with(&format!("stopped {} uuid=", serde_json::to_string(&a.name).unwrap())));
    assert!(line_of(&a).contains("was=running"));
    assert!(line_of(&b).contains("was=paused"));
    assert!(
        stop.stderr.contains("partial") && stop.stderr.contains("outside.iso"),
        "the partial domain is named: {}",
        stop.stderr
    );
    assert!(a.state().starts_with("shut off (saved)") && b.state().starts_with("shut off (saved)"));
    assert!(p.state().starts_with("running"), "a partly covered domain is left alone");
    assert!(c.state().starts_with("shut off"));
    assert!(!env.path("oops").exists() && !std::path::Path::new("oops").exists(), "a name never reaches a shell");

    let (code, out, err) = resume_from_stdin(&stop.stdout);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("started ")).count(), 2, "{out}");
    assert!(a.state().starts_with("running"), "{}", a.state());
    assert!(b.state().starts_with("paused"), "a paused domain comes back paused: {}", b.state());
    assert!(c.state().starts_with("shut off") && !c.state().contains("saved"));

    // --criterion partial takes the partly covered one too; JSON read back from a file.
    let stop = rime_raw(&["vm", "stop", "--volumes", vol.mount_point(), "--criterion", "partial", "--json"]).ok();
    let doc = stop.json();
    let uuids: Vec<&str> = doc["stopped"].as_array().unwrap().iter().map(|s| s["uuid"].as_str().unwrap()).collect();
    assert_eq!(uuids.len(), 3, "{doc:#}");
    assert!(uuids.contains(&p.uuid.as_str()));
    let saved_list = env.path("stopped.json");
    std::fs::write(&saved_list, &stop.stdout).unwrap();
    rime_raw(&["vm", "resume", "--from", saved_list.to_str().unwrap()]).ok();
    assert!(a.state().starts_with("running") && p.state().starts_with("running") && b.state().starts_with("paused"));

    // By name (one that needs quoting); without waiting, then it runs.
    let one = rime_raw(&["vm", "stop", "--names", &a.name, "-q"]).ok();
    assert_eq!(one.stdout.lines().count(), 1);
    assert!(one.stderr.is_empty());
    let r = rime_raw(&["vm", "resume", "--names", &a.name, "--no-wait"]).ok();
    assert!(r.stdout.contains("not waited for"), "{}", r.stdout);
    a.wait_state("running", Duration::from_secs(60));

    // An unknown name: nothing is stopped.
    let missing = rime_raw(&["vm", "stop", "--names", &a.name, &format!("{t} nobody")]);
    assert_eq!(missing.code, Some(4));
    assert!(missing.fails().contains("nobody"));
    assert!(a.state().starts_with("running"));
}

#[test]
fn a_save_that_cannot_finish_in_time_fails_and_loses_no_domain() {
    let _lv = shared();
    let env = Env::new();
    open_up(&env);
    let vol = Volume::new(&env, "late", 64, false);
    let t = tag("late");
    raw(&vol.path("l.raw"), 2048);
    let d = running(&env, &format!("{t} late"), &[Disk::Raw(&vol.path("l.raw"))]);
    let stop = rime_raw(&["vm", "stop", "--names", &d.name, "--max-wait", "0"]);
    assert_eq!(stop.code, Some(10), "{stop:?}");
    assert!(stop.stderr.contains("not saved within 0 s"), "{}", stop.stderr);
    // Either the save was aborted (it runs) or it ended anyway (then it is listed, and the
    // resume from the output puts it back): never a domain saved and not listed.
    if d.state().starts_with("shut off") {
        assert!(stop.stdout.contains(&d.uuid), "a saved domain is listed: {}", stop.stdout);
    }
    let (code, _, err) = resume_from_stdin(&stop.stdout);
    assert_eq!(code, Some(0), "{err}");
    d.wait_state("running", Duration::from_secs(60));

    // A start that fails (its disk is gone): one line, exit 10, the domain still saved.
    let stop = rime_raw(&["vm", "stop", "--names", &d.name]).ok();
    let moved = vol.path("l.raw.away");
    std::fs::rename(vol.path("l.raw"), &moved).unwrap();
    let (code, _, err) = resume_from_stdin(&stop.stdout);
    assert_eq!(code, Some(10), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("was not started again") && err.contains("l.raw"), "{err}");
    let info = virsh(&["dominfo", "--domain", &d.uuid]);
    assert!(
        d.state().starts_with("shut off") && info.contains("Managed save:   yes"),
        "its saved state is kept: {info}"
    );
    std::fs::rename(&moved, vol.path("l.raw")).unwrap();
    let (code, _, err) = resume_from_stdin(&stop.stdout);
    assert_eq!(code, Some(0), "{err}");
    assert!(d.state().starts_with("running"));

    // A domain gone between the stop and the resume: one line, exit 10.
    let gone = TestDomain::define(
        env.dir.path(),
        &domain_xml(&format!("{t} gone"), &[Disk::Raw(&vol.path("l.raw"))], false, ""),
    );
    let listed = format!("stopped {} uuid={} was=running\n", serde_json::to_string(&gone.name).unwrap(), gone.uuid);
    virsh(&["undefine", "--domain", &gone.uuid]);
    let (code, _, err) = resume_from_stdin(&listed);
    assert_eq!(code, Some(10), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&gone.name) || err.contains(&gone.uuid), "{err}");
}

#[test]
fn all_stops_and_resumes_every_domain() {
    // Acts on every domain of the host: no other test of this binary runs meanwhile.
    let _lv = exclusive();
    let env = Env::new();
    open_up(&env);
    let vol = Volume::new(&env, "all", 64, false);
    let t = tag("all");
    raw(&vol.path("x.raw"), 1024);
    raw(&vol.path("y.raw"), 1024);
    let x = running(&env, &format!("{t} x"), &[Disk::Raw(&vol.path("x.raw"))]);
    let y = running(&env, &format!("{t} y"), &[Disk::Raw(&vol.path("y.raw"))]);
    let stop = rime_raw(&["vm", "stop", "--all", "-q"]).ok();
    assert!(stop.stdout.contains(&x.uuid) && stop.stdout.contains(&y.uuid), "{}", stop.stdout);
    assert!(x.state().contains("saved") && y.state().contains("saved"));
    let r = rime_raw(&["vm", "resume", "--all"]).ok();
    assert!(r.stdout.contains(&x.uuid) && r.stdout.contains(&y.uuid), "{}", r.stdout);
    assert!(x.state().starts_with("running") && y.state().starts_with("running"));
}
