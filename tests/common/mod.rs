//! Shared harness for the end-to-end filesystem tests (`tests/fs_*.rs`).
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
//! The helpers beside it: [`sys`] wraps the system calls `std::fs` lacks (xattrs, renameat2,
//! raw open...), [`tree`] hashes files and snapshots whole trees.
//!
//! Every test binary compiles this module on its own and uses only part of it, hence the
//! `allow(dead_code)`.
#![allow(dead_code)]

mod sys;
mod tree;

// Re-exported so that tests `use common::*`; a binary that uses nothing of one would warn.
#[allow(unused_imports)]
pub use sys::*;
#[allow(unused_imports)]
pub use tree::*;

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a freshly spawned daemon may take until its mount answers.
const MOUNT_DEADLINE: Duration = Duration::from_secs(30);
/// How long `cairn unmount` and the daemon's exit may take (the flush runs in between).
const UNMOUNT_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

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
    /// Holds `data/`, `mnt/` and `daemon.log`; `None` once deliberately leaked (a mount we
    /// could not remove must never be deleted through).
    root: Option<TempDir>,
    mnt: PathBuf,
    data: PathBuf,
    log: PathBuf,
    daemon: Option<Child>,
}

impl TestMount {
    pub fn new() -> TestMount {
        Self::with_target(Target::from_env())
    }

    pub fn with_target(target: Target) -> TestMount {
        let root = tempfile::Builder::new()
            .prefix("cairn-e2e-")
            .tempdir()
            .expect("create test tempdir");
        let base = root.path().canonicalize().expect("canonicalize tempdir");
        let mnt = base.join("mnt");
        let data = base.join("data");
        fs::create_dir(&mnt).unwrap();
        let log = base.join("daemon.log");
        let mut m = TestMount {
            target,
            root: Some(root),
            mnt,
            data,
            log,
            daemon: None,
        };
        if target == Target::Cairn {
            check_fuse_available();
            fs::create_dir(&m.data).unwrap();
            m.run_cli(&["init"], Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("`cairn init` failed: {e}"));
            m.start_daemon();
        }
        m
    }

