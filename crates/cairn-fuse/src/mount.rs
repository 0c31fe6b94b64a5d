//! Mounting, unmounting and kernel cache invalidation.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cairn_overlay::Overlay;
use cairn_overlay::path::{name_of, parent_of};
use fuser::{BackgroundSession, Config, INodeNo, MountOption, Notifier, SessionACL};

use crate::base::BaseLayer;
use crate::core::Core;
use crate::fs::CairnFs;
use crate::history::{HistoryDir, HistoryFolder};
use crate::history_fs::WithHistory;
use crate::sink::{FlushError, FlushSink};

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Kernel request threads.
    pub threads: usize,
    /// Idle time after the last change (or close of a written file) before flushing.
    pub flush_debounce: Duration,
    /// Wait before retrying a failed flush.
    pub flush_retry: Duration,
    /// How long the kernel may cache attributes and names.
    pub ttl: Duration,
    /// Owner shown for base entries (the vault stores no owners).
    pub uid: u32,
    pub gid: u32,
    /// Let other users access the mount (needs `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Mount read-only (history views): the kernel answers every write with EROFS.
    pub read_only: bool,
    /// Masks the permission bits of entries that came from the vault without a local
    /// record (`umask=`); local changes show their own mode.
    pub umask: u32,
    /// The `.cairn/history/` folder's source of past snapshots; `None` shows no `.cairn`
    /// (history views themselves, tests).
    pub history: Option<HistoryFolder>,
    /// Free space kept on the state directory's disk: below it, operations that add data
    /// fail with ENOSPC (see [`crate::space`]). `None`: [`crate::DEFAULT_MIN_FREE`], at
    /// most a twentieth of the disk.
    pub min_free: Option<u64>,
}

/// A `-o` mount option cairn does not understand or cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MountOptionError {
    #[error(
        "unknown mount option {0:?}; cairn understands allow_other, default_permissions, ro, \
         rw, uid=N, gid=N and umask=OCTAL"
    )]
    Unknown(String),
    #[error("mount option {0:?} needs a number (uid=/gid= decimal, umask= octal)")]
    BadValue(String),
}

impl MountOptions {
    /// Applies a comma-separated option list, as `mount -o` and fstab write it.
    /// `default_permissions` is accepted but always on: cairn leaves permission checks to
    /// the kernel and has none of its own to fall back on. Options that only concern
    /// mount(8) itself (`defaults`, `noauto`, `user`, `_netdev`, `nofail`, `x-*`, ...) are
    /// ignored so an fstab line can carry them.
    pub fn apply_options(&mut self, list: &str) -> Result<(), MountOptionError> {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let number = |radix| {
                value
                    .and_then(|v| u32::from_str_radix(v, radix).ok())
                    .ok_or_else(|| MountOptionError::BadValue(opt.to_string()))
            };
            match key {
                "allow_other" => self.allow_other = true,
                "default_permissions" => {}
                "ro" => self.read_only = true,
                "rw" => self.read_only = false,
                "uid" => self.uid = number(10)?,
                "gid" => self.gid = number(10)?,
                "umask" => self.umask = number(8)? & 0o777,
                "defaults" | "auto" | "noauto" | "user" | "users" | "nouser" | "owner"
                | "_netdev" | "nofail" | "exec" | "noexec" | "suid" | "nosuid" | "dev"
                | "nodev" | "atime" | "noatime" | "relatime" => {}
                k if k.starts_with("x-") || k.starts_with("comment") => {}
                _ => return Err(MountOptionError::Unknown(opt.to_string())),
            }
        }
        Ok(())
    }
}

