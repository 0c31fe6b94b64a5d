//! What every harness that runs `cairn` daemons needs: the scratch directories a daemon lives
//! in (never deleted through a live mount), its log, mountinfo checks, stopping, killing and
//! lazily detaching with deadlines, and polling with a deadline.
//!
//! Nothing here waits without a deadline, and nothing leaves a mount behind: every failure
//! path kills the daemon and detaches its mount (`fusermount3 -u -z`) before it reports.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{cairn_bin, cairn_command};

/// How often the waits below look again.
const POLL: Duration = Duration::from_millis(20);
/// How long a mount may linger once its daemon has exited.
const LINGER_DEADLINE: Duration = Duration::from_secs(20);
/// How long a SIGKILLed daemon may take to die, and a lazily detached mount to go.
const GONE_DEADLINE: Duration = Duration::from_secs(60);

/// The directories of one daemon in one temporary directory: `data/` (its `--data-dir`),
/// `mnt/`, the XDG dirs it is pointed at, and `daemon.log`, which collects the output of
/// everything the harness runs for it plus `=== harness: … ===` notes.
///
/// Dropping it deletes the directory, except when the mount is still there (never delete
/// through a live mount: it is left in place with a warning) or `CAIRN_KEEP_TEST_DIRS` is
/// set (kept for a post-mortem). Stop the daemon first.
pub struct DaemonDir {
    /// `None` once deliberately kept.
    root: Option<TempDir>,
    pub base: PathBuf,
    pub data: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
    /// Extra environment for every command (e.g. a test relay: `CAIRN_RELAY`, `CAIRN_DIRECT`;
    /// these override [`cairn_command`]'s loopback defaults).
    pub env: Vec<(String, String)>,
}

impl DaemonDir {
    pub fn new(prefix: &str) -> DaemonDir {
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create test tempdir");
        let base = root.path().canonicalize().expect("canonicalize tempdir");
        let data = base.join("data");
        let mnt = base.join("mnt");
        fs::create_dir(&data).unwrap();
        fs::create_dir(&mnt).unwrap();
        DaemonDir {
            root: Some(root),
            log: base.join("daemon.log"),
            base,
            data,
            mnt,
            env: Vec::new(),
        }
    }

    pub fn mnt_str(&self) -> String {
        self.mnt.to_str().expect("utf-8 mount path").to_owned()
    }

    /// `cairn --data-dir DATA ARGS…` (see [`cairn_command`]) with this directory's XDG dirs,
    /// no vault or data dir inherited from the environment, `RUST_LOG=info` unless set, and
    /// stdin from /dev/null.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = cairn_command();
        c.arg("--data-dir").arg(&self.data).args(args);
        c.env("XDG_CONFIG_HOME", self.base.join("config"));
        c.env("XDG_DATA_HOME", self.base.join("xdg-data"));
        c.env_remove("CAIRN_DATA_DIR");
        c.env_remove("CAIRN_VAULT");
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    /// [`Self::command`] with stdout and stderr appended to the log.
    pub fn logged(&self, args: &[&str]) -> Command {
        let mut c = self.command(args);
        let log = log_file(&self.log);
        c.stdout(log.try_clone().expect("dup log fd")).stderr(log);
        c
    }

    /// Appends `=== harness: WHAT ===` to the log.
    pub fn note(&self, what: &str) {
        let _ = log_file(&self.log).write_all(format!("=== harness: {what} ===\n").as_bytes());
    }

    /// Everything in the log so far.
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Runs a short-lived CLI command, output appended to the log; an error (with the log)
    /// if it fails, or if it is still running after `limit` (then it is killed).
    pub fn run_logged(&self, args: &[&str], limit: Duration) -> Result<(), String> {
        self.note(&format!("cairn {}", args.join(" ")));
        let mut child = self
            .logged(args)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", cairn_bin()))?;
        match wait_deadline(&mut child, limit) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(format!(
                "`cairn {}` exited with {s}\n--- log ---\n{}",
                args.join(" "),
                self.log_text()
            )),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "`cairn {}` did not finish within {limit:?}",
                    args.join(" ")
                ))
            }
        }
    }

    /// Stops the daemon serving this directory's mount: `cairn unmount MNT` if it is mounted
    /// (a lazy detach if that fails), then [`reap`] with `limit`. `Ok` only if all of it went
    /// cleanly and the daemon exited successfully; every problem is reported otherwise.
    pub fn stop_daemon(&self, daemon: &mut Child, limit: Duration) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Ok(Some(status)) = daemon.try_wait() {
            problems.push(format!(
                "daemon had already exited with {status} before unmount"
            ));
        }
        if is_fuse_mounted(&self.mnt)
            && let Err(e) = self.run_logged(&["unmount", &self.mnt_str()], limit)
        {
            problems.push(e);
            if let Err(e) = fusermount_lazy(&self.mnt) {
                problems.push(format!("fusermount3 -u -z: {e}"));
            }
        }
        match reap(daemon, &self.mnt, limit) {
            Ok(s) if s.success() || !problems.is_empty() => {}
            Ok(s) => problems.push(format!("daemon exited with {s} after unmount")),
            Err(e) => problems.push(e),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for DaemonDir {
    fn drop(&mut self) {
        if is_fuse_mounted(&self.mnt)
            && let Some(root) = self.root.take()
        {
            eprintln!("warning: {:?} is still mounted; left in place", root.keep());
        }
        if std::env::var_os("CAIRN_KEEP_TEST_DIRS").is_some()
            && let Some(root) = self.root.take()
        {
            eprintln!("kept {:?} (CAIRN_KEEP_TEST_DIRS)", root.keep());
        }
    }
}

/// Panics with a hint unless FUSE mounts can work here (`/dev/fuse`, `fusermount3`).
pub fn check_fuse_available() {
    if !Path::new("/dev/fuse").exists() {
        panic!(
            "cairn's end-to-end tests need /dev/fuse, which is missing. Run scripts/setup.sh \
             (or `modprobe fuse`). The fs_* tests can instead run against a plain directory \
             with CAIRN_E2E_TARGET=native."
        );
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()))
        .unwrap_or(false);
    if !found {
        panic!(
            "cairn's end-to-end tests need `fusermount3` (Debian package fuse3), which is not \
             on PATH. Run scripts/setup.sh. The fs_* tests can instead run against a plain \
             directory with CAIRN_E2E_TARGET=native."
        );
    }
}

