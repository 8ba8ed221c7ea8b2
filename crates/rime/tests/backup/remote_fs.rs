//! Image files on network filesystems are refused: here an sshfs mount of this very machine (a
//! private sshd on 127.0.0.1), a FUSE remote whose writers could be on any host.

use crate::common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private sshd on 127.0.0.1 and an sshfs mount of `remote` at `mnt`; both gone on drop.
struct SshfsMount {
    sshd: Child,
    mnt: std::path::PathBuf,
}

impl SshfsMount {
    fn new(work: &Path, remote: &Path, mnt: &Path) -> SshfsMount {
        let key = |name: &str| {
            let k = work.join(name);
            sh("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", k.to_str().unwrap()]);
            k
        };
        let (host_key, client_key) = (key("host_key"), key("client_key"));
        std::fs::copy(client_key.with_extension("pub"), work.join("authorized_keys")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = work.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PidFile {}\nSubsystem sftp internal-sftp\n",
                host_key.display(),
                work.join("authorized_keys").display(),
                work.join("sshd.pid").display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        std::fs::create_dir_all(mnt).unwrap();
        let guard = SshfsMount { sshd, mnt: mnt.to_path_buf() };
        let opts = format!(
            "IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,port={port}",
            client_key.display()
        );
        let target = format!("root@127.0.0.1:{}", remote.display());
        let start = Instant::now();
        loop {
            let (ok, out) = sh_status("sshfs", &["-o", &opts, &target, mnt.to_str().unwrap()]);
            if ok {
                return guard;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "sshfs did not mount: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for SshfsMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount").arg("-u").arg(&self.mnt).status();
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

#[test]
fn an_image_on_sshfs_is_refused() {
    rime_testkit::require(&["sshfs", "ssh-keygen", "/usr/sbin/sshd"]);
    let env = Env::new();
    let (_src, image) = ext4_with_files(&env, "disk", 12, 16, 64 * 1024);
    let remote = env.path("exported");
    std::fs::create_dir_all(&remote).unwrap();
    std::fs::rename(&image, remote.join("disk.img")).unwrap();
    let work = env.path("ssh");
    std::fs::create_dir_all(&work).unwrap();
    let m = SshfsMount::new(&work, &remote, &env.path("sshfs"));
    let over_sshfs = m.mnt.join("disk.img");
    assert!(over_sshfs.is_file(), "the image is visible through sshfs");
    for mode in ["offline", "auto"] {
        let run = env.rime(&["backup", "--mode", mode, over_sshfs.to_str().unwrap()]);
        assert_eq!(run.code, Some(6), "{run:?}");
        let line = run.fails();
        assert!(line.contains("network filesystem (sshfs (FUSE))"), "{line}");
    }
    assert!(env.snapshot_ids().is_empty());
    // The same image, on the local filesystem, backs up.
    drop(m);
    env.backup(&[remote.join("disk.img").to_str().unwrap()]);
}
