//! Shared harness for the end-to-end tests in `tests/` (one test binary each).
//!
//! A [`TestMount`] hands a test a directory to work in. Which directory is chosen by
//! `CAIRN_E2E_TARGET`:
//!
//! * `cairn` (the default): a real cairn mount. The harness creates a temporary `data` dir and
//!   an empty `mnt` dir, runs `cairn --data-dir DATA init`, spawns
//!   `cairn --data-dir DATA mount MNT` in the foreground (stderr and stdout go to
//!   `daemon.log` beside them) and waits until MNT shows up in `/proc/self/mountinfo` as a
//!   `fuse*` mount. Dropping the mount runs `cairn --data-dir DATA unmount MNT` (falling back
//!   to `fusermount3 -u -z MNT`) and waits for the daemon to exit. Every wait has a deadline.
//! * `native`: a plain temporary directory on the machine's own filesystem. Used to validate
//!   the tests themselves against the kernel; `remount` and `kill9_and_remount` are no-ops.
//!
//! Every test builds its own `TestMount` (one daemon per test): tests stay isolated (a test
//! that wedges or corrupts its mount cannot fail its neighbours), and a mount costs one
//! `init` plus one daemon start, which is cheap next to the work the tests do.
//!
//! The helpers beside it: [`mount`] holds the daemon plumbing every harness shares (a
//! daemon's directories and log, mountinfo, stopping, killing and detaching, polling with a
//! deadline; the devices of `tests/sync_devices.rs` are built on it too), [`sys`] wraps the
//! system calls `std::fs` lacks (xattrs, renameat2, raw open...), [`tree`] hashes files and
//! snapshots whole trees.
//!
//! Every test binary compiles this module on its own and uses only part of it, hence the
//! `allow(dead_code)`.
#![allow(dead_code)]

mod mount;
mod sys;
mod tree;

// Re-exported so that tests `use common::*`; a binary that uses nothing of one would warn.
#[allow(unused_imports)]
pub use mount::*;
#[allow(unused_imports)]
pub use sys::*;
#[allow(unused_imports)]
pub use tree::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// How long a freshly spawned daemon may take until its mount answers.
const MOUNT_DEADLINE: Duration = Duration::from_secs(30);
/// How long `cairn unmount` and the daemon's exit may take (the flush runs in between).
const UNMOUNT_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Native,
    Cairn,
}

impl Target {
    pub fn from_env() -> Target {
        match std::env::var("CAIRN_E2E_TARGET").as_deref() {
            Ok("native") => Target::Native,
            Ok("cairn") | Ok("") | Err(_) => Target::Cairn,
            Ok(other) => panic!("CAIRN_E2E_TARGET={other:?}: expected `native` or `cairn`"),
        }
    }
}

/// The binary the `cairn` target drives: the workspace's own build, unless
/// `CAIRN_E2E_BIN` names another program with the same CLI contract (`--data-dir D init`,
/// `--data-dir D mount MNT` in the foreground, `--data-dir D unmount MNT`), e.g. a wrapper
/// around a reference FUSE filesystem to check the harness itself.
pub fn cairn_bin() -> String {
    std::env::var("CAIRN_E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cairn").to_string())
}

/// A `cairn` invocation as every test runs it: it never leaves loopback (no relays, the
/// network endpoint bound to 127.0.0.1).
pub fn cairn_command() -> Command {
    let mut c = Command::new(cairn_bin());
    c.env("CAIRN_BIND", "127.0.0.1:0");
    c.env("CAIRN_RELAY", "disabled");
    c
}

pub struct TestMount {
    target: Target,
    /// `data/`, `mnt/` and `daemon.log` (kept in place if the mount cannot be removed).
    dir: DaemonDir,
    daemon: Option<Child>,
}

impl TestMount {
    pub fn new() -> TestMount {
        Self::with_target(Target::from_env())
    }

    pub fn with_target(target: Target) -> TestMount {
        let mut m = TestMount {
            target,
            dir: DaemonDir::new("cairn-e2e-"),
            daemon: None,
        };
        if target == Target::Cairn {
            check_fuse_available();
            m.dir
                .run_logged(&["init"], Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("`cairn init` failed: {e}"));
            m.start_daemon();
        }
        m
    }

    /// The daemon's `--data-dir` (cairn target only).
    pub fn data_dir(&self) -> &Path {
        &self.dir.data
    }