    /// The daemon's `--data-dir` (cairn target only).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn is_native(&self) -> bool {
        self.target == Target::Native
    }

    /// The directory under test (the mount point, or the native tempdir).
    pub fn root(&self) -> &Path {
        &self.mnt
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        assert!(
            rel.is_relative(),
            "TestMount::path wants a relative path: {rel:?}"
        );
        self.mnt.join(rel)
    }

    /// Everything the daemon(s) printed so far (all restarts append to the same file).
    pub fn daemon_log(&self) -> String {
        match fs::read(&self.log) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => String::new(),
        }
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
        let _ = child.kill();
        if wait_deadline(&mut child, UNMOUNT_DEADLINE).is_none() {
            panic!("daemon did not die after SIGKILL");
        }
        append_log(&self.log, "=== harness: daemon killed with SIGKILL ===\n");
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + UNMOUNT_DEADLINE;
        while is_fuse_mounted(&self.mnt) {
            assert!(
                Instant::now() < deadline,
                "dead mount {:?} does not go away",
                self.mnt
            );
            sleep(POLL);
        }
        self.start_daemon();
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut c = cairn_command();
        c.arg("--data-dir").arg(&self.data);
        c.args(args);
        let base = self.mnt.parent().unwrap();
        c.env("XDG_CONFIG_HOME", base.join("config"));
        c.env("XDG_DATA_HOME", base.join("xdg-data"));
        c.env_remove("CAIRN_DATA_DIR");
        c.env_remove("CAIRN_VAULT");
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        c
    }

    /// Run a short-lived CLI command, output appended to the log; error on failure/timeout.
    fn run_cli(&self, args: &[&str], deadline: Duration) -> Result<(), String> {
        append_log(
            &self.log,
            &format!("=== harness: cairn {} ===\n", args.join(" ")),
        );
        let log = log_file(&self.log);
        let mut child = self
            .cli(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", cairn_bin()))?;
        match wait_deadline(&mut child, deadline) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(format!(
                "`cairn {}` exited with {s}\n--- log ---\n{}",
                args.join(" "),
                self.daemon_log()
            )),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "`cairn {}` did not finish within {deadline:?}",
                    args.join(" ")
                ))
            }
        }
    }

    fn start_daemon(&mut self) {
        assert!(self.daemon.is_none());
        assert!(
            !is_fuse_mounted(&self.mnt),
            "{:?} is already mounted",
            self.mnt
        );
        append_log(&self.log, "=== harness: cairn mount ===\n");
        let log = log_file(&self.log);
        let mnt = self.mnt.to_str().expect("utf-8 mount path").to_owned();
        let child = self
            .cli(&["mount", &mnt])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `cairn mount`: {e}"));
        self.daemon = Some(child);
        let deadline = Instant::now() + MOUNT_DEADLINE;
        loop {
            if is_fuse_mounted(&self.mnt) {
                return;
            }
            let child = self.daemon.as_mut().unwrap();
            if let Ok(Some(status)) = child.try_wait() {
                self.daemon = None;
                panic!(
                    "`cairn mount` exited with {status} before the mount appeared\n--- daemon log ---\n{}",
                    self.daemon_log()
                );
            }
            if Instant::now() >= deadline {
                let mut child = self.daemon.take().unwrap();
                let _ = child.kill();
                let _ = child.wait();
                let _ = fusermount_lazy(&self.mnt);
                panic!(
                    "mount did not appear in /proc/self/mountinfo within {MOUNT_DEADLINE:?}\n--- daemon log ---\n{}",
                    self.daemon_log()
                );
            }
            sleep(POLL);
        }
    }

    /// Unmount and wait for the daemon to exit. Never leaves the mount behind: on any failure
    /// it falls back to `fusermount3 -u -z` and SIGKILL, and reports what went wrong.
    fn stop_daemon(&mut self) -> Result<(), String> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        let mut problems = Vec::new();
        if let Ok(Some(status)) = child.try_wait() {
            problems.push(format!(
                "daemon had already exited with {status} before unmount"
            ));
        }
        let mnt = self.mnt.to_str().unwrap().to_owned();
        if is_fuse_mounted(&self.mnt)
            && let Err(e) = self.run_cli(&["unmount", &mnt], UNMOUNT_DEADLINE)
        {
            problems.push(e);
            if let Err(e) = fusermount_lazy(&self.mnt) {
                problems.push(format!("fusermount3 -u -z: {e}"));
            }
        }
        match wait_deadline(&mut child, UNMOUNT_DEADLINE) {
            Some(s) if s.success() || !problems.is_empty() => {}
            Some(s) => problems.push(format!("daemon exited with {s} after unmount")),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                problems.push(format!(
                    "daemon still running {UNMOUNT_DEADLINE:?} after unmount: killed with SIGKILL"
                ));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_fuse_mounted(&self.mnt) {
            if Instant::now() >= deadline {
                problems.push("mount still present; lazily detached".into());
                let _ = fusermount_lazy(&self.mnt);
                break;
            }
            sleep(POLL);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
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
        let result = self.stop_daemon();
        if is_fuse_mounted(&self.mnt) {
            // Never delete through a live mount: leak the tempdir instead.
            if let Some(root) = self.root.take() {
                let kept = root.keep();
                eprintln!("warning: {kept:?} is still mounted; left in place");
            }
        }
        if let Err(e) = result {
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

fn check_fuse_available() {
    if !Path::new("/dev/fuse").exists() {
        panic!(
            "CAIRN_E2E_TARGET=cairn (the default) needs /dev/fuse, which is missing. Run \
             scripts/setup.sh (or `modprobe fuse`), or set CAIRN_E2E_TARGET=native to run the \
             suite against a plain directory."
        );
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()))
        .unwrap_or(false);
    if !found {
        panic!(
            "CAIRN_E2E_TARGET=cairn (the default) needs `fusermount3` (Debian package fuse3), \
             which is not on PATH. Run scripts/setup.sh, or set CAIRN_E2E_TARGET=native."
        );
    }
}

fn fusermount_lazy(mnt: &Path) -> Result<(), String> {
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mnt)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn log_file(path: &Path) -> File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open daemon log")
}

fn append_log(path: &Path, line: &str) {
    use std::io::Write;
    let _ = log_file(path).write_all(line.as_bytes());
}

/// Wait for a child with a deadline; `None` if it is still running.
pub fn wait_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for child: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(POLL);
    }
}

/// Undo the octal escapes mountinfo uses for spaces, tabs, newlines and backslashes.
fn unescape_mountinfo(s: &str) -> OsString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsString::from_vec(out)
}

/// Whether `mnt` is currently a mount point with a `fuse*` filesystem type.
pub fn is_fuse_mounted(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        let Some(point) = left.split(' ').nth(4) else {
            return false;
        };
        let fstype = right.split(' ').next().unwrap_or("");
        fstype.starts_with("fuse") && unescape_mountinfo(point) == mnt.as_os_str()
    })
}
