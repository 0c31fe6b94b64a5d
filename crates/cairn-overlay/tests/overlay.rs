use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use cairn_overlay::{Data, Kind, Overlay, OverlayError, Record, StagingId};
use proptest::prelude::*;

fn file(size: u64, data: Data) -> Record {
    Record {
        kind: Kind::File,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_ns: 1_700_000_000_000_000_000,
        ctime_ns: 1_700_000_000_000_000_001,
        atime_ns: None,
        size,
        xattrs: BTreeMap::new(),
        data,
        generation: 0,
    }
}

fn dir() -> Record {
    Record {
        kind: Kind::Dir,
        mode: 0o755,
        data: Data::None,
        size: 0,
        ..file(0, Data::None)
    }
}

fn strip(mut r: Record) -> Record {
    r.generation = 0;
    r
}

#[test]
fn put_get_and_reopen_after_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let (id, mut f) = {
        let ov = Overlay::open(tmp.path()).unwrap();
        let (id, mut f) = ov.create_staging().unwrap();
        f.write_all(b"hello").unwrap();
        let mut rec = file(5, Data::Staged(id));
        rec.xattrs.insert(b"user.k".to_vec(), b"v".to_vec());
        rec.atime_ns = Some(7);
        ov.put("a/b.txt", rec).unwrap();
        ov.put("a", dir()).unwrap();
        ov.whiteout("gone").unwrap();
        ov.put(
            "link",
            Record {
                kind: Kind::Symlink,
                data: Data::Target(b"a/b.txt".to_vec()),
                ..file(7, Data::None)
            },
        )
        .unwrap();
        ov.put("moved", file(3, Data::Content(vec![1, 2, 3])))
            .unwrap();
        (id, f)
    };
    f.flush().unwrap();
    let ov = Overlay::open(tmp.path()).unwrap();
    let rec = ov.get("a/b.txt").unwrap().unwrap();
    assert_eq!(rec.data, Data::Staged(id));
    assert_eq!(rec.atime_ns, Some(7));
    assert_eq!(rec.xattrs.get(&b"user.k"[..]).unwrap(), b"v");
    let mut s = String::new();
    ov.open_staging(id).unwrap().read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello");
    assert_eq!(ov.get("gone").unwrap().unwrap().kind, Kind::Whiteout);
    assert_eq!(
        ov.get("link").unwrap().unwrap().data,
        Data::Target(b"a/b.txt".to_vec())
    );
    assert_eq!(
        ov.get("moved").unwrap().unwrap().data,
        Data::Content(vec![1, 2, 3])
    );
    assert!(ov.get("a/nope").unwrap().is_none());
    let paths: Vec<String> = ov.dirty().unwrap().into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, ["a", "a/b.txt", "gone", "link", "moved"]);
}

#[test]
fn second_open_of_same_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let _ov = Overlay::open(tmp.path()).unwrap();
    assert!(matches!(
        Overlay::open(tmp.path()),
        Err(OverlayError::Locked { .. })
    ));
}

const CHILD_ENV: &str = "CAIRN_OVERLAY_TEST_CHILD_DIR";

/// Runs as a child process of `survives_abort_of_writer_process`: writes, then dies without
/// running any destructor, like kill -9. The group window is long enough that nothing commits
/// except what the barrier commits.
#[test]
fn child_writer_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let ov = Overlay::open_with_window(&dir, Duration::from_secs(3600)).unwrap();
    let (id, f) = ov.create_staging().unwrap();
    f.write_all_at(b"survivor", 0).unwrap();
    ov.put("kept.txt", file(8, Data::Staged(id))).unwrap();
    ov.durable_barrier().unwrap();
    for i in 0..100 {
        ov.put(&format!("d/{i:03}"), file(i, Data::Base)).unwrap();
    }
    // An uncommitted overwrite releases the barrier's staging file; deleting it must wait
    // for the commit that never comes.
    let (newer, n) = ov.create_staging().unwrap();
    n.write_all_at(b"uncommitted", 0).unwrap();
    let change = ov.put("kept.txt", file(11, Data::Staged(newer))).unwrap();
    assert_eq!(change.released, vec![id]);
    ov.remove_staging(id).unwrap();
    assert!(
        ov.staging_path(id).exists(),
        "deletion waits for the group commit"
    );
    // An unreferenced staging file, as a crash between create_staging and put leaves.
    let (_orphan, o) = ov.create_staging().unwrap();
    o.write_all_at(b"orphan", 0).unwrap();
    std::process::abort();
}

