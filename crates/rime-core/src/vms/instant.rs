//! `rime vm instant-restore`: a VM run straight from the repository, before any of its data is
//! copied back (docs/VMS.md, "Instant recovery").
//!
//! ```text
//! QEMU ── overlay.qcow2 (local; the guest's writes) ── backing: nbd+unix:///vda?socket=… ──┐
//!                                                                                          │
//! rime vm instant-serve (own session) ── SnapshotExport (read-only) ── SnapshotReader ── repository
//! ```
//!
//! Start: the snapshot's VM is checked (it must be a `rime backup --vm` snapshot: each disk a
//! volume holding the guest's view), the name must be free, then a server process is started
//! detached (its own session, a pidfile, state in `/run/rime/instant/<key>/`) that exports each
//! disk volume read-only over NBD on its own unix socket, reading through the snapshot reader
//! with a bounded chunk cache; per disk a qcow2 overlay is made on that export
//! (`/var/lib/rime/instant/<key>/<target>.qcow2`), the NVRAM is written, and the domain is
//! defined from the snapshot's definition with each disk moved onto its overlay (with `--as`:
//! renamed, without UUID and MAC addresses, its own NVRAM path) and started.
//!
//! Finish: each disk is copied by libvirt's block copy (the whole chain, overlay and export,
//! into a standalone image: qcow2, or raw for a disk that was raw) while the guest runs and the guest is pivoted onto it; the
//! definition follows; only then the server stops and the overlays go. Cancel: the domain is
//! destroyed and undefined, its NVRAM, the overlays and the server go.
//!
//! Invariants: nothing is left behind by a start that fails (the domain undefined, the server
//! stopped, the overlays, NVRAM and state removed); the server is never stopped while a disk
//! of the domain still reads through it (finish checks the running domain's disks first); the
//! repository is only read (the server holds the shared repository lock, so no prune removes a
//! chunk it serves); no name or path passes through a shell (`virsh` and `qemu-img` get
//! argument vectors); a process is signalled only when its pidfile names it and its command
//! line is this state folder's server.

use super::backup::carried_name;
use super::instant_export::SnapshotExport;
use crate::error::CommandError;
use crate::explorer::Explorer;
use anyhow::{anyhow, bail, Context, Result};
use rime_repo::{Manifest, Repository, VmRecord};
use rime_virt::files::Role;
use rime_virt::xml::{DiskSwap, DomainXml, Edits};
use rime_virt::{domains, Libvirt, VirtError};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where each instant recovery's state lives (pidfile, sockets, log, `state.json`).
pub const STATE_ROOT: &str = "/run/rime/instant";
/// Where the overlays go by default (on disk: they take the guest's writes).
pub const OVERLAY_ROOT: &str = "/var/lib/rime/instant";
/// How long the server may take to open the repository and listen.
const SERVER_START: Duration = Duration::from_secs(120);
/// Longest block copy of one disk.
const COPY_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct InstantOptions {
    pub snapshot: String,
    /// The VM's name (or UUID) in the snapshot.
    pub vm: String,
    /// Run it under this new name (new UUID and MAC addresses, its own NVRAM).
    pub as_name: Option<String>,
    /// The parent folder of the overlays (default [`OVERLAY_ROOT`]).
    pub overlay_root: Option<PathBuf>,
    /// The chunk cache of each disk's reader, in bytes.
    pub cache_bytes: Option<u64>,
    /// The command that runs the server: program and arguments, to which `--state DIR` is
    /// appended (the `rime` binary's hidden `vm instant-serve`).
    pub server: Vec<OsString>,
    /// When the command started (the time to running counts from here).
    pub started: Instant,
}

/// One disk of an instant recovery.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstantDisk {
    /// The guest's name for it ("vda"); also the export's name.
    pub target: String,
    /// The snapshot volume served.
    pub volume: String,
    pub size: u64,
    pub socket: PathBuf,
    pub overlay: PathBuf,
    /// Its path and image format at backup time.
    pub original: String,
    pub format: String,
}

