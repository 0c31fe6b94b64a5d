//! One daemon per vault, found by its lock rather than by a pid: two `cairn mount` of one
//! vault started together leave exactly one serving, and `cairn unmount` never signals a
//! process just because a stale file names its pid.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{cairn_command, is_fuse_mounted, wait_deadline};

const DEADLINE: Duration = Duration::from_secs(60);

fn cairn(data: &Path) -> Command {
    let mut c = cairn_command();
    c.arg("--data-dir").arg(data);
    c
}

fn spawn_mount(data: &Path, mnt: &Path, log: &Path) -> Child {
    cairn(data)
        .arg("mount")
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn cairn mount")
}

fn unmount(data: &Path, mnt: &Path) {
    let out = cairn(data).arg("unmount").arg(mnt).output().unwrap();
    assert!(
        out.status.success(),
        "unmount {}: {}",
        mnt.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills and detaches whatever a failed test leaves behind.
struct Cleanup(Vec<(Child, std::path::PathBuf)>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (child, mnt) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&*mnt)
                .status();
        }
    }
}

#[test]
fn two_mounts_of_one_vault_started_together_leave_exactly_one_serving() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().canonicalize().unwrap();
    let data = base.join("data");
    let out = cairn(&data).arg("init").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mnts = [base.join("m1"), base.join("m2")];
    let logs = [base.join("d1.log"), base.join("d2.log")];
    for m in &mnts {
        fs::create_dir(m).unwrap();
    }
    let mut guard = Cleanup(Vec::new());
    for i in 0..2 {
        let child = spawn_mount(&data, &mnts[i], &logs[i]);
        guard.0.push((child, mnts[i].clone()));
    }

    // One of them must give up, the other must serve; both within the deadline.
    let start = Instant::now();
    let loser = loop {
        let exited: Vec<usize> = (0..2)
            .filter(|&i| matches!(guard.0[i].0.try_wait(), Ok(Some(_))))
            .collect();
        if let [i] = exited[..] {
            break i;
        }
        assert!(
            exited.len() < 2,
            "both daemons exited: {:?} / {:?}",
            fs::read_to_string(&logs[0]),
            fs::read_to_string(&logs[1])
        );
        assert!(start.elapsed() < DEADLINE, "neither daemon gave way");
        sleep(Duration::from_millis(20));
    };
    let winner = 1 - loser;
    let status = guard.0[loser].0.try_wait().unwrap().unwrap();
    assert!(!status.success(), "the second daemon must fail");
    let start = Instant::now();
    while !is_fuse_mounted(&mnts[winner]) {
        assert!(
            start.elapsed() < DEADLINE,
            "the winner never mounted: {:?}",
            fs::read_to_string(&logs[winner])
        );
        sleep(Duration::from_millis(20));
    }
    assert!(!is_fuse_mounted(&mnts[loser]));

    let err = fs::read_to_string(&logs[loser]).unwrap();
    let winner_pid = guard.0[winner].0.id();
    assert!(
        err.contains("already served by another cairn daemon"),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {winner_pid}")),
        "names the running daemon: {err}"
    );
    assert!(
        err.contains(&mnts[winner].display().to_string()),
        "names its mountpoint: {err}"
    );

    // The winner is who status reports, and it still serves.
    let status = cairn(&data).args(["status", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["mount"]["pid"], winner_pid);
    fs::write(mnts[winner].join("hello"), b"hi").unwrap();

    unmount(&data, &mnts[winner]);
    assert!(wait_deadline(&mut guard.0[winner].0, DEADLINE).is_some_and(|s| s.success()));
    assert!(!is_fuse_mounted(&mnts[winner]));

    // The lock went with the daemon: the vault can be mounted again, with what was written.
    let mut again = spawn_mount(&data, &mnts[loser], &base.join("d3.log"));
    let start = Instant::now();
    while !is_fuse_mounted(&mnts[loser]) {
        assert!(
            start.elapsed() < DEADLINE,
            "remount failed: {:?}",
            fs::read_to_string(base.join("d3.log"))
        );
        sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read(mnts[loser].join("hello")).unwrap(), b"hi");
    unmount(&data, &mnts[loser]);
    assert!(wait_deadline(&mut again, DEADLINE).is_some_and(|s| s.success()));
}

#[test]
fn unmount_never_signals_a_process_a_stale_lock_file_names() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().canonicalize().unwrap();
    let data = base.join("data");
    let out = cairn(&data).arg("init").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mnt = base.join("mnt");
    fs::create_dir(&mnt).unwrap();
    // A daemon that crashed left its lock file; its pid now belongs to an innocent process.
    let mut stranger = Command::new("sleep").arg("60").spawn().unwrap();
    let vault_dir = data.join("vaults").join("default");
    fs::write(
        vault_dir.join("daemon.lock"),
        format!("{}\n{}\n", stranger.id(), mnt.display()),
    )
    .unwrap();

    let out = cairn(&data).arg("unmount").arg(&mnt).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a cairn mount"), "{err}");
    sleep(Duration::from_millis(200));
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the stranger was signalled"
    );
    let status = cairn(&data).args(["status", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["state"], "not mounted");
    let _ = stranger.kill();
    let _ = stranger.wait();
}
