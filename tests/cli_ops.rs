//! Operating cairn day to day, through the `cairn` command as a user would: systemd
//! readiness, `status --json`, `log`, `restore` (through a live mount and straight into the
//! engine), `service install`, and the error paths (one line, a hint, nothing changed).
//! None of these touch the network.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A scratch home: data dir, config dir, mountpoint; every command runs with it.
struct Home {
    _tmp: tempfile::TempDir,
    base: PathBuf,
}

impl Home {
    fn new() -> Home {
        let tmp = tempfile::Builder::new()
            .prefix("cairn-ops-")
            .tempdir()
            .unwrap();
        let base = tmp.path().canonicalize().unwrap();
        for d in ["data", "config", "mnt", "runtime"] {
            fs::create_dir(base.join(d)).unwrap();
        }
        Home { _tmp: tmp, base }
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    fn mnt(&self) -> PathBuf {
        self.base.join("mnt")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = cairn_command();
        c.arg("--data-dir").arg(self.data()).args(args);
        c.env("XDG_CONFIG_HOME", self.base.join("config"))
            .env("HOME", &self.base)
            // No user manager or session bus is reachable through these.
            .env("XDG_RUNTIME_DIR", self.base.join("runtime"))
            .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
            .env_remove("CAIRN_DATA_DIR")
            .env_remove("CAIRN_VAULT")
            .env_remove("CAIRN_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run cairn")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`cairn {}` failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    fn wait_synced(&self, daemon: &mut Daemon) -> serde_json::Value {
        // The journal groups commits over a few milliseconds, so a status taken right after a
        // write may not see it yet: only a synced state that holds across polls counts.
        let mut synced_polls = 0;
        let mut last = serde_json::Value::Null;
        wait_until(
            "a synced state over three polls",
            Duration::from_secs(60),
            Duration::from_millis(150),
            |why| {
                daemon.assert_running();
                last = self.status();
                if last["state"] == "synced" && !last["last_snapshot"].is_null() {
                    synced_polls += 1;
                } else {
                    synced_polls = 0;
                }
                *why = format!("{last:#}");
                synced_polls >= 3
            },
            String::new,
        );
        last
    }
}

/// A `cairn mount` in the foreground; dropping it unmounts (or, failing that, detaches).
struct Daemon {
    child: Option<Child>,
    mnt: PathBuf,
}

impl Daemon {
    fn start(home: &Home, extra: &[&str], notify: Option<&Path>) -> Daemon {
        Daemon::start_with(home, extra, notify, None)
    }

    /// `fd_limit` sets both the soft and the hard descriptor limit of the daemon.
    fn start_with(
        home: &Home,
        extra: &[&str],
        notify: Option<&Path>,
        fd_limit: Option<u64>,
    ) -> Daemon {
        let mnt = home.mnt();
        let mut args = vec!["mount"];
        args.extend_from_slice(extra);
        let mut cmd = home.cmd(&args);
        cmd.arg(&mnt).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(sock) = notify {
            cmd.env("NOTIFY_SOCKET", sock);
            // As systemd sets it for `WatchdogSec=`: 400 ms, so pings come every 200 ms.
            cmd.env("WATCHDOG_USEC", "400000");
        }
        if let Some(limit) = fd_limit {
            use std::os::unix::process::CommandExt;
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads the struct it is given.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().expect("spawn cairn mount");
        let mut d = Daemon {
            child: Some(child),
            mnt,
        };
        if notify.is_none()
            && let Err(e) = wait_mounted(
                d.child.as_mut().unwrap(),
                &d.mnt,
                Duration::from_secs(30),
                || true,
            )
        {
            d.child = None;
            panic!("the daemon {e}");
        }
        d
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("the daemon exited early with {status}");
        }
    }

    fn stop(&mut self, home: &Home) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let out = home.run(&["unmount", self.mnt.to_str().unwrap()]);
        let exited = reap(&mut child, &self.mnt, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "unmount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            exited.as_ref().is_ok_and(|s| s.success()),
            "daemon did not exit cleanly: {exited:?}"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill_and_detach(&mut child, &self.mnt);
        }
    }
}

/// Asserts a failure a person can act on: non-zero exit, one line on stderr, the hint.
#[track_caller]
fn assert_one_line_error(out: &Output, hint: &str) -> String {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "expected one line, got:\n{err}");
    assert!(err.starts_with("cairn: error: "), "{err}");
    assert!(err.contains(hint), "expected {hint:?} in: {err}");
    err
}

fn revisions(home: &Home) -> usize {
    count_revisions(&home.ok(OWN_LOG))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + i / 1024) as u8).wrapping_add(seed))
        .collect()
}

