//! Model-based tests: the tree must behave exactly like a `BTreeMap` under random batches, and
//! its root must be a function of the final contents only.

mod common;

use std::collections::BTreeMap;
use std::ops::Bound;

use cairn_tree::{Edit, NodeId, Result, Tree, TreeConfig};
use common::*;
use proptest::prelude::*;

type Batch = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Keys from a tiny alphabet so batches collide with existing keys and share prefixes.
fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![b'a', b'b', b'/', b'z', 0xff]),
        0..7,
    )
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..40)
}

fn batch() -> impl Strategy<Value = Batch> {
    prop::collection::btree_map(key(), prop::option::weighted(0.7, value()), 0..40)
}

fn config() -> impl Strategy<Value = TreeConfig> {
    prop_oneof![Just(tiny_config()), Just(hashy_config())]
}

fn to_edits(b: &Batch) -> Vec<Edit> {
    b.iter()
        .map(|(k, v)| match v {
            Some(v) => Edit::Upsert(k.clone(), v.clone()),
            None => Edit::Remove(k.clone()),
        })
        .collect()
}

fn apply_model(m: &mut Model, b: &Batch) {
    for (k, v) in b {
        match v {
            Some(v) => m.insert(k.clone(), v.clone()),
            None => m.remove(k),
        };
    }
}