impl Default for MountOptions {
    fn default() -> Self {
        // SAFETY: geteuid/getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        MountOptions {
            threads: 4,
            flush_debounce: Duration::from_millis(500),
            flush_retry: Duration::from_secs(5),
            ttl: Duration::from_secs(1),
            uid,
            gid,
            allow_other: false,
            read_only: false,
            umask: 0,
            history: None,
            min_free: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mountpoint {0} does not exist; create it with `mkdir -p {0}`")]
    MountpointMissing(PathBuf),
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mountpoint {0} is not empty; mount over an empty directory so no files are hidden")]
    NotEmpty(PathBuf),
    #[error("{0} is already a mount point; unmount it first (`fusermount3 -u {0}`)")]
    AlreadyMounted(PathBuf),
    #[error(
        "{path} is a dead FUSE mount (transport endpoint not connected) and cleaning it up \
         failed: {detail}; run `fusermount3 -u -z {path}` by hand"
    )]
    StaleMount { path: PathBuf, detail: String },
    #[error(
        "/dev/fuse is missing: load the fuse module (`modprobe fuse`) or, in a container, pass the device through"
    )]
    DevFuseMissing,
    #[error(
        "fusermount3 was not found in PATH: install the fuse3 package (e.g. `apt install fuse3`)"
    )]
    FusermountMissing,
    #[error("cannot inspect mountpoint {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting {path} failed: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {path} failed: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "final flush at unmount failed: {0}; the changes are kept in the overlay and replayed \
         at the next mount"
    )]
    FinalFlush(#[source] FlushError),
}

pub(crate) fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut out = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `out` is a properly sized buffer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), out.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the whole struct.
    Ok(unsafe { out.assume_init() })
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Decodes the octal escapes (`\040` for space, ...) of /proc/self/mountinfo.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Whether `path` is a mount point in this process's mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want)
}

/// Detaches a mount: fusermount3 when available (works unprivileged), else umount2 directly.
pub fn lazy_unmount(path: &Path) -> Result<(), String> {
    if let Some(bin) = find_in_path("fusermount3") {
        let out = Command::new(bin)
            .args([OsStr::new("-u"), OsStr::new("-z"), path.as_os_str()])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(());
        }
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if unsafe { libc::geteuid() } != 0 {
            return Err(msg);
        }
    }
    umount2(path, libc::MNT_DETACH).map_err(|e| e.to_string())
}

fn umount2(path: &Path, flags: i32) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, MountError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::DevFuseMissing);
    }
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    // Root mounts with mount(2) directly; everybody else needs the setuid helper.
    if !root && find_in_path("fusermount3").is_none() {
        return Err(MountError::FusermountMissing);
    }
    let inspect = |source| MountError::Inspect {
        path: mountpoint.to_path_buf(),
        source,
    };
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(mountpoint = %mountpoint.display(), "found a dead FUSE mount (a previous daemon died); detaching it with fusermount3 -u -z");
            lazy_unmount(mountpoint).map_err(|detail| MountError::StaleMount {
                path: mountpoint.to_path_buf(),
                detail,
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::MountpointMissing(mountpoint.to_path_buf()));
        }
        Err(e) => return Err(inspect(e)),
        Ok(_) => {}
    }
    let meta = std::fs::metadata(mountpoint).map_err(inspect)?;
    if !meta.is_dir() {
        return Err(MountError::NotADirectory(mountpoint.to_path_buf()));
    }
    let canonical = mountpoint.canonicalize().map_err(inspect)?;
    if is_mounted(&canonical) {
        return Err(MountError::AlreadyMounted(canonical));
    }
    if std::fs::read_dir(&canonical)
        .map_err(inspect)?
        .next()
        .is_some()
    {
        return Err(MountError::NotEmpty(canonical));
    }
    Ok(canonical)
}

