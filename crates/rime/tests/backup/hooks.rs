//! Hooks around the snapshot (docs/CONSISTENCY.md): the exact order of the three stages and the
//! variables each gets, and what happens when a hook fails, hangs past its timeout, prints a
//! lot or is slow, at each stage; also when the snapshot itself fails, and hooks from a job file.
//! Every hook appends one line to a log file; the tests read the log back.

use crate::common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A hook that logs its stage and variables to `log` (names only through the environment).
fn logger(log: &Path) -> String {
    format!(
        "printf '%s|%s|%s|%s|%s|%s|%s|%s|%s|%s\\n' \"$RIME_STAGE\" \"$RIME_SNAPSHOT_ACTIVE\" \"$RIME_ERROR\" \
         \"$RIME_SNAPSHOT_ID\" \"$RIME_PROVIDER\" \"$PARAGON_BACKUPELVEL\" \"$PARAGON_VSSACTIVE\" \
         \"$PARAGON_BACKUPERROR\" \"$RIME_VOLUMES\" \"$VOLUME_NAME_LIST\" >> '{}'",
        log.display()
    )
}

/// The log's lines, split into fields.
fn entries(log: &Path) -> Vec<Vec<String>> {
    fs::read_to_string(log).unwrap_or_default().lines().map(|l| l.split('|').map(str::to_string).collect()).collect()
}

fn stages(log: &Path) -> Vec<String> {
    entries(log).into_iter().map(|e| e[0].clone()).collect()
}

/// An ext4 image whose file name a shell would misread, if it were ever pasted into a command.
fn hostile_volume(env: &Env) -> PathBuf {
    let (_src, image) = ext4_with_files(env, "vol", 3, 16, 128 * 1024);
    let odd = env.path("my vol $(touch PWNED) 'x'.img");
    fs::rename(&image, &odd).unwrap();
    odd
}

#[test]
fn stages_run_in_order_with_their_variables() {
    let env = Env::new();
    let vol = hostile_volume(&env);
    let log = env.path("hooks.log");
    let l = logger(&log);
    let v = env.backup_json(&[
        vol.to_str().unwrap(),
        "--before-snapshot",
        &l,
        "--after-snapshot",
        &l,
        "--after-backup",
        &l,
    ]);
    let id = v["snapshot"].as_str().unwrap();
    let e = entries(&log);
    let got: Vec<&str> = e.iter().map(|f| f[0].as_str()).collect();
    assert_eq!(got, ["before-snapshot", "after-snapshot", "after-backup"]);
    let name = vol.display().to_string();
    // stage | active | error | id | provider | paragon level | paragon active | paragon error | volumes | list
    assert_eq!(e[0][1..], ["no", "0", "", "offline", "BEFOREBACKUP", "NO", "0", &name, &name]);
    assert_eq!(e[1][1..], ["no", "0", "", "offline", "AFTERSNAPSHOT", "NO", "0", &name, &name]);
    assert_eq!(e[2][1..], ["no", "0", id, "offline", "AFTERBACKUP", "NO", "0", &name, &name]);
    assert!(!env.path("PWNED").exists() && !Path::new("PWNED").exists(), "a volume name reached a shell");
}

#[test]
fn a_failing_freeze_aborts_but_thaw_and_after_backup_still_run() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 4, 16, 128 * 1024);
    let log = env.path("hooks.log");
    let l = logger(&log);
    let freeze = format!("{l}; echo froze two of three; echo the third VM refused >&2; exit 3");
    let run = env.rime(&[
        "backup",
        vol.to_str().unwrap(),
        "--before-snapshot",
        &freeze,
        "--before-snapshot",
        &l, // not reached: the first failure stops the stage
        "--after-snapshot",
        &l,
        "--after-backup",
        &l,
    ]);
    assert_eq!(run.code, Some(8), "a failed freeze has its own exit code: {run:?}");
    let line = run.fails();
    assert!(line.contains("before-snapshot hook") && line.contains("the third VM refused"), "{line}");
    assert_eq!(stages(&log), ["before-snapshot", "after-snapshot", "after-backup"]);
    let e = entries(&log);
    assert_eq!((e[1][2].as_str(), e[1][7].as_str()), ("8", "8"), "thaw is told the error");
    assert_eq!((e[2][2].as_str(), e[2][3].as_str()), ("8", ""), "after-backup is told, no snapshot id");
    assert!(env.snapshot_ids().is_empty(), "nothing was backed up");
}

