//! What each command prints: a human summary, or one JSON document with `--json`.

use rime_core::commands::backup::BackupSummary;
use rime_core::commands::extract::ExtractSummary;
use rime_core::commands::ls::LsListing;
use rime_core::commands::mount::MountSummary;
use rime_core::commands::prune::PruneSummary;
use rime_core::commands::restore::RestoreSummary;
use rime_core::commands::verify::VerifyReport;
use rime_core::retention::Decision;
use rime_repo::{Manifest, Repository};
use serde_json::json;

/// A byte count for people (binary units: "1.50 MiB").
pub fn size(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

pub fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values serialise"));
}

/// A VM's name as Rime prints it: a JSON string, so quotes and anything else read back.
pub fn quoted(name: &str) -> String {
    serde_json::to_string(name).expect("strings serialise")
}

pub fn init(repo: &Repository, json: bool) {
    if json {
        print_json(&json!({"repository": repo.location(), "id": repo.config.id, "chunk_size": repo.config.chunk_size}));
    } else {
        println!("created repository {} (chunk size {})", repo.location(), size(repo.config.chunk_size as u64));
    }
}

pub fn backup(s: &BackupSummary, json: bool) {
    if json {
        print_json(&serde_json::to_value(s).expect("summary serialises"));
        return;
    }
    let m = &s.manifest;
    println!("snapshot {} saved ({:.1} s)", &m.id[..8], m.duration);
    for v in m.data_volumes() {
        println!(
            "  {:<16} {:>10}  {:<28} used {:>10}  read {:>10}  added {:>10}",
            v.name,
            size(v.size),
            v.map,
            size(v.used_bytes),
            size(v.read_bytes),
            size(v.added_bytes)
        );
    }
    if let Some(vms) = &m.vms {
        let carried: Vec<&rime_repo::VolumeEntry> =
            m.volumes.iter().filter(|v| v.kind == rime_repo::VM_FILE_KIND).collect();
        if !carried.is_empty() {
            let bytes = carried.iter().map(|v| v.size).sum();
            println!("  VM files carried into the snapshot: {} ({})", carried.len(), size(bytes));
        }
        for d in &vms.domains {
            let pause = d.interruption_ms.map(|ms| format!(", interrupted {:.1} s", ms / 1000.0)).unwrap_or_default();
            println!("  VM {}: {}{pause}", quoted(&d.name), d.action);
        }
    }
    let read: u64 = m.volumes.iter().map(|v| v.read_bytes).sum();
    if m.duration > 0.0 {
        println!("  read {} at {}/s", size(read), size((read as f64 / m.duration) as u64));
    }
    if !s.forgotten.is_empty() {
        println!("  --keep-last removed {} old snapshot(s)", s.forgotten.len());
    }
    if let Some(p) = &s.pruned {
        println!("  pruned: {} freed", size(p.bytes_freed));
    }
}

pub fn snapshots(list: &[Manifest], json: bool, long: bool) {
    if json {
        print_json(&serde_json::to_value(list).expect("manifests serialise"));
        return;
    }
    if list.is_empty() {
        println!("no snapshots");
        return;
    }
    println!("{:<9} {:<20} {:<16} {:>10} {:>10}  volumes", "id", "time (UTC)", "host", "size", "added");
    for m in list {
        let vols: Vec<&str> = m.data_volumes().map(|v| v.name.as_str()).collect();
        let tags = if m.tags.is_empty() { String::new() } else { format!("  [{}]", m.tags.join(",")) };
        println!(
            "{:<9} {:<20} {:<16} {:>10} {:>10}  {}{}",
            &m.id[..8],
            m.time.format("%Y-%m-%d %H:%M:%S"),
            m.host,
            size(m.total_size()),
            size(m.added_bytes()),
            vols.join(", "),
            tags
        );
        if let Some(vms) = &m.vms {
            let each: Vec<String> = vms
                .domains
                .iter()
                .map(|d| {
                    let name = quoted(&d.name);
                    match d.state == d.state_in_snapshot {
                        true => format!("{name} {}", d.state),
                        false => format!("{name} {}→{}", d.state, d.state_in_snapshot),
                    }
                })
                .collect();
            println!("{:<9} VMs: {}", "", if each.is_empty() { "none on its volumes".into() } else { each.join(", ") });
        }
        if long {
            crate::volume_tree::print(m);
        }
    }
}