    /// `cairn ARGS…` on this mount's data dir, with the same environment as its daemon.
    pub fn cli(&self, args: &[&str]) -> Command {
        self.dir.command(args)
    }

    pub fn target(&self) -> Target {
        self.target
    }

    /// How many snapshots this device published, by `cairn log`.
    pub fn revisions(&self) -> usize {
        let out = self.cli(OWN_LOG).output().expect("run cairn log");
        assert!(
            out.status.success(),
            "cairn log failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        count_revisions(&String::from_utf8_lossy(&out.stdout))
    }

    /// Waits (up to a minute) until this device published at least `n` snapshots.
    pub fn wait_for_revisions(&self, n: usize) {
        wait_until(
            &format!("revision {n}"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            |why| {
                let got = self.revisions();
                *why = format!("{got} revisions");
                got >= n
            },
            || self.daemon_log(),
        );
    }

    pub fn is_native(&self) -> bool {
        self.target == Target::Native
    }

    /// The directory under test (the mount point, or the native tempdir).
    pub fn root(&self) -> &Path {
        &self.dir.mnt
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        assert!(
            rel.is_relative(),
            "TestMount::path wants a relative path: {rel:?}"
        );
        self.dir.mnt.join(rel)
    }

    /// Everything the daemon(s) printed so far (all restarts append to the same file).
    pub fn daemon_log(&self) -> String {
        self.dir.log_text()
    }

    /// Cleanly unmount and mount the same data dir again: the daemon really restarts.
    /// Native target: no-op.
    pub fn remount(&mut self) {
        if self.target == Target::Native {
            return;
        }
        if let Err(e) = self.stop_daemon() {
            panic!(
                "remount: clean unmount failed: {e}\n--- daemon log ---\n{}",
                self.daemon_log()
            );
        }
        self.start_daemon();
    }

    /// SIGKILL the daemon (no flush, no goodbye), lazily detach the dead mount and mount the
    /// same data dir again. Native target: no-op.
    pub fn kill9_and_remount(&mut self) {
        if self.target == Target::Native {
            return;
        }
        let mut child = self
            .daemon
            .take()
            .expect("kill9_and_remount: no daemon running");
        if let Err(e) = kill_and_detach(&mut child, &self.dir.mnt) {
            panic!("kill9_and_remount: {e}");
        }
        self.dir.note("daemon killed with SIGKILL");
        self.start_daemon();
    }

    fn start_daemon(&mut self) {
        assert!(self.daemon.is_none());
        assert!(
            !is_fuse_mounted(&self.dir.mnt),
            "{:?} is already mounted",
            self.dir.mnt
        );
        self.dir.note("cairn mount");
        let mut child = self
            .dir
            .logged(&["mount", &self.dir.mnt_str()])
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `cairn mount`: {e}"));
        if let Err(e) = wait_mounted(&mut child, &self.dir.mnt, MOUNT_DEADLINE, || true) {
            panic!(
                "`cairn mount` {e}\n--- daemon log ---\n{}",
                self.daemon_log()
            );
        }
        self.daemon = Some(child);
    }

    /// Unmount and wait for the daemon to exit. Never leaves the mount behind: on any failure
    /// it falls back to `fusermount3 -u -z` and SIGKILL, and reports what went wrong.
    fn stop_daemon(&mut self) -> Result<(), String> {
        match self.daemon.take() {
            Some(mut child) => self.dir.stop_daemon(&mut child, UNMOUNT_DEADLINE),
            None => Ok(()),
        }
    }
}

impl Default for TestMount {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if self.target == Target::Native {
            return;
        }
        // The directory is removed after this (field drop), unless the mount is still there.
        if let Err(e) = self.stop_daemon() {
            let msg = format!(
                "unmount at teardown: {e}\n--- daemon log ---\n{}",
                self.daemon_log()
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// The number of snapshots `cairn log` printed (one `revision …` line each).
pub fn count_revisions(log_stdout: &str) -> usize {
    // One line per snapshot, starting with its time (`2026-12-01T10:00:00Z  …`).
    log_stdout
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .count()
}

/// `cairn log` arguments listing every snapshot this device published.
pub const OWN_LOG: &[&str] = &["log", "--device", "me", "--limit", "1000000"];
