//! One daemon per vault, and finding (and stopping) the daemon behind a mountpoint.
//!
//! The vault's serving daemon (`cairn mount` or `cairn sync`) holds an exclusive advisory lock
//! (`flock`) on `<vault dir>/daemon.lock` for its whole life; a history view (`cairn mount
//! --at`, read-only, allowed beside it) holds one on its own `run/view-<pid>.lock`. The file
//! says who holds it: the pid, then the mountpoint (empty for `cairn sync`), then `read-only`
//! for views. The kernel releases a lock when its holder exits, however it exits, so a locked
//! file always names a live daemon and two daemons cannot serve one vault even when started
//! in the same millisecond — unlike pid files checked through `/proc`, where a dead daemon's
//! pid may by then belong to a stranger. Stopping a daemon opens a pidfd for the pid first and
//! only then checks that the lock is still held by that pid, so a recycled pid is never
//! signalled (see [`stop`]).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const LOCK_FILE: &str = "daemon.lock";
const RUN_DIR: &str = "run";
const READ_ONLY_MARK: &str = "read-only";
/// A daemon writes its details right after taking the lock; a reader that finds the lock
/// held but the file still empty waits this long for them.
const DETAILS_WAIT: Duration = Duration::from_secs(2);

/// A running daemon, as its lock file describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonInfo {
    pub pid: i32,
    /// `None` for `cairn sync` (no mount).
    pub mountpoint: Option<PathBuf>,
    /// A history view (`cairn mount --at`), never the vault's writable mount.
    pub read_only: bool,
    lock_path: PathBuf,
}

impl DaemonInfo {
    /// How a person would recognize this daemon in a message.
    pub fn describe(&self) -> String {
        match &self.mountpoint {
            Some(m) if self.read_only => {
                format!("pid {}, history view at {}", self.pid, m.display())
            }
            Some(m) => format!("pid {}, mounted at {}", self.pid, m.display()),
            None => format!("pid {}, syncing without a mount", self.pid),
        }
    }
}

/// Held for as long as this process serves the vault (or the view); dropping it releases the
/// lock.
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    /// Views remove their own file when they stop; the vault's lock file stays (removing it
    /// would let a newcomer lock a fresh file while a late opener still locks the old one).
    remove_on_drop: Option<PathBuf>,
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        if let Some(p) = &self.remove_on_drop {
            let _ = fs::remove_file(p);
        }
        let _ = self.file.unlock();
    }
}

fn details(mountpoint: Option<&Path>, read_only: bool) -> String {
    let mut s = format!(
        "{}\n{}\n",
        std::process::id(),
        mountpoint
            .map(|m| m.display().to_string())
            .unwrap_or_default()
    );
    if read_only {
        s.push_str(READ_ONLY_MARK);
        s.push('\n');
    }
    s
}

fn write_details(file: &mut File, text: &str) -> std::io::Result<()> {
    file.set_len(0)?;
    (&*file).write_all(text.as_bytes())?;
    file.flush()
}

/// Opens (creating) a lock file without truncating it: a holder's details stay readable.
fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Takes the vault's single-daemon lock, or fails naming the daemon that holds it.
pub fn lock_vault(vault_dir: &Path, name: &str, mountpoint: Option<&Path>) -> Result<InstanceLock> {
    let path = vault_dir.join(LOCK_FILE);
    let mut file = open_lock_file(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = match read_details(&path) {
                Some(info) => info.describe(),
                None => "a process that has not said which yet".to_string(),
            };
            bail!(
                "vault {name:?} is already served by another cairn daemon ({holder}); stop it first (`cairn unmount DIR`, or Ctrl-C / SIGTERM for `cairn sync`)"
            );
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    write_details(&mut file, &details(mountpoint, false))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(InstanceLock {
        file,
        remove_on_drop: None,
    })
}

/// Takes a lock for a read-only history view at `mountpoint` (any number may run).
pub fn lock_view(vault_dir: &Path, mountpoint: &Path) -> Result<InstanceLock> {
    let dir = vault_dir.join(RUN_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("view-{}.lock", std::process::id()));
    let mut file = open_lock_file(&path)?;
    file.try_lock()
        .map_err(|e| anyhow::anyhow!("locking {}: {e}", path.display()))?;
    write_details(&mut file, &details(Some(mountpoint), true))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(InstanceLock {
        file,
        remove_on_drop: Some(path),
    })
}

/// Whether someone holds the lock on `path` (probed with a shared lock, released at once).
fn held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}

fn parse_details(text: &str, lock_path: &Path) -> Option<DaemonInfo> {
    let mut lines = text.lines();
    let pid = lines
        .next()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 0)?;
    let mountpoint = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
    Some(DaemonInfo {
        pid,
        mountpoint,
        read_only: lines.any(|l| l == READ_ONLY_MARK),
        lock_path: lock_path.to_path_buf(),
    })
}

