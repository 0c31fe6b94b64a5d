//! Properties that need large trees: write amplification of one change, diff cost, and the hard
//! node-size cap under inputs that never produce a hash boundary.

mod common;

use cairn_tree::{CacheConfig, DiffEntry, Edit, MemoryNodeStore, Node, Result, Tree, TreeConfig};
use common::*;

#[test]
fn one_change_in_100k_writes_at_most_depth_plus_one_nodes() {
    let tree = Tree::new(MemoryNodeStore::new());
    let entries: Vec<_> = path_entries(100_000).collect();
    let root = tree.build(entries.clone()).unwrap().root;
    let depth = tree.depth(&root).unwrap() as u64;
    assert!(depth >= 3, "depth {depth}");
    let mut checked = 0;
    for i in (0..100_000).step_by(4_999) {
        let key = &entries[i].0;
        let cases = [
            Edit::Upsert(key.clone(), b"changed".to_vec()),
            Edit::Remove(key.clone()),
            Edit::Upsert([key.as_slice(), b".new"].concat(), b"inserted".to_vec()),
        ];
        for edit in cases {
            let upd = tree.apply(&root, [edit.clone()]).unwrap();
            assert!(
                upd.stats.nodes_written <= depth + 1,
                "{edit:?} wrote {} nodes, depth {depth}",
                upd.stats.nodes_written
            );
            assert!(upd.stats.nodes_written >= 1);
            checked += 1;
        }
    }
    assert_eq!(checked, 21 * 3);
    // And the incremental result is the canonical one.
    let upd = tree
        .apply(
            &root,
            [Edit::Upsert(entries[50_000].0.clone(), b"x".to_vec())],
        )
        .unwrap();
    let mut changed = entries.clone();
    changed[50_000].1 = b"x".to_vec();
    let rebuilt = Tree::new(MemoryNodeStore::new())
        .build(changed)
        .unwrap()
        .root;
    assert_eq!(upd.root, rebuilt);
    assert_eq!(upd.stats.nodes_written, depth);
}

#[test]
fn diff_reads_only_changed_paths() {
    let store = CountingStore::default();
    let tree =
        Tree::with_config(&store, TreeConfig::default(), CacheConfig { max_bytes: 0 }).unwrap();
    let entries: Vec<_> = path_entries(100_000).collect();
    let a = tree.build(entries.clone()).unwrap().root;
    let b = tree
        .apply(
            &a,
            [
                Edit::Upsert(entries[10].0.clone(), b"v".to_vec()),
                Edit::Remove(entries[70_000].0.clone()),
            ],
        )
        .unwrap()
        .root;
    let depth = tree.depth(&a).unwrap() as u64;
    store.reset();
    let d: Vec<_> = tree.diff(&a, &b).collect::<Result<_>>().unwrap();
    assert_eq!(d.len(), 2);
    assert!(
        matches!(&d[0], DiffEntry::Changed { key, new, .. } if *key == entries[10].0 && new == b"v")
    );
    assert!(matches!(&d[1], DiffEntry::Removed { key, .. } if *key == entries[70_000].0));
    // Two changed paths per side; a few extra for nodes split at a changed boundary.
    assert!(
        store.gets() <= 4 * (depth + 1),
        "diff read {} nodes",
        store.gets()
    );
}

#[test]
fn hard_size_cap_holds_without_hash_boundaries() {
    // threshold 1 in 2^32: hash boundaries essentially never fire, so every cut is size-forced.
    let config = TreeConfig {
        target_fanout: u32::MAX,
        ..TreeConfig::default()
    };
    let tree = Tree::with_config(MemoryNodeStore::new(), config, CacheConfig::default()).unwrap();
    let entries: Vec<_> = path_entries(30_000).collect();
    let root = tree.build(entries.clone()).unwrap().root;
    let nodes = all_nodes(&tree, &root);
    let leaves: Vec<_> = nodes.iter().filter(|(_, n)| n.level() == 0).collect();
    assert!(leaves.len() >= 10, "only {} leaves", leaves.len());
    for (id, n) in &nodes {
        let len = n.encode().len();
        assert!(len <= config.max_node_bytes, "{id}: {len}");
    }
    // All but the last leaf were cut by size, so they are nearly full.
    let full = leaves
        .iter()
        .filter(|(_, n)| n.encode().len() > config.max_node_bytes - 200)
        .count();
    assert!(full >= leaves.len() - 1);

    // Inserting at the front shifts every size-forced cut; apply must still equal a rebuild.
    let upd = tree
        .apply(&root, [Edit::Upsert(b"a-first".to_vec(), vec![1; 100])])
        .unwrap();
    let mut with_first = vec![(b"a-first".to_vec(), vec![1; 100])];
    with_first.extend(entries);
    let rebuilt = Tree::with_config(MemoryNodeStore::new(), config, CacheConfig::default())
        .unwrap()
        .build(with_first)
        .unwrap()
        .root;
    assert_eq!(upd.root, rebuilt);
    for (_, n) in all_nodes(&tree, &upd.root) {
        assert!(n.encode().len() <= config.max_node_bytes);
    }
}

#[test]
fn max_size_entries_are_split_one_per_node() {
    let tree = Tree::new(MemoryNodeStore::new());
    let entries: Vec<_> = (0..6u8)
        .map(|i| {
            (
                vec![i; cairn_tree::MAX_KEY_LEN],
                vec![i; cairn_tree::MAX_VALUE_LEN],
            )
        })
        .collect();
    let root = tree.build(entries.clone()).unwrap().root;
    for (_, n) in all_nodes(&tree, &root) {
        assert!(n.encode().len() <= tree.config().max_node_bytes);
        if let Node::Leaf(e) = &*n {
            assert_eq!(e.len(), 1);
        }
    }
    assert_eq!(scan_all(&tree, &root), entries);
}
