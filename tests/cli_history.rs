//! `cairn log` and read-only history mounts (`cairn mount --at TIME`) on a real daemon.

mod common;

use std::fs;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn cli(m: &TestMount, args: &[&str]) -> Output {
    cairn_command()
        .arg("--data-dir")
        .arg(m.data_dir())
        .args(args)
        .output()
        .expect("run cairn")
}

fn revisions(m: &TestMount) -> usize {
    let out = cli(m, &["log"]);
    assert!(
        out.status.success(),
        "cairn log failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("revision"))
        .count()
}

fn wait_for_revisions(m: &TestMount, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while revisions(m) < n {
        assert!(
            Instant::now() < deadline,
            "no revision {n} after 60 s:\n{}",
            m.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn log_lists_snapshots_and_history_mount_shows_the_past_read_only() {
    let m = TestMount::with_target(Target::Cairn);
    fs::write(m.path("doc.txt"), "version one").unwrap();
    wait_for_revisions(&m, 1);
    std::thread::sleep(Duration::from_millis(1100));
    let between = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(m.path("doc.txt"), "version two").unwrap();
    fs::create_dir(m.path("later")).unwrap();
    wait_for_revisions(&m, 2);

    let hist = tempfile::tempdir().unwrap();
    let hist_path = hist.path().canonicalize().unwrap();
    let mut daemon = cairn_command()
        .arg("--data-dir")
        .arg(m.data_dir())
        .args(["mount", "--at", &format!("@{between}")])
        .arg(&hist_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_fuse_mounted(&hist_path) {
        if Instant::now() > deadline || daemon.try_wait().unwrap().is_some() {
            let _ = daemon.kill();
            panic!("history mount did not appear");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let past = fs::read_to_string(hist_path.join("doc.txt"));
    let write = fs::write(hist_path.join("new.txt"), "x");
    let later_visible = hist_path.join("later").exists();
    let un = cli(&m, &["unmount", hist_path.to_str().unwrap()]);
    let exited = wait_deadline(&mut daemon, Duration::from_secs(60));
    if exited.is_none() {
        let _ = daemon.kill();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&hist_path)
            .status();
    }
    assert_eq!(
        past.unwrap(),
        "version one",
        "history shows the state at the time"
    );
    assert_errno(write, libc::EROFS);
    assert!(
        !later_visible,
        "entries created later must not appear in the past"
    );
    assert!(un.status.success(), "unmount of the history view failed");
    assert!(
        exited.is_some_and(|s| s.success()),
        "history daemon did not exit cleanly"
    );
    assert_eq!(
        fs::read_to_string(m.path("doc.txt")).unwrap(),
        "version two"
    );
}

#[test]
fn history_mount_errors_are_clear_and_change_nothing() {
    let m = TestMount::with_target(Target::Cairn);
    let hist = tempfile::tempdir().unwrap();
    let h = hist.path().to_str().unwrap();
    let bad = cli(&m, &["mount", "--at", "garbage", h]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot read time"));
    let early = cli(&m, &["mount", "--at", "@1000", h]);
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stderr).contains("no snapshot"));
    assert!(!is_fuse_mounted(hist.path()));
    assert_eq!(fs::read_dir(hist.path()).unwrap().count(), 0);
}
