//! Merge rules on concrete scenarios, and merge laws (commutative, idempotent) on random
//! snapshots derived from a common base.

mod common;

use cairn_vault::{Change, EntrySource, Vault, VaultStores};
use common::*;
use proptest::prelude::*;

fn merged(stores: &VaultStores, a: &Vault, b: &Vault) -> cairn_vault::MergeOutcome {
    stores.merge(&a.root(), &b.root()).unwrap()
}

#[test]
fn concurrent_edits_keep_both_with_a_conflict_copy() {
    let f = Fixture::new(2);
    let (mut a, mut b) = (f.vault(0), f.vault(1));
    write(&mut a, "notes.txt", "base", 1_000);
    let s = a.snapshot(1_000).unwrap();
    b.receive(s.id).unwrap();
    // 2024-02-29 13:14:15 UTC, a few ms apart: b's edit is newer and keeps the name.
    write(&mut a, "notes.txt", "from a", 1_709_212_455_000);
    write(&mut b, "notes.txt", "from b", 1_709_212_455_500);
    let out = merged(&f.stores, &a, &b);
    let src = f.stores.source(out.root);
    let files = live(&src);
    let copy = format!(
        "notes.sync-conflict-20240229-131415-{}.txt",
        a.device().short()
    );
    assert_eq!(
        files,
        vec![
            (
                "notes.sync-conflict-20240229-131415-".to_string() + &a.device().short() + ".txt",
                Some("from a".into())
            ),
            ("notes.txt".into(), Some("from b".into())),
        ]
    );
    assert_eq!(out.report.conflicts.len(), 1);
    assert_eq!(out.report.conflicts[0].copy.as_str(), copy);
    // Same result from the other side.
    assert_eq!(merged(&f.stores, &b, &a).root, out.root);
}

#[test]
fn edit_beats_concurrent_delete_and_dominating_delete_stays() {
    let f = Fixture::new(2);
    let (mut a, mut b) = (f.vault(0), f.vault(1));
    write(&mut a, "f", "v1", 1);
    b.receive(a.snapshot(1).unwrap().id).unwrap();
    // a deletes, b edits concurrently: the edit survives.
    a.commit([(p("f"), Change::Remove)], 2).unwrap();
    write(&mut b, "f", "v2", 3);
    let out = merged(&f.stores, &a, &b);
    assert_eq!(
        live(&f.stores.source(out.root)),
        vec![("f".into(), Some("v2".into()))]
    );

    // b deletes after seeing everything: the delete dominates and stays, whatever order
    // stale snapshots arrive in.
    let stale_a = a.snapshot(4).unwrap();
    b.receive(stale_a.id).unwrap();
    b.commit([(p("f"), Change::Remove)], 5).unwrap();
    let old_edit = f.stores.merge(&a.root(), &b.root()).unwrap();
    assert!(live(&f.stores.source(old_edit.root)).is_empty());
    b.receive(stale_a.id).unwrap();
    assert!(live(&b.source()).is_empty());
}

#[test]
fn delete_after_seeing_a_merged_edit_wins() {
    // a and b edit/delete concurrently; the merge keeps a's edit. c, having seen only
    // a's edit, deletes it: that delete must win against the merged (joined) version.
    let f = Fixture::new(3);
    let (mut a, mut b, mut c) = (f.vault(0), f.vault(1), f.vault(2));
    write(&mut a, "f", "v1", 1);
    let s = a.snapshot(1).unwrap();
    b.receive(s.id).unwrap();
    b.commit([(p("f"), Change::Remove)], 2).unwrap();
    write(&mut a, "f", "v2", 3);
    let sa = a.snapshot(3).unwrap();
    c.receive(sa.id).unwrap();
    c.commit([(p("f"), Change::Remove)], 4).unwrap();
    b.receive(sa.id).unwrap();
    assert_eq!(live(&b.source()), vec![("f".into(), Some("v2".into()))]);
    let out = f.stores.merge(&b.root(), &c.root()).unwrap();
    assert!(live(&f.stores.source(out.root)).is_empty());
}