/// `path` opened for appending (created if missing).
pub fn log_file(path: &Path) -> File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {path:?}: {e}"))
}

/// Checks `cond` every `every` until it holds (`true`) or `limit` has passed (`false`).
pub fn poll(limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(every);
    }
}

/// Checks `cond` every `every` until it holds. On timeout panics with `what`, the last
/// diagnostic `cond` left in its argument, and `context()` (daemon logs, say).
#[track_caller]
pub fn wait_until(
    what: &str,
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut(&mut String) -> bool,
    context: impl FnOnce() -> String,
) {
    let mut why = String::new();
    let held = poll(limit, every, || {
        why.clear();
        cond(&mut why)
    });
    if !held {
        panic!(
            "timed out after {limit:?} waiting for: {what}\nlast state: {why}\n{}",
            context()
        );
    }
}

/// Wait for a child with a deadline; `None` if it is still running.
pub fn wait_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    poll(limit, POLL, || {
        status = child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for child: {e}"));
        status.is_some()
    });
    status
}

/// Waits until `mnt` is a FUSE mount and `ready()` holds, while `child` (the daemon that
/// serves it) keeps running. On failure the daemon is gone (killed after `limit`), its mount
/// detached, and the error says what happened.
pub fn wait_mounted(
    child: &mut Child,
    mnt: &Path,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let mut exited = None;
    let settled = poll(limit, POLL, || {
        if is_fuse_mounted(mnt) && ready() {
            return true;
        }
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return true;
        }
        false
    });
    match exited {
        Some(status) => {
            let _ = detach(mnt);
            Err(format!("exited with {status} before its mount was ready"))
        }
        None if settled => Ok(()),
        None => {
            let killed = why_not(kill_and_detach(child, mnt));
            Err(format!(
                "mount not ready (in /proc/self/mountinfo) within {limit:?}: killed{killed}"
            ))
        }
    }
}

/// Waits up to `limit` for a daemon that was asked to stop (unmount, SIGTERM) to exit, then
/// for its mount to go. Leaves neither behind: a daemon still running is killed, a mount that
/// lingers is lazily detached, and the error says so.
pub fn reap(child: &mut Child, mnt: &Path, limit: Duration) -> Result<ExitStatus, String> {
    let Some(status) = wait_deadline(child, limit) else {
        let killed = why_not(kill_and_detach(child, mnt));
        return Err(format!(
            "daemon still running {limit:?} after it was asked to stop: killed with SIGKILL{killed}"
        ));
    };
    if wait_unmounted(mnt, LINGER_DEADLINE) {
        return Ok(status);
    }
    let detached = why_not(detach(mnt));
    Err(format!(
        "daemon exited with {status}, mount still present {LINGER_DEADLINE:?} later: lazily detached{detached}"
    ))
}

/// SIGKILL (no flush, no goodbye), reap the process, and detach its dead mount.
pub fn kill_and_detach(child: &mut Child, mnt: &Path) -> Result<(), String> {
    let _ = child.kill();
    if wait_deadline(child, GONE_DEADLINE).is_none() {
        return Err(format!("daemon not dead {GONE_DEADLINE:?} after SIGKILL"));
    }
    detach(mnt)
}

/// Lazily detaches `mnt` (`fusermount3 -u -z`) if it is a FUSE mount, and waits until it is
/// gone from mountinfo.
pub fn detach(mnt: &Path) -> Result<(), String> {
    if !is_fuse_mounted(mnt) {
        return Ok(());
    }
    let detached = fusermount_lazy(mnt);
    if wait_unmounted(mnt, GONE_DEADLINE) {
        return Ok(());
    }
    Err(format!(
        "{mnt:?} still mounted {GONE_DEADLINE:?} after fusermount3 -u -z ({detached:?})"
    ))
}

/// `" (what went wrong)"` for an error, nothing for `Ok`: a suffix for a message.
fn why_not(r: Result<(), String>) -> String {
    r.err().map(|e| format!(" ({e})")).unwrap_or_default()
}

/// Waits up to `limit` until `mnt` is no FUSE mount any more; whether it went.
pub fn wait_unmounted(mnt: &Path, limit: Duration) -> bool {
    poll(limit, POLL, || !is_fuse_mounted(mnt))
}

/// `fusermount3 -u -z MNT`; its stderr on failure.
pub fn fusermount_lazy(mnt: &Path) -> Result<(), String> {
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
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
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
