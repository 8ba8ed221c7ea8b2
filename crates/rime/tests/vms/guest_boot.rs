//! The real guest of `vm_support::guest`: it boots under TCG, its agent answers and runs
//! commands, `virsh domfsfreeze` freezes its disk (a write meanwhile waits for the thaw), and it
//! shuts down cleanly, through the agent and with the power button, leaving a disk that e2fsck
//! finds clean and that holds what the guest wrote.

use crate::common::Env;
use crate::vm_support::guest::*;
use crate::vm_support::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Generous: TCG on a busy 2-core machine (a boot usually takes 7–15 s).
const BOOT: Duration = Duration::from_secs(180);
const OFF: Duration = Duration::from_secs(60);
/// How long the disk stays frozen, in seconds.
const HOLD: f64 = 5.0;

/// Until /run/probe.stop exists, writes its round number to /mnt/data/probe every 0.1 s and
/// notes the guest's uptime before and after each write in /run/probe.times (/run is not frozen).
const PROBE: &str = r#"i=0
while [ ! -e /run/probe.stop ]; do
  a=$(cut -d' ' -f1 /proc/uptime)
  echo $i > /mnt/data/probe
  b=$(cut -d' ' -f1 /proc/uptime)
  echo "$a $b" >> /run/probe.times
  i=$((i + 1))
  sleep 0.1
done"#;

/// Lines in a guest file.
fn lines_in(g: &Guest, file: &str) -> usize {
    g.sh(&format!("cat {file} 2>/dev/null | wc -l")).trim().parse().unwrap()
}