/// The daemon holding the lock on `path`, if one does.
fn read_details(path: &Path) -> Option<DaemonInfo> {
    let deadline = Instant::now() + DETAILS_WAIT;
    loop {
        if !held(path) {
            return None;
        }
        let mut text = String::new();
        if let Ok(mut f) = File::open(path) {
            let _ = f.read_to_string(&mut text);
        }
        if let Some(info) = parse_details(&text, path) {
            // Read while the lock was held; check it still is, so the details are not a
            // dead daemon's leftovers read just after a new one took the lock.
            return held(path).then_some(info);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The daemon serving this vault (mounted or `cairn sync`), if one runs.
pub fn running_daemon(vault_dir: &Path) -> Option<DaemonInfo> {
    read_details(&vault_dir.join(LOCK_FILE))
}

/// Every daemon of this vault: its serving daemon and its history views.
pub fn live_daemons(vault_dir: &Path) -> Vec<DaemonInfo> {
    let mut out: Vec<DaemonInfo> = running_daemon(vault_dir).into_iter().collect();
    if let Ok(dir) = fs::read_dir(vault_dir.join(RUN_DIR)) {
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with("view-") && name.ends_with(".lock")) {
                continue;
            }
            match read_details(&e.path()) {
                Some(info) => out.push(info),
                // A view that died without cleaning up; nobody holds it.
                None if !held(&e.path()) => {
                    let _ = fs::remove_file(e.path());
                }
                None => {}
            }
        }
    }
    out
}

/// Sends SIGTERM to the daemon `info` describes, if it still holds its lock, and waits until
/// it has released it (it flushes first, so this may take a while; after `limit` it gives up).
pub fn stop(info: &DaemonInfo, limit: Duration) -> Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, info.pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(()); // already gone
        }
        return Err(e).with_context(|| format!("cannot reach the cairn daemon (pid {})", info.pid));
    }
    // SAFETY: `fd` is a descriptor pidfd_open just returned; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The pidfd pins the process `info.pid` names now. If that is still the lock holder, the
    // signal reaches the daemon; if the daemon died before the pidfd was opened, its lock
    // is gone and nothing is sent, whoever owns the pid today.
    match read_details(&info.lock_path) {
        Some(now) if now.pid == info.pid => {}
        _ => return Ok(()),
    }
    // SAFETY: pidfd_send_signal on a valid pidfd with no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGTERM,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e)
            .with_context(|| format!("cannot signal the cairn daemon (pid {})", info.pid));
    }
    let start = Instant::now();
    let mut told = false;
    while held(&info.lock_path) {
        if !told && start.elapsed() > Duration::from_secs(2) {
            eprintln!("cairn: waiting for the daemon to flush pending changes…");
            told = true;
        }
        if start.elapsed() > limit {
            bail!(
                "the daemon (pid {}) did not stop within {} s; check its log",
                info.pid,
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_vault_is_refused_naming_the_first() {
        let d = tempfile::tempdir().unwrap();
        let mp = Path::new("/mnt/somewhere");
        let first = lock_vault(d.path(), "v", Some(mp)).unwrap();
        let err = lock_vault(d.path(), "v", None).unwrap_err().to_string();
        assert!(err.contains("already served"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("/mnt/somewhere"), "{err}");
        let info = running_daemon(d.path()).unwrap();
        assert_eq!(info.pid, std::process::id() as i32);
        assert_eq!(info.mountpoint.as_deref(), Some(mp));
        assert!(!info.read_only);
        drop(first);
        assert_eq!(running_daemon(d.path()), None);
        let again = lock_vault(d.path(), "v", None).unwrap();
        assert_eq!(running_daemon(d.path()).unwrap().mountpoint, None);
        drop(again);
    }

    #[test]
    fn racing_lockers_get_exactly_one_lock() {
        let d = tempfile::tempdir().unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let results: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let b = barrier.clone();
                    let dir = d.path();
                    s.spawn(move || {
                        b.wait();
                        let r = lock_vault(dir, "v", None);
                        // Hold it until everyone tried.
                        std::thread::sleep(Duration::from_millis(200));
                        r.is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
    }

    #[test]
    fn a_file_nobody_holds_names_no_daemon_even_with_a_live_pid_in_it() {
        let d = tempfile::tempdir().unwrap();
        // Left by a crashed daemon whose pid now belongs to someone else (this process).
        fs::write(
            d.path().join(LOCK_FILE),
            format!("{}\n/mnt/x\n", std::process::id()),
        )
        .unwrap();
        assert_eq!(running_daemon(d.path()), None);
        let info = DaemonInfo {
            pid: std::process::id() as i32,
            mountpoint: None,
            read_only: false,
            lock_path: d.path().join(LOCK_FILE),
        };
        // Would SIGTERM this very test process if it trusted the pid.
        stop(&info, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn views_are_listed_beside_the_daemon_and_clean_up_after_themselves() {
        let d = tempfile::tempdir().unwrap();
        let daemon = lock_vault(d.path(), "v", Some(Path::new("/a"))).unwrap();
        let view = lock_view(d.path(), Path::new("/b")).unwrap();
        let all = live_daemons(d.path());
        assert_eq!(all.len(), 2);
        assert!(
            all.iter()
                .any(|i| i.read_only && i.mountpoint.as_deref() == Some(Path::new("/b")))
        );
        assert_eq!(
            running_daemon(d.path()).unwrap().mountpoint.as_deref(),
            Some(Path::new("/a"))
        );
        drop(view);
        assert_eq!(live_daemons(d.path()).len(), 1);
        assert_eq!(fs::read_dir(d.path().join(RUN_DIR)).unwrap().count(), 0);
        drop(daemon);
        assert!(live_daemons(d.path()).is_empty());
    }
}
