//! The chunking rule: where one node ends and the next begins.
//!
//! Each level of the tree is a sorted sequence of items (leaf entries at level 0, child
//! references above). A left-to-right scan cuts the sequence into nodes:
//!
//! 1. Before adding an item, if the open node is non-empty and adding the item would make its
//!    encoding exceed `max_node_bytes`, the open node is closed first (hard size cap).
//! 2. After adding an item, the node is closed if the keyed blake3 hash of
//!    `(level, item key)` falls below `2^32 / target_fanout` (content-defined boundary).
//!
//! Both decisions depend only on the items of the open node and the next item, so the cut points
//! are a pure function of the sequence. That is what makes the root independent of insertion
//! history. Two consequences for `apply`:
//!
//! - A node closed by rule 2 depends on its own items only, and the scan state after it is empty.
//!   Once a freshly started scan closes a node by rule 2 where the old tree ended a node, and the
//!   items ahead are unchanged, everything after is identical (re-synchronisation).
//! - A node closed by rule 1 also depends on the *next* item, the first of the following node:
//!   its key (prefix-compressed against this node's last key) and value decide whether it fits.
//!   Changing or removing that item can move the cut, so the node before must be re-cut too. A
//!   rule-1 cut leaves the new item open in the scan, so it never counts as re-synchronised.

use std::sync::Arc;

use crate::node::{
    ChildRef, LeafEntry, MAX_DECODED_NODE, Node, child_item_len, encode_internal, encode_leaf,
    header_len, leaf_item_len,
};

/// Fixed key for the boundary hash. Mixing the level into the key makes the boundary decisions of
/// different levels independent even though internal items reuse leaf keys.
const BOUNDARY_KEY: [u8; 32] = *b"cairn-tree/boundary-rule/v1.....";

/// Probability threshold for `target_fanout`: an item ends a node with probability
/// `threshold / 2^32`.
pub(crate) fn threshold_for(target_fanout: u32) -> u32 {
    ((1u64 << 32) / u64::from(target_fanout.max(2))) as u32
}

/// Whether an item with `key` at `level` ends its node by the hash rule.
pub fn is_boundary(level: u8, key: &[u8], threshold: u32) -> bool {
    let mut k = BOUNDARY_KEY;
    k[31] ^= level;
    let h = blake3::keyed_hash(&k, key);
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) < threshold
}

/// An item of one tree level, generic so leaves and internal levels share one chunker.
pub(crate) trait ChunkItem: Clone {
    fn key(&self) -> &[u8];
    /// Encoded size when following an item with key `prev` in the same node.
    fn encoded_len(&self, prev: &[u8]) -> usize;
    /// Entries of the subtree this item stands for.
    fn weight(&self) -> u64;
    /// Whether `node` is a node of this item kind.
    fn is_kind(node: &Node) -> bool;
    /// The items of `node` if it is a node of this item kind.
    fn items(node: &Arc<Node>) -> Option<Vec<Self>>;
    /// The encoding of a node at `level` holding `items`.
    fn encode_node(items: &[Self], level: u8) -> Vec<u8>;
}

/// A leaf item as the chunker sees it. Items carried over from an old leaf point into that
/// (shared, decoded) leaf instead of being copied out: a re-cut feeds every item of each
/// node it touches, and copying them cost two allocations per item.
#[derive(Clone)]
pub(crate) enum LeafItem {
    /// Entry `idx` of a leaf node.
    Old(Arc<Node>, usize),
    New(LeafEntry),
}

impl LeafItem {
    pub(crate) fn parts(&self) -> (&[u8], &[u8]) {
        match self {
            LeafItem::Old(node, idx) => match &**node {
                Node::Leaf(leaf) => (leaf.key(*idx), leaf.value(*idx)),
                Node::Internal { .. } => unreachable!("old leaf items are only taken from leaves"),
            },
            LeafItem::New(e) => (&e.key, &e.value),
        }
    }

