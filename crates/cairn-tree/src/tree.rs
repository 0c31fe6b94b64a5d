//! The [`Tree`] handle: configuration, verified node loading, and node writing shared by the
//! operation modules.

use std::sync::{Arc, LazyLock};

use crate::boundary::{ChunkItem, threshold_for};
use crate::cache::{CacheConfig, CacheStats, NodeCache};
use crate::error::{Result, TreeError};
use crate::node::{
    ChildRef, Leaf, MAX_ENCODED_NODE, MAX_KEY_LEN, MAX_VALUE_LEN, Node, NodeId, header_len,
    varint_len,
};
use crate::store::NodeStore;

/// Transforms node encodings on their way to and from the store, e.g. encryption.
///
/// Node ids are the blake3 of the *sealed* bytes, so a peer that cannot open a node can still
/// store, serve and verify it, and a sealer that is deterministic (same plaintext → same sealed
/// bytes) keeps "same entries, same root". The tree never sees keys or nonces.
pub trait NodeSealer: Send + Sync {
    fn seal(&self, plain: Vec<u8>) -> Vec<u8>;
    /// Returns the node encoding, or a reason why `stored` cannot be opened.
    fn open(&self, stored: &[u8]) -> std::result::Result<Vec<u8>, String>;
    /// Whether `seal` is the identity; lets plaintext trees skip a copy on every read.
    fn is_identity(&self) -> bool {
        false
    }
}

/// Nodes stored as their plain encoding (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainNodes;

impl NodeSealer for PlainNodes {
    fn seal(&self, plain: Vec<u8>) -> Vec<u8> {
        plain
    }
    fn open(&self, stored: &[u8]) -> std::result::Result<Vec<u8>, String> {
        Ok(stored.to_vec())
    }
    fn is_identity(&self) -> bool {
        true
    }
}

/// Shape parameters. They are part of the tree's identity: two writers produce the same root for
/// the same entries only if they use the same configuration, so cairn uses the default everywhere
/// and other values exist for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeConfig {
    /// Average number of items per node produced by the hash rule.
    pub target_fanout: u32,
    /// Hard cap on a node's encoded size.
    pub max_node_bytes: usize,
    /// Longest accepted key (≤ [`MAX_KEY_LEN`]).
    pub max_key_len: usize,
    /// Longest accepted value (≤ [`MAX_VALUE_LEN`]).
    pub max_value_len: usize,
}

impl Default for TreeConfig {
    /// Fan-out 64 (≈4–8 KiB leaves for path-keyed metadata), 4 KiB keys, 64 KiB values,
    /// 128 KiB nodes.
    fn default() -> Self {
        TreeConfig {
            target_fanout: 64,
            max_node_bytes: 128 * 1024,
            max_key_len: MAX_KEY_LEN,
            max_value_len: MAX_VALUE_LEN,
        }
    }
}

impl TreeConfig {
    /// Checks the limits are consistent: one maximal entry must fit in a leaf, and two maximal
    /// child references in an internal node, otherwise a level could fail to shrink and the tree
    /// would grow without end.
    pub fn validate(&self) -> Result<()> {
        if self.target_fanout < 2 {
            return Err(TreeError::InvalidConfig("target_fanout must be at least 2"));
        }
        if self.max_key_len > MAX_KEY_LEN {
            return Err(TreeError::InvalidConfig("max_key_len exceeds format limit"));
        }
        if self.max_value_len > MAX_VALUE_LEN {
            return Err(TreeError::InvalidConfig(
                "max_value_len exceeds format limit",
            ));
        }
        if self.max_node_bytes > MAX_ENCODED_NODE {
            return Err(TreeError::InvalidConfig(
                "max_node_bytes exceeds format limit",
            ));
        }
        let key_part = 2 * varint_len(self.max_key_len as u64) + self.max_key_len;
        let leaf_item = key_part + varint_len(self.max_value_len as u64) + self.max_value_len;
        let child_item = key_part + 32 + varint_len(u64::MAX);
        if header_len(1) + leaf_item > self.max_node_bytes {
            return Err(TreeError::InvalidConfig(
                "max_node_bytes cannot hold one maximal entry",
            ));
        }
        if header_len(2) + 2 * child_item > self.max_node_bytes {
            return Err(TreeError::InvalidConfig(
                "max_node_bytes cannot hold two maximal child references",
            ));
        }
        Ok(())
    }

    pub(crate) fn check_entry(&self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        if key.len() > self.max_key_len {
            return Err(TreeError::KeyTooLarge {
                len: key.len(),
                max: self.max_key_len,
            });
        }
        if let Some(v) = value
            && v.len() > self.max_value_len
        {
            return Err(TreeError::ValueTooLarge {
                len: v.len(),
                max: self.max_value_len,
            });
        }
        Ok(())
    }
}

/// Counters for the nodes an operation wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub nodes_written: u64,
    pub bytes_written: u64,
}