/// Mounts the filesystem in the background: kernel requests are served by `opts.threads`
/// threads and flushes run on their own thread until [`MountHandle::unmount`].
pub fn mount(
    base: Arc<dyn BaseLayer>,
    sink: Arc<dyn FlushSink>,
    overlay: Overlay,
    mountpoint: &Path,
    opts: MountOptions,
) -> Result<MountHandle, MountError> {
    let mountpoint = check_mountpoint(mountpoint)?;
    let threads = opts.threads.clamp(1, 16);
    let allow_other = opts.allow_other;
    let read_only = opts.read_only;
    let history = opts
        .history
        .clone()
        .map(|h| Arc::new(HistoryDir::new(h.0, opts.uid, opts.gid, opts.umask)));
    let core = Arc::new(Core::new(base, sink, overlay, opts));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("cairn".into()),
        MountOption::Subtype("cairn".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let fs = WithHistory {
        inner: CairnFs { core: core.clone() },
        history,
    };
    let mount_err = |source| MountError::Mount {
        path: mountpoint.clone(),
        source,
    };
    let session = fuser::Session::new(fs, &mountpoint, &config)
        .and_then(|s| s.spawn())
        .map_err(mount_err)?;
    let notifier = session.notifier();
    let flusher = crate::flusher::spawn(core.clone()).map_err(mount_err)?;
    // Changes replayed from a previous run get flushed without waiting for new activity.
    if !core.overlay.is_empty().unwrap_or(true) {
        core.touched();
    }
    tracing::info!(mountpoint = %mountpoint.display(), threads, "cairn mounted");
    Ok(MountHandle {
        core,
        session: Some(session),
        notifier,
        flusher: Some(flusher),
        mountpoint,
    })
}

/// Drops kernel caches when the base layer changes under a live mount. Harmless after the
/// mount is gone (notifications then fail quietly).
#[derive(Clone)]
pub struct Invalidator {
    core: Arc<Core>,
    notifier: Notifier,
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator").finish_non_exhaustive()
    }
}

impl Invalidator {
    /// The base layer changed at these paths (a new snapshot arrived): drop the kernel's
    /// cached names, attributes and pages for them, and the content pinned by open files
    /// that have no local copy.
    pub fn base_changed(&self, changed_paths: &[String]) {
        let mut entries = Vec::new();
        let mut inodes = Vec::new();
        let mut cells = Vec::new();
        {
            let ns = self.core.ns();
            let mut parents = HashSet::new();
            for p in changed_paths {
                if !p.is_empty()
                    && let Some(&parent) = ns.paths.get(parent_of(p))
                {
                    entries.push((parent, name_of(p).to_string()));
                    // A directory's st_nlink counts its subdirectories: a peer's new or
                    // removed one changes the parent's attributes too.
                    if parents.insert(parent) {
                        inodes.push(parent);
                    }
                }
                if let Some(&ino) = ns.paths.get(p.as_str()) {
                    inodes.push(ino);
                    if let Some(cell) = ns.inodes.get(&ino).and_then(|i| i.file.clone()) {
                        cells.push(cell);
                    }
                }
            }
        }
        for cell in cells {
            let mut st = cell.lock();
            if st.staging.is_none() {
                st.base = None;
            }
        }
        // No lock is held while notifying: the kernel may need to call back into us first.
        self.notify(entries, inodes);
    }

    /// Those of `paths` that hold local changes not yet flushed (overlay records): edits
    /// made on top of whatever the base showed before it changed.
    pub fn dirty(&self, paths: &[String]) -> Vec<String> {
        paths
            .iter()
            // Local-only records (special files, owners) never flush: nothing to reconcile.
            .filter(|p| matches!(self.core.overlay.get(p), Ok(Some(r)) if r.kind != cairn_overlay::Kind::Whiteout && !r.kind.is_local()))
            .cloned()
            .collect()
    }

    /// Drops every kernel cache entry this mount handed out.
    pub fn invalidate_all(&self) {
        let (entries, inodes) = {
            let ns = self.core.ns();
            let mut entries = Vec::new();
            let mut inodes = Vec::new();
            for (p, &ino) in &ns.paths {
                inodes.push(ino);
                if !p.is_empty()
                    && let Some(&parent) = ns.paths.get(parent_of(p))
                {
                    entries.push((parent, name_of(p).to_string()));
                }
            }
            (entries, inodes)
        };
        self.notify(entries, inodes);
    }

