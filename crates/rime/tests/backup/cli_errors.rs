//! Repository creation and the error contract: non-zero exit with a one-line reason on stderr.

use crate::common::*;
use std::fs;

#[test]
fn init_creates_a_repository_and_refuses_existing_or_non_empty_locations() {
    let env = Env::without_repo();
    assert!(!env.repo.exists());

    let run = env.rime(&["init", "--json"]).ok();
    let v = run.json();
    assert!(v["id"].is_string(), "init --json should name the repository id: {v}");
    assert!(env.repo.join("config.json").is_file(), "init should write config.json");
    // The new repository works and is empty.
    assert_eq!(env.snapshots().len(), 0);
    env.assert_verify_clean();

    // Again on the same location: refused, one line, nothing changed.
    let config_before = fs::read(env.repo.join("config.json")).unwrap();
    let line = env.rime(&["init"]).fails();
    assert!(line.contains("exist"), "init on an existing repo should say it exists: {line}");
    assert_eq!(fs::read(env.repo.join("config.json")).unwrap(), config_before, "config.json must not change");

    // A non-empty directory that is not a repository: refused, left alone.
    let other = env.path("not-empty");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("precious.txt"), "keep me").unwrap();
    let line = rime_raw(&["--repo", other.to_str().unwrap(), "init"]).fails();
    assert!(line.contains("not empty"), "init on a non-empty dir should say so: {line}");
    assert!(!other.join("config.json").exists(), "no repository may be created in a non-empty dir");
    assert_eq!(fs::read_to_string(other.join("precious.txt")).unwrap(), "keep me");
    assert_eq!(fs::read_dir(&other).unwrap().count(), 1, "nothing may be added to the non-empty dir");

    // An existing but empty directory is fine, and RIME_REPO works in place of --repo.
    let empty = env.path("empty");
    fs::create_dir_all(&empty).unwrap();
    let out = rime_command().env("RIME_REPO", &empty).arg("init").output().unwrap();
    assert!(out.status.success(), "init in an empty dir via RIME_REPO: {}", String::from_utf8_lossy(&out.stderr));
    assert!(empty.join("config.json").is_file());
}

