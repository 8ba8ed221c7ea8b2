//! `forget --keep-last`, `prune` and cyclic backups (`backup --keep-last`).

use crate::common::*;
use std::fs;

#[test]
fn forget_keep_last_and_prune_reclaim_space() {
    let env = Env::new();
    let vol = env.path("vol.img");
    let mut ids = Vec::new();
    let mut versions = Vec::new();
    // Four versions of one volume, each with 4 MiB of its own data and 1 MiB shared.
    for i in 0..4u64 {
        write_random_file(&vol, 200 + i, 5 * MIB);
        write_random_at(&vol, 299, 4 * MIB, MIB);
        let copy = env.path(&format!("version-{i}.img"));
        fs::copy(&vol, &copy).unwrap();
        versions.push(copy);
        ids.push(env.backup(&[vol.to_str().unwrap()]));
    }
    assert_eq!(env.snapshot_ids(), ids);
    let full = env.repo_bytes();
    assert!(full > 17 * MIB, "four versions should be stored ({full} bytes)");

    // Dry run removes nothing.
    let run = env.rime(&["forget", "--keep-last", "2", "--dry-run"]).ok();
    assert!(run.stdout.contains(&ids[0][..8]), "{}", run.stdout);
    assert_eq!(env.snapshot_ids().len(), 4);

    env.rime(&["forget", "--keep-last", "2"]).ok();
    assert_eq!(env.snapshot_ids(), ids[2..].to_vec(), "the two newest snapshots should remain");
    // Forget alone frees (almost) nothing; prune does.
    let after_forget = env.repo_bytes();
    assert!(after_forget > full - MIB, "forget alone should not delete data");
    let run = env.rime(&["prune", "--json"]).ok();
    let pruned = run.json();
    assert!(pruned["prune"]["bytes_freed"].as_u64().unwrap() > 7 * MIB, "{pruned}");
    let after_prune = env.repo_bytes();
    assert!(
        after_prune < full - 7 * MIB,
        "prune should reclaim the two forgotten versions: {full} -> {after_prune} bytes"
    );
    assert!(after_prune > 9 * MIB, "the kept versions' data must remain ({after_prune} bytes)");

    env.assert_verify_clean();
    for (id, version) in ids[2..].iter().zip(&versions[2..]) {
        let out = env.path(&format!("restored-{id}.img"));
        env.restore(id, &out, &[]);
        assert_same_bytes(version, &out);
    }
    // Forgotten snapshots are gone for good.
    let out = env.path("gone.img");
    env.rime(&["restore", &ids[0], out.to_str().unwrap()]).fails();

    // Forget by id, then prune, down to one snapshot.
    env.rime(&["forget", &ids[2]]).ok();
    env.rime(&["prune"]).ok();
    assert_eq!(env.snapshot_ids(), vec![ids[3].clone()]);
    assert!(env.repo_bytes() < after_prune - 3 * MIB, "forgetting another version should free its data");
    env.assert_verify_clean();
    let out = env.path("last.img");
    env.restore("latest", &out, &[]);
    assert_same_bytes(&versions[3], &out);
    // A second prune has nothing left to do.
    let again = env.rime(&["prune", "--json"]).ok().json();
    assert_eq!(again["prune"]["bytes_freed"].as_u64(), Some(0), "{again}");
}

#[test]
fn cyclic_backup_keeps_the_last_n_of_its_volume_set() {
    let env = Env::new();
    let other = env.path("other.img");
    write_random_file(&other, 301, 2 * MIB);
    let other_id = env.backup(&[other.to_str().unwrap()]);

    let vol = env.path("vol.img");
    let mut ids = Vec::new();
    let mut versions = Vec::new();
    for i in 0..4u64 {
        write_random_file(&vol, 310 + i, 3 * MIB);
        let copy = env.path(&format!("v{i}.img"));
        fs::copy(&vol, &copy).unwrap();
        versions.push(copy);
        let v = env.backup_json(&["--keep-last", "2", vol.to_str().unwrap()]);
        ids.push(v["snapshot"].as_str().unwrap().to_string());
        if i >= 2 {
            let forgotten = v["forgotten"].as_array().expect("backup --json lists forgotten snapshots");
            assert_eq!(forgotten.len(), 1, "run {i} should remove exactly one old snapshot: {v}");
            assert_eq!(forgotten[0], ids[(i - 2) as usize].as_str());
        }
    }
    let remaining = env.snapshot_ids();
    let of_vol: Vec<&String> = remaining.iter().filter(|id| ids.contains(id)).collect();
    assert_eq!(of_vol, vec![&ids[2], &ids[3]], "exactly the last two snapshots of vol.img remain");
    assert!(remaining.contains(&other_id), "a snapshot of another volume must be kept");
    assert_eq!(remaining.len(), 3);
    // Old versions' data was pruned: about two versions of vol + other, not four.
    assert!(env.repo_bytes() < 9 * MIB, "repository holds {} bytes", env.repo_bytes());

    env.assert_verify_clean();
    for (id, version) in ids[2..].iter().zip(&versions[2..]) {
        let out = env.path(&format!("restored-{id}.img"));
        env.restore(id, &out, &[]);
        assert_same_bytes(version, &out);
    }
    let out = env.path("other-restored.img");
    env.restore(&other_id, &out, &[]);
    assert_same_bytes(&other, &out);
}
