//! Bad input, missing and tampered nodes, stores and cache bounds.

mod common;

use std::ops::Bound;
use std::sync::Arc;

use cairn_tree::{
    CacheConfig, DecodeError, Edit, FileNodeStore, FileStoreOptions, Leaf, LeafEntry, MAX_KEY_LEN,
    MAX_VALUE_LEN, MemoryNodeStore, Node, NodeId, NodeStore, Result, Tree, TreeConfig, TreeError,
};
use common::*;
use proptest::prelude::*;

fn arb_node() -> impl Strategy<Value = Node> {
    let leaf = prop::collection::btree_map(
        prop::collection::vec(any::<u8>(), 0..12),
        prop::collection::vec(any::<u8>(), 0..20),
        0..8,
    )
    .prop_map(|m| {
        Node::Leaf(
            m.into_iter()
                .map(|(key, value)| LeafEntry { key, value })
                .collect(),
        )
    });
    let internal = (
        1u8..5,
        prop::collection::btree_map(
            prop::collection::vec(any::<u8>(), 0..12),
            (any::<[u8; 32]>(), 1u64..u64::MAX),
            1..8,
        ),
    )
        .prop_map(|(level, m)| Node::Internal {
            level,
            children: m
                .into_iter()
                .map(|(key, (id, count))| cairn_tree::ChildRef {
                    key,
                    id: NodeId(id),
                    count,
                })
                .collect(),
        });
    prop_oneof![leaf, internal]
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn fuzz_node_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let r = Node::decode(&bytes);
        if bytes.first() != Some(&cairn_tree::FORMAT_V1) {
            prop_assert!(r.is_err());
        }
        if let Ok(n) = r {
            // Whatever decodes must be in canonical form.
            prop_assert_eq!(n.encode(), bytes);
        }
    }

    #[test]
    fn valid_nodes_round_trip_and_damage_is_detected(node in arb_node(), flip in any::<(usize, u8)>()) {
        let bytes = node.encode();
        prop_assert_eq!(Node::decode(&bytes).unwrap(), node);
        for cut in 0..bytes.len() {
            prop_assert!(Node::decode(&bytes[..cut]).is_err(), "prefix {} decoded", cut);
        }
        let mut extended = bytes.clone();
        extended.push(0);
        prop_assert!(Node::decode(&extended).is_err());

        let mut damaged = bytes.clone();
        let pos = flip.0 % damaged.len();
        damaged[pos] ^= flip.1.max(1);
        let _ = Node::decode(&damaged); // must not panic
        // Through a tree, damage is always caught by the id check.
        let store = MemoryNodeStore::new();
        let id = NodeId::of(&bytes);
        store.put(&id, &damaged).unwrap();
        let tree = Tree::new(store);
        // The empty leaf is the well-known empty root and never read from a store.
        if id != Tree::<MemoryNodeStore>::empty_root() {
            let is_mismatch = matches!(tree.read_node(&id), Err(TreeError::HashMismatch { .. }));
            prop_assert!(is_mismatch);
        }
    }
}