#[test]
fn survives_abort_of_writer_process() {
    let tmp = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer_process", "--nocapture"])
        .env(CHILD_ENV, tmp.path())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child is meant to abort");
    let ov = Overlay::open(tmp.path()).unwrap();
    let rec = ov.get("kept.txt").unwrap().unwrap();
    assert_eq!(
        rec.size, 8,
        "the barrier's state, not the uncommitted overwrite"
    );
    let mut buf = [0u8; 8];
    ov.open_staging(rec.staging().unwrap())
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"survivor");
    assert_eq!(
        ov.children("d").unwrap().len(),
        0,
        "the open group is lost whole"
    );
    let files = std::fs::read_dir(tmp.path().join("staging"))
        .unwrap()
        .count();
    assert_eq!(
        files, 1,
        "only the referenced staging file is left: unreferenced ones are deleted on open"
    );
}

/// A crash between group commits keeps exactly the committed prefix of the history, each
/// multi-record operation whole, and every staging file a surviving record references.
#[test]
fn crash_between_group_commits_keeps_the_committed_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let long = Duration::from_secs(3600);
    let ov = Overlay::open_with_window(tmp.path(), long).unwrap();
    let (a, fa) = ov.create_staging().unwrap();
    fa.write_all_at(b"aaaa", 0).unwrap();
    ov.put("dir", dir()).unwrap();
    ov.put("dir/a", file(4, Data::Staged(a))).unwrap();
    ov.put("dir/b", file(0, Data::None)).unwrap();
    ov.commit().unwrap();
    let committed = ov.dirty().unwrap();

    // The open group: a subtree move, a deletion releasing a staging file, new records.
    ov.rename_subtree("dir", "moved").unwrap();
    let change = ov.remove("moved/a").unwrap();
    assert_eq!(change.released, vec![a]);
    ov.remove_staging(a).unwrap();
    ov.put("new", file(1, Data::Base)).unwrap();
    assert!(
        ov.get("moved/b").unwrap().is_some(),
        "reads see the open group"
    );
    ov.abandon();

    let ov = Overlay::open_with_window(tmp.path(), long).unwrap();
    assert_eq!(ov.dirty().unwrap(), committed);
    let rec = ov.get("dir/a").unwrap().unwrap();
    let mut buf = [0u8; 4];
    ov.open_staging(rec.staging().unwrap())
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"aaaa");

    // The same release done again is deleted once its group commits.
    let g = ov.remove("dir/a").unwrap();
    assert_eq!(g.released, vec![a]);
    ov.remove_staging(a).unwrap();
    assert!(ov.staging_path(a).exists());
    ov.commit().unwrap();
    assert!(!ov.staging_path(a).exists());
}

/// An idle overlay commits its open group after the window on its own: a crash some time
/// after the last change loses nothing.
#[test]
fn open_group_commits_after_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let ov = Overlay::open_with_window(tmp.path(), Duration::from_millis(20)).unwrap();
    ov.put("x", dir()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ov.abandon();
    let ov = Overlay::open(tmp.path()).unwrap();
    assert!(ov.get("x").unwrap().is_some());
}

#[test]
fn orphan_staging_files_are_deleted_on_open_and_ids_not_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let (kept, orphan) = {
        let ov = Overlay::open(tmp.path()).unwrap();
        let (kept, _) = ov.create_staging().unwrap();
        let (orphan, _) = ov.create_staging().unwrap();
        ov.put("f", file(0, Data::Staged(kept))).unwrap();
        (kept, orphan)
    };
    let ov = Overlay::open(tmp.path()).unwrap();
    assert!(ov.staging_path(kept).exists());
    assert!(!ov.staging_path(orphan).exists());
    let (next, _) = ov.create_staging().unwrap();
    assert!(next > orphan);
}