/// What `state.json` holds: everything finish, cancel and list need.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstantState {
    /// The domain's name.
    pub name: String,
    /// Its UUID, once defined.
    pub uuid: Option<String>,
    pub snapshot: String,
    /// The VM's name and UUID in the snapshot.
    pub vm: String,
    pub vm_uuid: String,
    /// The repository's location, as the server opens it.
    pub repo: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub state_dir: PathBuf,
    pub overlay_dir: PathBuf,
    pub cache_bytes: u64,
    pub disks: Vec<InstantDisk>,
    /// The NVRAM file this recovery wrote (removed by cancel).
    pub nvram: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct InstantSummary {
    pub name: String,
    pub uuid: String,
    pub snapshot: String,
    pub vm: String,
    pub disks: Vec<InstantDisk>,
    pub server_pid: u32,
    pub state_dir: PathBuf,
    /// From the command's start to the domain running.
    pub seconds_to_running: f64,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct FinishedDisk {
    pub target: String,
    pub path: String,
    /// "block-copy" (the guest ran on) or "convert" (the domain was shut off).
    pub how: String,
}

#[derive(Debug, Serialize)]
pub struct FinishSummary {
    pub name: String,
    pub uuid: String,
    pub disks: Vec<FinishedDisk>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct CancelSummary {
    pub name: String,
    /// What was removed, in words.
    pub removed: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ListedInstant {
    #[serde(flatten)]
    pub state: InstantState,
    pub server_pid: Option<u32>,
    pub server_running: bool,
    /// The domain's state now (None: not defined, or libvirt not reachable).
    pub domain_state: Option<String>,
}

fn refused(msg: String) -> anyhow::Error {
    CommandError::VmRefused(msg).into()
}

/// The folder name for a domain name: the name itself when it is short and plain, else its
/// plain characters and a digest (so two names never share a folder).
pub fn state_key(name: &str) -> String {
    let plain: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    let plain = plain.trim_start_matches('.').to_string();
    if plain == name && !plain.is_empty() && plain.len() <= 48 {
        return plain;
    }
    let digest = blake3::hash(name.as_bytes()).to_hex();
    let head: String = plain.chars().take(40).collect();
    format!("{head}-{}", &digest[..8])
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("server.pid")
}

fn ready_file(dir: &Path) -> PathBuf {
    dir.join("ready")
}

fn log_file(dir: &Path) -> PathBuf {
    dir.join("server.log")
}

fn write_state(st: &InstantState) -> Result<()> {
    let tmp = st.state_dir.join(".state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
    std::fs::rename(&tmp, state_file(&st.state_dir)).context("writing the instant recovery's state")
}

fn read_state(dir: &Path) -> Result<InstantState> {
    let bytes = std::fs::read(state_file(dir)).with_context(|| format!("reading {}", state_file(dir).display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", state_file(dir).display()))
}

/// A folder QEMU (another user) may pass through but not list.
fn make_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("set the permissions of {}", dir.display()))
}

/// `nbd+unix:///EXPORT?socket=PATH`, with the characters a URI cannot hold escaped.
pub fn nbd_uri(export: &str, socket: &Path) -> String {
    fn escape(s: &str, keep_slash: bool) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }
    format!("nbd+unix:///{}?socket={}", escape(export, false), escape(&socket.display().to_string(), true))
}

/// The domains on the host by (UUID, name), from one `virsh list`.
fn domain_names(lv: &Libvirt) -> Result<Vec<(String, String)>, VirtError> {
    let text = lv.run("listing domains", ["list", "--all", "--uuid", "--name"])?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (uuid, name) = l.trim_start().split_once(' ')?;
            Some((uuid.to_string(), name.trim_start().to_string()))
        })
        .collect())
}

/// The snapshot's record of the VM, checked to be one instant recovery can run: every disk a
/// volume holding the guest's view (a `rime backup --vm` snapshot).
fn instant_vm<'m>(manifest: &'m Manifest, name: &str) -> Result<&'m VmRecord> {
    let vm = super::restore::find_vm(manifest, name)?;
    if vm.live.is_none() {
        return Err(refused(format!(
            "VM {:?} in snapshot {} was backed up with its volumes (--vm-aware), not as the guest saw its disks: instant recovery needs a `rime backup --vm` snapshot; use `rime restore --vm`",
            vm.name,
            &manifest.id[..8]
        )));
    }
    let disks: Vec<_> = vm.files.iter().filter(|f| f.role == "disk").collect();
    if disks.is_empty() {
        return Err(refused(format!("VM {:?} has no disk in snapshot {}", vm.name, &manifest.id[..8])));
    }
    for d in disks {
        match (&d.target, &d.in_snapshot) {
            (Some(_), Some(at))
                if at.path.is_none() && at.partition.is_none() && manifest.volume(&at.volume).is_some() => {}
            _ => {
                return Err(refused(format!(
                    "disk {} of VM {:?} is not in snapshot {} as a volume of its own",
                    d.path,
                    vm.name,
                    &manifest.id[..8]
                )))
            }
        }
    }
    Ok(vm)
}

