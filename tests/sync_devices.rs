//! Several devices syncing one vault over loopback: real daemons, real FUSE mounts, real
//! `cairn invite` / `cairn join` pairing. Every process runs with `CAIRN_BIND=127.0.0.1:0` and
//! `CAIRN_RELAY=disabled`: nothing leaves the machine.
//!
//! Each test asserts what a user would check by looking into the mounted folders (contents,
//! names, modes, symlink targets, `cairn peers`), never how fast it happened: every wait polls
//! with a generous deadline (the test machine may be two loaded cores) and a timeout panics
//! with the tail of every daemon's log attached.
//!
//! A paused device (SIGSTOP) keeps its FUSE mount: nothing may touch that mount until the
//! device is resumed, or the test would hang in the kernel. The harness never does.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    DaemonDir, OWN_LOG, SnapEntry, assert_errno, cairn_bin, check_fuse_available, count_revisions,
    diff_snapshots, hash_file, is_fuse_mounted, kill_and_detach, open_raw, poll, readdir_raw, reap,
    removexattr, setxattr, try_snapshot, wait_deadline, wait_mounted,
};

/// How long a daemon may take from spawn until its mount answers.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long an unmount / SIGTERM may take until the daemon has exited (the flush runs first).
const STOP_DEADLINE: Duration = Duration::from_secs(90);
/// Default deadline for a change to show up on another device.
const SYNC_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for the large files (100–200 MiB) to arrive and verify.
const BIG_DEADLINE: Duration = Duration::from_secs(300);
/// How often a condition on the devices is checked again.
const POLL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------
// harness
// ---------------------------------------------------------------------------------------

/// Output of a short-lived CLI command.
struct CmdOut {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl CmdOut {
    fn ok(&self) -> bool {
        self.status.success()
    }
}

/// One device: its own data dir, XDG dirs, mount point, log file and (while running) daemon.
struct Device {
    name: String,
    dir: DaemonDir,
    child: Option<Child>,
    debounce_ms: Option<u64>,
    paused: bool,
}

impl Device {
    /// Directories only; no process yet.
    fn new(name: &str, debounce_ms: Option<u64>) -> Device {
        check_fuse_available();
        Device {
            name: name.to_string(),
            dir: DaemonDir::new(&format!("cairn-sync-{name}-")),
            child: None,
            debounce_ms,
            paused: false,
        }
    }

    /// A new vault (`cairn mount --init`), mounted.
    fn init(name: &str, debounce_ms: Option<u64>) -> Device {
        let mut d = Device::new(name, debounce_ms);
        let mnt = d.dir.mnt_str();
        d.spawn_daemon(&["mount", "--init", &mnt]);
        d
    }

    /// A new device joining `inviter`'s vault with a fresh ticket, mounted.
    fn join(name: &str, inviter: &Device, debounce_ms: Option<u64>) -> Device {
        let ticket = inviter.invite("10m");
        let mut d = Device::new(name, debounce_ms);
        let mnt = d.dir.mnt_str();
        d.spawn_daemon(&["join", &ticket, &mnt]);
        d
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.mnt.join(rel)
    }

    fn vault_dir(&self) -> PathBuf {
        self.dir.data.join("vaults").join("default")
    }

