//! Running programs (stdin closed; `MTOOLS_SKIP_CHECK` set for mtools).

use std::process::{Command, Stdio};

fn command(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a program; panics with its output unless it succeeds. Returns stdout.
#[track_caller]
pub fn run(program: &str, args: &[&str]) -> String {
    let out = command(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a program; returns (success, stdout, stderr).
pub fn run_status(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = command(program, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `tool` is an executable on `PATH`.
pub fn have(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Fails the test unless every tool is installed: a missing tool is a broken test machine
/// (`.ci/run` installs them all), never a reason to pass.
#[track_caller]
pub fn require(tools: &[&str]) {
    for t in tools {
        assert!(have(t), "this test needs {t} (installed by .ci/run)");
    }
}
