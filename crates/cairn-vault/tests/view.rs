//! MergedView: per-path resolution across layers, streaming scans and directory listings.

mod common;

use std::sync::Arc;

use cairn_vault::{Change, EntryKey, EntrySource, MemorySource, MergedView};
use common::*;

#[test]
fn view_resolves_by_version_and_lists_direct_children() {
    let f = Fixture::new(2);
    let (mut a, mut b) = (f.vault(0), f.vault(1));
    mkdir(&mut a, "d", 1);
    mkdir(&mut a, "d/sub", 1);
    write(&mut a, "d/one", "a1", 2);
    write(&mut a, "d/sub/deep", "deep", 2);
    write(&mut a, "top", "t", 2);
    b.receive(a.snapshot(3).unwrap().id).unwrap();
    write(&mut b, "d/one", "b-newer", 4); // dominates a's
    b.commit([(p("top"), Change::Remove)], 5).unwrap(); // dominating delete hides
    write(&mut b, "d/two", "b2", 6);
    write(&mut a, "d/three", "a3", 7); // concurrent paths: both visible

    // An overlay with a dirty file not yet committed anywhere.
    let mut overlay = MemorySource::new();
    let mut staged = a.entry(&EntryKey::file(p("d/three"))).unwrap().unwrap();
    staged.content = cairn_vault::Content::Inline(b"staged".to_vec());
    staged.size = 6;
    staged.version.vv.bump(a.device());
    staged.version.dots = vec![(a.device(), staged.version.vv.get(&a.device()))];
    overlay.insert(&EntryKey::file(p("d/three")), staged);

    let mut view = MergedView::new(vec![
        ("overlay".into(), Arc::new(overlay) as Arc<dyn EntrySource>),
        ("own".into(), Arc::new(a.source())),
        ("peer-b".into(), Arc::new(b.source())),
    ]);
    let get = |v: &MergedView, path: &str| v.get(&p(path)).unwrap().and_then(|(_, e)| inline(&e));
    assert_eq!(get(&view, "d/one").as_deref(), Some("b-newer"));
    assert_eq!(get(&view, "d/three").as_deref(), Some("staged"));
    assert_eq!(get(&view, "top"), None);
    assert!(view.get(&p("d/sub")).unwrap().unwrap().0.dir);

    let names: Vec<String> = view
        .list_dir(&p("d"))
        .unwrap()
        .map(|e| e.unwrap().name)
        .collect();
    assert_eq!(names, ["one", "sub", "three", "two"]);
    let root: Vec<String> = view
        .list_dir(&p(""))
        .unwrap()
        .map(|e| e.unwrap().name)
        .collect();
    assert_eq!(root, ["d"]);
    let all: Vec<_> = view
        .scan_prefix(&p("d"))
        .unwrap()
        .map(|e| e.unwrap().0)
        .collect();
    assert_eq!(all.len(), 5);

    // A peer publishes again: replacing its layer updates the view.
    write(&mut b, "d/two", "b2-again", 8);
    view.set_layer("peer-b", Arc::new(b.source()));
    assert_eq!(get(&view, "d/two").as_deref(), Some("b2-again"));
    assert!(view.remove_layer("overlay"));
    assert_eq!(get(&view, "d/three").as_deref(), Some("a3"));
}

#[test]
fn listing_skips_large_subtrees() {
    let f = Fixture::new(1);
    let mut a = f.vault(0);
    mkdir(&mut a, "big", 1);
    let changes: Vec<_> = (0..5000)
        .map(|i| {
            (
                p(&format!("big/f{i:05}")),
                Change::write_inline(vec![1], 0o644, 0),
            )
        })
        .collect();
    a.commit(changes, 2).unwrap();
    write(&mut a, "small", "s", 3);
    let view = MergedView::new(vec![(
        "own".into(),
        Arc::new(a.source()) as Arc<dyn EntrySource>,
    )]);
    a.stores().tree.clear_cache();
    let before = a.stores().tree.cache_stats();
    let root: Vec<String> = view
        .list_dir(&p(""))
        .unwrap()
        .map(|e| e.unwrap().name)
        .collect();
    assert_eq!(root, ["big", "small"]);
    let after = a.stores().tree.cache_stats();
    // Listing the root must not walk the 5000-entry subtree: a handful of node loads.
    let loads = (after.misses + after.hits) - (before.misses + before.hits);
    assert!(loads < 40, "{loads} node reads to list 2 names");
}
