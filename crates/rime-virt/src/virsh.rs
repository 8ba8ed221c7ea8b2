//! Running `virsh`: an argument vector (never a shell), the C locale (so its words can be
//! read), its own process group (a Ctrl-C meant for Rime does not cut a managed save in half),
//! a bounded wait, and its errors turned into one line each.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The connection used when neither `RIME_LIBVIRT_URI` nor `LIBVIRT_DEFAULT_URI` names one.
pub const DEFAULT_URI: &str = "qemu:///system";

/// Longest wait for a query (list, state, XML); saves and starts have their own bounds.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum VirtError {
    #[error("virsh is not installed (Debian: libvirt-clients); Rime reaches libvirt through it")]
    NoVirsh,
    #[error("libvirt is not reachable at {uri}: {detail}")]
    Unreachable { uri: String, detail: String },
    #[error("no domain {0}")]
    NoDomain(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Timeout(String),
}

/// A connection to one libvirt daemon (by URI; each call is one `virsh` process).
#[derive(Clone, Debug)]
pub struct Libvirt {
    uri: String,
}

impl Libvirt {
    /// The connection named by `RIME_LIBVIRT_URI`, else `LIBVIRT_DEFAULT_URI`, else
    /// [`DEFAULT_URI`], checked to answer.
    pub fn connect() -> Result<Libvirt, VirtError> {
        let uri = ["RIME_LIBVIRT_URI", "LIBVIRT_DEFAULT_URI"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_URI.to_string());
        let lv = Libvirt { uri };
        lv.run("connecting to libvirt", ["uri"])?;
        Ok(lv)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command_with(true, args)
    }

    /// `quiet`: without virsh's informational messages ("Domain started"); some answers
    /// ("Froze 2 filesystem(s)") are only in those.
    fn command_with<I, S>(&self, quiet: bool, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("virsh");
        cmd.arg("--connect").arg(&self.uri);
        if quiet {
            cmd.arg("--quiet");
        }
        cmd.args(args);
        cmd.env("LC_ALL", "C").env_remove("LANGUAGE").stdin(Stdio::null());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        cmd
    }

    /// Runs one `virsh` command (`what` says what for, in errors) and returns its standard
    /// output, waiting at most [`QUERY_TIMEOUT`].
    pub fn run<I, S>(&self, what: &str, args: I) -> Result<String, VirtError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_for(what, args, QUERY_TIMEOUT)
    }

    /// [`Libvirt::run`] with its own bound.
    pub fn run_for<I, S>(&self, what: &str, args: I, limit: Duration) -> Result<String, VirtError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn(what, args)?.wait_for(limit)
    }

    /// [`Libvirt::run_for`] keeping virsh's informational messages in the output.
    pub fn run_verbose<I, S>(&self, what: &str, args: I, limit: Duration) -> Result<String, VirtError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut running = self.spawn_command(what, self.command_with(false, args))?;
        running.wait_for(limit)
    }

    /// Starts one `virsh` command and returns at once; [`Running::poll`] says when it is done.
    pub fn spawn<I, S>(&self, what: &str, args: I) -> Result<Running, VirtError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_command(what, self.command(args))
    }

    fn spawn_command(&self, what: &str, mut cmd: Command) -> Result<Running, VirtError> {
        let mut child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VirtError::NoVirsh,
            _ => VirtError::Failed(format!("{what}: cannot run virsh: {e}")),
        })?;
        // Readers drain both pipes, so a long answer (a large domain XML) never blocks virsh.
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut out);
                }
                out
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        Ok(Running { child, what: what.to_string(), uri: self.uri.clone(), stdout: Some(stdout), stderr: Some(stderr) })
    }
}

type Reader = std::thread::JoinHandle<Vec<u8>>;

/// A `virsh` command under way.
pub struct Running {
    child: Child,
    what: String,
    uri: String,
    stdout: Option<Reader>,
    stderr: Option<Reader>,
}

impl Running {
    /// Its outcome once it has ended (standard output, or the error it printed); None while it
    /// runs. Returns the outcome once.
    pub fn poll(&mut self) -> Option<Result<String, VirtError>> {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(e) => return Some(Err(VirtError::Failed(format!("{}: waiting for virsh: {e}", self.what)))),
        };
        let collect = |r: Option<Reader>| r.and_then(|h| h.join().ok()).unwrap_or_default();
        let stdout = String::from_utf8_lossy(&collect(self.stdout.take())).into_owned();
        let stderr = String::from_utf8_lossy(&collect(self.stderr.take())).into_owned();
        Some(if status.success() { Ok(stdout) } else { Err(classify(&self.what, &self.uri, &stderr)) })
    }

    /// Waits for its outcome at most `limit` (then kills it: a timeout).
    fn wait_for(&mut self, limit: Duration) -> Result<String, VirtError> {
        let started = Instant::now();
        loop {
            if let Some(outcome) = self.poll() {
                return outcome;
            }
            if started.elapsed() >= limit {
                self.kill();
                return Err(VirtError::Timeout(format!(
                    "{}: libvirt did not answer within {} s",
                    self.what,
                    limit.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops waiting for it (the libvirt job it asked for may go on; the caller decides).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line for what virsh printed on failure.
fn classify(what: &str, uri: &str, stderr: &str) -> VirtError {
    let lines: Vec<&str> =
        stderr.lines().map(|l| l.trim().trim_start_matches("error:").trim()).filter(|l| !l.is_empty()).collect();
    let detail = if lines.is_empty() { "virsh failed without saying why".to_string() } else { lines.join("; ") };
    let lower = detail.to_ascii_lowercase();
    if lower.contains("failed to connect") || lower.contains("no connection driver") {
        VirtError::Unreachable { uri: uri.to_string(), detail }
    } else if lower.contains("domain not found") || lower.contains("failed to get domain") {
        VirtError::NoDomain(format!("{what}: {detail}"))
    } else {
        VirtError::Failed(format!("{what}: {detail}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_one_line_and_told_apart() {
        let e = classify(
            "listing domains",
            "qemu:///system",
            "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory\n",
        );
        assert!(matches!(e, VirtError::Unreachable { .. }), "{e:?}");
        assert!(!e.to_string().contains('\n'));
        let e = classify("x", "u", "error: failed to get domain 'nope'\n");
        assert!(matches!(e, VirtError::NoDomain(_)));
        let e = classify("saving web", "u", "error: Failed to save domain\nerror: operation failed: boom\n");
        assert_eq!(e.to_string(), "saving web: Failed to save domain; operation failed: boom");
    }
}