#[test]
fn a_hanging_freeze_is_killed_at_its_timeout() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 5, 16, 128 * 1024);
    let log = env.path("hooks.log");
    let pidfile = env.path("hang.pid");
    let hang = format!("echo $$ > '{}'; echo hanging; exec sleep 60", pidfile.display());
    let t = Instant::now();
    let run = env.rime(&[
        "backup",
        vol.to_str().unwrap(),
        "--hook-timeout",
        "1",
        "--before-snapshot",
        &hang,
        "--after-snapshot",
        &logger(&log),
        "--after-backup",
        &logger(&log),
    ]);
    let took = t.elapsed();
    assert_eq!(run.code, Some(8), "{run:?}");
    let line = run.fails();
    assert!(line.contains("did not finish within 1 s") && line.contains("hanging"), "{line}");
    assert!(took < Duration::from_secs(10), "the timeout did not hold: {took:?}");
    let pid: u32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the hung hook (pid {pid}) is still running");
    assert_eq!(stages(&log), ["after-snapshot", "after-backup"]);
    assert!(env.snapshot_ids().is_empty());
}

#[test]
fn a_failing_thaw_is_a_warning_and_a_loud_hook_does_not_stall() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 6, 16, 128 * 1024);
    let log = env.path("hooks.log");
    // 100,000 lines on each stream: a hook whose output nobody reads would block on its pipe.
    let loud_thaw = "seq 1 100000; seq 1 100000 >&2; echo thaw-failed-at-the-end; exit 1";
    let v = env.backup_json(&[
        vol.to_str().unwrap(),
        "--after-snapshot",
        loud_thaw,
        "--after-backup",
        &logger(&log),
        "--after-backup",
        "exit 4",
    ]);
    let warnings: Vec<String> =
        v["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect();
    assert!(
        warnings.iter().any(|w| w.contains("after-snapshot hook") && w.contains("thaw-failed-at-the-end")),
        "{warnings:?}"
    );
    assert!(warnings.iter().any(|w| w.contains("after-backup hook `exit 4` failed")), "{warnings:?}");
    let e = entries(&log);
    assert_eq!((e[0][0].as_str(), e[0][2].as_str()), ("after-backup", "0"), "the backup succeeded");
    assert_eq!(env.snapshot_ids().len(), 1);
}

#[test]
fn slow_hooks_at_every_stage_are_waited_for() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 7, 16, 128 * 1024);
    let log = env.path("hooks.log");
    let slow = format!("sleep 1; {}", logger(&log));
    let t = Instant::now();
    env.backup_json(&[
        vol.to_str().unwrap(),
        "--before-snapshot",
        &slow,
        "--after-snapshot",
        &slow,
        "--after-backup",
        &slow,
    ]);
    assert!(t.elapsed() >= Duration::from_secs(3));
    assert_eq!(stages(&log), ["before-snapshot", "after-snapshot", "after-backup"]);
}

#[test]
fn a_failed_snapshot_reads_nothing_and_every_hook_hears_of_it() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 8, 16, 128 * 1024);
    let lo = LoopDev::attach(&image);
    let _mnt = Mount::new(&lo.dev, &env.path("mnt"), &[]);
    let log = env.path("hooks.log");
    let l = logger(&log);
    let run = env.rime(&[
        "backup",
        "--mode",
        "offline",
        lo.path(),
        "--before-snapshot",
        &l,
        "--after-snapshot",
        &l,
        "--after-backup",
        &l,
    ]);
    assert_eq!(run.code, Some(6), "{run:?}");
    let e = entries(&log);
    assert_eq!(stages(&log), ["before-snapshot", "after-snapshot", "after-backup"]);
    assert_eq!(e[0][2], "0");
    assert_eq!(e[1][2], "6", "thaw runs after a failed snapshot, and knows");
    assert_eq!(e[2][2], "6");
    assert!(env.snapshot_ids().is_empty());
}