#[test]
fn errors_exit_non_zero_with_one_line() {
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "vol", 9, 16, 256 * 1024);
    let target = env.path("target.img");

    // Restore from an empty repository, of a snapshot that does not exist, of a bad id.
    let run = env.rime(&["restore", "latest", target.to_str().unwrap()]);
    assert_eq!(run.code, Some(4), "nothing to restore is 'not found': {run:?}");
    let line = run.fails();
    assert!(line.contains("no snapshots") || line.contains("snapshot"), "{line}");
    let id = env.backup(&[image.to_str().unwrap()]);
    for missing in ["deadbeef", "0000000000000000"] {
        let run = env.rime(&["restore", missing, target.to_str().unwrap()]);
        assert_eq!(run.code, Some(4), "{run:?}");
        let line = run.fails();
        assert!(line.contains(missing), "the error should name the snapshot '{missing}': {line}");
    }
    let line = env.rime(&["restore", "not-a-hex-id!", target.to_str().unwrap()]).fails();
    assert!(line.contains("not-a-hex-id!"), "{line}");
    assert!(!target.exists(), "a failed restore must not create its target");
    let line = env.rime(&["verify", "deadbeef"]).fails();
    assert!(line.contains("deadbeef"), "{line}");
    let line = env.rime(&["forget", "deadbeef"]).fails();
    assert!(line.contains("deadbeef"), "{line}");
    assert_eq!(env.snapshot_ids(), vec![id.clone()], "a failed forget removes nothing");

    // Backup of a path that does not exist: fails, names the path, adds no snapshot.
    let nowhere = env.path("no/such/volume.img");
    let run = env.rime(&["backup", nowhere.to_str().unwrap()]);
    assert_eq!(run.code, Some(4), "a missing volume is 'not found': {run:?}");
    let line = run.fails();
    assert!(line.contains("volume.img"), "the error should name the missing volume: {line}");
    // ...also when it comes after a good volume: the whole backup fails.
    env.rime(&["backup", image.to_str().unwrap(), nowhere.to_str().unwrap()]).fails();
    // A directory is not a volume (a mount point names the device mounted there).
    let run = env.rime(&["backup", env.dir.path().to_str().unwrap()]);
    assert_eq!(run.code, Some(2), "a directory is not a volume: {run:?}");
    let line = run.fails();
    assert!(line.contains("is a directory but not a mount point"), "{line}");
    assert_eq!(env.snapshot_ids(), vec![id.clone()], "failed backups must not leave snapshots");
    env.assert_verify_clean();

    // Every command on a location that is not a repository: an empty dir, a missing dir, a file.
    let empty = env.path("empty-dir");
    fs::create_dir_all(&empty).unwrap();
    let file = env.path("plain-file");
    fs::write(&file, "hello").unwrap();
    let missing = env.path("missing-dir");
    for loc in [&empty, &missing, &file] {
        let l = loc.to_str().unwrap();
        let commands: Vec<Vec<&str>> = vec![
            vec!["snapshots"],
            vec!["snapshots", "--json"],
            vec!["backup", image.to_str().unwrap()],
            vec!["restore", "latest", target.to_str().unwrap()],
            vec!["verify"],
            vec!["forget", "--keep-last", "1"],
            vec!["prune"],
        ];
        for cmd in commands {
            let mut args = vec!["--repo", l];
            args.extend(cmd.iter());
            let line = rime_raw(&args).fails();
            assert!(
                line.contains("repositor") || line.contains(l),
                "`rime {}` should say there is no repository: {line}",
                args.join(" ")
            );
        }
    }
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0, "commands must not write into a non-repository");
    assert!(!missing.exists(), "commands must not create a non-repository location");
    assert!(!target.exists());

    // Bad arguments: refused by the parser (exit code 2) with the value named, nothing written.
    for args in [
        vec!["backup", "--keep-last", "0"],
        vec!["backup", "--compression", "extreme"],
        vec!["--threads", "0", "backup"],
        vec!["forget", "--keep-daily", "0"],
    ] {
        let mut args = args.clone();
        args.push(image.to_str().unwrap());
        let run = env.rime(&args);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("invalid value"), "{run:?}");
    }
    let run = rime_raw(&["--repo", env.path("new-repo").to_str().unwrap(), "init", "--chunk-size", "5000"]);
    assert_eq!(run.code, Some(2), "a chunk size that is not a power of two is refused: {run:?}");
    assert!(!env.path("new-repo").exists());
    assert_eq!(env.snapshot_ids(), vec![id]);
}

#[test]
fn default_repository_and_sample_volume() {
    // `rime backup` with no repository and no volume: the embedded default repository under the
    // data directory, and a sample ext4 volume Rime makes itself.
    let env = Env::without_repo();
    let data = env.path("xdg");
    let run = |args: &[&str]| {
        let out = rime_command().env("XDG_DATA_HOME", &data).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(&["backup", "--json"]);
    assert!(ok, "default backup failed: {stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("backup --json");
    let id = v["snapshot"].as_str().expect("snapshot id").to_string();
    assert_eq!(first_volume(&v)["filesystem"], "ext4", "{v}");
    let (ok, stdout, _) = run(&["snapshots", "--json"]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    let sample = std::path::PathBuf::from(first_volume(&v)["source"].as_str().unwrap());
    assert!(sample.starts_with(&data), "the sample volume lives in the data directory: {}", sample.display());
    let out = env.path("sample-restored.img");
    let (ok, _, stderr) = run(&["restore", "latest", out.to_str().unwrap()]);
    assert!(ok, "restore of the sample failed: {stderr}");
    let zf = env.path("sample-zf.img");
    zerofreed_copy(&sample, &zf);
    assert_same_bytes(&zf, &out);
    assert_fsck_clean(&out);
    let (ok, _, stderr) = run(&["verify"]);
    assert!(ok, "{stderr}");
}
