//! Flushing, unmount, replay after remount, bounded memory, and mountpoint checks.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_fuse::{
    Data, FlushBatch, FlushError, FlushSink, MemBase, MountError, MountOptions, Overlay, mount,
};
use common::*;

/// Lets a test hold a flush in the middle: the sink reports it has the batch, then waits.
struct GateSink {
    inner: Arc<MemBase>,
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl FlushSink for GateSink {
    fn flush(&self, batch: FlushBatch) -> Result<(), FlushError> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30));
        self.inner.flush(batch)
    }
}

#[test]
fn records_changed_during_a_flush_stay_dirty() {
    let base = Arc::new(MemBase::new());
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    let sink = Arc::new(GateSink {
        inner: base.clone(),
        entered: Mutex::new(etx),
        release: Mutex::new(rrx),
    });
    let m = Mounted::with_sink(base.clone(), sink, opts());
    fs::write(m.p("a"), b"v1").unwrap();
    fs::write(m.p("gone-later"), b"x").unwrap();
    std::thread::scope(|s| {
        let flusher = s.spawn(|| m.handle().flush_now());
        erx.recv_timeout(Duration::from_secs(10)).unwrap();
        // The mount keeps serving while the sink works.
        fs::set_permissions(m.p("a"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(m.p("b"), b"new").unwrap();
        fs::remove_file(m.p("gone-later")).unwrap();
        rtx.send(()).unwrap();
        flusher.join().unwrap().unwrap();
    });
    // The first flush committed the records as they were when it started.
    assert_eq!(base.entry("a").unwrap().mode & 0o777, 0o644 & !umask());
    assert!(base.file_content("b").is_none());
    assert!(
        base.entry("gone-later").is_some(),
        "committed by the first flush"
    );
    assert!(!m.p("gone-later").exists());
    assert_eq!(
        fs::metadata(m.p("a")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // What changed meanwhile stayed dirty and goes with the next flush.
    rtx.send(()).unwrap();
    m.flush();
    assert_eq!(base.flushes(), 2);
    assert_eq!(base.entry("a").unwrap().mode & 0o777, 0o600);
    assert_eq!(base.file_content("a").unwrap(), b"v1");
    assert_eq!(base.file_content("b").unwrap(), b"new");
    assert!(
        base.entry("gone-later").is_none(),
        "a deletion during the flush must not let the flush resurrect the file"
    );
}

fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

#[test]
fn close_of_a_written_file_flushes_after_the_debounce() {
    let base = Arc::new(MemBase::new());
    let opts = MountOptions {
        flush_debounce: Duration::from_millis(200),
        ..opts()
    };
    let m = Mounted::with_sink(base.clone(), base.clone(), opts);
    let mut f = File::create(m.p("doc")).unwrap();
    f.write_all(b"draft").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while base.file_content("doc").is_none() {
        assert!(Instant::now() < deadline, "no flush after close + debounce");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(base.file_content("doc").unwrap(), b"draft");
}

#[test]
fn an_open_file_survives_the_flush_of_its_content() {
    let m = Mounted::new(MemBase::new());
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.p("log"))
        .unwrap();
    f.write_all(b"one,").unwrap();
    f.sync_all().unwrap();
    m.flush();
    assert_eq!(m.base.file_content("log").unwrap(), b"one,");
    f.write_all(b"two").unwrap();
    let mut s = String::new();
    File::open(m.p("log"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "one,two");
    drop(f);
    m.flush();
    assert_eq!(m.base.file_content("log").unwrap(), b"one,two");
}

#[test]
fn unmount_flushes_everything() {
    let mut m = Mounted::new(MemBase::new());
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/file"), b"last words").unwrap();
    m.unmount().unwrap();
    assert!(!is_mounted(&m.mnt));
    assert_eq!(m.base.file_content("dir/file").unwrap(), b"last words");
    assert!(Overlay::open(&m.overlay_dir).unwrap().is_empty().unwrap());
}

struct FailSink;

impl FlushSink for FailSink {
    fn flush(&self, _batch: FlushBatch) -> Result<(), FlushError> {
        Err(FlushError::Rejected("engine offline".into()))
    }
}

#[test]
fn remount_replays_unflushed_changes() {
    let base = Arc::new(MemBase::new());
    base.insert_file("old.txt", b"old", 0o644);
    let mut m = Mounted::with_sink(base.clone(), Arc::new(FailSink), opts());
    fs::write(m.p("kept.txt"), b"not yet flushed").unwrap();
    fs::remove_file(m.p("old.txt")).unwrap();
    fs::create_dir(m.p("d")).unwrap();
    assert!(m.handle().flush_now().is_err());
    match m.unmount() {
        Err(MountError::FinalFlush(_)) => {}
        other => panic!("expected the final flush to fail, got {other:?}"),
    }
    assert!(!is_mounted(&m.mnt));
    assert!(base.entry("kept.txt").is_none());

    m.remount_with(base.clone(), opts());
    assert_eq!(fs::read(m.p("kept.txt")).unwrap(), b"not yet flushed");
    assert!(!m.p("old.txt").exists());
    assert!(m.p("d").is_dir());
    m.unmount().unwrap();
    assert_eq!(base.file_content("kept.txt").unwrap(), b"not yet flushed");
    assert!(base.entry("old.txt").is_none());
    assert!(base.entry("d").is_some());
}

/// Reads staged content in blocks and only counts it, like an engine that chunks and stores.
struct CountingSink {
    bytes: Mutex<u64>,
}

impl FlushSink for CountingSink {
    fn flush(&self, batch: FlushBatch) -> Result<(), FlushError> {
        let mut buf = vec![0u8; 1 << 20];
        for item in batch.items {
            if let (Data::Staged(_), Some(st)) = (&item.record.data, &item.staged) {
                let mut off = 0u64;
                loop {
                    let n = st.file.read_at(&mut buf, off)?;
                    if n == 0 {
                        break;
                    }
                    off += n as u64;
                }
                *self.bytes.lock().unwrap() += off;
            }
        }
        Ok(())
    }
}

#[test]
fn writing_256_mib_keeps_memory_bounded() {
    let base = Arc::new(MemBase::new());
    let sink = Arc::new(CountingSink {
        bytes: Mutex::new(0),
    });
    let mut m = Mounted::with_sink(base, sink.clone(), opts());
    let start = vm_rss_kib();
    let mut peak = start;
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let mut f = File::create(m.p("huge.bin")).unwrap();
    for i in 0..256 {
        f.write_all(&block).unwrap();
        if i % 16 == 0 {
            peak = peak.max(vm_rss_kib());
        }
    }
    drop(f);
    peak = peak.max(vm_rss_kib());
    // Read it back through the mount too (before the flush: this sink does not keep data).
    let mut f = File::open(m.p("huge.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, 256 << 20);
    drop(f);
    m.flush();
    peak = peak.max(vm_rss_kib());
    m.unmount().unwrap();
    assert_eq!(*sink.bytes.lock().unwrap(), 256 << 20);
    eprintln!("VmRSS: {start} KiB at start, {peak} KiB at peak");
    assert!(
        peak < 200 * 1024,
        "RSS peaked at {peak} KiB (started at {start} KiB)"
    );
}

#[test]
fn mountpoint_problems_are_reported_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = Arc::new(MemBase::new());
    let try_mount = |mp: &std::path::Path, ov: &str| {
        let overlay = Overlay::open(tmp.path().join(ov)).unwrap();
        mount(
            base.clone(),
            base.clone(),
            overlay,
            mp,
            MountOptions::default(),
        )
    };
    let missing = tmp.path().join("missing");
    assert!(matches!(
        try_mount(&missing, "o1"),
        Err(MountError::MountpointMissing(_))
    ));
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        try_mount(&file, "o2"),
        Err(MountError::NotADirectory(_))
    ));
    let full = tmp.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"").unwrap();
    assert!(matches!(
        try_mount(&full, "o3"),
        Err(MountError::NotEmpty(_))
    ));
    let m = Mounted::new(MemBase::new());
    let err = try_mount(&m.mnt, "o4").unwrap_err();
    assert!(matches!(err, MountError::AlreadyMounted(_)), "{err}");
    assert!(err.to_string().contains("already a mount point"));
}

const STALE_ENV: &str = "CAIRN_FUSE_TEST_STALE_MOUNTPOINT";

/// Runs as a child process of `a_dead_mount_is_detected_and_cleaned_up`: mounts, then dies
/// without unmounting, leaving a dead FUSE mount behind like a killed daemon.
#[test]
fn child_mounts_then_dies() {
    let Ok(mnt) = std::env::var(STALE_ENV) else {
        return;
    };
    let base = Arc::new(MemBase::new());
    let overlay = Overlay::open(format!("{mnt}.overlay")).unwrap();
    let handle = mount(
        base.clone(),
        base,
        overlay,
        std::path::Path::new(&mnt),
        opts(),
    )
    .unwrap();
    std::mem::forget(handle);
    std::process::abort();
}

#[test]
fn a_dead_mount_is_detected_and_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut m = Mounted {
        overlay_dir: tmp.path().join("overlay"),
        mnt: mnt.clone(),
        tmp,
        base: Arc::new(MemBase::new()),
        handle: None,
    };
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_mounts_then_dies", "--nocapture"])
        .env(STALE_ENV, &mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    assert_eq!(
        fs::metadata(&mnt).map(|_| ()).map_err(errno),
        Err(libc::ENOTCONN),
        "the child left a dead mount"
    );
    m.remount_with(m.base.clone(), opts());
    fs::write(m.p("alive"), b"yes").unwrap();
    m.unmount().unwrap();
    assert_eq!(m.base.file_content("alive").unwrap(), b"yes");
}