#[test]
fn a_job_file_declares_volumes_and_hooks() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 9, 16, 128 * 1024);
    let log = env.path("hooks.log");
    let job = env.path("jobs.toml");
    fs::write(
        &job,
        format!(
            r#"
[jobs.nightly]
volumes = ["{vol}"]
hook_timeout = 5

[[jobs.nightly.before_snapshot]]
run = ["/bin/sh", "-c", "echo \"$RIME_STAGE argv\" >> '{log}'"]

[[jobs.nightly.after_snapshot]]
run = "echo \"$RIME_STAGE shell\" >> '{log}'"
timeout = 2

[jobs.other]
volumes = []
"#,
            vol = vol.display(),
            log = log.display()
        ),
    )
    .unwrap();
    let run = env.rime(&["backup", "--job", job.to_str().unwrap()]);
    assert!(run.fails().contains("holds 2 jobs; name one with --job-name"));
    let v =
        env.backup_json(&["--job", job.to_str().unwrap(), "--job-name", "nightly", "--after-backup", &logger(&log)]);
    assert_eq!(v["manifest"]["volumes"][0]["source"], vol.display().to_string());
    let lines: Vec<String> = fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
    assert_eq!(lines[..2], ["before-snapshot argv", "after-snapshot shell"]);
    assert!(lines[2].starts_with("after-backup|"), "command-line hooks run after the job's: {lines:?}");
    let bad = env.path("bad.toml");
    fs::write(&bad, "[jobs.x]\nbefore_snaphot = []\n").unwrap();
    let line = env.rime(&["backup", "--job", bad.to_str().unwrap()]).fails();
    assert!(line.contains("before_snaphot"), "a misspelt stage is an error: {line}");
}

/// A job file with two custom writers that log what they are asked to do.
fn job_with_writers(env: &Env, vol: &Path, log: &Path, b_freeze: &str) -> PathBuf {
    let job = env.path("writers.toml");
    let say = |what: &str| format!("echo '{what}' $RIME_ERROR >> '{}'", log.display());
    fs::write(
        &job,
        format!(
            r#"
[jobs.app]
volumes = ["{vol}"]

[[jobs.app.before_snapshot]]
run = "{hook_before}"

[[jobs.app.after_snapshot]]
run = "{hook_after}"

[[jobs.app.after_backup]]
run = "{hook_backup}"

[[jobs.app.writers]]
name = "a"
freeze = "{a_freeze}"
thaw = "{a_thaw}"
complete = "{a_complete}"

[[jobs.app.writers]]
name = "b"
freeze = "{b_freeze}"
thaw = "{b_thaw}"
complete = "{b_complete}"
timeout = 5
"#,
            vol = vol.display(),
            hook_before = say("hook before-snapshot"),
            hook_after = say("hook after-snapshot"),
            hook_backup = say("hook after-backup"),
            a_freeze = say("freeze a"),
            a_thaw = say("thaw a"),
            a_complete = say("complete a"),
            b_freeze = b_freeze.replace("SAY", &say("freeze b")),
            b_thaw = say("thaw b"),
            b_complete = say("complete b"),
        ),
    )
    .unwrap();
    job
}

fn log_lines(log: &Path) -> Vec<String> {
    fs::read_to_string(log).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn custom_writers_freeze_thaw_and_complete_in_order() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 13, 16, 128 * 1024);
    let log = env.path("writers.log");
    let job = job_with_writers(&env, &vol, &log, "SAY");
    env.backup_json(&["--job", job.to_str().unwrap()]);
    assert_eq!(
        log_lines(&log),
        [
            "hook before-snapshot 0",
            "freeze a 0",
            "freeze b 0",
            "thaw b 0",
            "thaw a 0",
            "hook after-snapshot 0",
            "complete a 0",
            "complete b 0",
            "hook after-backup 0"
        ]
    );
}

#[test]
fn a_writer_that_cannot_freeze_is_thawed_with_the_others_and_nothing_completes() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 14, 16, 128 * 1024);
    let log = env.path("writers.log");
    let job = job_with_writers(&env, &vol, &log, "SAY; exit 5");
    let run = env.rime(&["backup", "--job", job.to_str().unwrap()]);
    assert_eq!(run.code, Some(8), "{run:?}");
    assert!(run.fails().contains("writer b"));
    assert_eq!(
        log_lines(&log),
        [
            "hook before-snapshot 0",
            "freeze a 0",
            "freeze b 0",
            "thaw b 8",
            "thaw a 8",
            "hook after-snapshot 8",
            "hook after-backup 8"
        ]
    );
    assert!(env.snapshot_ids().is_empty());
}