#[test]
fn a_real_guest_boots_runs_commands_freezes_and_shuts_down_clean() {
    let _lv = shared();
    let env = Env::without_repo();
    open_up(&env);
    let disk = env.path("data.qcow2");
    ext4_qcow2(&disk, 256);
    let t = tag("guest");
    let g = Guest::boot(env.dir.path(), &format!("{t} boot"), &disk, &[]);
    let took = g.wait_ready(BOOT);
    eprintln!("guest ready, agent answering, {:.1} s after start", took.as_secs_f64());
    assert!(g.console().contains("rime-guest: mounted /dev/vda at /mnt/data"), "{}", g.console());

    // The agent sees the mounted disk, through libvirt and directly.
    let info = virsh(&["domfsinfo", "--domain", &g.domain.uuid]);
    assert!(
        info.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["/mnt/data", "vda", "ext4", "vda"]),
        "{info}"
    );
    let fs = g.agent("guest-get-fsinfo", Value::Null).unwrap();
    let data = fs.as_array().unwrap().iter().find(|f| f["mountpoint"] == "/mnt/data").expect("/mnt/data listed");
    assert_eq!((data["type"].as_str(), data["disk"][0]["dev"].as_str()), (Some("ext4"), Some("/dev/vda")), "{fs}");
    assert_eq!(data["disk"][0]["bus-type"], "virtio", "{fs}");

    // guest-exec: exit codes and both outputs; a file written and synced.
    let e = g.exec("echo out; echo err >&2; exit 3");
    assert_eq!((e.code, e.stdout.as_str(), e.stderr.as_str()), (3, "out\n", "err\n"));
    let hello = "written through guest-exec\n";
    let back = g.sh(
        "echo written through guest-exec > /mnt/data/hello.txt && sync /mnt/data/hello.txt && cat /mnt/data/hello.txt",
    );
    assert_eq!(back, hello);

    // The writer runs; a probe writes and times each write.
    g.start_writer();
    let probe = g.spawn(PROBE, false);
    let t0 = Instant::now();
    while lines_in(&g, "/run/probe.times") < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the probe does not write");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rounds_before = lines_in(&g, "/mnt/data/writer/log");

    // Frozen: the agent says so and refuses to run anything; after the thaw, everything goes on.
    assert_eq!(g.freeze(), 1);
    let frozen_at = Instant::now();
    assert_eq!(g.agent("guest-fsfreeze-status", Value::Null).unwrap(), "frozen");
    let refused = g.agent("guest-exec", json!({ "path": "/bin/true" })).unwrap_err();
    assert!(refused.contains("frozen"), "{refused}");
    std::thread::sleep(Duration::from_secs_f64(HOLD).saturating_sub(frozen_at.elapsed()));
    assert_eq!(g.thaw(), 1);
    assert_eq!(g.agent("guest-fsfreeze-status", Value::Null).unwrap(), "thawed");
    let written = lines_in(&g, "/run/probe.times");
    while lines_in(&g, "/run/probe.times") < written + 3 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the probe does not write after the thaw");
        std::thread::sleep(Duration::from_millis(100));
    }
    g.sh("touch /run/probe.stop");
    while g.exec_status(probe).is_none() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let times = g.sh("cat /run/probe.times");
    let spans: Vec<f64> = times
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            b.parse::<f64>().unwrap() - a.parse::<f64>().unwrap()
        })
        .collect();
    let blocked: Vec<&f64> = spans.iter().filter(|&&s| s >= HOLD - 2.0).collect();
    assert_eq!(blocked.len(), 1, "exactly one write waited for the thaw (of {HOLD} s frozen): {spans:?}");
    eprintln!("a write during the freeze waited {:.2} s for the thaw", blocked[0]);
    let rounds = g.stop_writer();
    assert!(
        rounds as usize > rounds_before,
        "the writer went on after the thaw: {rounds} rounds, {rounds_before} before"
    );

    // A clean shutdown through the agent: the disk is clean and holds what was written.
    g.sync_and_shutdown(OFF);
    drop(g);
    let raw_data = env.path("data.raw");
    to_raw(&disk, &raw_data);
    let (clean, report) = e2fsck(&raw_data);
    assert!(clean, "{report}");
    assert_eq!(debugfs_cat(&raw_data, "/hello.txt"), hello);
    let log = debugfs_cat(&raw_data, "/writer/log");
    let expected: String = (1..=rounds).map(|i| format!("{i}\n")).collect();
    assert_eq!(log, expected, "every round logged once, in order");
    let last = debugfs_cat(&raw_data, &format!("/writer/f{}", rounds % 16));
    assert_eq!(last.len(), 65536);
    assert!(last.starts_with(&format!("rime-writer {rounds}\n")), "{}", &last[..40]);
    assert!(!debugfs_cat(&raw_data, "/probe").trim().is_empty());

    // Again, with the writer started at boot and two more disks (one ext4, one blank), and off
    // with the power button while the writer runs.
    let extra = env.path("extra.qcow2");
    ext4_qcow2(&extra, 64);
    let blank = env.path("blank.raw");
    raw(&blank, 16 * 1024);
    let disks = [Disk::Qcow2(&extra), Disk::Raw(&blank)];
    let g = Guest::boot_with(env.dir.path(), &format!("{t} again"), &disk, &disks, "rime.writer");
    let took = g.wait_ready(BOOT);
    eprintln!("second boot ready {:.1} s after start", took.as_secs_f64());
    let console = g.console();
    assert!(console.contains("rime-guest: mounted /dev/vdb at /mnt/vdb"), "{console}");
    assert!(console.contains("rime-guest: /dev/vdc holds no ext filesystem"), "{console}");
    assert_eq!(g.sh("cat /mnt/data/hello.txt"), hello);
    g.sh("echo on the second disk > /mnt/vdb/note");
    let t0 = Instant::now();
    while g.writer_rounds().is_none_or(|r| r < rounds + 3) {
        assert!(t0.elapsed() < Duration::from_secs(120), "the writer started at boot does not go on");
        std::thread::sleep(Duration::from_millis(200));
    }
    g.acpi_shutdown(OFF);
    assert!(g.console().contains("rime-guest: unmounted /mnt/vdb"), "{}", g.console());
    drop(g);
    to_raw(&disk, &raw_data);
    let (clean, report) = e2fsck(&raw_data);
    assert!(clean, "{report}");
    let log = debugfs_cat(&raw_data, "/writer/log");
    let numbers: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert!(numbers.len() as u64 >= rounds + 3, "{log}");
    assert!(numbers.iter().zip(1..).all(|(&n, i)| n == i), "rounds numbered on from the first run's: {log}");
    let raw_extra = env.path("extra.raw");
    to_raw(&extra, &raw_extra);
    let (clean, report) = e2fsck(&raw_extra);
    assert!(clean, "{report}");
    assert_eq!(debugfs_cat(&raw_extra, "/note"), "on the second disk\n");
}
