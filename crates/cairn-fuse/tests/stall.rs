//! One slow base read (a tree node or chunk a peer has yet to send) stalls only the
//! operations that need it: lookups, listings, attribute reads, file reads and creates of
//! other paths go on meanwhile, on the other kernel request threads.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cairn_fuse::{BaseChildren, BaseEntry, BaseError, BaseLayer, MemBase, Overlay, mount};
use common::*;

/// A base read the gate holds until it opens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Slow {
    Get(String),
    Children(String),
    Read(String),
}

#[derive(Default)]
struct GateState {
    open: bool,
    /// Held reads that have started (each key once however many times it is entered).
    entered: HashSet<Slow>,
}

#[derive(Default)]
struct Gate {
    st: Mutex<GateState>,
    cv: Condvar,
}

impl Gate {
    fn pass(&self, key: Slow) {
        let mut st = self.st.lock().unwrap();
        st.entered.insert(key);
        self.cv.notify_all();
        while !st.open {
            st = self.cv.wait(st).unwrap();
        }
    }

    fn open(&self) {
        self.st.lock().unwrap().open = true;
        self.cv.notify_all();
    }

    /// Waits (bounded) until every one of `keys` is held.
    fn wait_entered(&self, keys: &[Slow], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.st.lock().unwrap();
        while !keys.iter().all(|k| st.entered.contains(k)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.cv.wait_timeout(st, left).unwrap().0;
        }
        true
    }
}

/// Opens the gate when dropped, so a failing test never leaves a FUSE thread (and the
/// unmount) waiting on it.
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A base whose reads of chosen paths wait on a gate, like reads of content only a paused
/// peer has.
struct GatedBase {
    inner: Arc<MemBase>,
    gate: Arc<Gate>,
    slow: HashSet<Slow>,
}

impl GatedBase {
    fn check(&self, key: Slow) {
        if self.slow.contains(&key) {
            self.gate.pass(key);
        }
    }
}

impl BaseLayer for GatedBase {
    fn get(&self, path: &str) -> Result<Option<BaseEntry>, BaseError> {
        self.check(Slow::Get(path.to_string()));
        self.inner.get(path)
    }

    fn children(&self, dir: &str) -> Result<BaseChildren<'_>, BaseError> {
        self.check(Slow::Children(dir.to_string()));
        self.inner.children(dir)
    }

    fn read(&self, entry: &BaseEntry, offset: u64, buf: &mut [u8]) -> Result<usize, BaseError> {
        let path = self.inner.paths().into_iter().find(|p| {
            self.inner
                .entry(p)
                .is_some_and(|e| e.content == entry.content)
        });
        if let Some(p) = path {
            self.check(Slow::Read(p));
        }
        self.inner.read(entry, offset, buf)
    }
}

fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(f)
}

/// Joins `h`, failing the test if it has not finished within `limit` (a deadlock, not a
/// slow machine: the limit is generous).
fn join_within<T>(h: JoinHandle<T>, limit: Duration, what: &str) -> T {
    let deadline = Instant::now() + limit;
    while !h.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish while other base reads were held: the mount stalls"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().unwrap()
}

#[test]
fn a_held_base_read_stalls_only_what_needs_it() {
    let mem = Arc::new(MemBase::new());
    mem.insert_file("slow/big.bin", &[7u8; 3000], 0o644);
    mem.insert_file("slowdir/x.txt", b"x", 0o644);
    mem.insert_file("slowdata/data.bin", b"slow content", 0o644);
    mem.insert_file("fast/a.txt", b"hello", 0o644);
    mem.insert_file("fast/sub/b.txt", b"world", 0o600);
    for i in 0..40 {
        mem.insert_file(&format!("many/f{i:02}"), format!("{i}").as_bytes(), 0o644);
    }
    let gate = Arc::new(Gate::default());
    let slow: HashSet<Slow> = [
        Slow::Get("slow/big.bin".into()),
        Slow::Children("slowdir".into()),
        Slow::Read("slowdata/data.bin".into()),
    ]
    .into();
    let held: Vec<Slow> = slow.iter().cloned().collect();
    let base = Arc::new(GatedBase {
        inner: mem.clone(),
        gate: gate.clone(),
        slow,
    });
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let overlay_dir = tmp.path().join("overlay");
    fs::create_dir(&mnt).unwrap();
    let overlay = Overlay::open(&overlay_dir).unwrap();
    let handle = mount(base, mem.clone(), overlay, &mnt, opts()).unwrap();
    let m = Mounted {
        tmp,
        mnt,
        overlay_dir,
        base: mem,
        handle: Some(handle),
    };
    // Dropped before `m`: the gate opens before the unmount.
    let _open = OpenOnDrop(gate.clone());

    let p = |rel: &str| -> PathBuf { m.p(rel) };
    // A lookup, a listing and a file read, each held inside the base.
    let lookup = {
        let f = p("slow/big.bin");
        in_thread(move || fs::metadata(f).map(|m| m.len()))
    };
    let listing = {
        let d = p("slowdir");
        in_thread(move || {
            fs::read_dir(d).map(|r| {
                r.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect::<Vec<_>>()
            })
        })
    };
    let read = {
        let f = p("slowdata/data.bin");
        in_thread(move || fs::read(f))
    };
    let ok = gate.wait_entered(&held, Duration::from_secs(30));
    let entered = gate.st.lock().unwrap().entered.clone();
    assert!(
        ok,
        "the held operations never reached the base: {entered:?}"
    );

    // Meanwhile, everything else: lookups, attributes, listings with attributes, reads,
    // a create and a rename.
    let others = {
        let (fast, many, root, sub) = (p("fast"), p("many"), p(""), p("fast/sub/b.txt"));
        in_thread(move || {
            assert_eq!(fs::read(fast.join("a.txt")).unwrap(), b"hello");
            assert_eq!(fs::read(&sub).unwrap(), b"world");
            assert_eq!(fs::metadata(&sub).unwrap().len(), 5);
            let mut names: Vec<String> = fs::read_dir(&many)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    assert!(e.metadata().unwrap().is_file());
                    e.file_name().into_string().unwrap()
                })
                .collect();
            names.sort();
            assert_eq!(names.len(), 40);
            assert_eq!(names[7], "f07");
            let top: HashSet<String> = fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert!(top.contains("slow") && top.contains("fast"), "{top:?}");
            fs::write(fast.join("new.txt"), b"made meanwhile").unwrap();
            fs::rename(fast.join("new.txt"), fast.join("renamed.txt")).unwrap();
            assert_eq!(
                fs::read(fast.join("renamed.txt")).unwrap(),
                b"made meanwhile"
            );
        })
    };
    join_within(others, Duration::from_secs(60), "work on other paths");
    assert!(
        !lookup.is_finished() && !listing.is_finished() && !read.is_finished(),
        "a held operation finished before its base read was released"
    );

    gate.open();
    let limit = Duration::from_secs(60);
    assert_eq!(join_within(lookup, limit, "the held lookup").unwrap(), 3000);
    assert_eq!(
        join_within(listing, limit, "the held listing").unwrap(),
        vec!["x.txt".to_string()]
    );
    assert_eq!(
        join_within(read, limit, "the held read").unwrap(),
        b"slow content"
    );
}