    /// Runs a short CLI command to completion (killed after `limit`).
    fn run(&self, args: &[&str], limit: Duration) -> CmdOut {
        let dir = tempfile::tempdir().unwrap();
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        let mut child = self
            .dir
            .command(args)
            .stdout(File::create(&o).unwrap())
            .stderr(File::create(&e).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", cairn_bin()));
        let status = match wait_deadline(&mut child, limit) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "[{}] `cairn {}` did not finish within {limit:?}\n{}",
                    self.name,
                    args.join(" "),
                    self.log_tail(200)
                );
            }
        };
        let out = CmdOut {
            status,
            stdout: fs::read_to_string(&o).unwrap_or_default(),
            stderr: fs::read_to_string(&e).unwrap_or_default(),
        };
        self.dir.note(&format!(
            "cairn {} -> {status}; stdout: {:?}; stderr: {:?}",
            args.join(" "),
            out.stdout.trim(),
            out.stderr.trim()
        ));
        out
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args, Duration::from_secs(60));
        assert!(
            out.ok(),
            "[{}] `cairn {}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
            self.name,
            args.join(" "),
            out.status,
            out.stdout,
            out.stderr,
            self.log_tail(200)
        );
        out.stdout
    }

    fn ready_count(&self) -> usize {
        self.dir
            .log_text()
            .matches("cairn: vault \"default\" mounted at")
            .count()
    }

    /// Spawns a foreground daemon (`mount …` or `join …`) and waits until its mount answers.
    fn spawn_daemon(&mut self, args: &[&str]) {
        assert!(
            self.child.is_none(),
            "[{}] daemon already running",
            self.name
        );
        assert!(
            !is_fuse_mounted(&self.dir.mnt),
            "[{}] already mounted",
            self.name
        );
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(ms) = self.debounce_ms {
            args.push("--debounce-ms".into());
            args.push(ms.to_string());
        }
        let what = args.join(" ");
        let before = self.ready_count();
        self.dir.note(&format!("start: cairn {what}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self
            .dir
            .logged(&args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `cairn {what}`: {e}"));
        self.adopt(child, before, &what);
    }

    /// Makes `child`, a foreground daemon writing to this device's log, the device's daemon
    /// and waits until its mount is ready: in mountinfo, and more "mounted at" lines in the
    /// log than `before`. `what` names the command in messages.
    fn adopt(&mut self, mut child: Child, before: usize, what: &str) {
        let ready = wait_mounted(&mut child, &self.dir.mnt, START_DEADLINE, || {
            self.ready_count() > before
        });
        if let Err(e) = ready {
            panic!("[{}] `cairn {what}` {e}\n{}", self.name, self.log_tail(200));
        }
        self.child = Some(child);
    }

    /// (Re)starts the daemon on the existing vault.
    fn start(&mut self) {
        let mnt = self.dir.mnt_str();
        self.spawn_daemon(&["mount", &mnt]);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    fn signal(&self, sig: i32) {
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// SIGTERM and wait for the daemon to flush, unmount and exit cleanly.
    fn stop(&mut self) {
        self.resume();
        self.dir.note("SIGTERM");
        self.signal(libc::SIGTERM);
        self.wait_exit("SIGTERM");
    }

    /// `cairn unmount MNT` (waits for the final flush) and wait for the daemon to exit.
    fn unmount(&mut self) {
        self.resume();
        let mnt = self.dir.mnt_str();
        let out = self.run(&["unmount", &mnt], STOP_DEADLINE);
        assert!(
            out.ok(),
            "[{}] `cairn unmount` failed: {}\n{}",
            self.name,
            out.stderr,
            self.log_tail(200)
        );
        self.wait_exit("unmount");
    }

    /// Waits for the daemon to exit successfully and its mount to go.
    fn wait_exit(&mut self, how: &str) {
        let mut child = self.child.take().expect("daemon running");
        match reap(&mut child, &self.dir.mnt, STOP_DEADLINE) {
            Ok(s) if s.success() => {}
            Ok(s) => panic!(
                "[{}] daemon exited with {s} after {how}\n{}",
                self.name,
                self.log_tail(200)
            ),
            Err(e) => panic!("[{}] after {how}: {e}\n{}", self.name, self.log_tail(200)),
        }
    }

    /// SIGKILL (no flush, no goodbye), then detach the dead mount.
    fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.dir.note("SIGKILL");
        let killed = kill_and_detach(&mut child, &self.dir.mnt);
        self.paused = false;
        if let Err(e) = killed {
            panic!("[{}] {e}", self.name);
        }
    }

    /// SIGSTOP: the process freezes (a network partition as far as peers can tell). Its mount
    /// must not be touched until [`Device::resume`].
    fn pause(&mut self) {
        assert!(!self.paused);
        self.dir.note("SIGSTOP");
        self.signal(libc::SIGSTOP);
        self.paused = true;
    }

    fn resume(&mut self) {
        if self.paused {
            self.dir.note("SIGCONT");
            self.signal(libc::SIGCONT);
            self.paused = false;
        }
    }

    /// A fresh one-time ticket from the running daemon.
    fn invite(&self, ttl: &str) -> String {
        let out = self.run_ok(&["invite", "--ttl", ttl]);
        let ticket = out.trim().to_string();
        assert!(
            ticket.starts_with("cairn1") && !ticket.contains(char::is_whitespace),
            "[{}] `cairn invite` printed {out:?}, expected one cairn1… line",
            self.name
        );
        ticket
    }

    fn device_id(&self) -> String {
        let out = self.run_ok(&["status"]);
        out.lines()
            .find_map(|l| l.strip_prefix("device id:"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("[{}] no device id in `cairn status`: {out}", self.name))
    }

    /// `cairn peers` lines other than this device's own.
    fn peers(&self) -> Vec<String> {
        self.run_ok(&["peers"])
            .lines()
            .filter(|l| !l.contains("this device") && !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Revisions this device has published (`cairn log`).
    fn revisions(&self) -> usize {
        let out = self.run(OWN_LOG, Duration::from_secs(60));
        if !out.ok() {
            return 0;
        }
        count_revisions(&out.stdout)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = self.dir.log_text();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- log of device {} ({}), last {} of {} lines ---\n{}\n",
            self.name,
            self.dir.log.display(),
            all.len() - from,
            all.len(),
            all[from..].join("\n")
        )
    }

    /// Blobs in the local content store: hex id → (pack file, offset) of the copy it reads.
    /// Read through a store handle of the test's own, which only reads a pack the daemon is
    /// writing (and repairs one a killed daemon left, as the daemon would at its next start).
    /// A blob fetched a second time is appended to a newer pack and read from there, so its
    /// location changes.
    fn store_files(&self) -> HashMap<String, (PathBuf, u64)> {
        let Ok(store) = cairn_store::BlobStore::open(self.vault_dir().join("store")) else {
            return HashMap::new();
        };
        let mut out = HashMap::new();
        for id in store.list().unwrap_or_default() {
            if let Ok(Some(loc)) = store.locate(&id) {
                out.insert(id.to_hex(), (loc.path, loc.offset));
            }
        }
        out
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.resume();
        // The directory is removed after this (field drop), unless the mount is still there.
        if let Some(mut child) = self.child.take()
            && let Err(e) = self.dir.stop_daemon(&mut child, STOP_DEADLINE)
        {
            let msg = format!(
                "[{}] unmount at teardown: {e}\n{}",
                self.name,
                self.log_tail(200)
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

fn logs_of(devs: &[&Device]) -> String {
    devs.iter().map(|d| d.log_tail(150)).collect()
}

/// Polls `cond` until it holds; on timeout panics with `what`, the last diagnostic the
/// condition left in `why`, and every device's log.
#[track_caller]
fn wait_until(
    devs: &[&Device],
    what: &str,
    limit: Duration,
    cond: impl FnMut(&mut String) -> bool,
) {
    common::wait_until(what, limit, POLL, cond, || logs_of(devs));
}

/// Asserts `cond` stays false for `period` (things that must NOT happen).
#[track_caller]
fn assert_never(devs: &[&Device], what: &str, period: Duration, cond: impl FnMut() -> bool) {
    if poll(period, POLL, cond) {
        panic!("this must not happen, but did: {what}\n{}", logs_of(devs));
    }
}

// ---------------------------------------------------------------------------------------
// trees and files
// ---------------------------------------------------------------------------------------

/// True when every device shows the same tree (a [`try_snapshot`] of each mount: names,
/// kinds, modes, sizes, content hashes, symlink targets, `user.*` xattrs); `why` says what
/// differs otherwise.
fn all_equal(devs: &[&Device], why: &mut String) -> bool {
    let mut first: Option<(&str, Vec<SnapEntry>)> = None;
    for d in devs {
        let snap = match try_snapshot(&d.dir.mnt) {
            Ok(snap) => snap,
            Err(e) => {
                *why = format!("snapshot of {} failed: {e}", d.name);
                return false;
            }
        };
        match &first {
            None => first = Some((&d.name, snap)),
            Some((n, f)) => {
                if let Some(diff) = diff_snapshots(f, &snap) {
                    *why = format!("{n} (left) vs {} (right):\n{diff}", d.name);
                    return false;
                }
            }
        }
    }
    true
}

fn content_is(p: &Path, want: &[u8]) -> bool {
    fs::read(p).map(|b| b == want).unwrap_or(false)
}

/// Deterministic pseudo-random bytes (splitmix64), fast and with no API to depend on.
struct Rng(u64);

impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes `size` random bytes to `p` (1 MiB writes) and returns their blake3.
fn write_random(p: &Path, size: usize, seed: u64) -> blake3::Hash {
    let mut rng = Rng(seed);
    let mut f = File::create(p).unwrap_or_else(|e| panic!("create {p:?}: {e}"));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("write {p:?}: {e}"));
        h.update(&buf[..n]);
        left -= n;
    }
    drop(f);
    h.finalize()
}

/// Waits until `p` on `dev` has `size` bytes hashing to `hash`. The hash is only computed
/// once the size matches (each check reads the whole file).
fn wait_for_big_file(devs: &[&Device], p: &Path, size: u64, hash: &blake3::Hash, limit: Duration) {
    let mut last_hashed = Instant::now() - Duration::from_secs(60);
    wait_until(
        devs,
        &format!("{p:?} ({size} bytes, blake3 {hash})"),
        limit,
        |why| {
            let len = match fs::metadata(p) {
                Ok(m) => m.len(),
                Err(e) => {
                    *why = format!("stat: {e}");
                    return false;
                }
            };
            if len != size {
                *why = format!("size {len}");
                return false;
            }
            if last_hashed.elapsed() < Duration::from_secs(2) {
                return false;
            }
            last_hashed = Instant::now();
            match hash_file(p) {
                Ok(h) if h == *hash => true,
                Ok(h) => {
                    *why = format!("size matches but blake3 is {h}");
                    false
                }
                Err(e) => {
                    *why = format!("read: {e}");
                    false
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------

/// A and B: every kind of change made on one side shows up, identical, on the other, both
/// ways; a 100 MiB file arrives byte-identical.
#[test]
fn two_devices_sync_every_kind_of_change_both_ways() {
    let a = Device::init("A", Some(50));
    let b = Device::join("B", &a, Some(50));
    let both = [&a, &b];

    // A first file.
    fs::write(a.path("hello.txt"), b"hello from A\n").unwrap();
    wait_until(&both, "hello.txt on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("hello.txt"), b"hello from A\n")
    });

    // A → B: edit, rename, nested dirs, symlinks, chmod.
    fs::write(a.path("hello.txt"), b"hello again, edited on A\n").unwrap();
    fs::rename(a.path("hello.txt"), a.path("greeting.txt")).unwrap();
    fs::create_dir_all(a.path("docs/deep/deeper")).unwrap();
    fs::write(a.path("docs/deep/deeper/note.md"), b"# nested\n").unwrap();
    fs::write(a.path("docs/script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(a.path("docs/script.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(a.path("private.txt"), b"secret-ish\n").unwrap();
    fs::set_permissions(a.path("private.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    symlink("docs/deep/deeper/note.md", a.path("note-link")).unwrap();
    symlink("../greeting.txt", a.path("docs/up-link")).unwrap();
    symlink("does-not-exist", a.path("dangling")).unwrap();
    fs::write(a.path("doomed.txt"), b"to be deleted\n").unwrap();
    wait_until(&both, "A's changes on B", SYNC_DEADLINE, |why| {
        all_equal(&both, why)
    });
    fs::remove_file(a.path("doomed.txt")).unwrap();
    wait_until(&both, "A's delete on B", SYNC_DEADLINE, |why| {
        all_equal(&both, why)
    });
    assert!(!b.path("doomed.txt").exists());
    assert!(!b.path("hello.txt").exists(), "renamed away on A");
    assert_eq!(
        fs::read(b.path("greeting.txt")).unwrap(),
        b"hello again, edited on A\n"
    );
    assert_eq!(
        fs::read_link(b.path("note-link")).unwrap(),
        Path::new("docs/deep/deeper/note.md")
    );
    assert_eq!(fs::read(b.path("note-link")).unwrap(), b"# nested\n");
    assert_eq!(
        fs::metadata(b.path("docs/script.sh")).unwrap().mode() & 0o777,
        0o755
    );
    assert_eq!(
        fs::metadata(b.path("private.txt")).unwrap().mode() & 0o777,
        0o600
    );

    // B → A: the same kinds of change in the other direction.
    fs::write(
        b.path("docs/deep/deeper/note.md"),
        b"# nested, edited on B\n",
    )
    .unwrap();
    fs::rename(b.path("greeting.txt"), b.path("docs/greeting-moved.txt")).unwrap();
    fs::remove_file(b.path("docs/up-link")).unwrap();
    symlink("greeting-moved.txt", b.path("docs/up-link")).unwrap();
    fs::set_permissions(b.path("private.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(b.path("docs/script.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir_all(b.path("from-b/x/y")).unwrap();
    fs::write(b.path("from-b/x/y/z.bin"), [0u8, 1, 2, 255, 254]).unwrap();
    fs::remove_file(b.path("dangling")).unwrap();
    fs::create_dir(b.path("empty-dir")).unwrap();
    wait_until(&both, "B's changes on A", SYNC_DEADLINE, |why| {
        all_equal(&both, why)
    });
    assert_eq!(
        fs::read(a.path("docs/greeting-moved.txt")).unwrap(),
        b"hello again, edited on A\n"
    );
    assert_eq!(
        fs::read(b.path("docs/deep/deeper/note.md")).unwrap(),
        b"# nested, edited on B\n",
        "B's own edit, read back on B"
    );
    assert_eq!(
        fs::read(a.path("docs/deep/deeper/note.md")).unwrap(),
        b"# nested, edited on B\n",
        "B's edit, on A"
    );
    assert!(!a.path("greeting.txt").exists());
    assert!(!a.path("dangling").exists());
    assert!(a.path("empty-dir").is_dir());
    assert_eq!(
        fs::read(a.path("docs/up-link")).unwrap(),
        b"hello again, edited on A\n"
    );
    assert_eq!(
        fs::metadata(a.path("private.txt")).unwrap().mode() & 0o777,
        0o640
    );

    // B removes a whole subtree; an empty directory and a rename of a directory.
    fs::remove_dir_all(b.path("from-b")).unwrap();
    fs::rename(b.path("docs/deep"), b.path("docs/shallow")).unwrap();
    wait_until(
        &both,
        "B's subtree removal and dir rename on A",
        SYNC_DEADLINE,
        |why| all_equal(&both, why),
    );
    assert!(!a.path("from-b").exists());
    assert_eq!(
        fs::read(a.path("docs/shallow/deeper/note.md")).unwrap(),
        b"# nested, edited on B\n"
    );

    // 100 MiB of random data written on A arrives byte-identical on B.
    const BIG: usize = 100 << 20;
    let hash = write_random(&a.path("big.bin"), BIG, 1);
    wait_for_big_file(&both, &b.path("big.bin"), BIG as u64, &hash, BIG_DEADLINE);
    wait_until(&both, "identical trees at the end", SYNC_DEADLINE, |why| {
        all_equal(&both, why)
    });
}

/// The most common edit there is: a file arrives from a peer, the user opens it, changes it
/// and saves. That edit saw the peer's version, so it is no conflict: it must replace the
/// file on both devices (no `.sync-conflict-` copy, no reverted content).
#[test]
fn editing_a_file_received_from_a_peer_replaces_it_everywhere() {
    let a = Device::init("A", Some(50));
    let b = Device::join("B", &a, Some(50));
    let both = [&a, &b];
    fs::write(a.path("report.txt"), b"draft from A\n").unwrap();
    wait_until(&both, "report.txt on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("report.txt"), b"draft from A\n")
    });
    // B has shown A's version for a while before the user edits it.
    sleep(Duration::from_secs(1));
    fs::write(
        b.path("report.txt"),
        b"final, edited on B after reading A's draft\n",
    )
    .unwrap();
    // Wait until A shows B's edit in some form (in place, or as a conflict copy).
    wait_until(&both, "B's edit on A", SYNC_DEADLINE, |why| {
        let arrived = fs::read_dir(&a.dir.mnt)
            .map(|rd| rd.count() > 1)
            .unwrap_or(false)
            || content_is(
                &a.path("report.txt"),
                b"final, edited on B after reading A's draft\n",
            );
        arrived && all_equal(&both, why)
    });
    assert_eq!(
        fs::read(b.path("report.txt")).unwrap(),
        b"final, edited on B after reading A's draft\n",
        "B's edit was reverted on B itself"
    );
    for d in &both {
        let names: Vec<String> = fs::read_dir(&d.dir.mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["report.txt"],
            "{}: no conflict copy expected",
            d.name
        );
    }
}

/// A, B and C edit the same file concurrently while partitioned from each other; once they
/// can talk again, all three show the same tree and no edit is lost (conflict copies).
#[test]
fn three_devices_converge_and_keep_every_concurrent_edit() {
    // Default debounce (500 ms): A's and B's back-to-back edits are concurrent.
    let mut a = Device::init("A", None);
    let mut b = Device::join("B", &a, None);
    let mut c = Device::join("C", &a, None);

    fs::write(a.path("shared.txt"), b"base version\n").unwrap();
    fs::write(a.path("from-a.txt"), b"a\n").unwrap();
    fs::write(b.path("from-b.txt"), b"b\n").unwrap();
    fs::write(c.path("from-c.txt"), b"c\n").unwrap();
    {
        let all = [&a, &b, &c];
        wait_until(
            &all,
            "the three devices agree before the partition",
            SYNC_DEADLINE,
            |why| {
                ["shared.txt", "from-a.txt", "from-b.txt", "from-c.txt"]
                    .iter()
                    .all(|f| all.iter().all(|d| d.path(f).exists()))
                    && all_equal(&all, why)
            },
        );
    }

    // C goes offline; A and B edit the shared file at the same moment.
    c.unmount();
    fs::write(a.path("shared.txt"), b"edited on A\n").unwrap();
    fs::write(b.path("shared.txt"), b"edited on B\n").unwrap();
    fs::write(a.path("a-while-c-away.txt"), b"a2\n").unwrap();
    {
        let ab = [&a, &b];
        wait_until(
            &ab,
            "A and B converge while C is away",
            SYNC_DEADLINE,
            |why| {
                a.path("a-while-c-away.txt").exists()
                    && b.path("a-while-c-away.txt").exists()
                    && all_equal(&ab, why)
            },
        );
    }

    // Now A and B freeze (SIGSTOP: their peers see a dead network) and C comes back alone,
    // editing the same file without being able to hear about A's and B's versions.
    a.pause();
    b.pause();
    let revs = c.revisions();
    c.start();
    fs::write(c.path("shared.txt"), b"edited on C\n").unwrap();
    fs::write(c.path("c-offline.txt"), b"c2\n").unwrap();
    wait_until(
        &[&c],
        "C publishes its offline edit",
        SYNC_DEADLINE,
        |why| {
            let n = c.revisions();
            *why = format!("C has {n} revisions, had {revs}");
            n > revs
        },
    );
    assert_eq!(
        fs::read(c.path("shared.txt")).unwrap(),
        b"edited on C\n",
        "C could not have heard of A's and B's edits"
    );

    // The partition heals.
    a.resume();
    b.resume();
    let all = [&a, &b, &c];
    let versions: BTreeSet<&[u8]> = [
        &b"edited on A\n"[..],
        &b"edited on B\n"[..],
        &b"edited on C\n"[..],
    ]
    .into_iter()
    .collect();
    wait_until(
        &all,
        "all three converge with every version kept",
        BIG_DEADLINE,
        |why| {
            if !all_equal(&all, why) {
                return false;
            }
            for d in &all {
                let got = shared_versions(d);
                let want: BTreeSet<Vec<u8>> = versions.iter().map(|v| v.to_vec()).collect();
                if !want.is_subset(&got.values().cloned().collect()) {
                    *why = format!("{}: shared.txt versions {got:?}", d.name);
                    return false;
                }
            }
            [
                "a-while-c-away.txt",
                "c-offline.txt",
                "from-a.txt",
                "from-b.txt",
                "from-c.txt",
            ]
            .iter()
            .all(|f| a.path(f).exists())
        },
    );
    // One of them keeps the name; the others sit beside it as conflict copies, everywhere.
    eprintln!(
        "shared.txt versions on A: {:?}",
        shared_versions(&a).keys().collect::<Vec<_>>()
    );
    for d in &all {
        let got = shared_versions(d);
        assert!(got.contains_key("shared.txt"), "{}: {got:?}", d.name);
        let conflicts: Vec<&String> = got
            .keys()
            .filter(|k| k.starts_with("shared") && k.contains(".sync-conflict-"))
            .collect();
        assert!(
            conflicts.len() >= 2,
            "{}: expected two conflict copies next to shared.txt, got {got:?}",
            d.name
        );
        for f in ["a-while-c-away.txt", "c-offline.txt"] {
            assert!(d.path(f).exists(), "{}: {f} missing", d.name);
        }
    }
}

/// `shared.txt` and every `shared*.sync-conflict-*` beside it: name → content.
fn shared_versions(d: &Device) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = fs::read_dir(&d.dir.mnt) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name == "shared.txt"
                || (name.starts_with("shared") && name.contains(".sync-conflict-")))
                && let Ok(b) = fs::read(e.path())
            {
                out.insert(name, b);
            }
        }
    }
    out
}

/// B is offline (cleanly unmounted) while A deletes a file; when B comes back the file stays
/// deleted on both.
#[test]
fn delete_while_a_device_is_offline_stays_deleted() {
    let a = Device::init("A", Some(50));
    let mut b = Device::join("B", &a, Some(50));
    fs::create_dir(a.path("dir")).unwrap();
    fs::write(a.path("dir/doomed.txt"), b"delete me\n").unwrap();
    fs::write(a.path("doomed-too.txt"), b"and me\n").unwrap();
    fs::write(a.path("keeper.txt"), b"keep me\n").unwrap();
    wait_until(&[&a, &b], "files on B", SYNC_DEADLINE, |why| {
        b.path("dir/doomed.txt").exists() && all_equal(&[&a, &b], why)
    });

    b.unmount();
    let revs = a.revisions();
    fs::remove_file(a.path("dir/doomed.txt")).unwrap();
    fs::remove_file(a.path("doomed-too.txt")).unwrap();
    wait_until(&[&a], "A publishes the deletes", SYNC_DEADLINE, |why| {
        let n = a.revisions();
        *why = format!("A has {n} revisions, had {revs}");
        n > revs
    });

    b.start();
    // A marker written after B is back proves B has caught up with A's later state.
    fs::write(a.path("marker.txt"), b"after\n").unwrap();
    let both = [&a, &b];
    wait_until(&both, "B catches up", SYNC_DEADLINE, |why| {
        b.path("marker.txt").exists() && all_equal(&both, why)
    });
    for d in &both {
        assert!(
            !d.path("dir/doomed.txt").exists(),
            "{}: deleted file came back",
            d.name
        );
        assert!(
            !d.path("doomed-too.txt").exists(),
            "{}: deleted file came back",
            d.name
        );
        assert_eq!(fs::read(d.path("keeper.txt")).unwrap(), b"keep me\n");
        assert!(d.path("dir").is_dir());
    }
    // And it does not come back later either (B's old snapshot must not resurrect it).
    assert_never(
        &both,
        "a deleted file reappears",
        Duration::from_secs(8),
        || {
            both.iter()
                .any(|d| d.path("dir/doomed.txt").exists() || d.path("doomed-too.txt").exists())
        },
    );
}

/// A device outside the vault gets nothing: used, expired and malformed tickets fail with a
/// clear error and leave no vault behind; a removed member neither sends nor receives.
#[test]
fn non_members_and_removed_devices_get_nothing() {
    let mut a = Device::init("A", Some(50));
    let ticket = a.invite("10m");
    let mut b = Device::new("B", Some(50));
    {
        let mnt = b.dir.mnt_str();
        b.spawn_daemon(&["join", &ticket, &mnt]);
    }
    let c = Device::init("C", Some(50));
    fs::write(a.path("a-secret.txt"), b"for members only\n").unwrap();
    fs::write(c.path("c-own.txt"), b"C's own vault\n").unwrap();
    wait_until(
        &[&a, &b],
        "B (a member) gets A's file",
        SYNC_DEADLINE,
        |_| content_is(&b.path("a-secret.txt"), b"for members only\n"),
    );

    // C already has a vault "default": it tries to join A's into another vault name.
    let other = c.dir.data.join("vaults").join("stolen");
    let join_fails = |ticket: &str, expect: &[&str], what: &str| {
        let out = c.run(
            &["--vault", "stolen", "join", ticket, "--no-mount"],
            Duration::from_secs(90),
        );
        assert!(
            !out.ok(),
            "join with {what} succeeded:\n{}\n{}",
            out.stderr,
            logs_of(&[&a, &c])
        );
        let err = out.stderr.to_lowercase();
        assert!(
            err.contains("cairn: error:") && expect.iter().any(|w| err.contains(w)),
            "join with {what}: unclear error (wanted one of {expect:?}): {}",
            out.stderr
        );
        assert!(
            !other.join("vault.secret").exists(),
            "join with {what} left a vault behind in {other:?}"
        );
    };
    // A used ticket: nothing else is pending, so A no longer lets strangers in at all.
    join_fails(
        &ticket,
        &["not accepting new devices", "already used"],
        "a used ticket",
    );
    let short = a.invite("1s");
    sleep(Duration::from_secs(2));
    join_fails(&short, &["expired"], "an expired ticket");
    join_fails(
        "cairn1garbage",
        &["ticket", "invalid", "malformed", "checksum", "encoding"],
        "a malformed ticket",
    );
    join_fails(
        "hello",
        &["ticket", "invalid", "malformed", "prefix"],
        "a non-ticket",
    );
    let mut mangled = ticket.clone().into_bytes();
    let mid = mangled.len() / 2;
    mangled[mid] = if mangled[mid] == b'a' { b'b' } else { b'a' };
    join_fails(
        &String::from_utf8(mangled).unwrap(),
        &[
            "ticket",
            "invalid",
            "malformed",
            "checksum",
            "encoding",
            "refused",
            "unknown",
        ],
        "a ticket with one character changed",
    );
    // C's own vault is untouched and separate.
    assert!(!c.path("a-secret.txt").exists());
    assert!(!a.path("c-own.txt").exists());
    assert_eq!(fs::read(c.path("c-own.txt")).unwrap(), b"C's own vault\n");

    // Remove B. A stops listing it; nothing flows either way any more.
    let b_id = b.device_id();
    assert!(
        a.peers().iter().any(|l| l.starts_with(&b_id)),
        "A's peers should list B before removal: {:?}",
        a.peers()
    );
    a.run_ok(&["remove-device", &b_id[..12]]);
    wait_until(
        &[&a, &b],
        "A's peers no longer list B",
        SYNC_DEADLINE,
        |why| {
            let p = a.peers();
            *why = format!("{p:?}");
            !p.iter().any(|l| l.contains(&b_id))
        },
    );
    fs::write(b.path("b-after-removal.txt"), b"B was removed\n").unwrap();
    fs::write(b.path("a-secret.txt"), b"B overwrites after removal\n").unwrap();
    fs::write(a.path("a-after-removal.txt"), b"not for B\n").unwrap();
    let both = [&a, &b];
    assert_never(
        &both,
        "data crosses between A and removed B",
        Duration::from_secs(15),
        || {
            a.path("b-after-removal.txt").exists()
                || !content_is(&a.path("a-secret.txt"), b"for members only\n")
                || b.path("a-after-removal.txt").exists()
        },
    );
    let p = a.peers();
    assert!(
        !p.iter().any(|l| l.contains(&b_id)),
        "A still lists B: {p:?}"
    );
    // A restart of A (B still running and dialing) does not bring B back either.
    a.unmount();
    a.start();
    fs::write(
        a.path("a-after-restart.txt"),
        b"still not for B
",
    )
    .unwrap();
    let both = [&a, &b];
    assert_never(
        &both,
        "data crosses after A restarted",
        Duration::from_secs(10),
        || a.path("b-after-removal.txt").exists() || b.path("a-after-restart.txt").exists(),
    );
    let p = a.peers();
    assert!(
        !p.iter().any(|l| l.contains(&b_id)),
        "A lists B again after a restart: {p:?}"
    );
}

/// B restarts twice in the middle of receiving a 200 MiB file (SIGTERM, then SIGKILL) and
/// still ends with the file byte-identical, without fetching again what it already had.
#[test]
fn interrupted_large_transfer_resumes_without_refetching() {
    let a = Device::init("A", Some(50));
    let mut b = Device::join("B", &a, Some(50));
    fs::write(a.path("warmup.txt"), b"x\n").unwrap();
    wait_until(&[&a, &b], "warm-up file on B", SYNC_DEADLINE, |_| {
        b.path("warmup.txt").exists()
    });

    const BIG: usize = 200 << 20;
    let before_a = a.store_files().len();
    let before_b = b.store_files().len();
    let hash = write_random(&a.path("huge.bin"), BIG, 7);
    // Chunks are ~64 KiB: the file is ~3,200 blobs. B starts fetching once A has flushed and
    // published; it is interrupted twice while it fetches (a tight poll: loopback is fast).
    let mut kept: HashMap<String, (PathBuf, u64)> = HashMap::new();
    let mut interruptions = Vec::new();
    for (grown, how) in [(300, "SIGTERM"), (1500, "SIGKILL")] {
        let target = before_b + grown;
        let deadline = Instant::now() + BIG_DEADLINE;
        let mut polls = 0u32;
        loop {
            if b.store_files().len() >= target {
                break;
            }
            polls += 1;
            if Instant::now() >= deadline {
                panic!(
                    "B does not fetch: {} blobs, waiting for {target}\n{}",
                    b.store_files().len(),
                    logs_of(&[&a, &b])
                );
            }
            sleep(Duration::from_millis(if polls.is_multiple_of(50) {
                200
            } else {
                5
            }));
        }
        match how {
            "SIGTERM" => b.stop(),
            _ => b.kill9(),
        }
        let files = b.store_files();
        let had = files.len() - before_b;
        kept.extend(files);
        interruptions.push((how, had));
        b.start();
    }

    wait_for_big_file(
        &[&a, &b],
        &b.path("huge.bin"),
        BIG as u64,
        &hash,
        BIG_DEADLINE,
    );
    // A flushes a large file in several snapshots while it is written, so its blob count is
    // only final now.
    let total = a.store_files().len() - before_a;
    eprintln!("interruptions (signal, blobs B had) of {total} blobs: {interruptions:?}");
    assert!(
        interruptions.iter().any(|(_, had)| had + 10 < total),
        "B had every blob before each interruption ({interruptions:?} of {total}); nothing was tested"
    );
    // Every blob B had before a restart is still where it was: nothing was fetched twice (a
    // fetched blob is appended to B's pack, and the newest copy is the one read).
    let now = b.store_files();
    let rewritten: Vec<&String> = kept
        .iter()
        .filter(|(p, v)| now.get(*p).is_some_and(|w| w != *v))
        .map(|(p, _)| p)
        .collect();
    let lost: Vec<&String> = kept.keys().filter(|p| !now.contains_key(*p)).collect();
    assert!(
        rewritten.is_empty() && lost.is_empty(),
        "{} of {} blobs B had before restarting were fetched again, {} vanished; e.g. {:?}\n{}",
        rewritten.len(),
        kept.len(),
        lost.len(),
        rewritten
            .iter()
            .chain(lost.iter())
            .take(3)
            .collect::<Vec<_>>(),
        logs_of(&[&a, &b])
    );
}

/// `cairn recover`: the recovery phrase plus one reachable member rebuild a device, which then
/// sees everything written before it existed (the member re-seals its snapshot to it). The
/// member accepts the phrase only inside a recovery window (`cairn allow-recovery`), and a
/// stranger with a made-up ticket gets nowhere, window or not.
#[test]
fn recovery_phrase_and_a_peer_rebuild_a_device() {
    let mut a = Device::new("A", Some(50));
    let init = a.run_ok(&["init", "--show-phrase"]);
    let phrase = init
        .lines()
        .find_map(|l| l.strip_prefix("recovery phrase: "))
        .expect("init prints the phrase")
        .to_string();
    a.start();
    fs::create_dir(a.path("kept")).unwrap();
    fs::write(a.path("kept/precious.txt"), b"written before the loss\n").unwrap();
    wait_until(&[&a], "A publishes", SYNC_DEADLINE, |_| a.revisions() >= 1);

    let own = a
        .run_ok(&["peers"])
        .lines()
        .find(|l| l.contains("this device"))
        .map(|l| l.to_string())
        .expect("peers lists this device");
    let addr = own.rsplit(' ').next().unwrap().split(',').next().unwrap();
    let from = format!("{}@{addr}", a.device_id());

    // A wrong phrase is refused with a reason and creates nothing.
    let bad = Device::new("bad", None);
    let out = recover_no_mount(&bad, &from, "abandon abandon abandon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("recovery phrase is not valid"), "{err}");
    assert!(!bad.vault_dir().join("vault.secret").exists());

    // The right phrase without a recovery window on A: refused, with what to do.
    let early = Device::new("early", None);
    let out = recover_no_mount(&early, &from, &phrase);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "recovered without a window: {err}");
    assert!(
        err.contains("no recovery window is open") && err.contains("cairn allow-recovery"),
        "{err}"
    );
    assert!(!early.vault_dir().join("vault.secret").exists());

    // A stranger with a ticket it made up (A's id and address, a random token).
    let stranger = Device::new("stranger", None);
    let forged = made_up_ticket(&a.device_id(), addr);
    let out = stranger.run(&["join", &forged, "--no-mount"], Duration::from_secs(90));
    assert!(!out.ok(), "a made-up ticket joined: {}", out.stderr);
    assert!(
        out.stderr.contains("not accepting new devices"),
        "{}",
        out.stderr
    );

    // Absurd windows are refused naming the limit; then a real one opens.
    let out = a.run(
        &["allow-recovery", "--for", "1000000d"],
        Duration::from_secs(30),
    );
    assert!(
        !out.ok() && out.stderr.contains("at most 1day"),
        "{}",
        out.stderr
    );
    let opened = a.run_ok(&["allow-recovery", "--for", "10m"]);
    assert!(opened.contains("recovery window open until"), "{opened}");

    // The open window lets the stranger reach the proof check, which refuses its token.
    let out = stranger.run(&["join", &forged, "--no-mount"], Duration::from_secs(90));
    assert!(!out.ok(), "a made-up ticket joined: {}", out.stderr);
    assert!(
        out.stderr.contains("does not know this invitation"),
        "{}",
        out.stderr
    );
    assert!(!stranger.vault_dir().join("vault.secret").exists());

    // The right phrase: a new device, member of the same vault, with A's data.
    let mut b = Device::new("B", Some(50));
    let mnt = b.dir.mnt_str();
    let before = b.ready_count();
    let mut child = b
        .dir
        .logged(&["recover", "--from", &from, &mnt])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{phrase}\n").as_bytes())
        .unwrap();
    b.adopt(child, before, "recover");
    wait_until(&[&a, &b], "A's data on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("kept/precious.txt"), b"written before the loss\n")
    });
    assert_ne!(a.device_id(), b.device_id());
    // And it is a full member: its writes reach A.
    fs::write(b.path("after.txt"), b"from the recovered device\n").unwrap();
    wait_until(&[&a, &b], "B's write on A", SYNC_DEADLINE, |_| {
        content_is(&a.path("after.txt"), b"from the recovered device\n")
    });

    // Closed early, the window admits nobody else.
    let closed = a.run_ok(&["allow-recovery", "--close"]);
    assert!(closed.contains("recovery window closed"), "{closed}");
    let late = Device::new("late", None);
    let out = recover_no_mount(&late, &from, &phrase);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "recovered after the window closed: {err}"
    );
    assert!(err.contains("cairn allow-recovery"), "{err}");
    assert!(!late.vault_dir().join("vault.secret").exists());
    // Of all the devices that tried, only B became a member.
    let peers = a.peers();
    assert_eq!(peers.len(), 1, "A's members besides itself: {peers:?}");
    assert!(peers[0].starts_with(&b.device_id()), "{peers:?}");
}

/// `cairn recover --from FROM --no-mount` on `dev` with `phrase` on stdin, to completion.
fn recover_no_mount(dev: &Device, from: &str, phrase: &str) -> std::process::Output {
    let mut child = dev
        .dir
        .command(&["recover", "--from", from, "--no-mount"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{phrase}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A well-formed ticket naming `inviter` at `addr` with a token nobody issued.
fn made_up_ticket(inviter: &str, addr: &str) -> String {
    cairn_net::Ticket {
        inviter: inviter.parse().expect("a device id"),
        addrs: vec![addr.parse().expect("HOST:PORT")],
        relays: Vec::new(),
        vault: cairn_crypto::VaultId(rand::random()),
        token: rand::random(),
        expires_at: u64::MAX,
    }
    .to_string()
}

// ---------------------------------------------------------------------------------------
// Relays: a relay started by the test on 127.0.0.1 (`cairn relay`, plain HTTP).

/// A `cairn relay` process on 127.0.0.1 with a random port, for as long as it lives.
struct TestRelay {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl TestRelay {
    fn start() -> TestRelay {
        let dir = tempfile::tempdir().unwrap();
        let (child, url) = Self::spawn(dir.path(), "127.0.0.1:0");
        TestRelay {
            child,
            url,
            _dir: dir,
        }
    }

    /// Kills the relay (as a crashed or rebooted host vanishes) and starts it again on the
    /// same port after `outage`.
    fn restart_after(&mut self, outage: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        sleep(outage);
        let bind = self.url.trim_start_matches("http://").trim_end_matches('/');
        let (child, url) = Self::spawn(self._dir.path(), bind);
        self.child = child;
        assert_eq!(url, self.url, "the relay came back elsewhere");
    }

    /// `cairn relay --bind BIND` logging into `dir`; returns it with the URL it printed.
    fn spawn(dir: &Path, bind: &str) -> (Child, String) {
        let log = dir.join("relay.log");
        let err = dir.join("relay.err");
        let child = common::cairn_command()
            .args(["relay", "--bind", bind, "--allow-anyone"])
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .expect("spawn cairn relay");
        let mut url = None;
        let found = poll(START_DEADLINE, POLL, || {
            let text = fs::read_to_string(&log).unwrap_or_default();
            url = text
                .split_whitespace()
                .find(|w| w.starts_with("http://127.0.0.1:"))
                .map(str::to_string);
            url.is_some()
        });
        assert!(
            found,
            "the relay printed no URL: {:?} / {:?}",
            fs::read_to_string(&log),
            fs::read_to_string(&err)
        );
        (child, url.unwrap())
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Device {
    /// Directories only, with every command using `relay` (and, unless `direct`, nothing else).
    fn via_relay(name: &str, relay: &TestRelay, direct: bool) -> Device {
        let mut d = Device::new(name, None);
        d.dir.env = vec![
            ("CAIRN_RELAY".into(), relay.url.clone()),
            ("CAIRN_DIRECT".into(), direct.to_string()),
        ];
        d
    }

    /// The `cairn peers` line of the device with id `id`.
    fn peer_line(&self, id: &str) -> Option<String> {
        self.peers().into_iter().find(|l| l.starts_with(id))
    }
}

/// Every remote address of the TCP and UDP sockets process `pid` holds, as `IP:PORT` text,
/// and whether it holds any UDP socket at all.
fn socket_peers(pid: i32) -> (Vec<String>, bool) {
    let mut inodes = BTreeSet::new();
    if let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(n.to_string());
                }
            }
        }
    }
    let mut remotes = Vec::new();
    let mut udp = false;
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !inodes.contains(f[9]) {
                continue;
            }
            udp |= table.starts_with("udp");
            remotes.push(hex_addr(f[2]));
        }
    }
    (remotes, udp)
}

/// `0100007F:1F90` (or the 32-hex-digit IPv6 form) as `127.0.0.1:8080`.
fn hex_addr(s: &str) -> String {
    let (ip, port) = s.split_once(':').unwrap_or((s, "0"));
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    let bytes: Vec<u8> = (0..ip.len() / 2)
        .filter_map(|i| u8::from_str_radix(&ip[2 * i..2 * i + 2], 16).ok())
        .collect();
    // /proc prints each 32-bit word in host (little-endian) order.
    let words: Vec<u8> = bytes
        .chunks(4)
        .flat_map(|w| w.iter().rev().copied())
        .collect();
    match words.len() {
        4 => format!("{}.{}.{}.{}:{port}", words[0], words[1], words[2], words[3]),
        16 => {
            let ip = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&words[..]).unwrap());
            match ip.to_ipv4_mapped() {
                Some(v4) => format!("{v4}:{port}"),
                None => format!("[{ip}]:{port}"),
            }
        }
        _ => s.to_string(),
    }
}

/// A remote address that is loopback, or unset (a listening or unconnected socket).
fn stays_local(addr: &str) -> bool {
    addr.starts_with("127.")
        || addr.starts_with("0.0.0.0:")
        || addr.starts_with("[::]:")
        || addr.starts_with("[::1]:")
}

#[test]
fn relay_only_devices_pair_and_sync_through_a_local_relay() {
    let relay = TestRelay::start();
    let mut a = Device::via_relay("ra", &relay, false);
    let mnt = a.dir.mnt_str();
    a.spawn_daemon(&["mount", "--init", &mnt]);
    let ticket = a.invite("10m");
    let mut b = Device::via_relay("rb", &relay, false);
    let mnt = b.dir.mnt_str();
    b.spawn_daemon(&["join", &ticket, &mnt]);

    fs::write(a.path("hello.txt"), b"over the relay\n").unwrap();
    wait_until(&[&a, &b], "hello.txt on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("hello.txt"), b"over the relay\n")
    });
    let hash = write_random(&a.path("big.bin"), 50 << 20, 15);
    wait_for_big_file(&[&a, &b], &b.path("big.bin"), 50 << 20, &hash, BIG_DEADLINE);
    fs::remove_file(a.path("hello.txt")).unwrap();
    wait_until(&[&a, &b], "the delete on B", SYNC_DEADLINE, |_| {
        !b.path("hello.txt").exists()
    });

    // Both sides report the relay as the path, and nobody learned an IP address.
    let b_id = b.device_id();
    let line = a.peer_line(&b_id).expect("A lists B");
    assert!(line.contains(&format!("via relay {}", relay.url)), "{line}");
    let out = a.run_ok(&["peers"]);
    let own = out
        .lines()
        .find(|l| l.contains("this device"))
        .unwrap_or_default();
    let listed = own.rsplit(' ').next().unwrap_or_default();
    assert!(
        !listed.is_empty() && listed.split(',').all(|x| x.starts_with("http://")),
        "a relay-only device announces only its relay, no IP address: {own}"
    );
    // Nothing but loopback, and no UDP socket at all (relay-only opens none).
    for d in [&a, &b] {
        let (remotes, udp) = socket_peers(d.pid());
        assert!(!udp, "[{}] relay-only daemon holds a UDP socket", d.name);
        for r in &remotes {
            assert!(stays_local(r), "[{}] socket to {r}", d.name);
        }
        assert!(
            remotes.iter().any(|r| relay.url.contains(r.as_str())),
            "[{}] no connection to the relay among {remotes:?}",
            d.name
        );
    }
    // A used ticket is refused through the relay exactly as over a direct path: with nothing
    // else pending, A lets no stranger into pairing at all.
    let c = Device::via_relay("rc", &relay, false);
    let out = c.run(&["join", &ticket, "--no-mount"], START_DEADLINE);
    assert!(!out.ok(), "a used ticket was accepted through the relay");
    assert!(
        out.stderr.contains("not accepting new devices") && out.stderr.contains("used"),
        "{}",
        out.stderr
    );

    b.stop();
    a.stop();
}

#[test]
fn with_direct_paths_allowed_the_relay_gives_way_and_a_moved_device_is_found_again() {
    let relay = TestRelay::start();
    let mut a = Device::via_relay("da", &relay, true);
    let mnt = a.dir.mnt_str();
    a.spawn_daemon(&["mount", "--init", &mnt]);
    let ticket = a.invite("10m");
    let mut b = Device::via_relay("db", &relay, true);
    let mnt = b.dir.mnt_str();
    b.spawn_daemon(&["join", &ticket, &mnt]);
    let b_id = b.device_id();

    fs::write(a.path("one.txt"), b"1").unwrap();
    wait_until(&[&a, &b], "one.txt on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("one.txt"), b"1")
    });
    wait_until(
        &[&a, &b],
        "a direct path from A to B",
        SYNC_DEADLINE,
        |why| {
            let line = a.peer_line(&b_id).unwrap_or_default();
            *why = line.clone();
            line.contains("via direct 127.0.0.1:")
        },
    );

    // B comes back on another port; A finds it through the relay without a new ticket.
    b.stop();
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    b.dir
        .env
        .push(("CAIRN_BIND".into(), format!("127.0.0.1:{port}")));
    b.start();
    fs::write(a.path("two.txt"), b"2").unwrap();
    wait_until(
        &[&a, &b],
        "two.txt on B after its move",
        SYNC_DEADLINE,
        |_| content_is(&b.path("two.txt"), b"2"),
    );
    wait_until(&[&a, &b], "A knows B's new port", SYNC_DEADLINE, |why| {
        let line = a.peer_line(&b_id).unwrap_or_default();
        *why = line.clone();
        line.contains(&format!("127.0.0.1:{port}"))
    });
    for d in [&a, &b] {
        for r in socket_peers(d.pid()).0 {
            assert!(stays_local(&r), "[{}] socket to {r}", d.name);
        }
    }
    b.stop();
    a.stop();
}

/// The relay dies while B is fetching a large file over it (relay-only, so nothing else can
/// carry it) and comes back on the same port: B finishes by itself, byte-identical, and
/// keeps every blob it had fetched before the outage (nothing fetched twice).
#[test]
fn a_relay_outage_mid_transfer_resumes_without_refetching() {
    let mut relay = TestRelay::start();
    let mut a = Device::via_relay("oa", &relay, false);
    let mnt = a.dir.mnt_str();
    a.spawn_daemon(&["mount", "--init", &mnt]);
    let ticket = a.invite("10m");
    let mut b = Device::via_relay("ob", &relay, false);
    let mnt = b.dir.mnt_str();
    b.spawn_daemon(&["join", &ticket, &mnt]);
    fs::write(a.path("warmup.txt"), b"x\n").unwrap();
    wait_until(&[&a, &b], "warm-up file on B", SYNC_DEADLINE, |_| {
        b.path("warmup.txt").exists()
    });

    const BIG: usize = 100 << 20;
    let before = b.store_files().len();
    let hash = write_random(&a.path("big.bin"), BIG, 21);
    // ~1,600 blobs of ~64 KiB: cut the relay once B holds 200 of them (a tight poll).
    let deadline = Instant::now() + BIG_DEADLINE;
    while b.store_files().len() < before + 200 {
        assert!(
            Instant::now() < deadline,
            "B does not fetch over the relay\n{}",
            logs_of(&[&a, &b])
        );
        sleep(Duration::from_millis(5));
    }
    relay.restart_after(Duration::from_secs(3));
    let kept = b.store_files();
    let had = kept.len() - before;

    wait_for_big_file(
        &[&a, &b],
        &b.path("big.bin"),
        BIG as u64,
        &hash,
        BIG_DEADLINE,
    );
    let total = b.store_files().len() - before;
    eprintln!("B had {had} of {total} blobs when the relay died");
    assert!(
        had + 10 < total,
        "B had every blob ({had} of {total}) before the outage ended; nothing was tested"
    );
    let now = b.store_files();
    let refetched = kept.iter().filter(|(p, v)| now.get(*p) != Some(*v)).count();
    assert_eq!(
        refetched,
        0,
        "{refetched} of the {} blobs B had were fetched again or vanished\n{}",
        kept.len(),
        logs_of(&[&a, &b])
    );
    // Still relay-only after the outage: the relay is the path B reports.
    let line = b.peer_line(&a.device_id()).expect("B lists A");
    assert!(line.contains(&format!("via relay {}", relay.url)), "{line}");
    b.stop();
    a.stop();
}

// ---------------------------------------------------------------------------------------
// Revocation: key epochs, and every way back refused.

/// `DEVICE_ID@IP:PORT` of a running device, for `cairn recover --from`.
fn recover_from(d: &Device) -> String {
    let own = d
        .run_ok(&["peers"])
        .lines()
        .find(|l| l.contains("this device"))
        .map(str::to_string)
        .expect("peers lists this device");
    let addr = own
        .rsplit(' ')
        .next()
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    format!("{}@{addr}", d.device_id())
}

/// `cairn recover --from FROM --no-mount` on `d` with `phrase` on stdin; the daemon it starts
/// on success keeps running, so give up after `limit` and report what happened.
fn try_recover(d: &mut Device, from: &str, phrase: &str) -> CmdOut {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = d
        .dir
        .command(&["recover", "--from", from, "--no-mount"])
        .stdin(Stdio::piped())
        .stdout(File::create(&o).unwrap())
        .stderr(File::create(&e).unwrap())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{phrase}\n").as_bytes())
        .unwrap();
    let status = match wait_deadline(&mut child, Duration::from_secs(30)) {
        Some(s) => s,
        None => {
            // Still running: it joined and now syncs. Stop it (SIGTERM flushes and exits).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap()
        }
    };
    CmdOut {
        status,
        stdout: fs::read_to_string(&o).unwrap_or_default(),
        stderr: fs::read_to_string(&e).unwrap_or_default(),
    }
}

/// Ids (hex) of the blobs in a device's store.
fn blob_names(d: &Device) -> BTreeSet<String> {
    d.store_files().into_keys().collect()
}

/// A, B and C are members; A removes B. Nothing written afterwards is readable with anything
/// in B's state directory, and no way back works: B's old key, a fresh device with the phrase
/// computed from B's `vault.secret`, a device joining with a ticket B printed before. The new
/// phrase A printed recovers a fresh device; C and A agree on the member list throughout.
#[test]
fn a_removed_device_reads_nothing_new_and_cannot_come_back() {
    let a = Device::init("A", Some(50));
    let mut b = Device::join("B", &a, Some(50));
    let c = Device::join("C", &a, Some(50));
    fs::write(a.path("before.txt"), b"everyone saw this\n").unwrap();
    wait_until(
        &[&a, &b, &c],
        "before.txt on B and C",
        SYNC_DEADLINE,
        |_| {
            content_is(&b.path("before.txt"), b"everyone saw this\n")
                && content_is(&c.path("before.txt"), b"everyone saw this\n")
        },
    );
    let b_id = b.device_id();
    let b_ticket = b.invite("10m");
    let old_phrase = b.run_ok(&["recovery-phrase", "--yes"]).trim().to_string();
    assert_eq!(old_phrase.split(' ').count(), 24, "{old_phrase}");
    // A thief's copy of B's whole state directory, taken before the removal.
    let stolen = tempfile::tempdir().unwrap();
    for f in ["vault.secret", "age.key", "device.key", "epochs.secret"] {
        let _ = fs::copy(b.vault_dir().join(f), stolen.path().join(f));
    }
    let known_before = blob_names(&a);

    let out = a.run_ok(&["remove-device", &b_id]);
    let new_phrase = out
        .lines()
        .skip_while(|l| !l.starts_with("new recovery phrase"))
        .nth(1)
        .unwrap_or_else(|| panic!("remove-device printed no new phrase: {out}"))
        .trim()
        .to_string();
    assert_eq!(new_phrase.split(' ').count(), 24);
    assert_ne!(new_phrase, old_phrase);
    b.kill9();

    // Written after the removal: a small file (inline in a tree node) and a chunked one.
    fs::write(a.path("after.txt"), b"not for B\n").unwrap();
    let hash = write_random(&a.path("after.bin"), 300 << 10, 5);
    wait_for_big_file(
        &[&a, &c],
        &c.path("after.bin"),
        300 << 10,
        &hash,
        BIG_DEADLINE,
    );
    wait_until(&[&a, &c], "after.txt on C", SYNC_DEADLINE, |_| {
        content_is(&c.path("after.txt"), b"not for B\n")
    });
    for d in [&a, &c] {
        let s = d.run_ok(&["status"]);
        assert!(s.contains("key epoch: 1 "), "[{}] {s}", d.name);
    }

    // B's keys against every blob written since: no header opens with its age key, no tree
    // node with its epochs, and the new nodes name an epoch B does not hold.
    let new_blobs: Vec<String> = c
        .store_files()
        .into_keys()
        .filter(|id| !known_before.contains(id))
        .collect();
    let c_store = cairn_store::BlobStore::open(c.vault_dir().join("store")).unwrap();
    assert!(!new_blobs.is_empty());
    let identity: cairn_crypto::AgeIdentity = fs::read_to_string(stolen.path().join("age.key"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let vault_secret: [u8; 32] = fs::read(stolen.path().join("vault.secret"))
        .unwrap()
        .try_into()
        .unwrap();
    let b_keys = std::sync::Arc::new(cairn_crypto::KeyEpochs::new(
        &cairn_crypto::VaultSecret::from_bytes(vault_secret),
    ));
    assert!(!stolen.path().join("epochs.secret").exists() || b_keys.all().len() == 1);
    let nodes = cairn_store::EpochMetaSealer::new(b_keys.clone(), "tree node");
    let mut foreign_epoch = 0;
    for p in &new_blobs {
        let bytes = c_store.get(&p.parse().unwrap()).unwrap();
        assert!(
            cairn_crypto::open_sealed(&identity, &bytes).is_err(),
            "B's age key opens {p:?}"
        );
        assert!(
            nodes.open(&bytes).is_err(),
            "B's keys open the tree node {p:?}"
        );
        if let Some(e) = cairn_store::sealed_epoch(&bytes) {
            assert!(!b_keys.contains(&e));
            foreign_epoch += 1;
        }
        let plain = b"not for B";
        assert!(!bytes.windows(plain.len()).any(|w| w == plain));
    }
    assert!(
        foreign_epoch > 0,
        "no new blob is sealed under the new epoch"
    );

    // 1. B comes back with its old key: refused everywhere, gets nothing new.
    let b_blobs = blob_names(&b);
    let mut b_sync = b.dir.logged(&["sync"]).spawn().unwrap();
    sleep(Duration::from_secs(8));
    let _ = unsafe { libc::kill(b_sync.id() as i32, libc::SIGTERM) };
    let _ = b_sync.wait();
    let got: Vec<String> = blob_names(&b).difference(&b_blobs).cloned().collect();
    assert!(
        got.iter()
            .all(|n| !new_blobs.iter().any(|p| p.ends_with(n))),
        "B fetched blobs written after its removal: {got:?}"
    );

    // Recovery windows open on A, so what refuses below is the epoch, not the window.
    a.run_ok(&["allow-recovery", "--for", "10m"]);
    let from = recover_from(&a);

    // 2. A fresh device with the phrase computed from B's vault.secret.
    let mut thief = Device::new("thief", None);
    let out = try_recover(&mut thief, &from, &old_phrase);
    assert!(
        !out.ok(),
        "the old phrase recovered a device: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("refused") || out.stderr.contains("recovery"),
        "{}",
        out.stderr
    );
    assert!(!thief.vault_dir().join("vault.secret").exists());

    // 3. A device joining with the ticket B printed before its removal (B answers it).
    let mut b_again = b.dir.logged(&["sync"]).spawn().unwrap();
    let mut j = Device::new("J", None);
    let jmnt = j.dir.mnt_str();
    let joined = j.dir.logged(&["join", &b_ticket, &jmnt]).spawn().unwrap();
    j.child = Some(joined);
    sleep(Duration::from_secs(8));
    assert!(
        !j.path("after.txt").exists(),
        "a device invited by removed B got data written after the removal"
    );
    let _ = unsafe { libc::kill(b_again.id() as i32, libc::SIGTERM) };
    let _ = b_again.wait();
    if let Some(mut child) = j.child.take() {
        let _ = kill_and_detach(&mut child, &j.dir.mnt);
    }

    // Neither A nor C lists any of them as a member.
    for d in [&a, &c] {
        let peers = d.peers().join("\n");
        assert!(!peers.contains(&b_id), "[{}] lists B: {peers}", d.name);
    }

    // 4. The new phrase recovers a fresh device through A, with everything.
    let mut r = Device::new("R", Some(50));
    let out = try_recover(&mut r, &from, &new_phrase);
    assert!(
        r.vault_dir().join("vault.secret").exists(),
        "the new phrase did not recover: {} {}",
        out.stderr,
        logs_of(&[&a])
    );
    let rmnt = r.dir.mnt_str();
    r.spawn_daemon(&["mount", &rmnt]);
    wait_until(&[&a, &r], "everything on R", SYNC_DEADLINE, |_| {
        content_is(&r.path("before.txt"), b"everyone saw this\n")
            && content_is(&r.path("after.txt"), b"not for B\n")
    });
    assert!(r.run_ok(&["status"]).contains("key epoch: 1 "));
}

/// Partition {A, C} | {B, D}: A removes B while B removes A. When C and D meet again, both
/// removals stand on both (the rule is the same whatever order the records arrive in), so the
/// remaining members agree on the member list, and on the key epoch they write under: a
/// fresh one, since each epoch 1 was held by a device that is now removed.
#[test]
fn members_that_remove_each_other_while_partitioned_agree_afterwards() {
    let mut a = Device::init("A", Some(50));
    let mut b = Device::join("B", &a, Some(50));
    let mut c = Device::join("C", &a, Some(50));
    let mut d = Device::join("D", &a, Some(50));
    fs::write(a.path("x.txt"), b"x").unwrap();
    wait_until(&[&a, &b, &c, &d], "x.txt everywhere", SYNC_DEADLINE, |_| {
        [&b, &c, &d]
            .iter()
            .all(|n| content_is(&n.path("x.txt"), b"x"))
    });
    let ids: Vec<String> = [&a, &b, &c, &d].iter().map(|n| n.device_id()).collect();
    let (a_id, b_id, c_id, d_id) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let lists = |n: &Device, id: &str| n.peers().iter().any(|l| l.starts_with(id));

    // {A, C} alone: A removes B; C hears it.
    b.stop();
    d.stop();
    a.run_ok(&["remove-device", b_id]);
    wait_until(&[&a, &c], "C drops B", SYNC_DEADLINE, |_| !lists(&c, b_id));
    a.stop();
    c.stop();
    // {B, D} alone: B removes A; D hears it.
    b.start();
    d.start();
    b.run_ok(&["remove-device", a_id]);
    wait_until(&[&b, &d], "D drops A", SYNC_DEADLINE, |_| !lists(&d, a_id));
    b.stop();
    // Healed: C and D meet. Both removals stand on both.
    c.start();
    wait_until(
        &[&c, &d],
        "C and D drop both A and B",
        SYNC_DEADLINE,
        |why| {
            let (pc, pd) = (c.peers(), d.peers());
            *why = format!("C: {pc:?} D: {pd:?}");
            [a_id, b_id].iter().all(|id| {
                !pc.iter()
                    .chain(pd.iter())
                    .any(|l| l.starts_with(id.as_str()))
            }) && lists(&c, d_id)
                && lists(&d, c_id)
        },
    );
    let epoch_of = |n: &Device| {
        n.run_ok(&["status"])
            .lines()
            .find(|l| l.starts_with("key epoch:"))
            .map(str::to_string)
            .unwrap_or_default()
    };
    wait_until(
        &[&c, &d],
        "C and D write under one epoch",
        SYNC_DEADLINE,
        |why| {
            let (ec, ed) = (epoch_of(&c), epoch_of(&d));
            *why = format!("C: {ec} D: {ed}");
            // Both epoch-1s (one per removal) were held by a removed device: each side
            // rotated again, and the same epoch 2 wins on both.
            ec == ed && ec.starts_with("key epoch: 2 ")
        },
    );
    // And they still sync with each other.
    fs::write(c.path("after.txt"), b"c and d").unwrap();
    wait_until(&[&c, &d], "after.txt on D", SYNC_DEADLINE, |_| {
        content_is(&d.path("after.txt"), b"c and d")
    });
    c.stop();
    d.stop();
}

// ---------------------------------------------------------------------------------------
// a hostile member
// ---------------------------------------------------------------------------------------

/// A device's vault state opened as a library while its daemon is stopped: its real device
/// key, store and registry, so the test can sign what a malicious build of cairn would.
fn open_state(d: &Device) -> cairn_daemon::OpenVault {
    let state = cairn_daemon::VaultState::load(&d.dir.data, "default")
        .unwrap_or_else(|e| panic!("[{}] loading the vault state: {e:#}", d.name));
    cairn_daemon::OpenVault::open(&state)
        .unwrap_or_else(|e| panic!("[{}] opening the vault: {e:#}", d.name))
}

/// A sealed snapshot header of `m`'s current engine state naming `device` as its author,
/// stored in `m`'s store; returns its id and the sealed bytes.
fn craft_header(
    m: &cairn_daemon::OpenVault,
    device: cairn_crypto::DeviceId,
    created_ms: u64,
) -> (cairn_vault::SnapshotId, Vec<u8>) {
    let engine = m.engine();
    let head = engine.head().expect("M has published before");
    let header = cairn_vault::SnapshotHeader {
        vault: m.vault_id,
        root: engine.root(),
        parents: vec![head.id],
        device,
        clock: engine.clock(),
        seq: head.header.seq + 1,
        created_ms,
    };
    let id = cairn_vault::write_snapshot(engine.stores(), engine.keys(), &header).unwrap();
    let sealed = engine.stores().blobs.get(&id.0).unwrap().unwrap();
    m.blobs.sync().unwrap();
    (id, sealed)
}

/// Reads `p` on a helper thread: the outcome, or a panic if the read hangs.
fn read_with_deadline(devs: &[&Device], p: &Path) -> std::io::Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = p.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(fs::read(&path));
    });
    rx.recv_timeout(SYNC_DEADLINE).unwrap_or_else(|_| {
        panic!(
            "reading {p:?} hung for {SYNC_DEADLINE:?}\n{}",
            logs_of(devs)
        )
    })
}

/// `cairn status --json`'s peer faults as (device, kind) pairs, with their counts.
fn peer_faults(d: &Device) -> Vec<(String, String, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&d.run_ok(&["status", "--json"])).expect("status --json is JSON");
    json["peer_faults"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    (
                        f["device"].as_str().unwrap_or_default().to_string(),
                        f["kind"].as_str().unwrap_or_default().to_string(),
                        f["count"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// V and a member M that turns hostile: M signs (with its real device key) files whose
/// chunks are shorter or longer than their manifest says and a file whose size lies about
/// its chunk list, then a snapshot header naming V as its author, then two different
/// snapshots under one revision. V's mount keeps serving every other file byte-identical,
/// the bad files fail with EIO (promptly, no hang, no crash), and `cairn status` on V names
/// M for each kind of misbehaviour.
#[test]
fn a_hostile_member_cannot_break_the_other_members_mount() {
    use cairn_registry::{Payload, Registry, RegistryEntry, Revision};
    use cairn_store::{ChunkRef, ChunkSealer, FileManifest};
    use cairn_vault::{Attrs, Change, Content, VaultPath, content_from_manifest};

    let v = Device::init("V", Some(50));
    let mut m = Device::join("M", &v, Some(50));
    let m_id = m.device_id();

    // Honest files from both sides, synced.
    let notes = b"notes from V\n".to_vec();
    fs::write(v.path("notes.txt"), &notes).unwrap();
    let big_hash = write_random(&v.path("big.bin"), 600_000, 7);
    let from_m = b"written by M while it was honest\n".to_vec();
    fs::write(m.path("from-m.txt"), &from_m).unwrap();
    wait_until(&[&v, &m], "honest files everywhere", SYNC_DEADLINE, |why| {
        content_is(&v.path("from-m.txt"), &from_m)
            && content_is(&m.path("notes.txt"), &notes)
            && all_equal(&[&v, &m], why)
    });
    let good = |why: &mut String| -> bool {
        let big_ok = hash_file(&v.path("big.bin")).is_ok_and(|h| h == big_hash);
        if !big_ok {
            *why = "big.bin differs on V".into();
        }
        big_ok
            && content_is(&v.path("notes.txt"), &notes)
            && content_is(&v.path("from-m.txt"), &from_m)
    };

    // (a, b) M publishes files that contradict their own manifests.
    m.unmount();
    {
        let ov = open_state(&m);
        let sealer = ChunkSealer::new(&ov.keys.current_key().1);
        let chunk = |plain: &[u8], claimed: u32| {
            let s = sealer.seal(plain);
            ov.stores.blobs.put(&s.bytes).unwrap();
            ChunkRef {
                id: s.id,
                len: claimed,
                key: s.key,
            }
        };
        let data = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
        };
        let short = chunk(&data(1_000, 1), 3_000);
        let long = chunk(&data(3_000, 2), 1_000);
        let refs: Vec<ChunkRef> = (0..49).map(|i| chunk(&data(100, 10 + i), 100)).collect();
        let manifest = FileManifest::new(refs).unwrap();
        let (list, real) =
            content_from_manifest(ov.stores.blobs.as_ref(), &sealer, &manifest).unwrap();
        assert_eq!(real, 4_900);
        let attrs = || Attrs {
            mode: 0o644,
            mtime_ns: 1_000_000_000,
            xattrs: Default::default(),
        };
        let write = |size: u64, content: Content| Change::Write {
            attrs: attrs(),
            size,
            content,
        };
        let mut engine = ov.engine();
        engine
            .commit(
                [
                    (
                        VaultPath::new("short-chunk.bin").unwrap(),
                        write(3_000, Content::Chunks(vec![short])),
                    ),
                    (
                        VaultPath::new("long-chunk.bin").unwrap(),
                        write(1_000, Content::Chunks(vec![long])),
                    ),
                    (
                        VaultPath::new("lying-size.bin").unwrap(),
                        write(100_000, list),
                    ),
                ],
                cairn_daemon::now_ms(),
            )
            .unwrap();
        ov.blobs.sync().unwrap();
        engine
            .publish(&ov.registry, cairn_daemon::now_ms())
            .unwrap();
    }
    m.start();
    let bad = ["short-chunk.bin", "long-chunk.bin", "lying-size.bin"];
    wait_until(
        &[&v, &m],
        "M's bad files listed on V",
        SYNC_DEADLINE,
        |why| {
            let missing: Vec<&str> = bad
                .iter()
                .copied()
                .filter(|b| fs::metadata(v.path(b)).is_err())
                .collect();
            *why = format!("not listed yet: {missing:?}");
            missing.is_empty()
        },
    );
    for b in bad {
        match read_with_deadline(&[&v, &m], &v.path(b)) {
            Ok(bytes) => panic!(
                "{b}: read {} bytes from a file that contradicts its manifest\n{}",
                bytes.len(),
                logs_of(&[&v, &m])
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{b}: {e}"),
        }
    }
    let mut why = String::new();
    assert!(
        good(&mut why),
        "after the bad reads: {why}\n{}",
        logs_of(&[&v, &m])
    );
    wait_until(
        &[&v, &m],
        "V's status names M for bad files",
        SYNC_DEADLINE,
        |why| {
            let f = peer_faults(&v);
            *why = format!("{f:?}");
            f.iter()
                .any(|(d, k, n)| *d == m_id && k == "bad-file" && *n >= bad.len() as u64)
        },
    );
    // A new honest file on V still reaches M: the mounts keep serving and syncing.
    fs::write(v.path("after.txt"), b"still syncing\n").unwrap();
    wait_until(&[&v, &m], "after.txt on M", SYNC_DEADLINE, |_| {
        content_is(&m.path("after.txt"), b"still syncing\n")
    });

    // (c) A snapshot header naming V, announced under M's signature, and (d) two different
    // snapshots under one revision. M is stopped; the foreign header and one side of the
    // equivocation go straight into V's registry and store (as if pushed by a modified M),
    // the other side stays in M's registry for M's daemon to deliver when it comes back.
    m.unmount();
    let v_registry = Registry::open(v.vault_dir().join("registry.sqlite")).unwrap();
    let v_store = cairn_store::BlobStore::open(v.vault_dir().join("store")).unwrap();
    let (foreign, lo, hi) = {
        let ov = open_state(&m);
        let v_dev: cairn_crypto::DeviceId = v.device_id().parse().unwrap();
        let r = ov
            .registry
            .get(&ov.vault_id, &ov.device_id)
            .unwrap()
            .expect("M has a head")
            .revision
            .0;
        let (fid, fsealed) = craft_header(&ov, v_dev, cairn_daemon::now_ms());
        let foreign =
            RegistryEntry::sign(&ov.key, ov.vault_id, Revision(r + 1), Payload::from(fid));
        v_store
            .put(&fsealed, cairn_store::Durability::Immediate)
            .unwrap();

        // Sealing is randomized: one header sealed twice gives two payloads.
        let now = cairn_daemon::now_ms();
        let (x, xs) = craft_header(&ov, ov.device_id, now);
        let (y, ys) = craft_header(&ov, ov.device_id, now);
        let ex = RegistryEntry::sign(&ov.key, ov.vault_id, Revision(r + 2), Payload::from(x));
        let ey = RegistryEntry::sign(&ov.key, ov.vault_id, Revision(r + 2), Payload::from(y));
        let ((lo, _), (hi, hs)) = if ex.payload < ey.payload {
            ((ex, xs), (ey, ys))
        } else {
            ((ey, ys), (ex, xs))
        };
        v_store
            .put(&hs, cairn_store::Durability::Immediate)
            .unwrap();
        v_store.sync().unwrap();
        ov.registry.put(&ov.vault_id, &lo).unwrap();
        (foreign, lo, hi)
    };
    v_registry.put(&foreign.vault, &foreign).unwrap();
    wait_until(
        &[&v, &m],
        "V's status names M for a foreign header",
        SYNC_DEADLINE,
        |why| {
            let f = peer_faults(&v);
            *why = format!("{f:?}");
            f.iter()
                .any(|(d, k, _)| *d == m_id && k == "foreign-snapshot")
        },
    );
    v_registry.put(&hi.vault, &hi).unwrap();
    m.start();
    wait_until(
        &[&v, &m],
        "V's status names M for equivocation",
        SYNC_DEADLINE,
        |why| {
            let f = peer_faults(&v);
            *why = format!("{f:?}");
            f.iter().any(|(d, k, _)| *d == m_id && k == "equivocation")
        },
    );
    // Both ends hold the same head for M's equivocated revision: the lower payload.
    let ev = v_registry.equivocations(&lo.vault).unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].low.clone(), ev[0].high.clone()),
        (lo.clone(), hi.clone())
    );
    let held = v_registry.log(&lo.vault, &lo.device).unwrap();
    assert!(
        held.contains(&(lo.revision, lo.payload)) && !held.contains(&(hi.revision, hi.payload)),
        "V keeps the lower payload for revision {}: {held:?}",
        lo.revision
    );

    // Through all of it V kept serving: good files identical, bad ones still EIO, and the
    // human status names M.
    let mut why = String::new();
    assert!(good(&mut why), "at the end: {why}\n{}", logs_of(&[&v, &m]));
    for b in bad {
        let e = read_with_deadline(&[&v, &m], &v.path(b)).expect_err(b);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{b}: {e}");
    }
    let human = v.run_ok(&["status"]);
    assert!(
        human.contains("misbehaving devices") && human.contains(&m_id),
        "`cairn status` on V does not name M ({m_id}):\n{human}"
    );
}

// ---------------------------------------------------------------------------------------
// living with a synced folder: the mass-delete guard, ignore rules, conflicts
// ---------------------------------------------------------------------------------------

impl Device {
    /// `cairn held --json`: the files count of each held deletion.
    fn held_files(&self) -> Vec<u64> {
        let out = self.run_ok(&["held", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("[{}] `cairn held --json`: {e}: {out}", self.name));
        v.as_array()
            .expect("a list")
            .iter()
            .map(|h| h["files"].as_u64().expect("files"))
            .collect()
    }

    fn root_status(&self) -> String {
        String::from_utf8_lossy(
            &common::getxattr(&self.dir.mnt, "user.cairn.status").unwrap_or_default(),
        )
        .into_owned()
    }
}

/// `dirs` directories of `per` small files under `top`, written through the mount.
fn make_tree(d: &Device, top: &str, dirs: usize, per: usize) {
    for i in 0..dirs {
        let dir = d.path(&format!("{top}/d{i:02}"));
        fs::create_dir_all(&dir).unwrap();
        for j in 0..per {
            fs::write(dir.join(format!("f{j:03}.txt")), format!("{top} {i} {j}\n")).unwrap();
        }
    }
}

/// Every file of [`make_tree`] readable with its content, and nothing else in `top`.
fn tree_intact(d: &Device, top: &str, dirs: usize, per: usize, why: &mut String) -> bool {
    for i in 0..dirs {
        let dir = d.path(&format!("{top}/d{i:02}"));
        let n = fs::read_dir(&dir).map(|r| r.count()).unwrap_or(0);
        if n != per {
            *why = format!(
                "{}: {} holds {n} entries, want {per}",
                d.name,
                dir.display()
            );
            return false;
        }
        for j in [0, per / 2, per - 1] {
            let want = format!("{top} {i} {j}\n");
            if !content_is(&dir.join(format!("f{j:03}.txt")), want.as_bytes()) {
                *why = format!("{}: {top}/d{i:02}/f{j:03}.txt unreadable or wrong", d.name);
                return false;
            }
        }
    }
    true
}

/// An `rm -rf` of 3,000 files is held on the deleting device and on its peer, with every
/// file still readable on both; other writes keep syncing meanwhile; `reject` (on the peer)
/// brings the files back everywhere, the deleting device included. A second `rm -rf` is held
/// again, survives a restart of both daemons, and `approve` deletes it everywhere but for a
/// file written into the held tree meanwhile (an edit wins over a deletion).
#[test]
fn a_mass_delete_is_held_everywhere_until_approved_or_rejected() {
    let (dirs, per) = (30, 100);
    let total = (dirs * per) as u64;
    let mut a = Device::init("A", Some(300));
    let mut b = Device::join("B", &a, Some(300));
    let a_short = a.device_id()[..8].to_string();
    make_tree(&a, "big", dirs, per);
    fs::write(a.path("keep.txt"), b"keep\n").unwrap();
    let both = [&a, &b];
    wait_until(&both, "the tree reaches B", BIG_DEADLINE, |why| {
        b.path("keep.txt").exists() && tree_intact(&b, "big", dirs, per, why)
    });

    // A too-large deletion (an `rm -rf` that ran into its own hold may stop with ENOTEMPTY:
    // the files it deleted first came back).
    let _ = fs::remove_dir_all(a.path("big"));
    for d in both {
        wait_until(&both, "the deletion is held", SYNC_DEADLINE, |why| {
            let held = d.held_files();
            *why = format!("{} holds {held:?}", d.name);
            held.iter().sum::<u64>() == total
        });
    }
    for d in both {
        wait_until(&both, "held files stay readable", SYNC_DEADLINE, |why| {
            tree_intact(d, "big", dirs, per, why)
        });
        let note = d.root_status();
        assert!(
            note.starts_with("held") && note.contains(&a_short),
            "[{}] root status {note:?} does not name the held deletion by {a_short}",
            d.name
        );
        let status: serde_json::Value =
            serde_json::from_str(&d.run_ok(&["status", "--json"])).unwrap();
        let files: u64 = status["held"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["files"].as_u64().unwrap())
            .sum();
        assert_eq!(files, total, "[{}] status --json: {status}", d.name);
    }
    fs::write(a.path("during.txt"), b"written while held\n").unwrap();
    wait_until(
        &both,
        "writes keep syncing while held",
        SYNC_DEADLINE,
        |_| content_is(&b.path("during.txt"), b"written while held\n"),
    );

    // Rejected on the peer: back everywhere, no longer held anywhere.
    b.run_ok(&["reject"]);
    wait_until(&both, "reject restores everywhere", SYNC_DEADLINE, |why| {
        both.iter().all(|d| d.held_files().is_empty())
            && tree_intact(&a, "big", dirs, per, why)
            && all_equal(&both, why)
    });
    assert_eq!(a.root_status(), "synced");

    // Deleted again: held again, and still held after both daemons restart.
    let _ = fs::remove_dir_all(a.path("big"));
    for d in both {
        wait_until(&both, "the second deletion is held", SYNC_DEADLINE, |why| {
            let held = d.held_files();
            *why = format!("{} holds {held:?}", d.name);
            held.iter().sum::<u64>() == total
        });
    }
    a.stop();
    b.stop();
    a.start();
    b.start();
    let both = [&a, &b];
    for d in both {
        assert_eq!(d.held_files().iter().sum::<u64>(), total, "[{}]", d.name);
        wait_until(
            &both,
            "held files readable after a restart",
            SYNC_DEADLINE,
            |why| tree_intact(d, "big", dirs, per, why),
        );
    }

    // A file written into a held directory (on the peer) is an edit: it wins over the
    // deletion, with the directories above it.
    fs::write(b.path("big/d07/late.txt"), b"late\n").unwrap();
    wait_until(
        &both,
        "a file made inside the hold syncs",
        SYNC_DEADLINE,
        |_| content_is(&a.path("big/d07/late.txt"), b"late\n"),
    );

    // Approved on the deleting device: gone everywhere, the rest untouched.
    a.run_ok(&["approve"]);
    wait_until(&both, "approve deletes everywhere", SYNC_DEADLINE, |why| {
        let gone = both.iter().all(|d| {
            !d.path("big/d00").exists()
                && !d.path("big/d07/f000.txt").exists()
                && d.held_files().is_empty()
        });
        gone && all_equal(&both, why)
    });
    for d in both {
        assert_eq!(fs::read(d.path("keep.txt")).unwrap(), b"keep\n");
        assert_eq!(fs::read(d.path("big/d07/late.txt")).unwrap(), b"late\n");
        assert_eq!(fs::read_dir(d.path("big")).unwrap().count(), 1);
        assert_eq!(d.root_status(), "synced");
    }
    assert_never(
        &both,
        "approved files come back",
        Duration::from_secs(5),
        || both.iter().any(|d| d.path("big/d00").exists()),
    );
}

fn status_of(d: &Device, p: &str) -> String {
    String::from_utf8_lossy(&common::getxattr(&d.path(p), "user.cairn.status").unwrap_or_default())
        .into_owned()
}

/// `.cairnignore` with `target/` and `*.o`: such files never reach the peer, stay readable
/// and writable where they were made, and say `ignored`. Changing the rules applies to the
/// files already there: unignored ones are published, newly ignored ones stop syncing but
/// are not deleted on the peer.
#[test]
fn ignored_paths_stay_on_their_device_and_rule_changes_apply_to_existing_files() {
    let a = Device::init("A", Some(50));
    let b = Device::join("B", &a, Some(50));
    let both = [&a, &b];
    fs::write(a.path("notes.txt"), b"v1\n").unwrap();
    wait_until(&both, "notes.txt on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("notes.txt"), b"v1\n")
    });
    fs::write(a.path(".cairnignore"), b"target/\n*.o\n").unwrap();
    fs::create_dir_all(a.path("target/debug")).unwrap();
    fs::write(a.path("target/debug/app"), b"binary\n").unwrap();
    fs::write(a.path("main.o"), b"object\n").unwrap();
    fs::write(a.path("main.c"), b"int main;\n").unwrap();
    wait_until(&both, "the rules and main.c on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("main.c"), b"int main;\n")
            && content_is(&b.path(".cairnignore"), b"target/\n*.o\n")
    });
    assert_never(
        &both,
        "an ignored path reaches B",
        Duration::from_secs(4),
        || b.path("target").exists() || b.path("main.o").exists(),
    );
    // Usable on A, and said to be local.
    fs::OpenOptions::new()
        .append(true)
        .open(a.path("main.o"))
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    assert_eq!(fs::read(a.path("main.o")).unwrap(), b"object\nmore\n");
    assert_eq!(fs::read(a.path("target/debug/app")).unwrap(), b"binary\n");
    for p in ["main.o", "target", "target/debug/app"] {
        assert_eq!(status_of(&a, p), "ignored", "{p}");
    }
    wait_until(
        &both,
        "A counts its ignored paths and is synced",
        SYNC_DEADLINE,
        |why| {
            let s: serde_json::Value =
                serde_json::from_str(&a.run_ok(&["status", "--json"])).unwrap();
            *why = format!("status: {s}");
            s["state"] == "synced" && s["ignored"]["files"].as_u64() == Some(4)
        },
    );
    assert_eq!(status_of(&a, "main.c"), "synced");

    // New rules: `*.o` is published now, notes.txt stops syncing.
    fs::write(a.path(".cairnignore"), b"target/\nnotes.txt\n").unwrap();
    wait_until(
        &both,
        "an unignored file is published",
        SYNC_DEADLINE,
        |_| content_is(&b.path("main.o"), b"object\nmore\n"),
    );
    fs::write(a.path("notes.txt"), b"v2, local\n").unwrap();
    assert_never(
        &both,
        "a newly ignored file syncs",
        Duration::from_secs(4),
        || !content_is(&b.path("notes.txt"), b"v1\n"),
    );
    assert_eq!(fs::read(a.path("notes.txt")).unwrap(), b"v2, local\n");
    assert_eq!(status_of(&a, "notes.txt"), "ignored");
    assert!(!b.path("target").exists());
}

/// `cairn conflicts --json` on a device: (path, copy, copy's device, current's device).
fn conflicts_of(d: &Device) -> Vec<(String, String, String, String)> {
    let out = d.run_ok(&["conflicts", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["copy"].as_str().unwrap().to_string(),
                c["copy_side"]["device"].as_str().unwrap().to_string(),
                c["current"]["device"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Two devices edit one file while apart: the conflict shows in `cairn conflicts` on both
/// (both sides' device, time and size), and `resolve --keep theirs` leaves one file,
/// identical everywhere.
#[test]
fn a_conflict_is_listed_on_both_devices_and_resolved_everywhere() {
    let mut a = Device::init("A", Some(50));
    let mut b = Device::join("B", &a, Some(50));
    let (a_id, b_id) = (a.device_id(), b.device_id());
    fs::write(a.path("plan.txt"), b"base\n").unwrap();
    wait_until(&[&a, &b], "plan.txt on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("plan.txt"), b"base\n")
    });

    // Apart: B edits while A is down, then A edits while B is down.
    a.unmount();
    fs::write(b.path("plan.txt"), b"B's plan, longer\n").unwrap();
    b.unmount();
    a.start();
    let revs = a.revisions();
    fs::write(a.path("plan.txt"), b"A's plan\n").unwrap();
    wait_until(&[&a], "A publishes its edit", SYNC_DEADLINE, |_| {
        a.revisions() > revs
    });
    b.start();
    let both = [&a, &b];
    wait_until(
        &both,
        "the conflict is listed on both",
        SYNC_DEADLINE,
        |why| {
            let lists: Vec<_> = both.iter().map(|d| conflicts_of(d)).collect();
            *why = format!("{lists:?}");
            lists.iter().all(|l| {
                l.len() == 1
                    && l[0].0 == "plan.txt"
                    && [&l[0].2, &l[0].3].iter().any(|d| **d == a_id)
                    && [&l[0].2, &l[0].3].iter().any(|d| **d == b_id)
            }) && lists[0] == lists[1]
        },
    );
    let human = a.run_ok(&["conflicts"]);
    assert!(
        human.contains("plan.txt") && human.contains(&b_id[..8]) && human.contains("bytes"),
        "{human}"
    );

    // A keeps B's version.
    let out = a.run_ok(&["resolve", "plan.txt", "--keep", "theirs"]);
    assert!(out.contains("resolved plan.txt"), "{out}");
    wait_until(
        &both,
        "one file, identical everywhere",
        SYNC_DEADLINE,
        |why| {
            both.iter().all(|d| {
                content_is(&d.path("plan.txt"), b"B's plan, longer\n")
                    && fs::read_dir(d.path("")).unwrap().count() == 1
                    && conflicts_of(d).is_empty()
            }) && all_equal(&both, why)
        },
    );
}

// ---------------------------------------------------------------------------------------
// Vault-wide history and device names.

/// The snapshot directories of `.cairn/history/` (not the `latest-*` links).
fn history_folder(d: &Device) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(d.path(".cairn/history")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with("latest-"))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Waits until some snapshot directory in `d`'s `.cairn/history/` holds `rel` with content
/// `want`, and returns that directory.
fn wait_for_folder_version(devs: &[&Device], d: &Device, rel: &str, want: &[u8]) -> PathBuf {
    let mut found = None;
    wait_until(
        devs,
        "the version in .cairn/history",
        SYNC_DEADLINE,
        |why| {
            let dirs = history_folder(d);
            *why = format!("{dirs:?}");
            found = dirs.into_iter().find(|s| content_is(&s.join(rel), want));
            found.is_some()
        },
    );
    found.unwrap()
}

/// Neither the mount root's listing nor `ls -a` show `.cairn`, yet it opens by name.
fn assert_folder_hidden(d: &Device) {
    let names = readdir_raw(&d.dir.mnt).unwrap();
    assert!(
        !names.iter().any(|n| n == ".cairn"),
        "{names:?} on {}",
        d.name
    );
    let ls = std::process::Command::new("ls")
        .arg("-a")
        .arg(&d.dir.mnt)
        .output()
        .unwrap();
    assert!(ls.status.success());
    assert!(
        !String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l == ".cairn"),
        "ls -a on {}",
        d.name
    );
    assert!(fs::metadata(d.path(".cairn/history")).unwrap().is_dir());
}

/// Every kind of write inside a snapshot of `.cairn/history/` fails with EROFS.
fn assert_history_folder_is_read_only(d: &Device, snap: &Path) {
    let file = snap.join("doc.txt");
    let rofs = libc::EROFS;
    assert_errno(open_raw(&file, libc::O_WRONLY, 0), rofs);
    assert_errno(open_raw(&file, libc::O_RDWR, 0), rofs);
    assert_errno(open_raw(&file, libc::O_RDONLY | libc::O_TRUNC, 0), rofs);
    assert_errno(
        open_raw(&snap.join("new"), libc::O_WRONLY | libc::O_CREAT, 0o644),
        rofs,
    );
    assert_errno(fs::create_dir(snap.join("dir")), rofs);
    assert_errno(fs::create_dir(d.path(".cairn/history/dir")), rofs);
    assert_errno(fs::remove_file(&file), rofs);
    assert_errno(fs::remove_dir(snap), rofs);
    assert_errno(fs::rename(&file, snap.join("moved")), rofs);
    assert_errno(fs::rename(&file, d.path("out.txt")), rofs);
    assert_errno(fs::rename(d.path("doc.txt"), snap.join("in.txt")), rofs);
    assert_errno(fs::rename(d.path(".cairn"), d.path("cairn")), rofs);
    assert_errno(
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)),
        rofs,
    );
    assert_errno(common::utimensat(&file, (0, 0), (0, 0), 0), rofs);
    assert_errno(setxattr(&file, "user.x", b"1", 0), rofs);
    assert_errno(removexattr(&file, "user.x"), rofs);
    assert_errno(symlink("doc.txt", snap.join("ln")), rofs);
    assert_errno(fs::hard_link(&file, d.path("linked.txt")), rofs);
    assert_errno(fs::hard_link(d.path("doc.txt"), snap.join("ln2")), rofs);
    assert_eq!(fs::read(&file).unwrap(), b"version one\n");
}

/// History A made before B existed is listed (with A's name), shown per file and restorable
/// on B, and on C, recovered from the phrase: headers are sealed to the key epoch's shared
/// history identity, and the daemon fetches what the device lacks.
#[test]
fn history_made_on_one_device_is_listed_and_restorable_on_others() {
    let mut a = Device::new("A", Some(50));
    let init = a.run_ok(&["init", "--show-phrase", "--name", "alpha"]);
    let phrase = init
        .lines()
        .find_map(|l| l.strip_prefix("recovery phrase: "))
        .expect("init prints the phrase")
        .to_string();
    a.start();
    fs::write(a.path("doc.txt"), b"version one\n").unwrap();
    fs::write(a.path("gone.txt"), b"deleted later\n").unwrap();
    wait_until(&[&a], "A publishes", SYNC_DEADLINE, |_| a.revisions() >= 1);
    std::thread::sleep(Duration::from_millis(1100));
    let between = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(a.path("doc.txt"), b"version two\n").unwrap();
    fs::remove_file(a.path("gone.txt")).unwrap();
    wait_until(&[&a], "A publishes again", SYNC_DEADLINE, |_| {
        a.revisions() >= 2
    });
    let a_revs = a.revisions();

    // B joins afterwards, under its own name.
    let ticket = a.invite("10m");
    let mut b = Device::new("B", Some(50));
    let mnt = b.dir.mnt_str();
    b.spawn_daemon(&["join", &ticket, &mnt, "--name", "bravo"]);
    wait_until(&[&a, &b], "A's files on B", SYNC_DEADLINE, |_| {
        content_is(&b.path("doc.txt"), b"version two\n")
    });
    wait_until(&[&a, &b], "A's history on B", SYNC_DEADLINE, |why| {
        let out = b.run(
            &["log", "--device", "alpha", "--limit", "1000"],
            SYNC_DEADLINE,
        );
        *why = format!("{}{}", out.stdout, out.stderr);
        out.ok() && count_revisions(&out.stdout) >= a_revs
    });
    let log = b.run_ok(&["log", "--stat"]);
    assert!(log.contains("alpha ("), "{log}");
    assert!(log.contains("gone.txt"), "{log}");
    let versions = b.run_ok(&["log", "doc.txt"]);
    assert_eq!(count_revisions(&versions), 2, "{versions}");
    assert!(versions.contains("alpha ("), "{versions}");
    // Names travel both ways.
    wait_until(&[&a, &b], "names in peers", SYNC_DEADLINE, |why| {
        let (pa, pb) = (a.peers().join("\n"), b.peers().join("\n"));
        *why = format!("A: {pa}\nB: {pb}");
        pa.contains("bravo: ") && pb.contains("alpha: ")
    });
    b.run_ok(&["rename-device", "bravo-2"]);
    wait_until(&[&a, &b], "the new name on A", SYNC_DEADLINE, |why| {
        let pa = a.peers().join("\n");
        *why = pa.clone();
        pa.contains("bravo-2: ")
    });
    let other = b.run(&["rename-device", &a.device_id()[..12], "x"], SYNC_DEADLINE);
    assert!(
        !other.ok() && other.stderr.contains("only name itself"),
        "{}",
        other.stderr
    );

    // The same history as a folder inside B's mount: browsable, copyable, read-only.
    let v1 = wait_for_folder_version(&[&a, &b], &b, "doc.txt", b"version one\n");
    assert!(
        fs::read_link(b.path(".cairn/history/latest-alpha"))
            .is_ok_and(|t| !t.to_string_lossy().contains('/')),
        "latest-alpha is a link to a snapshot beside it"
    );
    assert_eq!(
        fs::read(b.path(".cairn/history/latest-alpha/doc.txt")).unwrap(),
        b"version two\n"
    );
    assert_eq!(
        fs::read(b.path(".cairn/history/latest-alpha/gone.txt")).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::NotFound)
    );
    fs::copy(v1.join("doc.txt"), b.path("doc-from-folder.txt")).unwrap();
    assert_eq!(
        fs::read(b.path("doc-from-folder.txt")).unwrap(),
        b"version one\n"
    );
    assert_history_folder_is_read_only(&b, &v1);
    assert_folder_hidden(&b);

    // B restores what A deleted before B existed, and an old version beside the current.
    b.run_ok(&["restore", "gone.txt"]);
    b.run_ok(&[
        "restore",
        "doc.txt",
        "--at",
        &format!("@{between}"),
        "--to",
        "doc-v1.txt",
    ]);
    wait_until(&[&a, &b], "B's restores on A", SYNC_DEADLINE, |_| {
        content_is(&a.path("gone.txt"), b"deleted later\n")
            && content_is(&a.path("doc-v1.txt"), b"version one\n")
            && content_is(&a.path("doc-from-folder.txt"), b"version one\n")
    });
    // The folder never travels: A's tree and the vault's history know no .cairn.
    assert_folder_hidden(&a);
    let everything = a.run_ok(&["log", "--stat", "--limit", "1000"]);
    assert!(
        !everything
            .lines()
            .map(str::trim)
            .any(|l| l == ".cairn" || l.starts_with(".cairn/")),
        "{everything}"
    );

    // C, recovered from the phrase, sees and restores the same history.
    a.run_ok(&["allow-recovery", "--for", "10m"]);
    let from = recover_from(&a);
    let mut c = Device::new("C", Some(50));
    let mnt = c.dir.mnt_str();
    let before = c.ready_count();
    let mut child = c
        .dir
        .logged(&["recover", "--from", &from, &mnt, "--name", "charlie"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{phrase}\n").as_bytes())
        .unwrap();
    c.adopt(child, before, "recover");
    wait_until(&[&a, &c], "A's history on C", SYNC_DEADLINE, |why| {
        let out = c.run(
            &["log", "--device", "alpha", "--limit", "1000"],
            SYNC_DEADLINE,
        );
        *why = format!("{}{}", out.stdout, out.stderr);
        out.ok() && count_revisions(&out.stdout) >= a_revs
    });
    c.run_ok(&[
        "restore",
        "doc.txt",
        "--at",
        &format!("@{between}"),
        "--to",
        "doc-c.txt",
    ]);
    assert_eq!(fs::read(c.path("doc-c.txt")).unwrap(), b"version one\n");
    let past_on_c = wait_for_folder_version(&[&a, &c], &c, "gone.txt", b"deleted later\n");
    fs::copy(past_on_c.join("doc.txt"), c.path("doc-c2.txt")).unwrap();
    assert_eq!(fs::read(c.path("doc-c2.txt")).unwrap(), b"version one\n");
    assert_folder_hidden(&c);
    let hist = c.dir.base.join("past");
    fs::create_dir_all(&hist).unwrap();
    let hist_s = hist.to_str().unwrap().to_string();
    let mut view = c
        .dir
        .command(&["mount", "--at", &format!("@{between}"), &hist_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if let Err(e) = wait_mounted(&mut view, &hist, START_DEADLINE, || true) {
        panic!(
            "history mount on C did not appear: {e}\n{}",
            c.log_tail(100)
        );
    }
    let past = fs::read(hist.join("gone.txt"));
    let un = c.run(&["unmount", &hist_s], STOP_DEADLINE);
    let _ = reap(&mut view, &hist, STOP_DEADLINE);
    assert_eq!(past.unwrap(), b"deleted later\n");
    assert!(un.ok(), "{}", un.stderr);
}

/// Blob ids (hex) of `dev` with at least `min` bytes, and their sizes.
fn large_blobs(dev: &Device, min: u64) -> BTreeMap<String, u64> {
    let store = cairn_store::BlobStore::open(dev.vault_dir().join("store")).unwrap();
    let mut out = BTreeMap::new();
    for id in store.list().unwrap() {
        let len = store.len_of(&id).unwrap().unwrap_or(0);
        if len >= min {
            out.insert(id.to_hex(), len);
        }
    }
    out
}

/// The multi-device prune rule: a device never prunes what another member's newest snapshot
/// references, even when that member is offline and lacks it, so the member can still get it
/// from here; once the member's newest snapshot moved on, the next prune frees it.
#[test]
fn prune_keeps_what_another_members_newest_snapshot_needs() {
    let a = Device::init("A", Some(50));
    let mut b = Device::join("B", &a, Some(50));
    let both = [&a, &b];
    // A's `cairn prune` keeps only each member's newest snapshot.
    let config = a.dir.data.parent().unwrap().join("config").join("cairn");
    fs::create_dir_all(&config).unwrap();
    fs::write(
        config.join("config.toml"),
        "[history]\nkeep_within = \"0s\"\nkeep_hourly = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n",
    )
    .unwrap();

    let v1 = write_random(&a.path("f.bin"), 2 << 20, 1);
    wait_for_big_file(&both, &b.path("f.bin"), 2 << 20, &v1, SYNC_DEADLINE);
    // B's newest snapshot holds f.bin v1.
    fs::write(b.path("b.txt"), b"from B\n").unwrap();
    wait_until(&both, "b.txt on A", SYNC_DEADLINE, |_| {
        content_is(&a.path("b.txt"), b"from B\n")
    });
    b.stop();
    // B lacks v1's chunks from now on: whatever it needs of them must come from A.
    let needed = large_blobs(&b, 16 << 10);
    assert!(needed.len() >= 10, "v1's chunks on B: {needed:?}");
    {
        let store = cairn_store::BlobStore::open(b.vault_dir().join("store")).unwrap();
        for id in needed.keys() {
            assert!(store.remove(&id.parse().unwrap()).unwrap());
        }
        store.sync().unwrap();
    }

    let v2 = write_random(&a.path("f.bin"), 2 << 20, 2);
    wait_until(&[&a], "v2 in A's snapshot", SYNC_DEADLINE, |_| {
        a.run_ok(&["status", "--json"])
            .contains("\"state\": \"synced\"")
    });
    let out = a.run_ok(&["prune"]);
    let on_a = large_blobs(&a, 16 << 10);
    for id in needed.keys() {
        assert!(
            on_a.contains_key(id),
            "A pruned {id}, which B's newest snapshot needs\n{out}"
        );
    }

    // B comes back, fetches what it needs from A, and moves on to v2.
    b.start();
    let both = [&a, &b];
    wait_for_big_file(&both, &b.path("f.bin"), 2 << 20, &v2, SYNC_DEADLINE);
    fs::write(b.path("b2.txt"), b"B saw v2\n").unwrap();
    wait_until(&both, "b2.txt on A", SYNC_DEADLINE, |_| {
        content_is(&a.path("b2.txt"), b"B saw v2\n")
    });
    // Now no member's newest snapshot needs v1: A frees it.
    let out = a.run_ok(&["prune"]);
    let on_a = large_blobs(&a, 16 << 10);
    let left: u64 = needed
        .iter()
        .filter(|(id, _)| on_a.contains_key(*id))
        .map(|(_, n)| n)
        .sum();
    let total: u64 = needed.values().sum();
    assert!(
        left < total / 4,
        "v1 still holds {left} of {total} bytes on A after B moved on\n{out}"
    );
    assert!(content_is(
        &b.path("f.bin"),
        &fs::read(a.path("f.bin")).unwrap()
    ));
}

/// Hard links made on A are links on B (one inode for both names, `st_nlink` 2), and a
/// write on B through one name shows on A through the other.
#[test]
fn hard_links_reach_a_peer_as_links() {
    let a = Device::init("A", Some(50));
    let b = Device::join("B", &a, Some(50));
    let both = [&a, &b];
    fs::create_dir(a.path("dir")).unwrap();
    fs::write(a.path("one.txt"), b"shared by two names\n").unwrap();
    fs::hard_link(a.path("one.txt"), a.path("dir/two.txt")).unwrap();
    let linked = |d: &Device, why: &mut String| {
        let (Ok(x), Ok(y)) = (
            fs::metadata(d.path("one.txt")),
            fs::metadata(d.path("dir/two.txt")),
        ) else {
            *why = format!("{}: a name is missing", d.name);
            return false;
        };
        *why = format!(
            "{}: ino {} / {}, nlink {} / {}",
            d.name,
            x.ino(),
            y.ino(),
            x.nlink(),
            y.nlink()
        );
        x.ino() == y.ino() && x.nlink() == 2 && y.nlink() == 2
    };
    wait_until(&both, "the link on B", SYNC_DEADLINE, |why| {
        linked(&b, why) && content_is(&b.path("dir/two.txt"), b"shared by two names\n")
    });
    fs::write(
        b.path("dir/two.txt"),
        b"written on B through the second name\n",
    )
    .unwrap();
    wait_until(
        &both,
        "B's write on A through the first name",
        SYNC_DEADLINE,
        |why| {
            content_is(
                &a.path("one.txt"),
                b"written on B through the second name\n",
            ) && linked(&a, why)
                && all_equal(&both, why)
        },
    );
    assert!(linked(&b, &mut String::new()), "still one inode on B");
}

/// The syscall the thread `tid` of this process is blocked in, if any
/// (`/proc/self/task/TID/syscall` starts with its number; "running" otherwise).
fn blocked_in(tid: i32) -> Option<i64> {
    let s = fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Every path under `root` (not following symlinks, skipping the `.cairn` folder).
fn walk_all(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {dir:?}: {e}")) {
            let e = e.unwrap();
            if e.file_name() == ".cairn" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out
}

/// Joins `h`, a thread working in `dev`'s mount, failing the test (with the log) if it does
/// not finish within a generous deadline.
#[track_caller]
fn join_on<T>(dev: &Device, h: std::thread::JoinHandle<T>, what: &str) -> T {
    let deadline = Instant::now() + SYNC_DEADLINE;
    while !h.is_finished() {
        assert!(
            Instant::now() < deadline,
            "[{}] {what} hangs\n{}",
            dev.name,
            dev.log_tail(200)
        );
        sleep(Duration::from_millis(20));
    }
    h.join().unwrap()
}

/// A member that stops answering (SIGSTOP) stalls only reads of content only it has: on B, a
/// read of a file whose chunks are not local fails with EIO after `[sync]
/// fetch_timeout_secs` while A is still paused, and meanwhile `ls -lR`, a stat of every
/// entry and reads of local files all finish. Once A answers again the same read returns
/// the file byte-identical.
#[test]
fn a_paused_peer_stalls_only_reads_of_what_only_it_has() {
    let mut a = Device::init("A", Some(50));
    let ticket = a.invite("10m");
    let mut b = Device::new("B", Some(50));
    let config = b.dir.data.parent().unwrap().join("config").join("cairn");
    fs::create_dir_all(&config).unwrap();
    fs::write(
        config.join("config.toml"),
        "[sync]\nfetch_timeout_secs = 10\n",
    )
    .unwrap();
    let mnt = b.dir.mnt_str();
    b.spawn_daemon(&["join", &ticket, &mnt]);

    make_tree(&a, "tree", 6, 30);
    fs::write(a.path("local.txt"), b"local on B\n").unwrap();
    wait_until(&[&a, &b], "the tree on B", SYNC_DEADLINE, |why| {
        all_equal(&[&a, &b], why)
    });

    // cold.bin's chunks: the large blobs it adds to A's store (tree nodes stay far smaller).
    const COLD: u64 = 2 << 20;
    let min = 40 << 10;
    let before: BTreeSet<String> = large_blobs(&a, min).into_keys().collect();
    let hash = write_random(&a.path("cold.bin"), COLD as usize, 11);
    let mut cold: Vec<String> = Vec::new();
    wait_until(
        &[&a, &b],
        "cold.bin's chunks in B's store",
        SYNC_DEADLINE,
        |why| {
            cold = large_blobs(&a, min)
                .into_keys()
                .filter(|k| !before.contains(k))
                .collect();
            let on_b = large_blobs(&b, min);
            let missing = cold.iter().filter(|k| !on_b.contains_key(*k)).count();
            // Metadata only: reading the file on B would put it in the mount's chunk cache.
            let size = fs::metadata(b.path("cold.bin")).map(|m| m.len()).ok();
            *why = format!(
                "B lacks {missing} of {} chunks; size on B {size:?}",
                cold.len()
            );
            cold.len() >= 10 && missing == 0 && size == Some(COLD)
        },
    );

    // A stops answering, and B no longer holds cold.bin's content: only A has it. (B is
    // stopped meanwhile: its store must not hold the chunks in a pack it still reads.)
    a.pause();
    b.stop();
    {
        let store = cairn_store::BlobStore::open(b.vault_dir().join("store")).unwrap();
        for id in &cold {
            assert!(store.remove(&id.parse().unwrap()).unwrap());
        }
        store.compact().unwrap();
        for id in &cold {
            assert!(store.locate(&id.parse().unwrap()).unwrap().is_none());
        }
    }
    b.start();
    let (tx, rx) = std::sync::mpsc::channel();
    let cold_path = b.path("cold.bin");
    let reader = std::thread::spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        let _ = tx.send(unsafe { libc::gettid() });
        let started = Instant::now();
        let r = fs::read(&cold_path);
        eprintln!(
            "the read of cold.bin returned after {:?}",
            started.elapsed()
        );
        r
    });
    let tid = rx.recv().unwrap();
    wait_until(
        &[&a, &b],
        "the read of cold.bin in progress",
        SYNC_DEADLINE,
        |why| {
            let state = blocked_in(tid);
            *why = format!("reader thread in syscall {state:?}");
            state == Some(libc::SYS_read) || reader.is_finished()
        },
    );
    assert!(
        !reader.is_finished(),
        "reading content only a paused peer has returned at once: {:?}",
        reader.join().unwrap().map(|v| v.len())
    );

    // Meanwhile, in parallel: a listing, a stat of everything, reads of local files.
    let root = b.dir.mnt.clone();
    let listing = std::thread::spawn({
        let root = root.clone();
        move || {
            std::process::Command::new("ls")
                .arg("-lR")
                .arg(&root)
                .output()
                .unwrap()
        }
    });
    let stats = std::thread::spawn({
        let root = root.clone();
        move || {
            walk_all(&root)
                .into_iter()
                .map(|p| {
                    let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
                    (p, m.len())
                })
                .collect::<Vec<_>>()
        }
    });
    let reads = std::thread::spawn({
        move || {
            for i in 0..6 {
                for j in 0..30 {
                    let p = root.join(format!("tree/d{i:02}/f{j:03}.txt"));
                    let got = fs::read(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
                    assert_eq!(got, format!("tree {i} {j}\n").as_bytes(), "{p:?}");
                }
            }
            fs::read(root.join("local.txt")).unwrap()
        }
    });
    let listing = join_on(&b, listing, "ls -lR");
    let stats = join_on(&b, stats, "a stat of every entry");
    let local = join_on(&b, reads, "reads of local files");
    let still_pending = !reader.is_finished();
    assert!(listing.status.success(), "ls -lR: {listing:?}");
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(
        text.contains("f029.txt") && text.contains("cold.bin"),
        "{text}"
    );
    assert_eq!(stats.len(), 1 + 1 + 1 + 6 + 6 * 30, "{stats:?}");
    assert!(stats.contains(&(b.path("cold.bin"), COLD)), "{stats:?}");
    assert_eq!(local, b"local on B\n");
    assert!(
        still_pending,
        "the read of cold.bin ended before the other work did; nothing ran alongside it"
    );

    // The read gives up while A is still paused: EIO, not a hang.
    match join_on(&b, reader, "the read of content only paused A has") {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        Ok(v) => panic!("read {} bytes of content no one could send", v.len()),
    }

    a.resume();
    wait_until(
        &[&a, &b],
        "cold.bin readable on B again",
        SYNC_DEADLINE,
        |why| match hash_file(&b.path("cold.bin")) {
            Ok(h) => {
                *why = format!("blake3 {h}");
                h == hash
            }
            Err(e) => {
                *why = format!("read: {e}");
                false
            }
        },
    );
}

// ---------------------------------------------------------------------------------------
// files on demand
// ---------------------------------------------------------------------------------------

/// Bytes of every file below `dir` (what `du --apparent-size` counts), whatever the layout.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => n += dir_bytes(&e.path()),
            Ok(t) if t.is_file() => n += e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => {}
        }
    }
    n
}

/// Every file below `root` with its size, from `stat` alone (no content is read).
fn sizes(root: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
        let Ok(rd) = fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                if e.file_name() != ".cairn" {
                    walk(root, &p, out);
                }
            } else if md.is_file() {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, md.len());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn local_attr(p: &Path) -> String {
    common::getxattr(p, "user.cairn.local")
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_else(|e| format!("error {e}"))
}

impl Device {
    /// The content store's size on disk (blobs, whatever their layout).
    fn store_bytes(&self) -> u64 {
        dir_bytes(&self.vault_dir().join("store"))
    }
}

/// A full device and an on-demand device: B sees every name and size but stores almost no
/// content; a read fetches that file only, `cairn pin` fetches exactly a tree and keeps it
/// current, `user.cairn.local` tells which, and `cairn evict` frees what A holds but never
/// what only B holds.
#[test]
fn an_on_demand_device_lists_everything_and_stores_what_it_uses() {
    const SMALL: usize = 240;
    const MEDIA: usize = 12;
    const PINNED: usize = 8;
    const MIB: usize = 1 << 20;
    let mut a = Device::init("a", None);
    let mut hashes = HashMap::new();
    fs::create_dir_all(a.path("docs/deep")).unwrap();
    fs::create_dir_all(a.path("media")).unwrap();
    fs::create_dir_all(a.path("keep")).unwrap();
    for i in 0..SMALL {
        let dir = if i % 3 == 0 { "docs/deep" } else { "docs" };
        let p = format!("{dir}/note{i}.txt");
        hashes.insert(
            p.clone(),
            write_random(&a.path(&p), 2048 + i * 61, i as u64),
        );
    }
    for i in 0..MEDIA {
        let p = format!("media/m{i}.bin");
        hashes.insert(
            p.clone(),
            write_random(&a.path(&p), 2 * MIB, 1000 + i as u64),
        );
    }
    for i in 0..PINNED {
        let p = format!("keep/k{i}.bin");
        hashes.insert(p.clone(), write_random(&a.path(&p), MIB, 2000 + i as u64));
    }
    let want = sizes(&a.dir.mnt);
    let total: u64 = want.values().sum();
    assert_eq!(want.len(), SMALL + MEDIA + PINNED);

    let ticket = a.invite("10m");
    let mut b = Device::new("b", None);
    let mnt = b.dir.mnt_str();
    b.spawn_daemon(&["join", &ticket, &mnt, "--mode", "on-demand"]);
    let both = [&a, &b];
    wait_until(&both, "every name and size on B", SYNC_DEADLINE, |why| {
        let got = sizes(&b.dir.mnt);
        *why = format!("{} of {} files", got.len(), want.len());
        got == want
    });
    // Listing fetched metadata only: tree nodes and small files stored inline.
    let small_limit = 4 * MIB as u64;
    assert_never(
        &both,
        "B's store growing past 4 MiB of a 30+ MiB vault while only listed",
        Duration::from_secs(4),
        || b.store_bytes() > small_limit,
    );
    let listed = b.store_bytes();
    eprintln!(
        "vault {} MiB in {} files; B's store after listing: {listed} bytes",
        total >> 20,
        want.len()
    );
    assert_eq!(local_attr(&b.path("media/m0.bin")), "none");

    // One read fetches that file, and only that file.
    let m0 = b.path("media/m0.bin");
    assert_eq!(hash_file(&m0).unwrap(), hashes["media/m0.bin"]);
    let after_read = b.store_bytes();
    let grown = after_read - listed;
    assert!(
        grown >= 2 * MIB as u64 && grown < 2 * MIB as u64 + MIB as u64 / 2,
        "reading a 2 MiB file grew B's store by {grown} bytes"
    );
    assert_eq!(local_attr(&m0), "full");
    assert_eq!(local_attr(&b.path("media/m1.bin")), "none");

    // A pin fetches exactly that tree, and keeps it current.
    let out = b.run_ok(&["pin", "keep"]);
    assert!(out.contains("pinned keep"), "{out}");
    let pinned = b.store_bytes() - after_read;
    assert!(
        pinned >= (PINNED * MIB) as u64 && pinned < (PINNED * MIB + MIB) as u64,
        "pinning an 8 MiB tree grew B's store by {pinned} bytes"
    );
    for i in 0..PINNED {
        let p = b.path(&format!("keep/k{i}.bin"));
        assert_eq!(local_attr(&p), "full", "{p:?}");
        assert_eq!(common::getxattr(&p, "user.cairn.pin").unwrap(), b"1");
    }
    assert_eq!(common::getxattr(&m0, "user.cairn.pin").unwrap(), b"0");
    assert_eq!(local_attr(&b.path("media/m2.bin")), "none");
    let new_k3 = write_random(&a.path("keep/k3.bin"), MIB + 4096, 3000);
    wait_until(
        &both,
        "A's edit of a pinned file local on B",
        SYNC_DEADLINE,
        |why| {
            let p = b.path("keep/k3.bin");
            let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            *why = format!("size {len}, local {}", local_attr(&p));
            len == (MIB + 4096) as u64 && local_attr(&p) == "full"
        },
    );
    assert_eq!(hash_file(&b.path("keep/k3.bin")).unwrap(), new_k3);
    let status = b.run_ok(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(json["local"]["mode"], "on-demand", "{status}");
    assert_eq!(
        json["local"]["bytes_pinned"],
        (PINNED * MIB + 4096) as u64,
        "{status}"
    );

    // The xattr pins and unpins too, and is never synced to A.
    setxattr(&b.path("media/m5.bin"), "user.cairn.pin", b"1", 0).unwrap();
    wait_until(&both, "the xattr pin fetched on B", SYNC_DEADLINE, |why| {
        *why = local_attr(&b.path("media/m5.bin"));
        why == "full"
    });
    removexattr(&b.path("media/m5.bin"), "user.cairn.pin").unwrap();
    assert_eq!(
        common::getxattr(&b.path("media/m5.bin"), "user.cairn.pin").unwrap(),
        b"0"
    );
    assert!(
        common::getxattr(&a.path("media/m5.bin"), "user.cairn.pin")
            .map(|v| v == b"0")
            .unwrap_or(true),
        "B's pin must not reach A"
    );

    // Evicting what A holds frees B's bytes; a later read fetches it again, identical.
    let before = b.store_bytes();
    let out = b.run_ok(&["evict", "media/m0.bin"]);
    assert!(out.contains("evicted 1 file"), "{out}");
    let freed = before - b.store_bytes();
    assert!(
        freed >= 2 * MIB as u64,
        "evicting a 2 MiB file freed {freed} bytes"
    );
    assert_eq!(local_attr(&m0), "none");
    assert_eq!(fs::metadata(&m0).unwrap().len(), 2 * MIB as u64);
    // A restart empties the kernel's page cache and the mount's chunk cache, so the next read
    // must fetch; the mode and the pins come back from disk.
    b.stop();
    b.start();
    assert_eq!(local_attr(&m0), "none");
    assert_eq!(hash_file(&m0).unwrap(), hashes["media/m0.bin"]);
    assert_eq!(local_attr(&m0), "full");
    assert_eq!(local_attr(&b.path("media/m1.bin")), "none");
    assert_eq!(
        common::getxattr(&b.path("keep/k0.bin"), "user.cairn.pin").unwrap(),
        b"1"
    );
    // Pinned content stays.
    let refused = b.run(&["evict", "keep/k1.bin"], Duration::from_secs(60));
    assert!(
        !refused.ok() && refused.stderr.contains("unpin"),
        "{}",
        refused.stderr
    );
    assert_eq!(local_attr(&b.path("keep/k1.bin")), "full");

    // What only B holds is never evicted.
    a.stop();
    let only_b = write_random(&b.path("only-b.bin"), MIB, 4000);
    wait_until(&[&b], "B's file in a snapshot", SYNC_DEADLINE, |why| {
        let s = common::getxattr(&b.path("only-b.bin"), "user.cairn.status")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        *why = s.clone();
        s == "synced"
    });
    let before = b.store_bytes();
    let refused = b.run(&["evict", "only-b.bin"], Duration::from_secs(120));
    assert!(
        !refused.ok(),
        "evicting B's only copy succeeded: {}",
        refused.stdout
    );
    assert!(
        refused.stderr.contains("last copy"),
        "the refusal should say why: {}",
        refused.stderr
    );
    assert_eq!(b.store_bytes(), before);
    assert_eq!(local_attr(&b.path("only-b.bin")), "full");
    assert_eq!(hash_file(&b.path("only-b.bin")).unwrap(), only_b);
}

/// With `cache.max_gib`, an on-demand device's store stays near its budget however much is
/// read (the least recently read content goes, since A holds it); evicted files read again
/// correctly and pinned content stays. The mode comes from `[sync] mode` of the config here.
#[test]
fn a_cache_budget_keeps_an_on_demand_store_near_it() {
    const MIB: usize = 1 << 20;
    const FILES: usize = 12;
    let a = Device::init("a", None);
    fs::create_dir_all(a.path("media")).unwrap();
    let hashes: Vec<blake3::Hash> = (0..FILES)
        .map(|i| {
            write_random(
                &a.path(&format!("media/m{i}.bin")),
                2 * MIB,
                5000 + i as u64,
            )
        })
        .collect();
    let kept = write_random(&a.path("keep.bin"), MIB, 6000);
    let want = sizes(&a.dir.mnt);

    let ticket = a.invite("10m");
    let mut b = Device::new("b", None);
    let config = b.dir.base.join("config/cairn");
    fs::create_dir_all(&config).unwrap();
    // 8 MiB.
    fs::write(
        config.join("config.toml"),
        "[sync]\nmode = \"on-demand\"\n\n[cache]\nmax_gib = 0.0078125\n",
    )
    .unwrap();
    let mnt = b.dir.mnt_str();
    b.spawn_daemon(&["join", &ticket, &mnt]);
    let both = [&a, &b];
    wait_until(&both, "every name and size on B", SYNC_DEADLINE, |why| {
        let got = sizes(&b.dir.mnt);
        *why = format!("{} of {} files", got.len(), want.len());
        got == want
    });
    b.run_ok(&["pin", "keep.bin"]);
    let budget = 8 * MIB as u64;
    // Tree nodes, sealing overhead and the file just read, until the check after it runs.
    let slack = 3 * MIB as u64;
    for (i, h) in hashes.iter().enumerate() {
        let p = b.path(&format!("media/m{i}.bin"));
        assert_eq!(hash_file(&p).unwrap(), *h, "{p:?}");
        wait_until(
            &both,
            "B's store back near its budget",
            SYNC_DEADLINE,
            |why| {
                let n = b.store_bytes();
                *why = format!("{n} bytes after reading m{i}");
                n <= budget + slack
            },
        );
    }
    eprintln!(
        "read {} MiB on B with an 8 MiB budget: store {} bytes",
        FILES * 2,
        b.store_bytes()
    );
    assert_eq!(
        local_attr(&b.path("media/m0.bin")),
        "none",
        "the oldest read went"
    );
    assert_eq!(
        local_attr(&b.path("keep.bin")),
        "full",
        "pinned content stays"
    );
    let status = b.run_ok(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(json["local"]["mode"], "on-demand", "{status}");
    // Evicted content reads again, identical (a restart drops the kernel's page cache).
    b.stop();
    b.start();
    for (i, h) in hashes.iter().enumerate().take(3) {
        let p = b.path(&format!("media/m{i}.bin"));
        assert_eq!(hash_file(&p).unwrap(), *h, "{p:?}");
    }
    assert_eq!(hash_file(&b.path("keep.bin")).unwrap(), kept);
}

/// A symlink with two names reaches a peer as one inode with two names, and a directory
/// received from a peer counts its subdirectories in `st_nlink` (2 + subdirectories).
#[test]
fn symlink_links_and_directory_counts_reach_a_peer() {
    let a = Device::init("A", Some(50));
    let b = Device::join("B", &a, Some(50));
    let both = [&a, &b];
    fs::create_dir_all(a.path("top/sub1")).unwrap();
    fs::create_dir(a.path("top/sub2")).unwrap();
    std::os::unix::fs::symlink("sub1", a.path("top/ln")).unwrap();
    fs::hard_link(a.path("top/ln"), a.path("ln2")).unwrap();
    wait_until(
        &both,
        "the linked symlink and the directory on B",
        SYNC_DEADLINE,
        |why| {
            let (Ok(x), Ok(y), Ok(t)) = (
                fs::symlink_metadata(b.path("top/ln")),
                fs::symlink_metadata(b.path("ln2")),
                fs::symlink_metadata(b.path("top")),
            ) else {
                *why = "B: a name is missing".into();
                return false;
            };
            *why = format!(
                "B: ino {} / {}, nlink {} / {}, top nlink {}",
                x.ino(),
                y.ino(),
                x.nlink(),
                y.nlink(),
                t.nlink()
            );
            x.file_type().is_symlink()
                && x.ino() == y.ino()
                && (x.nlink(), y.nlink(), t.nlink()) == (2, 2, 4)
                && fs::read_link(b.path("ln2")).is_ok_and(|p| p == Path::new("sub1"))
        },
    );
}