/// Result of `build` and `apply`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeUpdate {
    pub root: NodeId,
    pub stats: WriteStats,
}

static EMPTY_ROOT: LazyLock<NodeId> =
    LazyLock::new(|| NodeId::of(&Node::Leaf(Leaf::new()).encode()));

/// A prolly tree over a [`NodeStore`]. Cheap to share (`&Tree` or `Arc<Tree>`) across threads;
/// trees are values named by their root id, so one handle serves any number of roots.
pub struct Tree<S> {
    store: S,
    cache: NodeCache,
    config: TreeConfig,
    pub(crate) threshold: u32,
    pub(crate) sealer: Arc<dyn NodeSealer>,
}

impl<S: NodeStore> Tree<S> {
    /// Default configuration and a 32 MiB cache.
    pub fn new(store: S) -> Self {
        let config = TreeConfig::default();
        Tree {
            store,
            cache: NodeCache::new(CacheConfig::default()),
            threshold: threshold_for(config.target_fanout),
            config,
            sealer: Arc::new(PlainNodes),
        }
    }

    pub fn with_config(store: S, config: TreeConfig, cache: CacheConfig) -> Result<Self> {
        config.validate()?;
        Ok(Tree {
            store,
            cache: NodeCache::new(cache),
            threshold: threshold_for(config.target_fanout),
            config,
            sealer: Arc::new(PlainNodes),
        })
    }

    /// Store nodes through `sealer` (see [`NodeSealer`]). Trees written with one sealer are only
    /// readable with an equivalent one.
    pub fn with_sealer(mut self, sealer: Arc<dyn NodeSealer>) -> Self {
        self.sealer = sealer;
        self
    }

    /// Root of the tree with no entries: the id of an encoded empty leaf. It is never written to a
    /// store; every reader recognises it.
    pub fn empty_root() -> NodeId {
        *EMPTY_ROOT
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn config(&self) -> &TreeConfig {
        &self.config
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    pub fn clear_cache(&self) {
        self.cache.clear()
    }

    /// Loads and verifies a node: present in the store, hashing to `id`, well-formed.
    pub fn read_node(&self, id: &NodeId) -> Result<Arc<Node>> {
        if let Some(n) = self.cache.get(id) {
            return Ok(n);
        }
        if *id == *EMPTY_ROOT {
            return Ok(Arc::new(Node::Leaf(Leaf::new())));
        }
        let bytes = self.store.get(id)?.ok_or(TreeError::MissingNode(*id))?;
        let actual = NodeId::of(&bytes);
        if actual != *id {
            return Err(TreeError::HashMismatch { id: *id, actual });
        }
        let plain = if self.sealer.is_identity() {
            bytes
        } else {
            self.sealer
                .open(&bytes)
                .map_err(|reason| TreeError::Unseal { id: *id, reason })?
        };
        let node =
            Arc::new(Node::decode(&plain).map_err(|source| TreeError::Decode { id: *id, source })?);
        self.cache.insert(*id, node.clone());
        Ok(node)
    }

    /// Loads the child behind `child` of a node at `parent_level`, checking it fits its parent:
    /// one level down and starting exactly at the separator key.
    pub(crate) fn read_child(&self, parent_level: u8, child: &ChildRef) -> Result<Arc<Node>> {
        let node = self.read_node(&child.id)?;
        if node.level() + 1 != parent_level {
            return Err(TreeError::Corrupt {
                id: child.id,
                reason: "child level does not match parent",
            });
        }
        if node.first_key() != Some(child.key.as_slice()) {
            return Err(TreeError::Corrupt {
                id: child.id,
                reason: "child does not start at its separator key",
            });
        }
        Ok(node)
    }

    /// Number of levels (1 for a single leaf, including the empty tree).
    pub fn depth(&self, root: &NodeId) -> Result<usize> {
        Ok(usize::from(self.read_node(root)?.level()) + 1)
    }

    /// Number of entries, from the counts stored in the root.
    pub fn len(&self, root: &NodeId) -> Result<u64> {
        Ok(self.read_node(root)?.entry_count())
    }

    pub(crate) fn write_encoded(
        &self,
        id: &NodeId,
        bytes: &[u8],
        stats: &mut WriteStats,
    ) -> Result<()> {
        self.store.put(id, bytes)?;
        stats.nodes_written += 1;
        stats.bytes_written += bytes.len() as u64;
        Ok(())
    }
}

/// Turns a closed chunk into a node: encoding, id and the reference its parent will hold.
pub(crate) fn seal<T: ChunkItem>(
    items: Vec<T>,
    level: u8,
    sealer: &dyn NodeSealer,
) -> (ChildRef, Vec<u8>) {
    let count = items.iter().map(ChunkItem::weight).sum();
    let key = items.first().map(|i| i.key().to_vec()).unwrap_or_default();
    let bytes = sealer.seal(T::encode_node(&items, level));
    let id = NodeId::of(&bytes);
    (ChildRef { key, id, count }, bytes)
}