#[test]
fn retire_only_drops_records_whose_generation_still_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let ov = Overlay::open(tmp.path()).unwrap();
    let (s1, _) = ov.create_staging().unwrap();
    let (s2, _) = ov.create_staging().unwrap();
    ov.put("a", file(1, Data::Staged(s1))).unwrap();
    ov.put("b", file(1, Data::Staged(s2))).unwrap();
    ov.whiteout("c").unwrap();
    let batch: Vec<(String, u64)> = ov
        .dirty()
        .unwrap()
        .into_iter()
        .map(|(p, r)| (p, r.generation))
        .collect();
    // "b" changes while the flush is in flight.
    let c = ov.put("b", file(2, Data::Staged(s2))).unwrap();
    assert!(c.generation > batch[1].1);
    let released = ov.retire(&batch).unwrap();
    assert_eq!(released, vec![s1]);
    let left: Vec<String> = ov.dirty().unwrap().into_iter().map(|(p, _)| p).collect();
    assert_eq!(left, ["b"]);
    assert!(ov.is_referenced(s2).unwrap());
    assert!(!ov.is_referenced(s1).unwrap());
    ov.remove_staging(s1).unwrap();
    ov.remove_staging(s1).unwrap();
}

#[test]
fn put_and_remove_report_released_staging() {
    let tmp = tempfile::tempdir().unwrap();
    let ov = Overlay::open(tmp.path()).unwrap();
    let (s1, _) = ov.create_staging().unwrap();
    let (s2, _) = ov.create_staging().unwrap();
    ov.put("a", file(1, Data::Staged(s1))).unwrap();
    assert_eq!(
        ov.put("a", file(1, Data::Staged(s2))).unwrap().released,
        vec![s1]
    );
    assert_eq!(
        ov.put("a", file(1, Data::Staged(s2))).unwrap().released,
        vec![]
    );
    assert_eq!(ov.whiteout("a").unwrap().released, vec![s2]);
    assert_eq!(ov.remove("a").unwrap().released, vec![]);
    assert!(ov.is_empty().unwrap());
}

#[test]
fn rename_subtree_moves_records_and_keeps_whiteouts() {
    let tmp = tempfile::tempdir().unwrap();
    let ov = Overlay::open(tmp.path()).unwrap();
    let (s, _) = ov.create_staging().unwrap();
    let (old, _) = ov.create_staging().unwrap();
    ov.put("src", dir()).unwrap();
    ov.put("src/f", file(1, Data::Staged(s))).unwrap();
    ov.put("src/sub", dir()).unwrap();
    ov.put("src/sub/g", file(2, Data::Content(vec![9])))
        .unwrap();
    ov.whiteout("src/hidden").unwrap();
    ov.put("srcx", dir()).unwrap(); // sibling sharing the prefix: must not move
    ov.put("dst", dir()).unwrap();
    ov.put("dst/f", file(1, Data::Staged(old))).unwrap();
    ov.whiteout("dst/base-child").unwrap();

    let change = ov.rename_subtree("src", "dst").unwrap();
    assert_eq!(change.released, vec![old]);
    let all: Vec<(String, Kind)> = ov
        .dirty()
        .unwrap()
        .into_iter()
        .map(|(p, r)| (p, r.kind))
        .collect();
    let expect = [
        ("dst", Kind::Dir),
        ("dst/base-child", Kind::Whiteout),
        ("dst/f", Kind::File),
        ("dst/sub", Kind::Dir),
        ("dst/sub/g", Kind::File),
        ("src/hidden", Kind::Whiteout),
        ("srcx", Kind::Dir),
    ];
    let expect: Vec<(String, Kind)> = expect.iter().map(|(p, k)| (p.to_string(), *k)).collect();
    assert_eq!(all, expect);
    assert_eq!(ov.get("dst/f").unwrap().unwrap().data, Data::Staged(s));
    let names: Vec<String> = ov
        .children("dst")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["base-child", "f", "sub"]);
    let root: Vec<String> = ov
        .children("")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(root, ["dst", "srcx"], "src/hidden stays, src itself moved");

    assert!(matches!(
        ov.rename_subtree("dst", "dst/sub/x"),
        Err(OverlayError::IntoOwnSubtree { .. })
    ));
    ov.put("b", file(1, Data::Base)).unwrap();
    assert!(matches!(
        ov.rename_subtree("b", "c"),
        Err(OverlayError::UnpinnedBase { .. })
    ));
    assert!(
        ov.get("b").unwrap().is_some(),
        "a refused move changes nothing"
    );
}