#[test]
fn writers_are_held_only_where_their_paths_are_and_a_split_one_is_refused() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 15, 16, 128 * 1024);
    let elsewhere = env.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let log = env.path("writers.log");
    let say = |what: &str| format!("echo '{what}' >> '{}'", log.display());
    let job = env.path("placed.toml");
    let write_job = |extra_paths: &str| {
        fs::write(
            &job,
            format!(
                r#"
[jobs.app]
volumes = ["{vol}"]
sqlite = ["{db}"]

[[jobs.app.writers]]
name = "on-volume"
paths = ["{vol}"]
freeze = "{fa}"
thaw = "{ta}"

[[jobs.app.writers]]
name = "elsewhere"
paths = [{extra_paths}]
freeze = "{fb}"
thaw = "{tb}"
"#,
                vol = vol.display(),
                db = elsewhere.join("app.db").display(),
                fa = say("freeze on-volume"),
                ta = say("thaw on-volume"),
                fb = say("freeze elsewhere"),
                tb = say("thaw elsewhere"),
            ),
        )
        .unwrap();
    };
    write_job(&format!("\"{}\"", elsewhere.display()));

    // `rime writers --job` says where each declared writer's data is.
    let r = env.rime(&["writers", "--json", "--job", job.to_str().unwrap()]).ok().json();
    let find = |name: &str| r["writers"].as_array().unwrap().iter().find(|w| w["name"] == name).cloned().unwrap();
    assert_eq!(find("on-volume")["paths"][0]["volume"], vol.display().to_string(), "{r}");
    assert_eq!(find("elsewhere")["paths"][0]["volume"], serde_json::Value::Null, "{r}");
    assert!(find("elsewhere")["freeze"].as_str().unwrap().starts_with("none"), "{r}");
    let db = r["writers"].as_array().unwrap().iter().find(|w| w["kind"] == "sqlite").unwrap();
    assert_eq!(db["paths"][0]["volume"], serde_json::Value::Null, "{r}");

    // A backup holds the writer whose data is on its volume, and says why it left the others out.
    let b = env.backup_json(&["--job", job.to_str().unwrap()]);
    assert_eq!(log_lines(&log), ["freeze on-volume", "thaw on-volume"]);
    let warnings = b["warnings"].to_string();
    assert!(warnings.contains("writer elsewhere: its paths are not on the volumes"), "{warnings}");
    assert!(warnings.contains("app.db: not on the volumes of this backup"), "{warnings}");
    let held: Vec<&str> = b["manifest"]["consistency"]["writers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(held, ["on-volume"], "{b}");

    // A writer with data both on and off the backup's volumes: refused, nothing frozen.
    fs::remove_file(&log).unwrap();
    write_job(&format!("\"{}\", \"{}\"", vol.display(), elsewhere.display()));
    let run = env.rime(&["backup", "--job", job.to_str().unwrap()]);
    let code = run.code;
    let line = run.fails();
    assert_eq!(code, Some(9), "{line}");
    assert!(line.contains("writer elsewhere is only partly on the volumes"), "{line}");
    assert!(log_lines(&log).is_empty(), "nothing was frozen: {:?}", log_lines(&log));
    assert_eq!(env.snapshot_ids().len(), 1, "no new snapshot");
}

#[test]
fn with_freeze_try_a_writer_that_cannot_freeze_leaves_a_recorded_crash_consistent_backup() {
    let env = Env::new();
    let (_src, vol) = ext4_with_files(&env, "vol", 16, 16, 128 * 1024);
    let log = env.path("writers.log");
    let job = job_with_writers(&env, &vol, &log, "SAY; exit 5");
    let b = env.backup_json(&["--job", job.to_str().unwrap(), "--freeze", "try"]);
    // b's freeze was tried, so it is thawed; it is not held, so it does not complete.
    assert_eq!(
        log_lines(&log),
        [
            "hook before-snapshot 0",
            "freeze a 0",
            "freeze b 0",
            "thaw b 0",
            "thaw a 0",
            "hook after-snapshot 0",
            "complete a 0",
            "hook after-backup 0"
        ]
    );
    let c = &b["manifest"]["consistency"];
    let held: Vec<&str> = c["writers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(held, ["a"], "{c}");
    let not_held = c["not_held"].as_array().unwrap_or_else(|| panic!("{c}"));
    assert!(not_held.len() == 1 && not_held[0].as_str().unwrap().contains("writer b"), "{c}");
    assert!(b["warnings"].to_string().contains("only crash-consistent"), "{}", b["warnings"]);
    // Without try, the same job fails (exit 8), as a_writer_that_cannot_freeze_... shows.
}
