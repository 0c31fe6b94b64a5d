#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_tree::{
    CacheConfig, DiffEntry, MemoryNodeStore, Node, NodeId, NodeStore, Result, Tree, TreeConfig,
};

pub type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Small limits so a few hundred entries give deep trees and frequent forced splits.
pub fn tiny_config() -> TreeConfig {
    TreeConfig {
        target_fanout: 4,
        max_node_bytes: 160,
        max_key_len: 24,
        max_value_len: 40,
    }
}

/// Hash boundaries only (the size cap is never reached with the test data).
pub fn hashy_config() -> TreeConfig {
    TreeConfig {
        target_fanout: 3,
        max_node_bytes: 64 * 1024,
        max_key_len: 24,
        max_value_len: 40,
    }
}

pub fn mem_tree(config: TreeConfig) -> Tree<MemoryNodeStore> {
    Tree::with_config(MemoryNodeStore::new(), config, CacheConfig::default()).unwrap()
}

/// Every node reachable from `root`, depth first.
pub fn all_nodes<S: NodeStore>(tree: &Tree<S>, root: &NodeId) -> Vec<(NodeId, Arc<Node>)> {
    let mut out = Vec::new();
    let mut todo = vec![*root];
    while let Some(id) = todo.pop() {
        let node = tree.read_node(&id).unwrap();
        if let Node::Internal { children, .. } = &*node {
            todo.extend(children.iter().map(|c| c.id));
        }
        out.push((id, node));
    }
    out
}

pub fn scan_all<S: NodeStore>(tree: &Tree<S>, root: &NodeId) -> Vec<(Vec<u8>, Vec<u8>)> {
    tree.scan_all(root).collect::<Result<Vec<_>>>().unwrap()
}

pub fn model_diff(a: &Model, b: &Model) -> Vec<DiffEntry> {
    let mut keys: Vec<&Vec<u8>> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| match (a.get(k), b.get(k)) {
            (Some(o), Some(n)) if o != n => Some(DiffEntry::Changed {
                key: k.clone(),
                old: o.clone(),
                new: n.clone(),
            }),
            (Some(o), None) => Some(DiffEntry::Removed {
                key: k.clone(),
                value: o.clone(),
            }),
            (None, Some(n)) => Some(DiffEntry::Added {
                key: k.clone(),
                value: n.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Store wrapper counting reads, to show which operations touch how many nodes.
#[derive(Default)]
pub struct CountingStore {
    pub inner: MemoryNodeStore,
    pub gets: AtomicU64,
    pub puts: AtomicU64,
}

impl CountingStore {
    pub fn reset(&self) {
        self.gets.store(0, Ordering::Relaxed);
        self.puts.store(0, Ordering::Relaxed);
    }
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::Relaxed)
    }
}

impl NodeStore for CountingStore {
    fn get(&self, id: &NodeId) -> Result<Option<Vec<u8>>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(id)
    }
    fn put(&self, id: &NodeId, bytes: &[u8]) -> Result<()> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put(id, bytes)
    }
}

/// Realistic path keys `dirNNNN/subNN/fileNNNNNN.txt`, sorted, with pseudo-random values.
pub fn path_entries(n: usize) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> {
    (0..n).map(|i| {
        let key = format!(
            "dir{:04}/sub{:02}/file{:06}.txt",
            i / 1000,
            (i / 100) % 10,
            i
        );
        let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        let len = 40 + (x % 61) as usize;
        let value = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        (key.into_bytes(), value)
    })
}