#[test]
fn directories_are_resurrected_for_live_children_and_win_names() {
    let f = Fixture::new(2);
    let (mut a, mut b) = (f.vault(0), f.vault(1));
    mkdir(&mut a, "d", 1);
    b.receive(a.snapshot(1).unwrap().id).unwrap();
    a.commit([(p("d"), Change::Rmdir)], 2).unwrap();
    write(&mut b, "d/new.txt", "child", 3);
    let out = merged(&f.stores, &a, &b);
    assert_eq!(
        live(&f.stores.source(out.root)),
        vec![
            ("d/".into(), None),
            ("d/new.txt".into(), Some("child".into()))
        ]
    );
    assert_eq!(out.report.resurrected.len(), 1);

    // File `x` on one side, directory `x` on the other: the directory keeps the name.
    let (mut c, mut d) = (f.vault(0), f.vault(1));
    write(&mut c, "x", "file", 10);
    mkdir(&mut d, "x", 11);
    let out = merged(&f.stores, &c, &d);
    let names: Vec<String> = live(&f.stores.source(out.root))
        .into_iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"x/".to_string()));
    assert!(names.iter().any(|n| n.starts_with("x.sync-conflict-")));
    assert_eq!(merged(&f.stores, &d, &c).root, out.root);
}

#[test]
fn concurrent_renames_keep_both_names_and_rename_vs_edit_keeps_both() {
    let f = Fixture::new(2);
    let (mut a, mut b) = (f.vault(0), f.vault(1));
    write(&mut a, "f", "orig", 1);
    b.receive(a.snapshot(1).unwrap().id).unwrap();
    a.commit([(p("f"), Change::Rename { to: p("g") })], 2)
        .unwrap();
    b.commit([(p("f"), Change::Rename { to: p("h") })], 3)
        .unwrap();
    let out = merged(&f.stores, &a, &b);
    assert_eq!(
        live(&f.stores.source(out.root)),
        vec![
            ("g".into(), Some("orig".into())),
            ("h".into(), Some("orig".into()))
        ]
    );

    let (mut c, mut d) = (f.vault(0), f.vault(1));
    write(&mut c, "f", "orig", 1);
    d.receive(c.snapshot(1).unwrap().id).unwrap();
    c.commit([(p("f"), Change::Rename { to: p("g") })], 2)
        .unwrap();
    write(&mut d, "f", "edited", 3);
    let out = merged(&f.stores, &c, &d);
    assert_eq!(
        live(&f.stores.source(out.root)),
        vec![
            ("f".into(), Some("edited".into())),
            ("g".into(), Some("orig".into()))
        ]
    );
}

#[test]
fn commit_rejects_invalid_changes_without_changing_anything() {
    let f = Fixture::new(1);
    let mut a = f.vault(0);
    write(&mut a, "f", "x", 1);
    let root = a.root();
    for (path, change) in [
        ("missing/f", Change::write_inline(b"x".to_vec(), 0o644, 0)),
        ("nope", Change::Remove),
        ("f", Change::Rmdir),
        (
            "f",
            Change::Mkdir {
                attrs: Default::default(),
            },
        ),
    ] {
        // A valid change first: the whole commit must still be refused.
        let err = a
            .commit(
                [
                    (p("ok"), Change::write_inline(b"y".to_vec(), 0o644, 0)),
                    (p(path), change),
                ],
                2,
            )
            .unwrap_err();
        assert!(
            matches!(err, cairn_vault::VaultError::Rejected { .. }),
            "{err}"
        );
        assert_eq!(a.root(), root);
    }
    mkdir(&mut a, "d", 3);
    write(&mut a, "d/x", "1", 4);
    assert!(a.commit([(p("d"), Change::Rmdir)], 5).is_err());
}

/// One random local operation on a tiny universe.
fn op(sel: u8, val: u8) -> (String, Change) {
    let files = ["a", "b.txt", "d/a", "d/b.txt", "e/x", "d"];
    let dirs = ["d", "e"];
    let f = files[(val as usize) % files.len()].to_string();
    match sel % 6 {
        0 | 1 => (f, Change::write_inline(vec![val, sel], 0o644, 0)),
        2 => (f, Change::Remove),
        3 => (
            dirs[(val as usize) % 2].into(),
            Change::Mkdir {
                attrs: Default::default(),
            },
        ),
        4 => (dirs[(val as usize) % 2].into(), Change::Rmdir),
        _ => (
            f,
            Change::Rename {
                to: p(files[(val as usize / 7) % files.len()]),
            },
        ),
    }
}

