//! The `.cairn/history/` folder through a real kernel mount, over in-memory snapshots.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use cairn_fuse::{
    BaseError, BaseLayer, HistoryFolder, HistorySource, MemBase, MountOptions, PastSnapshot,
};
use common::{Mounted, check, cstr, errno, opts};

const T1: u64 = 1_796_119_200_000; // 2026-12-01T10:00:00Z
const T2: u64 = T1 + 65_000; // 2026-12-01T10:01:05Z

/// Two past snapshots: "laptop" wrote version one, "desk" version two.
struct Past {
    old: Arc<MemBase>,
    new: Arc<MemBase>,
}

impl HistorySource for Past {
    fn snapshots(&self) -> Result<Vec<PastSnapshot>, BaseError> {
        Ok(vec![
            PastSnapshot {
                key: vec![1],
                created_ms: T1,
                device: vec![1; 32],
                device_name: "laptop".into(),
            },
            PastSnapshot {
                key: vec![2],
                created_ms: T2,
                device: vec![2; 32],
                device_name: "desk".into(),
            },
        ])
    }

    fn open(&self, key: &[u8]) -> Result<Arc<dyn BaseLayer>, BaseError> {
        match key {
            [1] => Ok(self.old.clone()),
            [2] => Ok(self.new.clone()),
            _ => Err(BaseError::Unavailable("unknown snapshot".into())),
        }
    }
}