    fn notify(&self, entries: Vec<(u64, String)>, inodes: Vec<u64>) {
        for (parent, name) in entries {
            if let Err(e) = self
                .notifier
                .inval_entry(INodeNo(parent), OsStr::new(&name))
            {
                tracing::debug!(error = %e, name, "kernel entry invalidation failed");
            }
        }
        for ino in inodes {
            if let Err(e) = self.notifier.inval_inode(INodeNo(ino), 0, 0) {
                tracing::debug!(error = %e, ino, "kernel inode invalidation failed");
            }
        }
    }
}

/// A live mount. Dropping it unmounts like [`MountHandle::unmount`], logging any error.
pub struct MountHandle {
    core: Arc<Core>,
    session: Option<BackgroundSession>,
    notifier: Notifier,
    flusher: Option<JoinHandle<()>>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Flushes now and waits for the outcome.
    pub fn flush_now(&self) -> Result<(), FlushError> {
        let ticket = self.core.flush.request();
        self.core.flush.wait(ticket)
    }

    /// A cloneable handle for telling the kernel that the base layer changed (for the
    /// network side, which lives longer than any one borrow of the mount).
    pub fn invalidator(&self) -> Invalidator {
        Invalidator {
            core: self.core.clone(),
            notifier: self.notifier.clone(),
        }
    }

    /// See [`Invalidator::base_changed`].
    pub fn base_changed(&self, changed_paths: &[String]) {
        self.invalidator().base_changed(changed_paths)
    }

    /// See [`Invalidator::invalidate_all`].
    pub fn invalidate_all(&self) {
        self.invalidator().invalidate_all()
    }

    /// Unmounts, waits for the kernel session to end, then flushes everything that is left.
    /// If files are still open the mount is detached lazily and this waits until they close.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), MountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let unmounted = match umount2(&self.mountpoint, 0) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "mount busy; detaching lazily and waiting for open files to close");
                umount2(&self.mountpoint, libc::MNT_DETACH)
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                lazy_unmount(&self.mountpoint).map_err(io::Error::other)
            }
            Err(e) => Err(e),
        };
        let unmount_result = unmounted.map_err(|source| MountError::Unmount {
            path: self.mountpoint.clone(),
            source,
        });
        if unmount_result.is_ok()
            && let Err(e) = session.join()
        {
            tracing::warn!(error = %e, "FUSE session ended with an error");
        }
        self.core.flush.shutdown();
        if let Some(f) = self.flusher.take()
            && f.join().is_err()
        {
            tracing::error!("flush thread panicked");
        }
        unmount_result?;
        self.core.flush_all().map_err(MountError::FinalFlush)?;
        tracing::info!(mountpoint = %self.mountpoint.display(), "cairn unmounted");
        Ok(())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "unmount on drop failed");
        }
    }
}

#[cfg(test)]
mod option_tests {
    use super::*;

    #[test]
    fn option_lists_set_what_they_name_and_refuse_the_rest() {
        let mut o = MountOptions::default();
        o.apply_options(
            "allow_other,default_permissions,uid=1000,gid=100,umask=027,noauto,x-systemd.automount",
        )
        .unwrap();
        assert!(o.allow_other);
        assert!(!o.read_only);
        assert_eq!((o.uid, o.gid, o.umask), (1000, 100, 0o027));
        o.apply_options("ro").unwrap();
        assert!(o.read_only);
        assert_eq!(
            o.apply_options("uid=me"),
            Err(MountOptionError::BadValue("uid=me".into()))
        );
        assert_eq!(
            o.apply_options("umask=9"),
            Err(MountOptionError::BadValue("umask=9".into()))
        );
        assert_eq!(
            o.apply_options("allow_root"),
            Err(MountOptionError::Unknown("allow_root".into()))
        );
    }
}