fn apply_ops(v: &mut Vault, ops: &[(u8, u8)], t0: u64) {
    for (i, &(s, x)) in ops.iter().enumerate() {
        let (path, change) = op(s, x);
        // Invalid operations (missing parent, ...) are refused and simply skipped.
        let _ = v.commit([(p(&path), change)], t0 + i as u64 * 400);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative_and_idempotent(
        base in prop::collection::vec((any::<u8>(), any::<u8>()), 0..12),
        left in prop::collection::vec((any::<u8>(), any::<u8>()), 0..12),
        right in prop::collection::vec((any::<u8>(), any::<u8>()), 0..12),
        third in prop::collection::vec((any::<u8>(), any::<u8>()), 0..6),
    ) {
        let f = Fixture::new(3);
        let mut o = f.vault(0);
        apply_ops(&mut o, &base, 1_000);
        let s = o.snapshot(5_000).unwrap();
        let (mut a, mut b, mut c) = (f.vault(0), f.vault(1), f.vault(2));
        for v in [&mut a, &mut b, &mut c] {
            v.receive(s.id).unwrap();
        }
        apply_ops(&mut a, &left, 10_000);
        apply_ops(&mut b, &right, 10_100);
        apply_ops(&mut c, &third, 10_050);
        let ab = f.stores.merge(&a.root(), &b.root()).unwrap().root;
        let ba = f.stores.merge(&b.root(), &a.root()).unwrap().root;
        prop_assert_eq!(ab, ba);
        prop_assert_eq!(f.stores.merge(&a.root(), &ab).unwrap().root, ab);
        prop_assert_eq!(f.stores.merge(&ab, &a.root()).unwrap().root, ab);
        prop_assert_eq!(f.stores.merge(&b.root(), &ab).unwrap().root, ab);
        prop_assert_eq!(f.stores.merge(&ab, &ab).unwrap().root, ab);
        // Any exchange order of three converges once everyone has everything.
        let ab_c = f.stores.merge(&ab, &c.root()).unwrap().root;
        let ca = f.stores.merge(&c.root(), &a.root()).unwrap().root;
        let ca_b = f.stores.merge(&ca, &b.root()).unwrap().root;
        let x = f.stores.merge(&ab_c, &ca_b).unwrap().root;
        let y = f.stores.merge(&ca_b, &ab_c).unwrap().root;
        prop_assert_eq!(x, y);
        prop_assert_eq!(f.stores.merge(&x, &ab_c).unwrap().root, x);
        prop_assert_eq!(f.stores.merge(&x, &ca_b).unwrap().root, x);
        // Nothing live on either side vanishes without a dominating version: every live
        // file's content of a and b survives somewhere in the merge.
        let all: Vec<_> = live(&f.stores.source(ab)).into_iter().filter_map(|x| x.1).collect();
        for side in [&a, &b] {
            let other = if std::ptr::eq(side, &a) { &b } else { &a };
            for (k, content) in live(&side.source()) {
                let Some(content) = content else { continue };
                let theirs = other.source().get(k.as_bytes()).unwrap();
                let superseded = theirs.is_some_and(|t| {
                    let mine = side.source().get(k.as_bytes()).unwrap().unwrap();
                    mine.version.content_seen_by(&t.version) && mine != t
                });
                prop_assert!(superseded || all.contains(&content), "lost {k}: {content}");
            }
        }
    }
}

// ---- hard links: every name carries the link group (see cairn_link) ----

/// Writes `bytes` at every name in `names`, as the mount does for a write through any name
/// of a linked file: `group` = the names and id every entry carries, or `None` for plain
/// files.
fn write_names(v: &mut Vault, names: &[&str], bytes: &str, group: Option<&[&str]>, now: u64) {
    let mut xattrs = std::collections::BTreeMap::new();
    if let Some(g) = group {
        let g = cairn_link::LinkGroup {
            id: [7; 16],
            names: g.iter().map(|s| s.to_string()).collect(),
        };
        xattrs.insert(cairn_link::LINK_XATTR.to_vec(), g.encode());
    }
    let changes: Vec<_> = names
        .iter()
        .map(|n| {
            (
                p(n),
                Change::Write {
                    attrs: cairn_vault::Attrs {
                        mode: 0o644,
                        mtime_ns: 0,
                        xattrs: xattrs.clone(),
                    },
                    size: bytes.len() as u64,
                    content: cairn_vault::Content::Inline(bytes.as_bytes().to_vec()),
                },
            )
        })
        .collect();
    v.commit(changes, now).unwrap();
}

/// Every live file that carries a link group stands in a coherent one: each listed name
/// is a live file with the same group and content.
fn assert_links_coherent(src: &dyn EntrySource) {
    let files: std::collections::BTreeMap<String, cairn_vault::Entry> = src
        .scan(b"", None)
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|(_, e)| e.kind == cairn_vault::EntryKind::File)
        .map(|(k, e)| (String::from_utf8(k).unwrap(), e))
        .collect();
    for (k, e) in &files {
        let Some(g) = cairn_link::LinkGroup::of(&e.xattrs) else {
            continue;
        };
        assert!(
            g.names.contains(k),
            "{k} is not among its own group's names"
        );
        for n in &g.names {
            let o = files
                .get(n)
                .unwrap_or_else(|| panic!("{k} lists {n}, which is gone"));
            assert_eq!(o.content, e.content, "{k} and {n} differ in content");
            assert_eq!(cairn_link::LinkGroup::of(&o.xattrs), Some(g.clone()));
        }
    }
}