/// Reads a whole (small) volume of the snapshot: the domain XML, the NVRAM.
fn read_volume(explorer: &Explorer, volume: &str) -> Result<Vec<u8>> {
    let entry = explorer.manifest.volume(volume).ok_or_else(|| anyhow!("snapshot has no volume {volume}"))?;
    anyhow::ensure!(entry.size <= 256 << 20, "volume {volume} is too large for a carried file");
    let reader = explorer.reader(entry)?;
    let mut buf = vec![0u8; entry.size as usize];
    reader.read_at(0, &mut buf)?;
    Ok(buf)
}

/// What a failed start leaves to undo, undone in reverse.
struct Undo {
    lv: Option<Libvirt>,
    uuid: Option<String>,
    server: Option<std::process::Child>,
    nvram: Option<PathBuf>,
    dirs: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let (Some(lv), Some(uuid)) = (&self.lv, &self.uuid) {
            let _ = lv.run("stopping the domain", ["destroy", "--domain", uuid]);
            let _ = rime_virt::domains::undefine(lv, uuid, false);
        }
        if let Some(mut child) = self.server.take() {
            rime_os::process::signal(child.id(), rime_os::signals::Signal::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(n) = &self.nvram {
            let _ = std::fs::remove_file(n);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Starts the VM from the snapshot; returns once it runs.
pub fn instant_restore(location: &str, opts: &InstantOptions) -> Result<InstantSummary> {
    let step = |what: &str| tracing::info!("{what} after {:.2} s", opts.started.elapsed().as_secs_f64());
    let repo = Repository::open(location)?;
    let manifest = repo.resolve(&opts.snapshot)?;
    let vm = instant_vm(&manifest, &opts.vm)?.clone();
    let name = opts.as_name.clone().unwrap_or_else(|| vm.name.clone());
    if name.is_empty() || name.contains('/') {
        bail!("{name:?} cannot be a domain name");
    }
    step("checked the snapshot");
    let lv = Libvirt::connect()?;
    let on_host = domain_names(&lv)?;
    if on_host.iter().any(|(_, n)| *n == name) {
        return Err(refused(format!(
            "a domain named {name:?} is defined on this host; run the VM under another name with --as NEW"
        )));
    }
    if opts.as_name.is_none() {
        if let Some((_, other)) = on_host.iter().find(|(u, _)| u.eq_ignore_ascii_case(&vm.uuid)) {
            return Err(refused(format!(
                "domain {other:?} on this host has the UUID of VM {:?} ({}); run the VM under another name with --as NEW",
                vm.name, vm.uuid
            )));
        }
    }
    let key = state_key(&name);
    let state_dir = Path::new(STATE_ROOT).join(&key);
    let overlay_dir = opts.overlay_root.clone().unwrap_or_else(|| PathBuf::from(OVERLAY_ROOT)).join(&key);
    for d in [&state_dir, &overlay_dir] {
        if d.exists() {
            return Err(refused(format!(
                "an instant recovery named {name:?} is under way or was left behind ({}): `rime vm instant-restore --cancel {name}` ends it",
                d.display()
            )));
        }
    }

    step("checked the host");
    // The definition and NVRAM, from the snapshot.
    let explorer = Explorer::open(repo.clone(), &manifest.id, Some(4 << 20))?;
    let xml_volume = vm
        .files
        .iter()
        .find(|f| f.role == "domain-xml")
        .and_then(|f| f.in_snapshot.as_ref())
        .map(|a| a.volume.clone())
        .unwrap_or_else(|| carried_name(&vm.uuid, Role::DomainXml));
    let xml = String::from_utf8(read_volume(&explorer, &xml_volume).context("reading the domain XML")?)
        .context("the domain XML is not UTF-8")?;
    let parsed = DomainXml::parse(&xml)?;
    let nvram_file = vm.files.iter().find(|f| f.role == "nvram").and_then(|f| Some((f, f.in_snapshot.as_ref()?)));
    let nvram_path = parsed.nvram.clone().map(|p| match &opts.as_name {
        Some(new) => {
            let dir = Path::new(&p).parent().unwrap_or(Path::new("/var/lib/libvirt/qemu/nvram"));
            dir.join(format!("{}_VARS.fd", state_key(new))).display().to_string()
        }
        None => p,
    });
    let nvram_bytes = match (&nvram_file, &nvram_path) {
        (Some((_, at)), Some(dest)) => {
            if Path::new(dest).exists() {
                return Err(refused(format!(
                    "{dest} exists: the VM's NVRAM would overwrite it; remove it, or run the VM under another name with --as NEW"
                )));
            }
            Some(read_volume(&explorer, &at.volume).context("reading the NVRAM")?)
        }
        _ => None,
    };
    let cache_bytes = opts.cache_bytes.unwrap_or(crate::snapshot_reader::DEFAULT_CACHE_BYTES);
    drop(explorer);

    step("read the definition and NVRAM");
    // Disks and media.
    let mut warnings = Vec::new();
    let mut disks = Vec::new();
    for f in vm.files.iter().filter(|f| f.role == "disk") {
        let target = f.target.clone().expect("checked by instant_vm");
        let volume = f.in_snapshot.as_ref().expect("checked by instant_vm").volume.clone();
        let size = manifest.volume(&volume).expect("checked by instant_vm").size;
        let file = state_key(&target);
        disks.push(InstantDisk {
            socket: state_dir.join(format!("{file}.sock")),
            overlay: overlay_dir.join(format!("{file}.qcow2")),
            target,
            volume,
            size,
            original: f.path.clone(),
            format: f.format.clone().unwrap_or_else(|| "raw".into()),
        });
    }
    for d in parsed.disks.iter().filter(|d| matches!(d.device.as_str(), "disk" | "lun")) {
        if !disks.iter().any(|i| Some(&i.target) == d.target.as_ref()) {
            return Err(refused(format!(
                "disk {} of VM {:?} is not in the snapshot",
                d.target.as_deref().unwrap_or("?"),
                vm.name
            )));
        }
    }
    let mut eject = Vec::new();
    for d in parsed.disks.iter().filter(|d| d.is_media()) {
        if let (Some(src), Some(t)) = (&d.source, &d.target) {
            if !Path::new(src).exists() {
                warnings.push(format!("{} {t}: {src} is not on this host; the drive is left empty", d.device));
                eject.push(t.clone());
            }
        }
    }

    // The state, then the server.
    let mut undo = Undo { lv: None, uuid: None, server: None, nvram: None, dirs: Vec::new(), armed: true };
    for root in [Path::new("/run/rime"), Path::new(STATE_ROOT)] {
        if !root.exists() {
            make_dir(root)?;
        }
    }
    if let Some(parent) = overlay_dir.parent() {
        if !parent.exists() {
            make_dir(parent)?;
        }
    }
    make_dir(&state_dir)?;
    undo.dirs.push(state_dir.clone());
    make_dir(&overlay_dir)?;
    undo.dirs.push(overlay_dir.clone());
    let mut state = InstantState {
        name: name.clone(),
        uuid: None,
        snapshot: manifest.id.clone(),
        vm: vm.name.clone(),
        vm_uuid: vm.uuid.clone(),
        repo: location.to_string(),
        started_at: chrono::Utc::now(),
        state_dir: state_dir.clone(),
        overlay_dir: overlay_dir.clone(),
        cache_bytes,
        disks: disks.clone(),
        nvram: nvram_bytes.as_ref().and(nvram_path.clone()),
    };
    write_state(&state)?;
    let child = spawn_server(&opts.server, &state_dir)?;
    let server_pid = child.id();
    undo.server = Some(child);
    wait_ready(undo.server.as_mut().expect("just set"), &state_dir)?;

    step("server listening");
    // Overlays on the exports.
    for d in &disks {
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-b"])
            .arg(nbd_uri(&d.target, &d.socket))
            .args(["-F", "raw"])
            .arg(&d.overlay)
            .arg(d.size.to_string())
            .stdin(Stdio::null())
            .output()
            .context("run qemu-img (install qemu-utils)")?;
        if !out.status.success() {
            bail!("qemu-img create {}: {}", d.overlay.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    step("overlays made");
    // NVRAM into place (under a temporary name first).
    if let (Some(bytes), Some(dest)) = (&nvram_bytes, &nvram_path) {
        let dest = PathBuf::from(dest);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
        let tmp = dest.with_file_name(format!(".rime-instant-{}", std::process::id()));
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        undo.nvram = Some(dest.clone());
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("moving the NVRAM to {}", dest.display()));
        }
    }

    // Define and start.
    let edits = Edits {
        name: opts.as_name.clone(),
        drop_uuid: opts.as_name.is_some(),
        drop_macs: opts.as_name.is_some(),
        disks: disks
            .iter()
            .map(|d| DiskSwap {
                target: d.target.clone(),
                file: d.overlay.display().to_string(),
                format: "qcow2".into(),
            })
            .collect(),
        eject,
        nvram: nvram_path.clone().filter(|_| opts.as_name.is_some()),
    };
    let new_xml = rime_virt::xml::edit(&xml, &edits)?;
    let xml_path = state_dir.join("domain.xml");
    std::fs::write(&xml_path, &new_xml)?;
    undo.lv = Some(lv.clone());
    lv.run(&format!("defining domain {name:?}"), [std::ffi::OsStr::new("define"), xml_path.as_os_str()])?;
    let uuid = domain_names(&lv)?
        .into_iter()
        .find(|(_, n)| *n == name)
        .map(|(u, _)| u)
        .ok_or_else(|| anyhow!("domain {name:?} is not listed after its definition"))?;
    undo.uuid = Some(uuid.clone());
    state.uuid = Some(uuid.clone());
    write_state(&state)?;
    step("defined");
    lv.run_for(&format!("starting domain {name:?}"), ["start", "--domain", &uuid], Duration::from_secs(300))?;
    let seconds_to_running = opts.started.elapsed().as_secs_f64();
    undo.armed = false;
    undo.server.take();
    Ok(InstantSummary {
        name,
        uuid,
        snapshot: manifest.id.clone(),
        vm: vm.name.clone(),
        disks,
        server_pid,
        state_dir,
        seconds_to_running,
        warnings,
    })
}

/// Starts the server, detached: no terminal, its output to its log.
fn spawn_server(server: &[OsString], state_dir: &Path) -> Result<std::process::Child> {
    let (program, args) = server.split_first().ok_or_else(|| anyhow!("no server command"))?;
    let log = std::fs::File::create(log_file(state_dir)).context("creating the server's log")?;
    Command::new(program)
        .args(args)
        .arg("--state")
        .arg(state_dir)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the instant-recovery server")
}

/// Waits until the server listens (its `ready` file), or says why it did not start.
fn wait_ready(child: &mut std::process::Child, state_dir: &Path) -> Result<()> {
    let t = Instant::now();
    loop {
        if ready_file(state_dir).exists() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(log_file(state_dir)).unwrap_or_default();
            let why = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim();
            let why = why.strip_prefix("rime: ").unwrap_or(why);
            bail!("the instant-recovery server did not start ({status}): {why}");
        }
        if t.elapsed() > SERVER_START {
            bail!("the instant-recovery server did not listen within {} s", SERVER_START.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server: exports every disk of the state folder's recovery until SIGTERM or SIGINT.
/// Runs in its own session; a hangup is ignored.
pub fn serve(state_dir: &Path) -> Result<()> {
    use rime_os::signals::{BlockedSignals, Signal};
    let _ = rime_os::process::new_session();
    let signals = BlockedSignals::block(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])?;
    let state = read_state(state_dir)?;
    let repo = Repository::open(&state.repo)?;
    let explorer = Explorer::open_for(repo, &state.snapshot, Some(state.cache_bytes), "vm instant-serve")?;
    let owner = rime_virt::files::qemu_process_ids();
    let mut exports = Vec::new();
    for d in &state.disks {
        let entry = explorer
            .manifest
            .volume(&d.volume)
            .ok_or_else(|| anyhow!("snapshot {} has no volume {}", state.snapshot, d.volume))?;
        let reader = explorer.reader(entry)?;
        let export = Arc::new(SnapshotExport::new(reader, format!("rime {} {}", &state.snapshot[..8], d.volume)));
        exports.push(export.clone());
        let server = rime_nbd::NbdServer::new(export, d.target.clone());
        server.listen(&rime_nbd::Address::Unix(d.socket.clone()))?;
        // Only QEMU (and root) may connect.
        match owner {
            Some((uid, gid)) => {
                std::os::unix::fs::chown(&d.socket, Some(uid), Some(gid))
                    .with_context(|| format!("give {} to QEMU's user", d.socket.display()))?;
                std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o600))?;
            }
            None => std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666))?,
        }
        tracing::info!("serving volume {} as export {:?} on {}", d.volume, d.target, d.socket.display());
    }
    std::fs::write(pid_file(state_dir), format!("{}\n", std::process::id()))?;
    std::fs::write(ready_file(state_dir), b"")?;
    loop {
        match signals.wait() {
            Signal::SIGHUP => continue,
            s => {
                tracing::info!("{s}: stopping");
                break;
            }
        }
    }
    for d in &state.disks {
        let _ = std::fs::remove_file(&d.socket);
    }
    let _ = std::fs::remove_file(ready_file(state_dir));
    let _ = std::fs::remove_file(pid_file(state_dir));
    drop(explorer);
    Ok(())
}

/// Every recovery under [`STATE_ROOT`], by folder.
fn all_states() -> Vec<InstantState> {
    let Ok(entries) = std::fs::read_dir(STATE_ROOT) else { return Vec::new() };
    let mut out: Vec<InstantState> = entries.flatten().filter_map(|e| read_state(&e.path()).ok()).collect();
    out.sort_by_key(|a| a.started_at);
    out
}

/// The recovery of domain `name` (or UUID).
fn find_state(name: &str) -> Result<InstantState> {
    let all = all_states();
    all.iter()
        .find(|s| s.name == name)
        .or_else(|| all.iter().find(|s| s.uuid.as_deref().is_some_and(|u| u.eq_ignore_ascii_case(name))))
        .cloned()
        .ok_or_else(|| {
            let names: Vec<String> = all.iter().map(|s| format!("{:?}", s.name)).collect();
            CommandError::PathNotFound(format!(
                "no instant recovery named {name:?} (running: {})",
                if names.is_empty() { "none".into() } else { names.join(", ") }
            ))
            .into()
        })
}

/// The server's pid, if its pidfile names a live process that is this folder's server.
fn server_pid(state: &InstantState) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(&state.state_dir)).ok()?.trim().parse().ok()?;
    let args = rime_os::process::command_line(pid)?;
    let ours =
        args.iter().any(|a| a == "instant-serve") && args.iter().any(|a| Path::new(a) == state.state_dir.as_path());
    ours.then_some(pid)
}

/// Stops the server and waits for it to end.
fn stop_server(state: &InstantState) -> Result<bool> {
    let Some(pid) = server_pid(state) else { return Ok(false) };
    rime_os::process::signal(pid, rime_os::signals::Signal::SIGTERM);
    let t = Instant::now();
    while rime_os::process::is_alive(pid) && server_pid(state).is_some() {
        if t.elapsed() > Duration::from_secs(20) {
            rime_os::process::signal(pid, rime_os::signals::Signal::SIGKILL);
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the instant-recovery server (pid {pid}) did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// Whether any disk of the domain's live XML still reads through this recovery (its overlay or
/// its sockets).
fn still_served(xml: &str, state: &InstantState) -> bool {
    let escaped = |p: &Path| {
        let p = p.display().to_string();
        let e = p.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        [e.replace('\'', "&apos;").replace('"', "&quot;"), e, p]
    };
    state.disks.iter().flat_map(|d| escaped(&d.overlay).into_iter().chain(escaped(&d.socket))).any(|p| xml.contains(&p))
}

/// Copies every disk to local images while the VM runs, moves the definition onto them, then
/// stops the server and removes the overlays.
pub fn finish(name: &str, to: Option<&Path>) -> Result<FinishSummary> {
    let started = Instant::now();
    let state = find_state(name)?;
    let lv = Libvirt::connect()?;
    let uuid = state.uuid.clone().ok_or_else(|| {
        anyhow!(
            "instant recovery {:?} never defined its domain: `rime vm instant-restore --cancel` removes it",
            state.name
        )
    })?;
    let domain = domains::get(&lv, &uuid).map_err(|e| match e {
        VirtError::NoDomain(_) => CommandError::PathNotFound(format!(
            "domain {:?} of this instant recovery is gone: `rime vm instant-restore --cancel {}` cleans up",
            state.name, state.name
        ))
        .into(),
        e => anyhow::Error::from(e),
    })?;
    let running = domain.state.is_active();
    // Destinations: DIR/<file name at backup>, or the paths at backup time.
    if let Some(dir) = to {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut dests: Vec<PathBuf> = Vec::new();
    for d in &state.disks {
        let original = PathBuf::from(&d.original);
        let base = original.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| d.target.clone());
        let mut dest = match to {
            Some(dir) => dir.join(&base),
            None => original.clone(),
        };
        let mut n = 2;
        while dests.contains(&dest) {
            dest = dest.with_file_name(format!("{n}-{base}"));
            n += 1;
        }
        dests.push(dest);
    }
    let pending: Vec<(&InstantDisk, &PathBuf)> = state
        .disks
        .iter()
        .zip(&dests)
        .filter(|(d, dest)| {
            // A disk a previous --finish already moved is done.
            let now = domain.parsed.disks.iter().find(|x| x.target.as_deref() == Some(&d.target));
            now.and_then(|x| x.source.as_deref()) != Some(&*dest.display().to_string())
        })
        .collect();
    let in_the_way: Vec<String> =
        pending.iter().filter(|(_, dest)| dest.exists()).map(|(_, dest)| dest.display().to_string()).collect();
    if !in_the_way.is_empty() {
        return Err(refused(format!(
            "{} {} in the way; name a folder for the disks with --to DIR",
            in_the_way.join(", "),
            if in_the_way.len() == 1 { "is" } else { "are" }
        )));
    }
    if dests.iter().any(|d| d.starts_with(&state.overlay_dir) || d.starts_with(&state.state_dir)) {
        return Err(refused("the disks cannot be copied into the recovery's own folders".into()));
    }
    let mut finished = Vec::new();
    for (d, dest) in &pending {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
        if running {
            let dest_arg = dest.as_os_str();
            lv.run_for(
                &format!("copying disk {} of {:?} to {}", d.target, state.name, dest.display()),
                [
                    std::ffi::OsStr::new("blockcopy"),
                    "--domain".as_ref(),
                    uuid.as_ref(),
                    "--path".as_ref(),
                    d.target.as_ref(),
                    "--dest".as_ref(),
                    dest_arg,
                    "--format".as_ref(),
                    finished_format(d).as_ref(),
                    "--wait".as_ref(),
                    "--pivot".as_ref(),
                    "--transient-job".as_ref(),
                ],
                COPY_LIMIT,
            )?;
            finished.push(FinishedDisk {
                target: d.target.clone(),
                path: dest.display().to_string(),
                how: "block-copy".into(),
            });
        } else {
            // Shut off: the overlay (and through it the export) converted to a standalone image.
            let tmp = dest.with_file_name(format!(
                ".rime-instant-{}-{}",
                std::process::id(),
                dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ));
            let out = Command::new("qemu-img")
                .args(["convert", "-q", "-f", "qcow2", "-O", finished_format(d)])
                .arg(&d.overlay)
                .arg(&tmp)
                .stdin(Stdio::null())
                .output()
                .context("run qemu-img (install qemu-utils)")?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&tmp);
                bail!("qemu-img convert {}: {}", d.overlay.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
            std::fs::rename(&tmp, dest).with_context(|| format!("moving {} into place", dest.display()))?;
            finished.push(FinishedDisk {
                target: d.target.clone(),
                path: dest.display().to_string(),
                how: "convert".into(),
            });
        }
    }
    // The definition follows (libvirt moves it on a pivot too; a disk it left is moved here).
    let definition = domains::definition(&lv, &uuid)?;
    let parsed = DomainXml::parse(&definition)?;
    let swaps: Vec<DiskSwap> = state
        .disks
        .iter()
        .zip(&dests)
        .filter(|(d, dest)| {
            let now = parsed.disks.iter().find(|x| x.target.as_deref() == Some(&d.target));
            now.and_then(|x| x.source.as_deref()) != Some(&*dest.display().to_string())
                || now.is_some_and(|x| !x.backing.is_empty())
        })
        .map(|(d, dest)| DiskSwap {
            target: d.target.clone(),
            file: dest.display().to_string(),
            format: finished_format(d).into(),
        })
        .collect();
    if !swaps.is_empty() {
        let xml = rime_virt::xml::edit(&definition, &Edits { disks: swaps, ..Edits::default() })?;
        let path = state.state_dir.join("finished.xml");
        std::fs::write(&path, xml)?;
        lv.run(
            &format!("updating the definition of {:?}", state.name),
            [std::ffi::OsStr::new("define"), path.as_os_str()],
        )?;
    }
    // Nothing may read through the server any more: only then does it stop.
    let now = domains::get(&lv, &uuid)?;
    if now.state.is_active() && still_served(&now.xml, &state) {
        bail!("domain {:?} still reads a disk through the instant-recovery server; it is left running", state.name);
    }
    if still_served(&domains::definition(&lv, &uuid)?, &state) {
        bail!("the definition of {:?} still names an overlay; the server is left running", state.name);
    }
    stop_server(&state)?;
    remove_files(&state);
    Ok(FinishSummary { name: state.name.clone(), uuid, disks: finished, seconds: started.elapsed().as_secs_f64() })
}

/// The format a disk is finished in: raw for a disk that was raw at backup time, else qcow2
/// (a standalone image: the copy has no backing file).
fn finished_format(d: &InstantDisk) -> &'static str {
    if d.format == "raw" {
        "raw"
    } else {
        "qcow2"
    }
}

fn remove_files(state: &InstantState) {
    for d in &state.disks {
        let _ = std::fs::remove_file(&d.overlay);
    }
    let _ = std::fs::remove_dir_all(&state.overlay_dir);
    let _ = std::fs::remove_dir_all(&state.state_dir);
}

/// Destroys and undefines the domain, removes its NVRAM and the overlays, stops the server.
pub fn cancel(name: &str) -> Result<CancelSummary> {
    let state = find_state(name)?;
    let mut removed = Vec::new();
    if let Some(uuid) = &state.uuid {
        let lv = Libvirt::connect()?;
        match domains::get(&lv, uuid) {
            Ok(d) => {
                if d.state.is_active() {
                    lv.run_for("stopping the domain", ["destroy", "--domain", uuid], Duration::from_secs(120))?;
                }
                let mut undefined = Err(VirtError::Failed(String::new()));
                // libvirt may still be finishing the destroy's job.
                for _ in 0..50 {
                    undefined = domains::undefine(&lv, uuid, true);
                    if undefined.is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                undefined?;
                removed.push(format!("domain {:?} ({uuid})", state.name));
            }
            Err(VirtError::NoDomain(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(n) = &state.nvram {
        if std::fs::remove_file(n).is_ok() {
            removed.push(format!("NVRAM {n}"));
        }
    }
    if stop_server(&state)? {
        removed.push("the server".into());
    }
    for d in &state.disks {
        if d.overlay.exists() {
            removed.push(format!("overlay {}", d.overlay.display()));
        }
    }
    remove_files(&state);
    Ok(CancelSummary { name: state.name, removed })
}

/// Every instant recovery on this host, with its server's and domain's state.
pub fn list() -> Vec<ListedInstant> {
    let lv = Libvirt::connect().ok();
    all_states()
        .into_iter()
        .map(|state| {
            let pid = server_pid(&state);
            let domain_state = match (&lv, &state.uuid) {
                (Some(lv), Some(uuid)) => domains::state(lv, uuid).ok().map(|s| s.label().to_string()),
                _ => None,
            };
            ListedInstant { server_pid: pid, server_running: pid.is_some(), domain_state, state }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_plain_and_never_shared() {
        assert_eq!(state_key("web-1.prod"), "web-1.prod");
        let a = state_key("web 1");
        let b = state_key("web_1");
        assert_ne!(a, b);
        assert!(a.starts_with("web_1-"), "{a}");
        assert!(state_key("..").chars().all(|c| c != '/'));
        assert!(!state_key("..").starts_with('.'));
        assert!(state_key(&"x".repeat(300)).len() < 60);
    }

    #[test]
    fn nbd_uris_escape_what_a_uri_cannot_hold() {
        assert_eq!(
            nbd_uri("vda", Path::new("/run/rime/instant/web/vda.sock")),
            "nbd+unix:///vda?socket=/run/rime/instant/web/vda.sock"
        );
        assert_eq!(nbd_uri("v d", Path::new("/a b/&.sock")), "nbd+unix:///v%20d?socket=/a%20b/%26.sock");
    }
}