#[test]
fn exchange_swaps_subtrees() {
    let tmp = tempfile::tempdir().unwrap();
    let ov = Overlay::open(tmp.path()).unwrap();
    ov.put("a", dir()).unwrap();
    ov.put("a/x", file(1, Data::Content(vec![1]))).unwrap();
    ov.put("b", file(2, Data::Content(vec![2]))).unwrap();
    ov.exchange_subtrees("a", "b").unwrap();
    assert_eq!(ov.get("a").unwrap().unwrap().kind, Kind::File);
    assert_eq!(ov.get("b").unwrap().unwrap().kind, Kind::Dir);
    assert_eq!(ov.get("b/x").unwrap().unwrap().data, Data::Content(vec![1]));
    assert!(ov.get("a/x").unwrap().is_none());
}

#[test]
fn children_are_sorted_bytewise_and_direct_only() {
    let tmp = tempfile::tempdir().unwrap();
    let ov = Overlay::open(tmp.path()).unwrap();
    for p in ["d/b", "d/a", "d/B", "d/a/deep", "d/é", "d/a-b", "e", "d"] {
        ov.put(p, dir()).unwrap();
    }
    let names: Vec<String> = ov
        .children("d")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["B", "a", "a-b", "b", "é"]);
    let root: Vec<String> = ov
        .children("")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(root, ["d", "e"]);
    assert!(matches!(
        ov.put("/abs", dir()),
        Err(OverlayError::InvalidPath { .. })
    ));
    assert!(matches!(
        ov.put("a//b", dir()),
        Err(OverlayError::InvalidPath { .. })
    ));
}

#[test]
fn durable_barrier_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let ov = Overlay::open(tmp.path()).unwrap();
    ov.put("x", dir()).unwrap();
    ov.durable_barrier().unwrap();
    ov.put("y", dir()).unwrap();
    ov.durable_barrier().unwrap();
    drop(ov);
    let ov = Overlay::open(tmp.path()).unwrap();
    assert_eq!(ov.dirty().unwrap().len(), 2);
}

// ---- model-based test ----

#[derive(Debug, Clone)]
enum Op {
    Put(usize, u8),
    Whiteout(usize),
    Remove(usize),
    Rename(usize, usize),
    Exchange(usize, usize),
    FlushSome(Vec<bool>),
    Reopen,
}

const PATHS: &[&str] = &["a", "a/b", "a/b/c", "a/c", "ab", "b", "b/a", "c"];