fn mounted(live: MemBase) -> Mounted {
    let old = MemBase::new();
    old.insert_file("report.txt", b"version one", 0o640);
    old.insert_file("docs/a/deep.txt", b"deep", 0o644);
    old.set_xattr("report.txt", b"user.tag", b"draft");
    let new = MemBase::new();
    new.insert_file("report.txt", b"version two!", 0o644);
    new.insert_symlink("to-report", b"report.txt");
    let past = Past {
        old: Arc::new(old),
        new: Arc::new(new),
    };
    let base = Arc::new(live);
    let o = MountOptions {
        history: Some(HistoryFolder(Arc::new(past))),
        ..opts()
    };
    Mounted::with_sink(base.clone(), base, o)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn past_snapshots_are_listed_browsable_and_copyable() {
    let live = MemBase::new();
    live.insert_file("report.txt", b"version three", 0o644);
    let m = mounted(live);
    // Hidden from the root listing, yet reachable by name.
    assert_eq!(names(&m.mnt), ["report.txt"]);
    assert!(fs::metadata(m.p(".cairn")).unwrap().is_dir());
    assert_eq!(names(&m.p(".cairn")), ["history"]);
    assert_eq!(
        names(&m.p(".cairn/history")),
        [
            "2026-12-01T10-00-00Z",
            "2026-12-01T10-01-05Z",
            "latest-desk",
            "latest-laptop"
        ]
    );
    let old = m.p(".cairn/history/2026-12-01T10-00-00Z");
    assert_eq!(names(&old), ["docs", "report.txt"]);
    assert_eq!(fs::read(old.join("report.txt")).unwrap(), b"version one");
    assert_eq!(fs::read(old.join("docs/a/deep.txt")).unwrap(), b"deep");
    let st = fs::metadata(old.join("report.txt")).unwrap();
    assert_eq!((st.len(), st.mode() & 0o7777), (11, 0o640));
    assert_eq!(st.mtime(), 1_600_000_000);
    assert!(
        st.ino() >= 1 << 62,
        "history inodes live in their own range"
    );
    assert_eq!(
        xattr(&old.join("report.txt"), "user.tag").as_deref(),
        Some(&b"draft"[..])
    );
    // latest-<device> is a link to that device's newest snapshot.
    let latest = m.p(".cairn/history/latest-desk");
    assert_eq!(
        fs::read_link(&latest).unwrap().to_str(),
        Some("2026-12-01T10-01-05Z")
    );
    assert_eq!(
        fs::read(latest.join("report.txt")).unwrap(),
        b"version two!"
    );
    assert_eq!(
        fs::read_link(latest.join("to-report")).unwrap().to_str(),
        Some("report.txt")
    );
    // The simplest restore there is; it syncs like any write, .cairn never does.
    fs::copy(old.join("report.txt"), m.p("report.txt")).unwrap();
    m.flush();
    assert_eq!(m.base.file_content("report.txt").unwrap(), b"version one");
    assert!(
        m.base.paths().iter().all(|p| !p.starts_with(".cairn")),
        "{:?}",
        m.base.paths()
    );
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            cstr(p).as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

#[test]
fn every_write_into_the_history_folder_fails_with_erofs() {
    let live = MemBase::new();
    live.insert_file("mine.txt", b"mine", 0o644);
    live.insert_dir("live-dir", 0o755);
    let m = mounted(live);
    let snap = m.p(".cairn/history/2026-12-01T10-00-00Z");
    let file = snap.join("report.txt");
    let erofs = |r: std::io::Result<()>, what: &str| {
        assert_eq!(r.map_err(errno), Err(libc::EROFS), "{what}");
    };
    let open = |p: &Path, flags: i32| {
        // SAFETY: a valid C string.
        let fd = unsafe { libc::open(cstr(p).as_ptr(), flags, 0o644) };
        if fd >= 0 {
            // SAFETY: fd was just opened.
            unsafe { libc::close(fd) };
        }
        check(fd).map_err(std::io::Error::from_raw_os_error)
    };
    erofs(open(&file, libc::O_WRONLY), "open O_WRONLY");
    erofs(open(&file, libc::O_RDWR), "open O_RDWR");
    erofs(open(&file, libc::O_RDONLY | libc::O_TRUNC), "open O_TRUNC");
    erofs(
        open(&snap.join("new.txt"), libc::O_WRONLY | libc::O_CREAT),
        "create",
    );
    erofs(
        fs::write(m.p(".cairn/history/x"), b"x"),
        "create in history",
    );
    erofs(fs::write(m.p(".cairn/x"), b"x"), "create in .cairn");
    erofs(fs::create_dir(snap.join("d")), "mkdir");
    erofs(fs::create_dir(m.p(".cairn/history/d")), "mkdir in history");
    erofs(fs::remove_file(&file), "unlink");
    erofs(fs::remove_dir(snap.join("docs/a")), "rmdir");
    erofs(
        fs::remove_dir(m.p(".cairn/history/2026-12-01T10-00-00Z")),
        "rmdir snapshot",
    );
    erofs(fs::rename(&file, snap.join("moved")), "rename inside");
    erofs(fs::rename(&file, m.p("stolen.txt")), "rename out of");
    erofs(
        fs::rename(m.p("mine.txt"), snap.join("mine.txt")),
        "rename into",
    );
    // A file over a directory is the kernel's EISDIR before cairn is asked.
    assert_eq!(
        fs::rename(m.p("mine.txt"), m.p(".cairn")).map_err(errno),
        Err(libc::EISDIR)
    );
    erofs(
        fs::rename(m.p("live-dir"), m.p(".cairn")),
        "rename dir onto .cairn",
    );
    erofs(fs::rename(m.p(".cairn"), m.p("gone")), "rename .cairn away");
    erofs(fs::remove_dir(m.p(".cairn")), "rmdir .cairn");
    erofs(
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    // SAFETY: valid C strings throughout.
    unsafe {
        erofs(
            check(libc::truncate(cstr(&file).as_ptr(), 0))
                .map_err(std::io::Error::from_raw_os_error),
            "truncate",
        );
        erofs(
            check(libc::utimensat(
                libc::AT_FDCWD,
                cstr(&file).as_ptr(),
                std::ptr::null(),
                0,
            ))
            .map_err(std::io::Error::from_raw_os_error),
            "utimes",
        );
        erofs(
            check(libc::chown(
                cstr(&file).as_ptr(),
                libc::getuid(),
                libc::getgid(),
            ))
            .map_err(std::io::Error::from_raw_os_error),
            "chown",
        );
        erofs(
            check(libc::setxattr(
                cstr(&file).as_ptr(),
                c"user.x".as_ptr(),
                b"1".as_ptr().cast(),
                1,
                0,
            ))
            .map_err(std::io::Error::from_raw_os_error),
            "setxattr",
        );
        erofs(
            check(libc::removexattr(
                cstr(&file).as_ptr(),
                c"user.tag".as_ptr(),
            ))
            .map_err(std::io::Error::from_raw_os_error),
            "removexattr",
        );
        erofs(
            check(libc::mknod(
                cstr(&snap.join("fifo")).as_ptr(),
                libc::S_IFIFO | 0o644,
                0,
            ))
            .map_err(std::io::Error::from_raw_os_error),
            "mknod",
        );
    }
    erofs(
        std::os::unix::fs::symlink("report.txt", snap.join("ln")),
        "symlink",
    );
    erofs(fs::hard_link(&file, m.p("linked.txt")), "link out of");
    erofs(fs::hard_link(m.p("mine.txt"), snap.join("l")), "link into");
    // Nothing changed, nothing reached the sink.
    assert_eq!(fs::read(&file).unwrap(), b"version one");
    m.flush();
    assert_eq!(m.base.paths(), ["", "live-dir", "mine.txt"]);
}

#[test]
fn a_real_cairn_entry_at_the_root_wins_until_renamed() {
    let live = MemBase::new();
    live.insert_file(".cairn/notes.txt", b"old vault data", 0o644);
    let m = mounted(live);
    assert_eq!(names(&m.mnt), [".cairn"]);
    assert_eq!(
        fs::read(m.p(".cairn/notes.txt")).unwrap(),
        b"old vault data"
    );
    assert!(fs::metadata(m.p(".cairn/history")).is_err());
    fs::rename(m.p(".cairn"), m.p("old-cairn")).unwrap();
    assert_eq!(names(&m.mnt), ["old-cairn"]);
    assert_eq!(names(&m.p(".cairn")), ["history"]);
    m.flush();
    assert_eq!(
        m.base.file_content("old-cairn/notes.txt").unwrap(),
        b"old vault data"
    );
}

/// Many snapshots of one device, one second apart, all with the same tree.
struct Many(usize, Arc<MemBase>);

impl HistorySource for Many {
    fn snapshots(&self) -> Result<Vec<PastSnapshot>, BaseError> {
        Ok((0..self.0)
            .map(|i| PastSnapshot {
                key: (i as u32).to_le_bytes().to_vec(),
                created_ms: T1 + i as u64 * 1000,
                device: vec![7; 32],
                device_name: "laptop".into(),
            })
            .collect())
    }

    fn open(&self, _key: &[u8]) -> Result<Arc<dyn BaseLayer>, BaseError> {
        Ok(self.1.clone())
    }
}

#[test]
fn a_listing_of_thousands_of_snapshots_takes_many_replies_and_misses_none() {
    let past = MemBase::new();
    past.insert_file("f", b"x", 0o644);
    let base = Arc::new(MemBase::new());
    let o = MountOptions {
        history: Some(HistoryFolder(Arc::new(Many(3000, Arc::new(past))))),
        ..opts()
    };
    let m = Mounted::with_sink(base.clone(), base, o);
    let listed = names(&m.p(".cairn/history"));
    assert_eq!(listed.len(), 3001);
    assert_eq!(listed[0], "2026-12-01T10-00-00Z");
    assert_eq!(listed[2999], "2026-12-01T10-49-59Z");
    assert_eq!(listed[3000], "latest-laptop");
    // With attributes (readdirplus), every one is a directory and the link resolves.
    let dirs = fs::read_dir(m.p(".cairn/history"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
        .count();
    assert_eq!(dirs, 3000);
    assert_eq!(
        fs::read(m.p(".cairn/history/latest-laptop/f")).unwrap(),
        b"x"
    );
}
