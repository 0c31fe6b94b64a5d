//! A full disk under the state directory: writers get ENOSPC at once, the daemon stays up,
//! what was fsync'd stays intact, `cairn status` says "disk full" with the path, and once
//! space is freed everything goes on by itself.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A tmpfs of `size` mounted over `dir` for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs on {} failed (the test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The daemon, killed and its mount detached if the test fails before it is stopped.
struct Daemon<'a> {
    dir: &'a DaemonDir,
    child: Option<Child>,
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill_and_detach(&mut c, &self.dir.mnt);
        }
    }
}

fn status_json(dir: &DaemonDir) -> serde_json::Value {
    let out = dir.command(&["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "cairn status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Fills the filesystem of `dir` to the last byte with a file there.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("ballast");
    let mut f = fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 << 10];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Smaller writes take what a 64 KiB block could not.
    for _ in 0..64 {
        if f.write(&[0u8; 1024]).is_err() {
            break;
        }
    }
    path
}

#[test]
fn a_full_disk_refuses_writes_keeps_everything_and_recovers_by_itself() {
    check_fuse_available();
    let dir = DaemonDir::new("cairn-diskfull-");
    let _fs = Tmpfs::mount(&dir.data, "64m");
    dir.run_logged(&["init"], LIMIT).unwrap();
    let mut daemon = Daemon {
        dir: &dir,
        child: Some(dir.logged(&["mount", &dir.mnt_str()]).spawn().unwrap()),
    };
    wait_mounted(daemon.child.as_mut().unwrap(), &dir.mnt, LIMIT, || true).unwrap();

    // Before: a file fsync'd and published.
    let kept: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write_synced(&dir.mnt.join("kept.bin"), &kept).unwrap();
    let synced = || status_json(&dir)["state"] == "synced";
    assert!(
        poll(LIMIT, Duration::from_millis(100), synced),
        "the first file was never published: {}",
        dir.log_text()
    );

    // Full: every kind of write fails with ENOSPC, and says so at once.
    let ballast = fill(&dir.data);
    let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
    assert_eq!(
        errno(write_synced(&dir.mnt.join("new.bin"), &[7u8; 1 << 20])),
        Some(libc::ENOSPC),
        "a new file on a full disk"
    );
    assert_eq!(
        errno(fs::create_dir(dir.mnt.join("newdir"))),
        Some(libc::ENOSPC)
    );
    // With the kernel's writeback cache an append may be accepted into the page cache;
    // the refusal then comes at fsync, as it would on any writeback filesystem.
    let append = fs::OpenOptions::new()
        .append(true)
        .open(dir.mnt.join("kept.bin"))
        .and_then(|mut f| {
            f.write_all(&[1u8; 256 << 10])?;
            f.sync_all()
        });
    assert_eq!(
        errno(append),
        Some(libc::ENOSPC),
        "an append on a full disk"
    );

    // The daemon is still up and serving; what was fsync'd is intact.
    assert!(
        daemon.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the daemon exited on a full disk: {}",
        dir.log_text()
    );
    let now = fs::read(dir.mnt.join("kept.bin")).unwrap();
    assert!(
        now.starts_with(&kept),
        "the fsync'd content of kept.bin changed"
    );
    let s = status_json(&dir);
    assert_eq!(s["state"], "disk full", "{s:#}");
    assert_eq!(s["disk"]["full"], true, "{s:#}");
    let human = dir.command(&["status"]).output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    let state_dir = dir.data.join("vaults").join("default");
    assert!(
        human.contains("FULL") && human.contains(state_dir.to_str().unwrap()),
        "cairn status does not say the disk is full, and where:\n{human}"
    );

    // Freed: writes work again and reach a snapshot with nothing restarted.
    fs::remove_file(&ballast).unwrap();
    let after: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    write_synced(&dir.mnt.join("after.bin"), &after).unwrap();
    fs::create_dir(dir.mnt.join("newdir")).unwrap();
    assert!(
        poll(LIMIT, Duration::from_millis(100), synced),
        "changes after the disk was freed were never published: {}",
        dir.log_text()
    );
    let log = dir.command(&["log", "--stat"]).output().unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("after.bin") && log.contains("kept.bin"),
        "{log}"
    );
    assert!(
        fs::read(dir.mnt.join("kept.bin"))
            .unwrap()
            .starts_with(&kept)
    );
    assert!(fs::read(dir.mnt.join("after.bin")).unwrap() == after);

    // The reserve kept every acknowledged change committable: none was dropped.
    let text = dir.log_text();
    assert!(
        !text.contains("changes are lost") && !text.contains("were lost"),
        "the overlay lost acknowledged changes on the full disk:\n{text}"
    );

    let mut child = daemon.child.take().unwrap();
    dir.stop_daemon(&mut child, LIMIT).unwrap();
}
