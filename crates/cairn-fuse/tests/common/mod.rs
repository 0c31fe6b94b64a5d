#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_fuse::{FlushSink, MemBase, MountHandle, MountOptions, Overlay, mount};

/// A mounted test filesystem. Dropping it unmounts; if that fails it still detaches the
/// mount with `fusermount3 -u -z` so a failing test never leaves a mount behind.
pub struct Mounted {
    pub tmp: tempfile::TempDir,
    pub mnt: PathBuf,
    pub overlay_dir: PathBuf,
    pub base: Arc<MemBase>,
    pub handle: Option<MountHandle>,
}

pub fn opts() -> MountOptions {
    MountOptions {
        // Tests flush explicitly unless they test the debounce.
        flush_debounce: Duration::from_secs(3600),
        flush_retry: Duration::from_secs(3600),
        ..MountOptions::default()
    }
}

impl Mounted {
    pub fn new(base: MemBase) -> Mounted {
        let base = Arc::new(base);
        Self::with_sink(base.clone(), base, opts())
    }

    pub fn with_sink(base: Arc<MemBase>, sink: Arc<dyn FlushSink>, opts: MountOptions) -> Mounted {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        let overlay_dir = tmp.path().join("overlay");
        std::fs::create_dir(&mnt).unwrap();
        let mut m = Mounted {
            tmp,
            mnt,
            overlay_dir,
            base,
            handle: None,
        };
        m.remount_with(sink, opts);
        m
    }

    pub fn remount_with(&mut self, sink: Arc<dyn FlushSink>, opts: MountOptions) {
        assert!(self.handle.is_none());
        let overlay = Overlay::open(&self.overlay_dir).unwrap();
        self.handle = Some(mount(self.base.clone(), sink, overlay, &self.mnt, opts).unwrap());
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn handle(&self) -> &MountHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn flush(&self) {
        self.handle().flush_now().unwrap();
    }

    pub fn unmount(&mut self) -> Result<(), cairn_fuse::MountError> {
        self.handle.take().unwrap().unmount()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.unmount();
        }
        if is_mounted(&self.mnt) {
            let _ = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mnt)
                .status();
        }
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let Ok(canon) = p.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(mp) == canon)
}

pub fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Runs a libc call returning -1 on error, giving the errno.
pub fn check(rc: libc::c_int) -> Result<(), i32> {
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(())
    }
}

pub fn check_size(rc: libc::ssize_t) -> Result<usize, i32> {
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(rc as usize)
    }
}

pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), i32> {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: valid C strings; AT_FDCWD with absolute paths.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

pub fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}