#[test]
fn notify_socket_gets_ready_only_once_the_mount_answers_then_watchdog_then_stopping() {
    let home = Home::new();
    let sock_path = home.base.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut daemon = Daemon::start(&home, &["--init"], Some(&sock_path));

    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut buf).expect("READY=1 within 60 s");
    // Checked before anything else: at this moment the mount must already serve requests.
    let mounted = is_fuse_mounted(&home.mnt());
    let written = fs::write(home.mnt().join("hello.txt"), b"ready");
    let read_back = fs::read(home.mnt().join("hello.txt"));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        msg.lines().any(|l| l == "READY=1"),
        "first notification: {msg:?}"
    );
    assert!(mounted, "READY=1 arrived before the mount existed");
    written.expect("write through the mount right after READY=1");
    assert_eq!(read_back.unwrap(), b"ready");

    // The watchdog is fed while the mount answers.
    let mut pings = 0;
    while pings < 2 {
        let n = sock.recv(&mut buf).expect("WATCHDOG=1 while mounted");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            msg.lines().any(|l| l == "WATCHDOG=1"),
            "while mounted: {msg:?}"
        );
        pings += 1;
    }

    let mnt = home.mnt();
    let mut unmount = home
        .cmd(&["unmount", mnt.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 after unmount");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        assert!(
            msg.lines().all(|l| l == "WATCHDOG=1"),
            "unexpected notification before STOPPING=1: {msg:?}"
        );
    }
    assert!(wait_deadline(&mut unmount, Duration::from_secs(60)).is_some_and(|s| s.success()));
    let exited = wait_deadline(daemon.child.as_mut().unwrap(), Duration::from_secs(60));
    assert!(exited.is_some_and(|s| s.success()));
    daemon.child = None;
    // The write made right after READY survived the unmount.
    assert_eq!(revisions(&home), 1);
}

