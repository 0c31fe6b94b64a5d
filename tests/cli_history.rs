//! `cairn log` and read-only history mounts (`cairn mount --at TIME`) on a real daemon.

mod common;

use std::fs;
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn cli(m: &TestMount, args: &[&str]) -> Output {
    m.cli(args).output().expect("run cairn")
}

#[test]
fn log_lists_snapshots_and_history_mount_shows_the_past_read_only() {
    let m = TestMount::with_target(Target::Cairn);
    fs::write(m.path("doc.txt"), "version one").unwrap();
    m.wait_for_revisions(1);
    std::thread::sleep(Duration::from_millis(1100));
    let between = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(m.path("doc.txt"), "version two").unwrap();
    fs::create_dir(m.path("later")).unwrap();
    m.wait_for_revisions(2);

    let hist = tempfile::tempdir().unwrap();
    let hist_path = hist.path().canonicalize().unwrap();
    let mut daemon = m
        .cli(&["mount", "--at", &format!("@{between}")])
        .arg(&hist_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if let Err(e) = wait_mounted(&mut daemon, &hist_path, Duration::from_secs(30), || true) {
        panic!("history mount did not appear: the daemon {e}");
    }
    let past = fs::read_to_string(hist_path.join("doc.txt"));
    let write = fs::write(hist_path.join("new.txt"), "x");
    let later_visible = hist_path.join("later").exists();
    let un = cli(&m, &["unmount", hist_path.to_str().unwrap()]);
    let exited = reap(&mut daemon, &hist_path, Duration::from_secs(60));
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
        exited.as_ref().is_ok_and(|s| s.success()),
        "history daemon did not exit cleanly: {exited:?}"
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
