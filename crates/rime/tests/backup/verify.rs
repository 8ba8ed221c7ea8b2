//! `rime verify`: a flipped byte in a pack is found and blamed on the snapshots that need it.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn pack_files(env: &Env) -> BTreeSet<PathBuf> {
    files_under(&env.repo.join("packs")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "pack")).collect()
}

fn flip_byte(path: &Path, offset: u64) {
    let f = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5A;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

fn snapshots_named_by(report: &Value) -> BTreeSet<String> {
    report["problems"]
        .as_array()
        .expect("verify --json has a problems list")
        .iter()
        .flat_map(|p| p["snapshots"].as_array().expect("each problem lists snapshots").clone())
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_flipped_byte_is_reported_with_the_snapshots_that_need_it() {
    let env = Env::new();
    let a = env.path("a.img");
    write_random_file(&a, 111, 4 * MIB);
    let b = env.path("b.img");
    write_random_file(&b, 112, 4 * MIB);

    let snap_a = env.backup(&[a.to_str().unwrap()]);
    let packs_a = pack_files(&env);
    assert!(!packs_a.is_empty(), "the backup should have written a pack");
    let snap_b = env.backup(&[b.to_str().unwrap()]);
    let packs_b: BTreeSet<PathBuf> = pack_files(&env).difference(&packs_a).cloned().collect();
    assert!(!packs_b.is_empty(), "different data should go to a new pack");
    // A second snapshot of the same data as A: it needs A's chunks too.
    let snap_c = env.backup(&[a.to_str().unwrap()]);

    let (code, report, _) = env.verify(None);
    assert_eq!(code, Some(0), "a clean repository verifies: {report}");
    assert_eq!(report["snapshots"].as_array().unwrap().len(), 3);
    assert!(report["problems"].as_array().unwrap().is_empty());

    // Flip one byte inside the blob area of A's pack (the header is 16 bytes; blobs follow).
    let pack = packs_a.iter().next().unwrap().clone();
    flip_byte(&pack, 100);

    // Human output: non-zero exit, names the damaged chunk's snapshots (A and C), not B.
    let run = env.rime(&["verify"]);
    assert_ne!(run.code, Some(0), "verify must fail on a flipped byte:\n{}", run.stdout);
    assert!(run.stdout.contains(&snap_a), "verify output should name snapshot A {snap_a}:\n{}", run.stdout);
    assert!(run.stdout.contains(&snap_c), "verify output should name snapshot C {snap_c}:\n{}", run.stdout);
    assert!(!run.stdout.contains(&snap_b), "snapshot B is not affected:\n{}", run.stdout);

    // JSON output: problems list the affected snapshots.
    let (code, report, _) = env.verify(None);
    assert_ne!(code, Some(0));
    assert_eq!(report["ok"], false, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "exactly one chunk is damaged: {report}");
    assert!(problems[0]["chunk"].is_string(), "the problem names the chunk: {report}");
    let named = snapshots_named_by(&report);
    assert_eq!(named, BTreeSet::from([snap_a.clone(), snap_c.clone()]), "{report}");

    // Verifying only the unaffected snapshot passes; only an affected one fails.
    let (code, report, _) = env.verify(Some(&snap_b));
    assert_eq!(code, Some(0), "snapshot B does not need the damaged chunk: {report}");
    let (code, report, _) = env.verify(Some(&snap_c));
    assert_ne!(code, Some(0), "snapshot C needs the damaged chunk: {report}");

    // Restoring an affected snapshot fails instead of writing bad data; B still restores.
    for snap in [&snap_a, &snap_c] {
        let out = env.path(&format!("restored-{snap}.img"));
        let run = env.rime(&["restore", snap, out.to_str().unwrap()]);
        assert_eq!(run.code, Some(5), "a damaged snapshot has its own exit code: {run:?}");
        let line = run.fails();
        assert!(line.contains("corrupt") || line.contains("damaged"), "restore should say why: {line}");
        assert!(!out.exists() || !same_bytes(&a, &out), "a failed restore must not look like a good one");
        assert!(!out.exists(), "a failed restore into a new file should remove it");
    }
    let out_b = env.path("restored-b.img");
    env.restore(&snap_b, &out_b, &[]);
    assert_same_bytes(&b, &out_b);

    // Flip it back: clean again, so the report was about exactly that byte.
    flip_byte(&pack, 100);
    env.assert_verify_clean();
    let out_a = env.path("restored-a.img");
    env.restore(&snap_a, &out_a, &[]);
    assert_same_bytes(&a, &out_a);
}

#[test]
fn a_missing_pack_is_reported() {
    let env = Env::new();
    let a = env.path("a.img");
    write_random_file(&a, 121, 2 * MIB);
    let snap = env.backup(&[a.to_str().unwrap()]);
    for p in pack_files(&env) {
        fs::remove_file(p).unwrap();
    }
    let (code, report, _) = env.verify(None);
    assert_ne!(code, Some(0), "verify must fail when a pack is gone: {report}");
    assert!(snapshots_named_by(&report).contains(&snap), "{report}");
    let out = env.path("out.img");
    env.rime(&["restore", &snap, out.to_str().unwrap()]).fails();
    assert!(!out.exists());
}