proptest! {
    #![proptest_config(cairn_fuzzkit::config())]

    /// Several edits of a valid node (flip, overwrite, insert, delete, truncate): an error
    /// that says something, or a node in canonical form (it re-encodes to the same bytes).
    #[test]
    fn fuzz_node_mutations(
        node in arb_node(),
        edits in cairn_fuzzkit::edits(),
    ) {
        let mut b = node.encode();
        for (op, at, x) in edits {
            cairn_fuzzkit::mutate(&mut b, op, at, x);
        }
        match Node::decode(&b) {
            Ok(n) => prop_assert_eq!(n.encode(), b),
            Err(e) => prop_assert!(e.to_string().len() > 8, "{}", e),
        }
    }

    /// An item count far beyond the input (up to 2^63) fails fast: the count is never
    /// trusted for a reservation or a loop beyond the bytes present.
    #[test]
    fn fuzz_node_huge_item_count(level in 0u8..4, shift in 16u32..64, tail in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut b = vec![cairn_tree::FORMAT_V1, level];
        let mut n = 1u64 << shift;
        while n >= 0x80 {
            b.push(n as u8 | 0x80);
            n >>= 7;
        }
        b.push(n as u8);
        b.extend_from_slice(&tail);
        let started = std::time::Instant::now();
        prop_assert!(Node::decode(&b).is_err());
        prop_assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}

#[test]
fn well_hashed_garbage_is_a_decode_error() {
    let store = MemoryNodeStore::new();
    let junk = vec![1u8, 0, 5, 0];
    let id = NodeId::of(&junk);
    store.put(&id, &junk).unwrap();
    let tree = Tree::new(store);
    match tree.get(&id, b"x") {
        Err(TreeError::Decode { id: got, source }) => {
            assert_eq!(got, id);
            assert_eq!(source, DecodeError::Truncated);
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn leaf_ids(tree: &Tree<MemoryNodeStore>, root: &NodeId) -> Vec<NodeId> {
    all_nodes(tree, root)
        .into_iter()
        .filter(|(_, n)| n.level() == 0)
        .map(|(id, _)| id)
        .collect()
}

#[test]
fn tampered_node_is_rejected_with_hash_mismatch() {
    let tree = Tree::new(MemoryNodeStore::new());
    let root = tree.build(path_entries(5000)).unwrap().root;
    let victim = leaf_ids(&tree, &root)[3];
    let Node::Leaf(entries) = &*tree.read_node(&victim).unwrap() else {
        panic!()
    };
    let key = entries.key(0).to_vec();
    let mut bytes = tree.store().get(&victim).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    tree.store().remove(&victim);
    tree.store().put(&victim, &bytes).unwrap();
    tree.clear_cache();
    match tree.get(&root, &key) {
        Err(TreeError::HashMismatch { id, actual }) => {
            assert_eq!(id, victim);
            assert_eq!(actual, NodeId::of(&bytes));
        }
        other => panic!("unexpected {other:?}"),
    }
    let scanned: Vec<_> = tree.scan_all(&root).collect();
    assert!(matches!(
        scanned.last(),
        Some(Err(TreeError::HashMismatch { .. }))
    ));
    assert_eq!(scanned.iter().filter(|r| r.is_err()).count(), 1);
}

#[test]
fn missing_node_is_reported_by_every_operation() {
    let tree = Tree::new(MemoryNodeStore::new());
    let root = tree.build(path_entries(5000)).unwrap().root;
    let victim = leaf_ids(&tree, &root)[2];
    let key = tree
        .read_node(&victim)
        .unwrap()
        .first_key()
        .unwrap()
        .to_vec();
    assert!(tree.store().remove(&victim));
    tree.clear_cache();
    let missing = |r: Result<()>| matches!(r, Err(TreeError::MissingNode(id)) if id == victim);
    assert!(missing(tree.get(&root, &key).map(|_| ())));
    assert!(missing(
        tree.scan_all(&root).collect::<Result<Vec<_>>>().map(|_| ())
    ));
    assert!(missing(
        tree.apply(&root, [Edit::Remove(key.clone())]).map(|_| ())
    ));
    let other = tree
        .build(path_entries(5000).filter(|(k, _)| *k != key))
        .unwrap()
        .root;
    assert!(missing(
        tree.diff(&root, &other)
            .collect::<Result<Vec<_>>>()
            .map(|_| ())
    ));
    // Unrelated keys still resolve.
    assert!(
        tree.get(&root, b"dir0004/sub09/file004999.txt")
            .unwrap()
            .is_some()
    );
    let unknown = NodeId([7; 32]);
    assert!(matches!(tree.get(&unknown, b"a"), Err(TreeError::MissingNode(id)) if id == unknown));
}

#[test]
fn structurally_inconsistent_tree_is_corrupt() {
    // Two individually valid nodes where the parent's separator disagrees with the child.
    let store = MemoryNodeStore::new();
    let leaf = Node::Leaf(Leaf::from(vec![LeafEntry {
        key: b"b".to_vec(),
        value: b"1".to_vec(),
    }]));
    let leaf_bytes = leaf.encode();
    let leaf_id = NodeId::of(&leaf_bytes);
    store.put(&leaf_id, &leaf_bytes).unwrap();
    let parent = Node::Internal {
        level: 1,
        children: vec![cairn_tree::ChildRef {
            key: b"a".to_vec(),
            id: leaf_id,
            count: 1,
        }],
    };
    let pb = parent.encode();
    let pid = NodeId::of(&pb);
    store.put(&pid, &pb).unwrap();
    let tree = Tree::new(store);
    assert!(matches!(
        tree.get(&pid, b"b"),
        Err(TreeError::Corrupt { id, .. }) if id == leaf_id
    ));
}

#[test]
fn file_store_round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<_> = path_entries(20_000).collect();
    let root = {
        let store =
            FileNodeStore::open_with(dir.path(), FileStoreOptions { fsync: false }).unwrap();
        let tree = Tree::new(store);
        let built = tree.build(entries.clone()).unwrap();
        let first = tree.store().path_for(&built.root);
        assert!(first.is_file());
        assert_eq!(
            first
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap(),
            &built.root.to_hex()[..2]
        );
        built.root
    };
    let tree = Tree::new(FileNodeStore::open(dir.path()).unwrap());
    assert_eq!(scan_all(&tree, &root), entries);
    assert_eq!(
        tree.get(&root, &entries[777].0).unwrap(),
        Some(entries[777].1.clone())
    );
    // A durable update on the reopened store, then one more reopen.
    let upd = tree
        .apply(
            &root,
            [Edit::Upsert(b"dir0000/new".to_vec(), b"v".to_vec())],
        )
        .unwrap();
    let tree = Tree::new(FileNodeStore::open(dir.path()).unwrap());
    assert_eq!(
        tree.get(&upd.root, b"dir0000/new").unwrap(),
        Some(b"v".to_vec())
    );
    assert_eq!(tree.len(&upd.root).unwrap(), 20_001);
    // No temporary files survive.
    for sub in std::fs::read_dir(dir.path()).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let name = f.unwrap().file_name();
            assert!(!name.to_string_lossy().starts_with(".tmp"), "{name:?}");
        }
    }
    // A missing file is MissingNode, not an I/O error.
    let absent = NodeId([9; 32]);
    assert!(matches!(
        tree.read_node(&absent),
        Err(TreeError::MissingNode(_))
    ));
}

#[test]
fn store_is_shareable_across_threads() {
    let store = Arc::new(MemoryNodeStore::new());
    let tree = Arc::new(Tree::new(store.clone()));
    let root = tree.build(path_entries(10_000)).unwrap().root;
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let tree = tree.clone();
            std::thread::spawn(move || {
                for i in (t..10_000).step_by(97) {
                    let (k, v) = path_entries(i + 1).last().unwrap();
                    assert_eq!(tree.get(&root, &k).unwrap(), Some(v));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(store.len() > 10);
}

#[test]
fn cache_stays_within_byte_bound_during_scan() {
    let max = 64 * 1024;
    let tree = Tree::with_config(
        MemoryNodeStore::new(),
        TreeConfig::default(),
        CacheConfig { max_bytes: max },
    )
    .unwrap();
    let root = tree.build(path_entries(30_000)).unwrap().root;
    let mut n = 0;
    for r in tree.scan_all(&root) {
        r.unwrap();
        n += 1;
        if n % 500 == 0 {
            let s = tree.cache_stats();
            assert!(s.used_bytes <= max, "{s:?}");
        }
    }
    assert_eq!(n, 30_000);
    let s = tree.cache_stats();
    assert!(s.used_bytes <= max && s.used_bytes > 0, "{s:?}");
    assert!(s.misses > s.nodes as u64, "cache must have evicted: {s:?}");
}

#[test]
fn empty_tree_is_well_defined() {
    let tree = Tree::new(MemoryNodeStore::new());
    let empty = Tree::<MemoryNodeStore>::empty_root();
    let built = tree.build(Vec::<(Vec<u8>, Vec<u8>)>::new()).unwrap();
    assert_eq!(built.root, empty);
    assert_eq!(built.stats.nodes_written, 0);
    assert!(tree.store().is_empty());
    assert_eq!(tree.get(&empty, b"a").unwrap(), None);
    assert_eq!(tree.scan_all(&empty).count(), 0);
    assert_eq!(tree.len(&empty).unwrap(), 0);
    assert_eq!(tree.depth(&empty).unwrap(), 1);
    let one = tree
        .apply(
            &empty,
            [
                Edit::Upsert(b"a".to_vec(), b"1".to_vec()),
                Edit::Remove(b"b".to_vec()),
            ],
        )
        .unwrap()
        .root;
    assert_eq!(tree.get(&one, b"a").unwrap(), Some(b"1".to_vec()));
    let gone = tree
        .apply(&one, [Edit::Remove(b"a".to_vec())])
        .unwrap()
        .root;
    assert_eq!(gone, empty);
    let big = tree.build(path_entries(3000)).unwrap().root;
    let all: Vec<Edit> = path_entries(3000).map(|(k, _)| Edit::Remove(k)).collect();
    assert_eq!(tree.apply(&big, all).unwrap().root, empty);
    let diff: Vec<_> = tree.diff(&empty, &one).collect::<Result<_>>().unwrap();
    assert_eq!(diff.len(), 1);
}

#[test]
fn input_validation_errors_are_typed() {
    let tree = Tree::new(MemoryNodeStore::new());
    let unsorted = vec![(b"b".to_vec(), vec![]), (b"a".to_vec(), vec![])];
    assert!(matches!(tree.build(unsorted), Err(TreeError::Unsorted { key }) if key == b"a"));
    let dup = vec![(b"a".to_vec(), vec![]), (b"a".to_vec(), vec![])];
    assert!(matches!(tree.build(dup), Err(TreeError::Unsorted { .. })));
    let long_key = vec![(vec![b'k'; MAX_KEY_LEN + 1], vec![])];
    assert!(matches!(
        tree.build(long_key),
        Err(TreeError::KeyTooLarge { len, max }) if len == MAX_KEY_LEN + 1 && max == MAX_KEY_LEN
    ));
    let long_val = vec![(b"k".to_vec(), vec![0; MAX_VALUE_LEN + 1])];
    assert!(matches!(
        tree.build(long_val),
        Err(TreeError::ValueTooLarge { .. })
    ));
    // The largest allowed entry fits in a node.
    let max_entry = vec![(vec![b'k'; MAX_KEY_LEN], vec![0xab; MAX_VALUE_LEN])];
    let root = tree.build(max_entry).unwrap().root;
    assert_eq!(
        tree.get(&root, &[b'k'; MAX_KEY_LEN])
            .unwrap()
            .unwrap()
            .len(),
        MAX_VALUE_LEN
    );
    let e = Tree::new(MemoryNodeStore::new()).root_apply_unsorted();
    assert!(matches!(e, Err(TreeError::Unsorted { .. })));
    let bad = TreeConfig {
        max_node_bytes: 1000,
        ..TreeConfig::default()
    };
    assert!(matches!(
        Tree::with_config(MemoryNodeStore::new(), bad, CacheConfig::default()),
        Err(TreeError::InvalidConfig(_))
    ));
    let bad = TreeConfig {
        target_fanout: 1,
        ..TreeConfig::default()
    };
    assert!(bad.validate().is_err());
}

trait ApplyUnsorted {
    fn root_apply_unsorted(&self) -> Result<cairn_tree::TreeUpdate>;
}

impl ApplyUnsorted for Tree<MemoryNodeStore> {
    fn root_apply_unsorted(&self) -> Result<cairn_tree::TreeUpdate> {
        let root = self.build(path_entries(10)).unwrap().root;
        self.apply(
            &root,
            [Edit::Remove(b"b".to_vec()), Edit::Remove(b"a".to_vec())],
        )
    }
}

#[test]
fn range_scan_bounds() {
    let tree = Tree::new(MemoryNodeStore::new());
    let entries: Vec<_> = path_entries(2000).collect();
    let root = tree.build(entries.clone()).unwrap().root;
    let (lo, hi) = (&entries[100].0, &entries[1500].0);
    let got: Vec<_> = tree
        .scan(
            &root,
            (
                Bound::Excluded(lo.as_slice()),
                Bound::Included(hi.as_slice()),
            ),
        )
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(got, entries[101..=1500].to_vec());
    let pre: Vec<_> = tree
        .scan_prefix(&root, b"dir0001/sub03/")
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(pre, entries[1300..1400].to_vec());
}

/// Toy deterministic sealer: a tag plus XOR. Enough to prove the tree stores only sealed bytes,
/// addresses them by their sealed hash, and refuses bytes it cannot open.
struct XorSealer(u8);

impl cairn_tree::NodeSealer for XorSealer {
    fn seal(&self, plain: Vec<u8>) -> Vec<u8> {
        let mut out = vec![b'S', self.0];
        out.extend(plain.into_iter().map(|b| b ^ self.0));
        out
    }
    fn open(&self, stored: &[u8]) -> Result<Vec<u8>, String> {
        match stored {
            [b'S', k, rest @ ..] if *k == self.0 => Ok(rest.iter().map(|b| b ^ self.0).collect()),
            _ => Err("sealed with another key".into()),
        }
    }
}

#[test]
fn sealed_trees_store_only_sealed_bytes_and_keep_canonical_roots() {
    use std::sync::Arc;
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..5_000u32)
        .map(|i| {
            (
                format!("dir/file-{i:06}").into_bytes(),
                b"plain-value".to_vec(),
            )
        })
        .collect();
    let store = Arc::new(cairn_tree::MemoryNodeStore::new());
    let tree = cairn_tree::Tree::new(store.clone()).with_sealer(Arc::new(XorSealer(0x5a)));
    let built = tree.build(entries.clone()).unwrap().root;
    for id in store.ids() {
        let bytes = cairn_tree::NodeStore::get(&*store, &id).unwrap().unwrap();
        assert_eq!(
            cairn_tree::NodeId::of(&bytes),
            id,
            "id must hash the sealed bytes"
        );
        assert!(
            !bytes.windows(8).any(|w| w == b"dir/file"),
            "plaintext key found in a sealed node"
        );
    }
    // apply == rebuild under the sealer.
    let applied = tree
        .apply(
            &built,
            vec![cairn_tree::Edit::Upsert(
                b"dir/file-000100".to_vec(),
                b"new".to_vec(),
            )],
        )
        .unwrap()
        .root;
    let mut expected = entries.clone();
    expected[100].1 = b"new".to_vec();
    assert_eq!(tree.build(expected).unwrap().root, applied);
    assert_eq!(
        tree.get(&applied, b"dir/file-000100").unwrap().unwrap(),
        b"new"
    );
    // Sealed and plain trees differ; another key cannot open the nodes.
    let plain = cairn_tree::Tree::new(cairn_tree::MemoryNodeStore::new());
    assert_ne!(plain.build(entries).unwrap().root, built);
    let other = cairn_tree::Tree::new(store.clone()).with_sealer(Arc::new(XorSealer(0x11)));
    assert!(matches!(
        other.get(&built, b"dir/file-000001"),
        Err(cairn_tree::TreeError::Unseal { .. })
    ));
}

/// Keys that share almost all of their 4 KiB: the encoding stores each once, a decoder would
/// write every one out in full.
fn long_shared_keys(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut k = vec![b'p'; MAX_KEY_LEN - 8];
            k.extend_from_slice(&(i as u64).to_be_bytes());
            k
        })
        .collect()
}

#[test]
fn a_node_that_would_decode_to_hundreds_of_mib_is_refused() {
    // ~60k items of ~5 encoded bytes each: a 300 KiB leaf that spells out 240 MiB of keys.
    let keys = long_shared_keys(60_000);
    let mut enc = vec![cairn_tree::FORMAT_V1, 0];
    cairn_codec::put_varint(&mut enc, keys.len() as u64);
    let mut prev: &[u8] = &[];
    for k in &keys {
        let shared = prev.iter().zip(k).take_while(|(a, b)| a == b).count();
        cairn_codec::put_varint(&mut enc, shared as u64);
        cairn_codec::put_varint(&mut enc, (k.len() - shared) as u64);
        enc.extend_from_slice(&k[shared..]);
        cairn_codec::put_varint(&mut enc, 0);
        prev = k;
    }
    assert!(enc.len() < 1 << 20, "{} bytes", enc.len());
    assert!(matches!(
        Node::decode(&enc),
        Err(DecodeError::DecodedTooLarge)
    ));
}

#[test]
fn writers_split_nodes_before_the_decoded_limit() {
    // The same kind of keys written with the largest nodes the format allows and a fan-out
    // so high that hash boundaries almost never close a node: only the decoded-size cap
    // splits them. Every node written decodes again, and all entries are there.
    let cfg = TreeConfig {
        max_node_bytes: cairn_tree::MAX_ENCODED_NODE,
        target_fanout: 1 << 30,
        ..TreeConfig::default()
    };
    let tree = Tree::with_config(MemoryNodeStore::new(), cfg, CacheConfig::default()).unwrap();
    let keys = long_shared_keys(8_000);
    let root = tree
        .build(keys.iter().map(|k| (k.clone(), b"v".to_vec())))
        .unwrap()
        .root;
    let ids = tree.store().ids();
    for id in &ids {
        let bytes = tree.store().get(id).unwrap().unwrap();
        Node::decode(&bytes).unwrap();
    }
    assert!(ids.len() >= 3, "32 MiB of keys fit in {} nodes", ids.len());
    assert_eq!(tree.len(&root).unwrap(), 8_000);
}