/// Three link races, each merged both ways: the result is coherent, symmetric, a fixpoint,
/// and holds every content either side wrote.
#[test]
fn link_races_lose_no_content_and_leave_coherent_groups() {
    type Side = fn(&mut Vault, u64);
    let cases: [(&str, Side, Side, &[&str]); 3] = [
        (
            "two devices write through different names",
            |v, t| write_names(v, &["x", "y"], "via x on a", Some(&["x", "y"]), t),
            |v, t| write_names(v, &["x", "y"], "via y on b", Some(&["x", "y"]), t),
            &["via x on a", "via y on b"],
        ),
        (
            "one device unlinks a name while the other writes through it",
            |v, t| {
                v.commit([(p("y"), Change::Remove)], t).unwrap();
                write_names(v, &["x"], "base", None, t + 1);
            },
            |v, t| write_names(v, &["x", "y"], "written via y", Some(&["x", "y"]), t),
            &["written via y"],
        ),
        (
            "one device writes a new file over a name while the other writes",
            |v, t| {
                write_names(v, &["y"], "a new file at y", None, t);
                write_names(v, &["x"], "base", None, t + 1);
            },
            |v, t| write_names(v, &["x", "y"], "written via x", Some(&["x", "y"]), t),
            &["a new file at y", "written via x"],
        ),
    ];
    for (what, on_a, on_b, want) in cases {
        for a_later in [false, true] {
            let f = Fixture::new(2);
            let (mut a, mut b) = (f.vault(0), f.vault(1));
            write_names(&mut a, &["x", "y"], "base", Some(&["x", "y"]), 1_000);
            let s = a.snapshot(1_000).unwrap();
            b.receive(s.id).unwrap();
            let (ta, tb) = if a_later {
                (9_000, 5_000)
            } else {
                (5_000, 9_000)
            };
            on_a(&mut a, ta);
            on_b(&mut b, tb);
            let out = merged(&f.stores, &a, &b);
            assert_eq!(
                merged(&f.stores, &b, &a).root,
                out.root,
                "{what}: symmetric"
            );
            assert_eq!(
                f.stores.merge(&out.root, &a.root()).unwrap().root,
                out.root,
                "{what}: merging again changes nothing"
            );
            let src = f.stores.source(out.root);
            assert_links_coherent(&src);
            let contents: Vec<String> = live(&src).into_iter().filter_map(|x| x.1).collect();
            for w in want {
                assert!(
                    contents.iter().any(|c| c == w),
                    "{what} (a later: {a_later}): lost {w:?}; have {contents:?}"
                );
            }
        }
    }
}