    pub(crate) fn into_pair(self) -> (Vec<u8>, Vec<u8>) {
        match self {
            LeafItem::New(e) => (e.key, e.value),
            old => {
                let (k, v) = old.parts();
                (k.to_vec(), v.to_vec())
            }
        }
    }
}

impl ChunkItem for LeafItem {
    fn key(&self) -> &[u8] {
        self.parts().0
    }
    fn encoded_len(&self, prev: &[u8]) -> usize {
        let (key, value) = self.parts();
        leaf_item_len(prev, key, value)
    }
    fn weight(&self) -> u64 {
        1
    }
    fn is_kind(node: &Node) -> bool {
        matches!(node, Node::Leaf(_))
    }
    fn items(node: &Arc<Node>) -> Option<Vec<Self>> {
        match &**node {
            Node::Leaf(e) => Some(
                (0..e.len())
                    .map(|i| LeafItem::Old(node.clone(), i))
                    .collect(),
            ),
            Node::Internal { .. } => None,
        }
    }
    fn encode_node(items: &[Self], _level: u8) -> Vec<u8> {
        encode_leaf(items.iter().map(LeafItem::parts))
    }
}

impl ChunkItem for ChildRef {
    fn key(&self) -> &[u8] {
        &self.key
    }
    fn encoded_len(&self, prev: &[u8]) -> usize {
        child_item_len(prev, self)
    }
    fn weight(&self) -> u64 {
        self.count
    }
    fn is_kind(node: &Node) -> bool {
        matches!(node, Node::Internal { .. })
    }
    fn items(node: &Arc<Node>) -> Option<Vec<Self>> {
        match &**node {
            Node::Internal { children, .. } => Some(children.clone()),
            Node::Leaf(_) => None,
        }
    }
    fn encode_node(items: &[Self], level: u8) -> Vec<u8> {
        encode_internal(level, items)
    }
}

/// Streaming cutter for one level. Holds only the open node.
pub(crate) struct Chunker<T> {
    level: u8,
    threshold: u32,
    max_node_bytes: usize,
    items: Vec<T>,
    body_len: usize,
    /// The open node's items written without prefix sharing: a bound on its decoded size.
    full_len: usize,
    /// Nodes closed so far; tells `finish` whether this level is the top.
    pub(crate) emitted: u64,
}

impl<T: ChunkItem> Chunker<T> {
    pub(crate) fn new(level: u8, threshold: u32, max_node_bytes: usize) -> Self {
        Chunker {
            level,
            threshold,
            max_node_bytes,
            items: Vec::new(),
            body_len: 0,
            full_len: 0,
            emitted: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds `item`; closed nodes (zero, one or two) are appended to `closed`.
    pub(crate) fn push(&mut self, item: T, closed: &mut Vec<Vec<T>>) {
        let prev = self.items.last().map_or(&[][..], |p| p.key());
        let mut len = item.encoded_len(prev);
        let full = item.encoded_len(&[]);
        if !self.items.is_empty()
            && (header_len(self.items.len() + 1) + self.body_len + len > self.max_node_bytes
                || self.full_len + full > MAX_DECODED_NODE)
        {
            closed.extend(self.take_open());
            len = full;
        }
        let boundary = is_boundary(self.level, item.key(), self.threshold);
        self.body_len += len;
        self.full_len += full;
        self.items.push(item);
        if boundary {
            closed.extend(self.take_open());
        }
    }

    /// Closes the open node if it has items.
    pub(crate) fn take_open(&mut self) -> Option<Vec<T>> {
        if self.items.is_empty() {
            return None;
        }
        self.body_len = 0;
        self.full_len = 0;
        self.emitted += 1;
        // The next node is likely about as long: sizing for it avoids regrowing item by item.
        let next = Vec::with_capacity(self.items.len());
        Some(std::mem::replace(&mut self.items, next))
    }
}