fn bound(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn any_bound() -> impl Strategy<Value = Bound<Vec<u8>>> {
    prop_oneof![
        key().prop_map(Bound::Included),
        key().prop_map(Bound::Excluded),
        Just(Bound::Unbounded),
    ]
}

fn check_shape(tree: &Tree<cairn_tree::MemoryNodeStore>, root: &NodeId, model: &Model) {
    let max = tree.config().max_node_bytes;
    let mut entries = 0;
    for (id, node) in all_nodes(tree, root) {
        let enc = node.encode();
        assert!(
            enc.len() <= max,
            "node {id} has {} > {max} bytes",
            enc.len()
        );
        assert_eq!(NodeId::of(&enc), id);
        if let cairn_tree::Node::Leaf(e) = &*node {
            entries += e.len();
        }
    }
    assert_eq!(entries, model.len());
    assert_eq!(tree.len(root).unwrap(), model.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn batches_agree_with_model(
        config in config(),
        initial in prop::collection::btree_map(key(), value(), 0..150),
        batches in prop::collection::vec(batch(), 1..6),
        probes in prop::collection::vec(key(), 0..20),
        ranges in prop::collection::vec((any_bound(), any_bound()), 1..5),
        prefixes in prop::collection::vec(key(), 1..4),
    ) {
        let tree = mem_tree(config);
        let mut model: Model = initial.clone();
        let mut root = tree.build(initial.clone()).unwrap().root;
        prop_assert_eq!(scan_all(&tree, &root), model.clone().into_iter().collect::<Vec<_>>());

        for b in &batches {
            let before = model.clone();
            let prev_root = root;
            let update = tree.apply(&root, to_edits(b)).unwrap();
            root = update.root;
            apply_model(&mut model, b);

            // apply == rebuild
            let rebuilt = mem_tree(config).build(model.clone()).unwrap().root;
            prop_assert_eq!(root, rebuilt);
            if before == model {
                prop_assert_eq!(root, prev_root);
                prop_assert_eq!(update.stats.nodes_written, 0);
            }

            for k in b.keys().chain(probes.iter()) {
                prop_assert_eq!(tree.get(&root, k).unwrap(), model.get(k).cloned());
            }
            prop_assert_eq!(scan_all(&tree, &root), model.clone().into_iter().collect::<Vec<_>>());
            let diff = tree.diff(&prev_root, &root).collect::<Result<Vec<_>>>().unwrap();
            prop_assert_eq!(diff, model_diff(&before, &model));
            let back = tree.diff(&root, &prev_root).collect::<Result<Vec<_>>>().unwrap();
            prop_assert_eq!(back, model_diff(&model, &before));
            check_shape(&tree, &root, &model);
        }

        for (lo, hi) in &ranges {
            let got = tree.scan(&root, (bound(lo), bound(hi))).collect::<Result<Vec<_>>>().unwrap();
            let valid = match (lo, hi) {
                (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
                    a < b || (a == b && matches!((lo, hi), (Bound::Included(_), Bound::Included(_))))
                }
                _ => true,
            };
            let want: Vec<_> = if valid {
                model.range::<[u8], _>((bound(lo), bound(hi))).map(|(k, v)| (k.clone(), v.clone())).collect()
            } else {
                Vec::new()
            };
            prop_assert_eq!(got, want);
        }
        for p in &prefixes {
            let got = tree.scan_prefix(&root, p).collect::<Result<Vec<_>>>().unwrap();
            let want: Vec<_> = model.iter().filter(|(k, _)| k.starts_with(p)).map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn root_is_independent_of_history(
        config in config(),
        target in prop::collection::btree_map(key(), value(), 0..150),
        junk in prop::collection::btree_map(key(), value(), 0..60),
        parts in 1usize..6,
        salt in any::<u64>(),
    ) {
        let tree = mem_tree(config);
        let built = tree.build(target.clone()).unwrap().root;

        // History 1: the entries arrive in `parts` interleaved batches, applied last-first.
        let mut root = Tree::<cairn_tree::MemoryNodeStore>::empty_root();
        let mut batches: Vec<Batch> = vec![Batch::new(); parts];
        for (i, (k, v)) in target.iter().enumerate() {
            let slot = (i as u64 ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) as usize % parts;
            batches[slot].insert(k.clone(), Some(v.clone()));
        }
        for b in batches.iter().rev() {
            root = tree.apply(&root, to_edits(b)).unwrap().root;
        }
        prop_assert_eq!(root, built);

        // History 2: junk inserted together with everything, overwritten values, then cleaned up.
        let mut noisy: Batch = junk.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect();
        for (k, v) in &target {
            let mut w = v.clone();
            w.push(1);
            noisy.insert(k.clone(), Some(w));
        }
        let r = tree.apply(&Tree::<cairn_tree::MemoryNodeStore>::empty_root(), to_edits(&noisy)).unwrap().root;
        let mut fix: Batch = junk.keys().map(|k| (k.clone(), None)).collect();
        for (k, v) in &target {
            fix.insert(k.clone(), Some(v.clone()));
        }
        let r = tree.apply(&r, to_edits(&fix)).unwrap().root;
        prop_assert_eq!(r, built);

        // History 3: one entry at a time, in key order descending.
        let mut r = Tree::<cairn_tree::MemoryNodeStore>::empty_root();
        for (k, v) in target.iter().rev() {
            r = tree.apply(&r, [Edit::Upsert(k.clone(), v.clone())]).unwrap().root;
        }
        prop_assert_eq!(r, built);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A few edits at a time, mostly on existing keys (so often on the first item of a node),
    /// against trees with many levels: the regime where `apply` re-cuts the fewest nodes.
    #[test]
    fn small_batches_on_existing_keys(
        config in config(),
        initial in prop::collection::btree_map(key(), value(), 20..200),
        steps in prop::collection::vec(
            prop::collection::vec((any::<prop::sample::Index>(), key(), prop::option::weighted(0.6, value()), any::<bool>()), 1..4),
            1..12,
        ),
    ) {
        let tree = mem_tree(config);
        let mut model: Model = initial.clone();
        let mut root = tree.build(initial).unwrap().root;
        for step in &steps {
            let keys: Vec<Vec<u8>> = model.keys().cloned().collect();
            let mut b = Batch::new();
            for (idx, fresh, v, existing) in step {
                let k = if *existing && !keys.is_empty() { idx.get(&keys).clone() } else { fresh.clone() };
                b.insert(k, v.clone());
            }
            root = tree.apply(&root, to_edits(&b)).unwrap().root;
            apply_model(&mut model, &b);
            let rebuilt = mem_tree(config).build(model.clone()).unwrap().root;
            prop_assert_eq!(root, rebuilt);
        }
        prop_assert_eq!(scan_all(&tree, &root), model.into_iter().collect::<Vec<_>>());
    }
}

#[test]
fn test_configs_exercise_deep_trees_and_forced_splits() {
    let entries: Model = (0..150u32)
        .map(|i| (format!("k{i:05}").into_bytes(), vec![i as u8; 30]))
        .collect();
    for config in [tiny_config(), hashy_config()] {
        let tree = mem_tree(config);
        let root = tree.build(entries.clone()).unwrap().root;
        assert!(tree.depth(&root).unwrap() >= 3, "{config:?}");
    }
    // With the tiny config most leaves are cut by size, not by hash.
    let tree = mem_tree(tiny_config());
    let root = tree.build(entries).unwrap().root;
    let leaves: Vec<_> = all_nodes(&tree, &root)
        .into_iter()
        .filter(|(_, n)| n.level() == 0)
        .collect();
    let forced = leaves
        .iter()
        .filter(|(_, n)| n.encode().len() > tiny_config().max_node_bytes - 40)
        .count();
    assert!(forced > leaves.len() / 4, "{forced} of {}", leaves.len());
}

/// Every single-entry change (removal, shorter value, longer value, and an insert right after)
/// applied to one deep tree with many size-forced cuts must give the rebuilt root. Small batches
/// are where `apply` re-cuts least, so they are the sharpest test of where re-cutting starts:
/// changing the first item of a node can move a size-forced cut at the end of the node before.
#[test]
fn every_single_edit_matches_rebuild() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let entries: Model = (0..160u32)
        .map(|i| {
            let key = format!("d{}/s{}/f{:03}", i / 40, (i / 8) % 5, i).into_bytes();
            let len = rand(41) as usize;
            (key, vec![i as u8; len])
        })
        .collect();
    for config in [tiny_config(), hashy_config()] {
        let tree = mem_tree(config);
        let root = tree.build(entries.clone()).unwrap().root;
        for (k, v) in &entries {
            let mut after = k.clone();
            after.push(b'/');
            let changes = [
                vec![Edit::Remove(k.clone())],
                vec![Edit::Upsert(k.clone(), Vec::new())],
                vec![Edit::Upsert(k.clone(), vec![7; config.max_value_len])],
                vec![Edit::Upsert(k.clone(), vec![7; v.len() / 2])],
                vec![
                    Edit::Upsert(k.clone(), Vec::new()),
                    Edit::Upsert(after, vec![9; 30]),
                ],
            ];
            for edits in changes {
                let mut model = entries.clone();
                for e in &edits {
                    match e {
                        Edit::Upsert(k, v) => model.insert(k.clone(), v.clone()),
                        Edit::Remove(k) => model.remove(k),
                    };
                }
                let applied = tree.apply(&root, edits.clone()).unwrap().root;
                let rebuilt = mem_tree(config).build(model).unwrap().root;
                assert_eq!(applied, rebuilt, "{config:?} {edits:?}");
            }
        }
    }
}