/// The group `name` belongs to on `v`, if it is a linked file there.
fn group_at(v: &Vault, name: &str) -> Option<cairn_link::LinkGroup> {
    let (_, e) = v.lookup(&p(name)).unwrap()?;
    if !e.is_live() {
        return None;
    }
    cairn_link::LinkGroup::of(&e.xattrs)
}

/// What the mount does for one random operation on names `x`, `y`, `z`: write through a
/// name (to every name of its group), unlink a name (the others lose it), or put a new
/// plain file over a name.
fn link_op(v: &mut Vault, sel: u8, val: u8, now: u64) {
    let names = ["x", "y", "z"];
    let n = names[(val as usize) % 3];
    let text = format!("{sel}-{val}-{now}");
    let group = group_at(v, n);
    let others = |g: &cairn_link::LinkGroup| -> Vec<String> {
        g.names.iter().filter(|m| *m != n).cloned().collect()
    };
    match sel % 3 {
        0 => match &group {
            Some(g) => {
                let all: Vec<&str> = g.names.iter().map(String::as_str).collect();
                write_names(v, &all, &text, Some(&all), now);
            }
            None => write_names(v, &[n], &text, None, now),
        },
        _ => {
            let Some((_, e)) = v.lookup(&p(n)).unwrap() else {
                return;
            };
            if !e.is_live() {
                return;
            }
            let content = inline(&e).unwrap_or_default();
            if let Some(g) = &group {
                let rest = others(g);
                let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
                let keep = (rest.len() > 1).then_some(&rest[..]);
                write_names(v, &rest, &content, keep, now);
            }
            if sel % 3 == 1 {
                v.commit([(p(n), Change::Remove)], now + 1).unwrap();
            } else {
                write_names(v, &[n], &text, None, now + 1);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random link races from a base where x, y and z are one file: the merge is
    /// symmetric and a fixpoint, leaves only coherent groups, and keeps every content a
    /// side still had (unless the other side had seen and replaced it).
    #[test]
    fn link_races_merge_symmetric_coherent_and_lossless(
        left in prop::collection::vec((any::<u8>(), any::<u8>()), 0..6),
        right in prop::collection::vec((any::<u8>(), any::<u8>()), 0..6),
    ) {
        let f = Fixture::new(2);
        let (mut a, mut b) = (f.vault(0), f.vault(1));
        write_names(&mut a, &["x", "y", "z"], "base", Some(&["x", "y", "z"]), 1_000);
        let s = a.snapshot(1_000).unwrap();
        b.receive(s.id).unwrap();
        for (i, &(s, x)) in left.iter().enumerate() {
            link_op(&mut a, s, x, 10_000 + i as u64 * 400);
        }
        for (i, &(s, x)) in right.iter().enumerate() {
            link_op(&mut b, s, x, 10_100 + i as u64 * 400);
        }
        let ab = f.stores.merge(&a.root(), &b.root()).unwrap().root;
        prop_assert_eq!(f.stores.merge(&b.root(), &a.root()).unwrap().root, ab);
        prop_assert_eq!(f.stores.merge(&a.root(), &ab).unwrap().root, ab);
        prop_assert_eq!(f.stores.merge(&ab, &b.root()).unwrap().root, ab);
        let src = f.stores.source(ab);
        assert_links_coherent(&src);
        let all: Vec<_> = live(&src).into_iter().filter_map(|x| x.1).collect();
        for (side, other) in [(&a, &b), (&b, &a)] {
            for (k, content) in live(&side.source()) {
                let Some(content) = content else { continue };
                let theirs = other.source().get(k.as_bytes()).unwrap();
                let superseded = theirs.is_some_and(|t| {
                    let mine = side.source().get(k.as_bytes()).unwrap().unwrap();
                    mine.version.content_seen_by(&t.version) && mine != t
                });
                prop_assert!(superseded || all.contains(&content), "lost {k}: {content}");
            }
        }
    }
}