pub fn restore(s: &RestoreSummary, json: bool) {
    if json {
        print_json(&serde_json::to_value(s).expect("summary serialises"));
    } else {
        println!(
            "restored volume {} of snapshot {} to {}: {} ({} data, {} zeros) in {:.1} s",
            s.volume,
            &s.snapshot[..8],
            s.target,
            size(s.size),
            size(s.data_bytes),
            size(s.zero_bytes),
            s.seconds
        );
    }
}

pub fn restore_vm(s: &rime_core::vms::restore::VmRestoreSummary, json: bool) {
    for w in &s.warnings {
        eprintln!("rime: warning: {w}");
    }
    if json {
        print_json(&serde_json::to_value(s).expect("summary serialises"));
        return;
    }
    let verb = if s.replaced { "replaced" } else { "restored" };
    println!(
        "{verb} VM {} from snapshot {}: {} at backup, {} now",
        quoted(&s.name),
        &s.snapshot[..8],
        s.state_at_backup,
        s.state
    );
    for f in &s.files {
        if f.from == f.to {
            println!("  {:<16} {}", f.role, f.to);
        } else {
            println!("  {:<16} {} (was {})", f.role, f.to, f.from);
        }
    }
}

pub fn verify(r: &VerifyReport, json: bool) {
    if json {
        let mut v = serde_json::to_value(r).expect("report serialises");
        v["ok"] = json!(r.ok());
        print_json(&v);
        return;
    }
    for p in &r.problems {
        let mut line = format!("{}: {}", p.kind, p.detail);
        if let Some(pack) = &p.pack {
            line.push_str(&format!(" (pack {pack})"));
        }
        if !p.snapshots.is_empty() {
            line.push_str(&format!("; needed by snapshot(s) {}", p.snapshots.join(", ")));
        }
        println!("{line}");
    }
    let verdict =
        if r.ok() { "no problems found".to_string() } else { format!("{} problem(s) found", r.problems.len()) };
    println!(
        "verified {} snapshot(s), {} chunks, {}: {verdict}",
        r.snapshots.len(),
        r.chunks_checked,
        size(r.bytes_checked)
    );
}

pub fn forget_decisions(decisions: &[Decision], dry_run: bool, json: bool) {
    if json {
        print_json(&json!({"dry_run": dry_run, "decisions": decisions}));
        return;
    }
    for d in decisions {
        let verb = match (d.keep, dry_run) {
            (true, _) => format!("keep   ({})", d.reasons.join(", ")),
            (false, true) => "would remove".to_string(),
            (false, false) => "removed".to_string(),
        };
        println!("{} {verb}", &d.id[..8]);
    }
}

pub fn forgotten(ids: &[String], json: bool) {
    if json {
        print_json(&json!({"forgotten": ids}));
    } else {
        for id in ids {
            println!("removed snapshot {id}");
        }
    }
}

pub fn prune(s: &PruneSummary, forgotten: Option<&[String]>, json: bool) {
    if json {
        print_json(&json!({"forgotten": forgotten, "prune": s}));
        return;
    }
    println!(
        "pruned: {} pack(s) deleted, {} repacked, {} orphan pack(s), {} chunks removed, {} freed",
        s.packs_deleted,
        s.packs_repacked,
        s.orphan_packs_deleted,
        s.chunks_deleted,
        size(s.bytes_freed)
    );
}