fn op() -> impl Strategy<Value = Op> {
    let idx = 0..PATHS.len();
    prop_oneof![
        4 => (idx.clone(), 0u8..5).prop_map(|(p, k)| Op::Put(p, k)),
        1 => idx.clone().prop_map(Op::Whiteout),
        1 => idx.clone().prop_map(Op::Remove),
        2 => (idx.clone(), idx.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (idx.clone(), idx.clone()).prop_map(|(a, b)| Op::Exchange(a, b)),
        1 => proptest::collection::vec(any::<bool>(), PATHS.len()).prop_map(Op::FlushSome),
        1 => Just(Op::Reopen),
    ]
}

fn record_for(k: u8, staging: StagingId) -> Record {
    match k {
        0 => dir(),
        1 => file(1, Data::Base),
        2 => file(2, Data::Staged(staging)),
        3 => file(3, Data::Content(vec![k])),
        _ => Record {
            kind: Kind::Symlink,
            data: Data::Target(b"t".to_vec()),
            ..file(1, Data::None)
        },
    }
}

fn in_subtree(p: &str, root: &str) -> bool {
    p == root || p.starts_with(&format!("{root}/"))
}

fn model_move(model: &mut BTreeMap<String, Record>, from: &str, to: &str) {
    if from == to {
        return;
    }
    let moving: Vec<(String, Record)> = model
        .iter()
        .filter(|(p, r)| in_subtree(p, from) && r.kind != Kind::Whiteout)
        .map(|(p, r)| (p.clone(), r.clone()))
        .collect();
    model.retain(|p, r| !(in_subtree(p, to) && r.kind != Kind::Whiteout));
    for (p, _) in &moving {
        model.remove(p);
    }
    for (p, r) in moving {
        model.insert(format!("{to}{}", &p[from.len()..]), r);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_ops_match_a_btreemap_model(ops in proptest::collection::vec(op(), 1..40)) {
        let tmp = tempfile::tempdir().unwrap();
        let mut ov = Overlay::open(tmp.path()).unwrap();
        let mut model: BTreeMap<String, Record> = BTreeMap::new();
        let mut released_total: HashSet<StagingId> = HashSet::new();
        for op in ops {
            match op {
                Op::Put(p, k) => {
                    let (id, _) = ov.create_staging().unwrap();
                    let rec = record_for(k, id);
                    let c = ov.put(PATHS[p], rec.clone()).unwrap();
                    released_total.extend(c.released);
                    model.insert(PATHS[p].to_string(), rec);
                }
                Op::Whiteout(p) => {
                    released_total.extend(ov.whiteout(PATHS[p]).unwrap().released);
                    let mut w = Record::whiteout(0);
                    w.mtime_ns = 0;
                    model.insert(PATHS[p].to_string(), w);
                }
                Op::Remove(p) => {
                    released_total.extend(ov.remove(PATHS[p]).unwrap().released);
                    model.remove(PATHS[p]);
                }
                Op::Rename(a, b) | Op::Exchange(a, b) => {
                    let (from, to) = (PATHS[a], PATHS[b]);
                    let exchange = matches!(op, Op::Exchange(..));
                    let nested = in_subtree(to, from) && to != from
                        || exchange && in_subtree(from, to) && to != from;
                    let unpinned = from != to && model.iter().any(|(p, r)| {
                        (in_subtree(p, from) || exchange && in_subtree(p, to))
                            && r.kind != Kind::Whiteout && r.data == Data::Base
                    });
                    let res = if exchange { ov.exchange_subtrees(from, to) } else { ov.rename_subtree(from, to) };
                    match res {
                        Ok(c) => {
                            prop_assert!(!nested && !unpinned);
                            released_total.extend(c.released);
                            if exchange {
                                let tmp = "/tmp";
                                model_move(&mut model, from, tmp);
                                model_move(&mut model, to, from);
                                model_move(&mut model, tmp, to);
                            } else {
                                model_move(&mut model, from, to);
                            }
                        }
                        Err(OverlayError::IntoOwnSubtree { .. }) => prop_assert!(nested),
                        Err(OverlayError::UnpinnedBase { .. }) => prop_assert!(unpinned && !nested),
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                Op::FlushSome(pick) => {
                    let dirty = ov.dirty().unwrap();
                    let batch: Vec<(String, u64)> = dirty
                        .iter()
                        .zip(pick.iter().cycle())
                        .filter(|(_, keep)| **keep)
                        .map(|((p, r), _)| (p.clone(), r.generation))
                        .collect();
                    released_total.extend(ov.retire(&batch).unwrap());
                    for (p, _) in batch {
                        model.remove(&p);
                    }
                }
                Op::Reopen => {
                    drop(ov);
                    ov = Overlay::open(tmp.path()).unwrap();
                }
            }
            let got: Vec<(String, Record)> = ov
                .dirty()
                .unwrap()
                .into_iter()
                .map(|(p, r)| {
                    let mut r = strip(r);
                    if r.kind == Kind::Whiteout {
                        r.mtime_ns = 0;
                        r.ctime_ns = 0;
                    }
                    (p, r)
                })
                .collect();
            let want: Vec<(String, Record)> = model
                .iter()
                .map(|(p, r)| {
                    let mut r = strip(r.clone());
                    if r.kind == Kind::Whiteout {
                        r.mtime_ns = 0;
                        r.ctime_ns = 0;
                    }
                    (p.clone(), r)
                })
                .collect();
            prop_assert_eq!(&got, &want);
            for dir in ["", "a", "a/b", "b"] {
                let kids: Vec<String> = ov.children(dir).unwrap().into_iter().map(|(n, _)| n).collect();
                let want: Vec<String> = model
                    .keys()
                    .filter(|p| {
                        let parent = p.rfind('/').map(|i| &p[..i]).unwrap_or("");
                        parent == dir && !p.is_empty()
                    })
                    .map(|p| p.rsplit('/').next().unwrap().to_string())
                    .collect();
                prop_assert_eq!(kids, want);
            }
            // Every released staging file is really unreferenced.
            for id in &released_total {
                let live = model.values().any(|r| r.data == Data::Staged(*id));
                prop_assert!(!live || ov.is_referenced(*id).unwrap());
            }
        }
    }
}

#[test]
fn special_files_and_owners_are_local_never_dirty_never_pending() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let ov = Overlay::open(tmp.path()).unwrap();
        let special = |kind, data| Record {
            kind,
            data,
            ..file(0, Data::None)
        };
        ov.put("fifo", special(Kind::Fifo, Data::None)).unwrap();
        ov.put("sock", special(Kind::Socket, Data::None)).unwrap();
        ov.put("null", special(Kind::CharDev, Data::Device(0x103)))
            .unwrap();
        ov.put("sda", special(Kind::BlockDev, Data::Device(u64::MAX)))
            .unwrap();
        assert!(ov.dirty().unwrap().is_empty(), "nothing to flush");
        assert!(ov.is_empty().unwrap());
        // A published file whose owner differs from the mount's stays as an owner record.
        let (id, _f) = ov.create_staging().unwrap();
        ov.put("mine", file(0, Data::Staged(id))).unwrap(); // uid/gid 1000
        ov.put("theirs", file(0, Data::Base)).unwrap();
        ov.whiteout("gone").unwrap();
        let keys: Vec<(String, u64)> = ov
            .dirty()
            .unwrap()
            .into_iter()
            .map(|(p, r)| (p, r.generation))
            .collect();
        assert_eq!(keys.len(), 3);
        let mut theirs = file(0, Data::Base);
        theirs.uid = 0;
        // "theirs" changes during the flush: it stays dirty, untouched by retire.
        ov.put("theirs", theirs.clone()).unwrap();
        let released = ov.retire_keeping_owners(&keys, Some((0, 0))).unwrap();
        assert_eq!(released, vec![id], "the owner record drops its content");
        let mine = ov.get("mine").unwrap().unwrap();
        assert_eq!((mine.kind, mine.uid, mine.gid), (Kind::Owner, 1000, 1000));
        assert_eq!(mine.data, Data::None);
        assert!(ov.get("gone").unwrap().is_none());
        assert_eq!(strip(ov.get("theirs").unwrap().unwrap()), theirs);
        let dirty: Vec<String> = ov.dirty().unwrap().into_iter().map(|(p, _)| p).collect();
        assert_eq!(dirty, ["theirs"]);
        ov.commit().unwrap();
    }
    let pending = cairn_overlay::read_pending(tmp.path()).unwrap();
    let paths: Vec<&str> = pending.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["theirs"], "local records are never pending uploads");
    let ov = Overlay::open(tmp.path()).unwrap();
    assert_eq!(ov.get("null").unwrap().unwrap().data, Data::Device(0x103));
    assert_eq!(ov.get("sda").unwrap().unwrap().data, Data::Device(u64::MAX));
    assert_eq!(ov.get("sock").unwrap().unwrap().kind, Kind::Socket);
    let names: Vec<String> = ov
        .children("")
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["fifo", "mine", "null", "sda", "sock", "theirs"]);
}
