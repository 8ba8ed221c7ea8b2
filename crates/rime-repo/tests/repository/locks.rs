//! Repository locks through the local backend: the lock table (shared with shared, nothing
//! with exclusive), a refusal that names the holder from its lock object, lock objects removed
//! on release, and those of dead processes ignored and cleaned up.

use rime_repo::backend::LOCKS_DIR;
use rime_repo::lock::{LockInfo, LockMode};
use rime_repo::{RepoError, Repository};
use std::time::Duration;

fn repo(dir: &std::path::Path) -> Repository {
    Repository::init(dir.join("repo").to_str().unwrap(), 65536).unwrap()
}

fn lock_objects(r: &Repository) -> Vec<String> {
    r.backend.list(LOCKS_DIR).unwrap()
}

#[test]
fn the_lock_table_holds_and_refusals_name_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo(dir.path());
    let a = r.lock(LockMode::Shared, "backup", Duration::ZERO).unwrap();
    let b = r.lock(LockMode::Shared, "restore", Duration::ZERO).expect("shared locks coexist");
    assert_eq!(lock_objects(&r).len(), 2, "each holder is described by a lock object");

    let err = r.lock(LockMode::Exclusive, "prune", Duration::from_millis(200)).unwrap_err();
    let RepoError::Locked { wanted, holders } = &err else { panic!("expected Locked, got {err:?}") };
    assert_eq!(*wanted, LockMode::Exclusive);
    let mut commands: Vec<&str> = holders.iter().map(|h| h.command.as_str()).collect();
    commands.sort();
    assert_eq!(commands, ["backup", "restore"]);
    let msg = err.to_string();
    assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains("rime backup (shared)"), "{msg}");

    drop(a);
    drop(b);
    assert!(lock_objects(&r).is_empty(), "released locks remove their objects");
    let x = r.lock(LockMode::Exclusive, "prune", Duration::ZERO).expect("free again");
    assert!(r.lock(LockMode::Shared, "backup", Duration::ZERO).is_err(), "exclusive excludes shared");
    assert!(r.lock(LockMode::Exclusive, "forget", Duration::ZERO).is_err(), "and exclusive");
    drop(x);
}

#[test]
fn lock_objects_of_dead_processes_are_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo(dir.path());
    // A process that died holding the lock: the kernel dropped its flock, its object remains.
    let mut dead = LockInfo::new(LockMode::Exclusive, "prune");
    dead.pid = u32::MAX - 1;
    r.backend.write_atomic(&format!("{LOCKS_DIR}/dead.json"), &serde_json::to_vec(&dead).unwrap()).unwrap();
    let held = r.lock(LockMode::Shared, "backup", Duration::ZERO).expect("a dead holder does not lock");
    assert_eq!(lock_objects(&r).len(), 1, "the dead holder's object was cleaned up: {:?}", lock_objects(&r));
    drop(held);
}