pub fn ls(l: &LsListing, long: bool, json: bool) {
    if json {
        print_json(&serde_json::to_value(l).expect("listing serialises"));
        return;
    }
    for e in &l.entries {
        let name = match &e.target {
            Some(t) if long => format!("{} -> {t}", e.name),
            _ => e.name.clone(),
        };
        if !long {
            println!("{name}");
            continue;
        }
        let when = chrono::DateTime::from_timestamp(e.mtime, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| e.mtime.to_string());
        let size = match e.rdev {
            Some((ma, mi)) => format!("{ma}, {mi}"),
            None => e.size.to_string(),
        };
        println!("{} {:>3} {:>5} {:>5} {:>12} {when} {name}", e.permissions, e.nlink, e.uid, e.gid, size);
    }
}

pub fn extract(s: &ExtractSummary, json: bool) {
    for k in &s.skipped {
        eprintln!("rime: skipped {}: {}", k.path, k.reason);
    }
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        print_json(&serde_json::to_value(s).expect("summary serialises"));
        return;
    }
    println!(
        "extracted {} files, {} dirs, {} symlinks, {} hard links ({}) from volume {} of snapshot {} to {} in {:.1} s; read {} from the repository{}",
        s.files,
        s.dirs,
        s.symlinks,
        s.hardlinks,
        size(s.bytes),
        s.volume,
        &s.snapshot[..8],
        s.to,
        s.seconds,
        size(s.stats.repo_bytes_read),
        if s.skipped.is_empty() { String::new() } else { format!("; {} skipped", s.skipped.len()) }
    );
}

/// The view is mounted: one line (or one JSON line) on stdout, flushed, so scripts can wait for it.
pub fn mounted(s: &MountSummary, json: bool) {
    use std::io::Write;
    if json {
        println!(
            "{}",
            serde_json::to_string(
                &json!({"event": "mounted", "snapshot": s.snapshot, "mountpoint": s.mountpoint, "volumes": s.volumes})
            )
            .expect("serialises")
        );
    } else {
        let trees: Vec<String> =
            s.volumes.iter().flat_map(|v| v.trees.iter().map(|(d, fs)| format!("{d} ({fs})"))).collect();
        println!(
            "mounted snapshot {} at {}: {} volume image(s){}; Ctrl-C or `fusermount -u {}` unmounts",
            &s.snapshot[..8],
            s.mountpoint,
            s.volumes.len(),
            if trees.is_empty() { String::new() } else { format!(", file trees {}", trees.join(", ")) },
            s.mountpoint
        );
    }
    let _ = std::io::stdout().flush();
}

pub fn unmounted(s: &MountSummary, json: bool) {
    if json {
        println!("{}", serde_json::to_string(&json!({"event": "unmounted", "summary": s})).expect("serialises"));
    } else {
        println!(
            "unmounted {} after {:.1} s; read {} from the repository",
            s.mountpoint,
            s.seconds,
            size(s.stats.repo_bytes_read)
        );
    }
}

pub fn writers(r: &rime_core::commands::writers::WriterReport, json: bool) {
    if json {
        print_json(&serde_json::to_value(r).expect("writer report serialises"));
        return;
    }
    if r.writers.is_empty() {
        println!(
            "no writers on {}",
            if r.volumes.is_empty() { "any protected volume".into() } else { r.volumes.join(", ") }
        );
        return;
    }
    for w in &r.writers {
        match (&w.filesystem, &w.device) {
            (Some(fs), Some(dev)) => println!("{}  {fs} on {dev} (volume {})", w.name, w.volumes.join(", ")),
            _ => println!("{}  on {}", w.name, w.volumes.join(", ")),
        }
        for p in &w.paths {
            let on = p.volume.as_deref().map_or("not on these volumes".to_string(), |v| format!("on {v}"));
            println!("  {}: {} ({on})", p.role, p.path);
        }
        println!("  freeze: {}", w.freeze);
    }
}

pub fn providers(choices: &[rime_core::providers::Choice], json: bool) {
    if json {
        print_json(&json!({ "volumes": choices }));
        return;
    }
    for c in choices {
        match c.provider {
            Some(p) => println!("{}: {} ({})", c.volume, p.name(), c.reason),
            None => println!("{}: no provider ({})", c.volume, c.reason),
        }
    }
}