#[test]
fn write_status_log_delete_restore_and_the_error_paths() {
    let home = Home::new();
    home.ok(&["init"]);
    let mut daemon = Daemon::start(&home, &[], None);
    let mnt = home.mnt();

    let big = pattern(300 * 1024, 3);
    fs::create_dir(mnt.join("notes")).unwrap();
    fs::write(mnt.join("notes/today.txt"), &big).unwrap();
    fs::write(mnt.join("notes/small.txt"), b"small").unwrap();

    let s = home.wait_synced(&mut daemon);
    assert_eq!(s["pending_uploads"]["files"], 0);
    assert_eq!(s["pending_uploads"]["bytes"], 0);
    assert_eq!(s["vault"], "default");
    assert_eq!(s["mount"]["mountpoint"], mnt.to_str().unwrap());
    assert!(s["last_snapshot"]["revision"].as_u64().unwrap() >= 1);
    assert!(s["conflicts"].as_array().unwrap().is_empty());
    assert!(s["device_id"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(revisions(&home) >= 1, "log lists the snapshot");
    let human = home.ok(&["status"]);
    assert!(human.contains("(synced)"), "{human}");

    fs::remove_file(mnt.join("notes/today.txt")).unwrap();
    home.wait_synced(&mut daemon);
    assert!(!mnt.join("notes/today.txt").exists());

    // Errors first, on a vault with history: each is one line with a hint and changes nothing.
    let before = snapshot(&mnt);
    let revs = revisions(&home);
    assert_one_line_error(
        &home.run(&["restore", "notes/never.txt"]),
        "in none of the vault's",
    );
    assert_one_line_error(
        &home.run(&["restore", "--at", "@1000", "notes/today.txt"]),
        "see `cairn log`",
    );
    assert_one_line_error(
        &home.run(&["restore", "notes/small.txt", "--at", "garbage"]),
        "90m",
    );
    assert_snapshots_eq(
        &before,
        &snapshot(&mnt),
        "failed restores changed the mount",
    );
    assert_eq!(revisions(&home), revs);

    let out = home.ok(&["restore", "notes/today.txt"]);
    assert!(out.contains("restored notes/today.txt"), "{out}");
    assert_eq!(fs::read(mnt.join("notes/today.txt")).unwrap(), big);
    let again = home.ok(&["restore", "notes/today.txt"]);
    assert!(again.contains("nothing to restore"), "{again}");

    // An edited file is never overwritten; --to puts the old version beside it. (`--at` a
    // time before the edit: the edit itself may be in a snapshot by the time restore looks.)
    let before_edit = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(mnt.join("notes/small.txt"), b"edited").unwrap();
    let err = assert_one_line_error(&home.run(&["restore", "notes/small.txt"]), "--to");
    assert!(err.contains("exists and differs"), "{err}");
    assert_eq!(fs::read(mnt.join("notes/small.txt")).unwrap(), b"edited");
    home.ok(&[
        "restore",
        "notes/small.txt",
        "--at",
        &format!("@{before_edit}"),
        "--to",
        "notes/small.old.txt",
    ]);
    assert_eq!(fs::read(mnt.join("notes/small.old.txt")).unwrap(), b"small");
    home.wait_synced(&mut daemon);
    daemon.stop(&home);
    assert_eq!(home.status()["state"], "not mounted");

    // Not mounted: the restore is committed and published by the command itself.
    let revs = revisions(&home);
    let out = home.ok(&["restore", "notes", "--to", "archive/notes"]);
    assert!(out.contains("published"), "{out}");
    assert_eq!(revisions(&home), revs + 1);
    let mut daemon = Daemon::start(&home, &[], None);
    assert_eq!(fs::read(mnt.join("archive/notes/today.txt")).unwrap(), big);
    assert_eq!(
        fs::read(mnt.join("archive/notes/small.txt")).unwrap(),
        b"edited"
    );
    assert_eq!(fs::read(mnt.join("notes/small.txt")).unwrap(), b"edited");
    daemon.stop(&home);
}

/// A flush holds one descriptor per staged file, so a copy of more files than the daemon
/// may open must be flushed in several batches rather than fail over and over (EMFILE)
/// with every change stuck in the overlay.
#[test]
fn a_copy_of_more_files_than_the_descriptor_limit_still_syncs() {
    let home = Home::new();
    home.ok(&["init"]);
    // 256 descriptors: batches of 64 staged files, so 700 files need 11 of them.
    let mut daemon = Daemon::start_with(&home, &["--debounce-ms", "2000"], None, Some(256));
    let mnt = home.mnt();
    fs::create_dir(mnt.join("copy")).unwrap();
    for i in 0..700u32 {
        fs::write(
            mnt.join(format!("copy/f{i:04}")),
            pattern(100 + i as usize, i as u8),
        )
        .unwrap();
    }
    let s = home.wait_synced(&mut daemon);
    assert_eq!(s["pending_uploads"]["files"], 0, "{s:#}");
    daemon.stop(&home);

    // And every file reads back byte-identical after a restart.
    let mut daemon = Daemon::start(&home, &[], None);
    for i in 0..700u32 {
        let got = fs::read(mnt.join(format!("copy/f{i:04}"))).unwrap();
        assert_eq!(got, pattern(100 + i as usize, i as u8), "copy/f{i:04}");
    }
    daemon.stop(&home);
}

#[test]
fn operator_mistakes_get_one_line_and_change_nothing() {
    let home = Home::new();
    home.ok(&["init"]);

    let missing = home.base.join("no/such/dir");
    assert_one_line_error(&home.run(&["mount", missing.to_str().unwrap()]), "mkdir -p");
    assert!(!missing.exists());

    let err = assert_one_line_error(&home.run(&["--vault", "nope", "status"]), "cairn init");
    assert!(err.contains("nope"), "{err}");
    assert!(!home.data().join("vaults/nope").exists());

    let cfg_dir = home.base.join("config/cairn");
    fs::create_dir_all(&cfg_dir).unwrap();
    fs::write(
        cfg_dir.join("config.toml"),
        "[mount]\ndebounce_ms = 100\ndebounce = 5\n",
    )
    .unwrap();
    let err = assert_one_line_error(&home.run(&["status"]), "config.example.toml");
    assert!(err.contains("config.toml:3:"), "{err}");
    assert!(err.contains("debounce"), "{err}");
    fs::write(cfg_dir.join("config.toml"), "[net]\nbind = \"nowhere\"\n").unwrap();
    let err = assert_one_line_error(&home.run(&["status"]), "config.example.toml");
    assert!(err.contains("config.toml:2:"), "{err}");
    let explicit = home.base.join("other.toml");
    let err = assert_one_line_error(
        &home.run(&["--config", explicit.to_str().unwrap(), "log"]),
        "other.toml",
    );
    assert!(err.contains("--config"), "{err}");
    fs::remove_file(cfg_dir.join("config.toml")).unwrap();

    // A vault without snapshots has nothing to restore.
    assert_one_line_error(&home.run(&["restore", "a.txt"]), "no snapshot");
    assert_eq!(home.status()["state"], "not mounted");
}

/// Pairing lifetimes are bounded: an absurd `--ttl` or `--for` is refused before anything is
/// sent, naming the maximum, however large the number (no overflow, no wrap-around to a short
/// or endless window).
#[test]
fn absurd_pairing_lifetimes_are_refused_naming_the_maximum() {
    let home = Home::new();
    home.ok(&["init"]);
    let refused = |args: &[&str], hint: &str| {
        let out = home.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "`cairn {}` succeeded",
            args.join(" ")
        );
        assert!(
            err.contains(hint),
            "`cairn {}`: expected {hint:?} in: {err}",
            args.join(" ")
        );
    };
    for ttl in [
        "8days",
        "1000000d",
        "18446744073709551615s",
        "99999999999999999999999999s",
    ] {
        refused(
            &["invite", "--ttl", ttl],
            "an invitation can last at most 7days",
        );
    }
    refused(&["invite", "--ttl", "0s"], "at least one second");
    for window in ["25h", "1000000d", "18446744073709551615s"] {
        refused(
            &["allow-recovery", "--for", window],
            "a recovery window can last at most 1day",
        );
    }
    refused(&["allow-recovery", "--for", "soon"], "such as 10m");
    // Within bounds, they only need the daemon.
    assert_one_line_error(&home.run(&["invite", "--ttl", "7days"]), "cairn mount");
    assert_one_line_error(
        &home.run(&["allow-recovery", "--for", "1day"]),
        "cairn mount",
    );
    assert_one_line_error(&home.run(&["allow-recovery", "--close"]), "cairn mount");
}

#[test]
fn service_install_writes_a_valid_unit_without_a_user_manager() {
    let home = Home::new();
    let dir = home.base.join("My Cairn");
    let out = home.ok(&[
        "--vault",
        "work",
        "service",
        "install",
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("systemctl --user enable --now"), "{out}");
    let unit_path = home.base.join("config/systemd/user/cairn-mount@.service");
    let unit = fs::read_to_string(&unit_path).expect("unit written");
    let bin = fs::canonicalize(cairn_bin()).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={} mount %f\n", bin.display())),
        "{unit}"
    );
    assert!(unit.contains("Type=notify"));

    let escaped = Command::new("systemd-escape")
        .arg("--path")
        .arg(&dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let envs: Vec<_> = fs::read_dir(home.base.join("config/cairn"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(envs.len(), 1, "{envs:?}");
    if let Some(esc) = &escaped {
        assert_eq!(envs[0], format!("mount-{esc}.env"));
        assert!(out.contains(&format!("cairn-mount@{esc}.service")), "{out}");
    }
    let env = fs::read_to_string(home.base.join("config/cairn").join(&envs[0])).unwrap();
    assert!(env.contains("CAIRN_VAULT=work\n"), "{env}");
    assert!(
        env.contains(&format!("CAIRN_DATA_DIR={}\n", home.data().display())),
        "{env}"
    );

    verify_unit(&home, &unit_path, escaped.as_deref());

    let out = home.ok(&["service", "uninstall", dir.to_str().unwrap()]);
    assert!(out.contains("systemctl --user disable --now"), "{out}");
    assert!(!unit_path.exists());
    assert_eq!(
        fs::read_dir(home.base.join("config/cairn"))
            .unwrap()
            .count(),
        0
    );
    assert_one_line_error(
        &home.run(&["service", "uninstall", dir.to_str().unwrap()]),
        "no cairn service is installed",
    );
}

/// `systemd-analyze verify` on an instance of the written template, where the tool can run.
fn verify_unit(home: &Home, unit_path: &Path, instance: Option<&str>) {
    let Some(instance) = instance else {
        eprintln!("note: systemd-escape not found; skipping systemd-analyze verify");
        return;
    };
    let dir = home.base.join("verify");
    fs::create_dir_all(&dir).unwrap();
    let inst = dir.join(format!("cairn-mount@{instance}.service"));
    fs::copy(unit_path, &inst).unwrap();
    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&inst)
        .env("HOME", &home.base)
        .env("XDG_CONFIG_HOME", home.base.join("config"))
        .output()
    {
        Ok(o) => o,
        Err(_) => {
            eprintln!("note: systemd-analyze not found; skipping unit verification");
            return;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // Only complaints about this unit count: in containers the tool also reports on the
    // host's own units or on its missing manager, which says nothing about ours.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cairn-mount@"))
        .collect();
    if !out.status.success() && ours.is_empty() {
        eprintln!("note: systemd-analyze verify could not run here:\n{text}");
        return;
    }
    assert!(ours.is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn mount_options_reach_the_kernel_and_the_attributes() {
    use std::os::unix::fs::MetadataExt;
    let home = Home::new();
    home.ok(&["init"]);
    let mnt = home.mnt();
    let err = assert_one_line_error(
        &home.run(&["mount", "-o", "allow_root", mnt.to_str().unwrap()]),
        "allow_other",
    );
    assert!(err.contains("allow_root"), "{err}");
    let mut d = Daemon::start(
        &home,
        &["-o", "allow_other,ro,uid=4242,gid=4343,noauto"],
        None,
    );
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(&format!(" {} ", mnt.display())))
        .expect("the mount is listed");
    assert!(line.contains("allow_other"), "{line}");
    assert!(
        line.split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{line}"
    );
    let md = fs::metadata(&mnt).unwrap();
    assert_eq!((md.uid(), md.gid()), (4242, 4343), "uid=/gid= own the root");
    let e = fs::write(mnt.join("f"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    d.stop(&home);
}
