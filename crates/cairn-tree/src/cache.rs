//! Byte-bounded LRU of decoded nodes shared by all readers of a [`crate::Tree`].
//!
//! The bound is on accounted bytes (approximate decoded heap size), not on node count, because
//! node sizes vary from a few bytes to `max_node_bytes`. Nodes handed out stay alive while a reader
//! holds them even after eviction; the bound covers what the cache itself pins.

use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use crate::node::{Node, NodeId};

/// Cache sizing.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// Upper bound on accounted bytes held by the cache; 0 disables caching.
    pub max_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Snapshot of cache counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub used_bytes: usize,
    pub max_bytes: usize,
    pub nodes: usize,
    pub hits: u64,
    pub misses: u64,
}

struct Inner {
    lru: LruCache<NodeId, (Arc<Node>, usize)>,
    used: usize,
    hits: u64,
    misses: u64,
}

pub struct NodeCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl NodeCache {
    pub fn new(config: CacheConfig) -> Self {
        NodeCache {
            max_bytes: config.max_bytes,
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                used: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `used` consistent with the map before anything that can
        // panic, so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &NodeId) -> Option<Arc<Node>> {
        let mut g = self.lock();
        let hit = g.lru.get(id).map(|(n, _)| n.clone());
        if hit.is_some() {
            g.hits += 1;
        } else {
            g.misses += 1;
        }
        hit
    }

    pub fn insert(&self, id: NodeId, node: Arc<Node>) {
        let cost = node.heap_size() + std::mem::size_of::<(NodeId, Arc<Node>, usize)>();
        if cost > self.max_bytes {
            return;
        }
        let mut g = self.lock();
        if let Some((_, old)) = g.lru.pop(&id) {
            g.used -= old;
        }
        while g.used + cost > self.max_bytes {
            match g.lru.pop_lru() {
                Some((_, (_, c))) => g.used -= c,
                None => break,
            }
        }
        g.used += cost;
        g.lru.put(id, (node, cost));
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.lock();
        CacheStats {
            used_bytes: g.used,
            max_bytes: self.max_bytes,
            nodes: g.lru.len(),
            hits: g.hits,
            misses: g.misses,
        }
    }

    pub fn clear(&self) {
        let mut g = self.lock();
        g.lru.clear();
        g.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Leaf, LeafEntry};

    fn leaf(tag: u8, size: usize) -> Arc<Node> {
        Arc::new(Node::Leaf(Leaf::from(vec![LeafEntry {
            key: vec![tag],
            value: vec![tag; size],
        }])))
    }

    #[test]
    fn accounted_bytes_never_exceed_bound() {
        let cache = NodeCache::new(CacheConfig { max_bytes: 10_000 });
        for i in 0..500u32 {
            let size = (i as usize * 37) % 3000;
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            cache.insert(NodeId(id), leaf(i as u8, size));
            let s = cache.stats();
            assert!(s.used_bytes <= s.max_bytes, "{s:?}");
        }
        let s = cache.stats();
        assert!(s.nodes > 1 && s.nodes < 500, "{s:?}");
    }

    #[test]
    fn oversized_node_is_not_cached_and_reinsert_does_not_double_count() {
        let cache = NodeCache::new(CacheConfig { max_bytes: 1000 });
        cache.insert(NodeId([1; 32]), leaf(1, 5000));
        assert_eq!(cache.stats().nodes, 0);
        cache.insert(NodeId([2; 32]), leaf(2, 10));
        let once = cache.stats().used_bytes;
        cache.insert(NodeId([2; 32]), leaf(2, 10));
        assert_eq!(cache.stats().used_bytes, once);
        assert!(cache.get(&NodeId([2; 32])).is_some());
    }
}
