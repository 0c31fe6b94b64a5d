//! Node codec (format v1) and node identity.
//!
//! Layout of an encoded node:
//!
//! ```text
//! u8      format version (1)
//! u8      level: 0 = leaf, n > 0 = internal node whose children are at level n - 1
//! varint  item count
//! per item:
//!   varint  shared   bytes shared with the previous key of this node (0 for the first)
//!   varint  suffix length, then the suffix bytes
//!   leaf:     varint value length, value bytes
//!   internal: 32-byte child id, varint entry count of the child subtree
//! ```
//!
//! Varints are unsigned LEB128. The decoder accepts exactly one encoding per node (minimal
//! varints, maximal shared prefixes, strictly increasing keys, no trailing bytes) so that a node
//! id names one logical node, not a family of equivalent byte strings.

use std::fmt;

pub(crate) use cairn_codec::varint_len;
use cairn_codec::{Reader, put_varint};

use crate::error::DecodeError;

/// Leading byte of every node produced by this version of the codec.
pub const FORMAT_V1: u8 = 1;
/// Longest key the format accepts. Paths longer than this are refused on input.
pub const MAX_KEY_LEN: usize = 4 * 1024;
/// Longest value the format accepts.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Decoder refuses inputs larger than this regardless of the writer's configuration.
pub const MAX_ENCODED_NODE: usize = 1024 * 1024;
/// Decoder refuses nodes whose keys and values, written out in full, exceed this. Keys are
/// prefix-compressed, so without it a hostile writer's 1 MiB node of long shared keys would
/// decode to ~800 MiB. Writers close nodes before they reach it (see `boundary`); honest
/// nodes of the default 128 KiB stay under ~7 MiB.
pub const MAX_DECODED_NODE: usize = 16 * 1024 * 1024;
/// Deepest level a node can have. Every internal node chunk holds at least two children (see
/// `TreeConfig::validate`), so 2^64 entries fit well below this.
pub const MAX_LEVEL: u8 = 64;

/// blake3 hash of a node's encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// Id of `encoded` bytes.
    pub fn of(encoded: &[u8]) -> Self {
        NodeId(*blake3::hash(encoded).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits; `None` for anything else.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(NodeId(out))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.to_hex())
    }
}

/// One key/value pair stored in a leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Reference from an internal node to a child subtree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildRef {
    /// First key of the child subtree; doubles as the separator when descending.
    pub key: Vec<u8>,
    pub id: NodeId,
    /// Number of entries in the child subtree, so sizes are known without walking it.
    pub count: u64,
}

/// The entries of a leaf, kept in one buffer (each full key followed by its value)
/// plus an index of offsets. Readers load leaves far more often than they keep their
/// entries, and a `Vec<LeafEntry>` costs two allocations per entry to build and to free:
/// that was most of the cost of loading a leaf on a cold cache.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Leaf {
    bytes: Vec<u8>,
    /// Per entry: where its key ends and where its value ends in `bytes`. An entry starts
    /// where the previous one's value ends.
    ends: Vec<(usize, usize)>,
}

impl Leaf {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry. Order is the caller's business: a leaf built out of order simply
    /// encodes to a node the decoder refuses.
    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((key_end, self.bytes.len()));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn start(&self, i: usize) -> usize {
        match i {
            0 => 0,
            _ => self.ends[i - 1].1,
        }
    }

    /// Key and value of entry `i`.
    pub fn get(&self, i: usize) -> Option<(&[u8], &[u8])> {
        let (key_end, end) = *self.ends.get(i)?;
        Some((
            &self.bytes[self.start(i)..key_end],
            &self.bytes[key_end..end],
        ))
    }

    /// Key of entry `i`; panics if out of range, like slice indexing.
    pub fn key(&self, i: usize) -> &[u8] {
        &self.bytes[self.start(i)..self.ends[i].0]
    }

    /// Value of entry `i`; panics if out of range, like slice indexing.
    pub fn value(&self, i: usize) -> &[u8] {
        let (key_end, end) = self.ends[i];
        &self.bytes[key_end..end]
    }

    pub fn first_key(&self) -> Option<&[u8]> {
        (!self.is_empty()).then(|| self.key(0))
    }

    pub fn last_key(&self) -> Option<&[u8]> {
        self.len().checked_sub(1).map(|i| self.key(i))
    }

    /// Binary search by key, as [`slice::binary_search`].
    pub fn search(&self, key: &[u8]) -> Result<usize, usize> {
        let i = self.partition_point(|k| k < key);
        if i < self.len() && self.key(i) == key {
            Ok(i)
        } else {
            Err(i)
        }
    }

    /// Number of leading entries whose key satisfies `pred`, as [`slice::partition_point`].
    pub fn partition_point(&self, mut pred: impl FnMut(&[u8]) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.key(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Entries in order, as (key, value).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + Clone + '_ {
        (0..self.len()).map(|i| (self.key(i), self.value(i)))
    }

    /// The entries as owned pairs.
    pub fn to_entries(&self) -> Vec<LeafEntry> {
        self.iter()
            .map(|(k, v)| LeafEntry {
                key: k.to_vec(),
                value: v.to_vec(),
            })
            .collect()
    }

    fn heap_size(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<(usize, usize)>()
    }
}

impl FromIterator<LeafEntry> for Leaf {
    fn from_iter<I: IntoIterator<Item = LeafEntry>>(iter: I) -> Self {
        let mut leaf = Leaf::new();
        for e in iter {
            leaf.push(&e.key, &e.value);
        }
        leaf
    }
}

impl From<Vec<LeafEntry>> for Leaf {
    fn from(entries: Vec<LeafEntry>) -> Self {
        entries.into_iter().collect()
    }
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.to_entries()).finish()
    }
}

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Leaf(Leaf),
    Internal { level: u8, children: Vec<ChildRef> },
}

impl Node {
    pub fn level(&self) -> u8 {
        match self {
            Node::Leaf(_) => 0,
            Node::Internal { level, .. } => *level,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Node::Leaf(e) => e.len(),
            Node::Internal { children, .. } => children.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn first_key(&self) -> Option<&[u8]> {
        match self {
            Node::Leaf(e) => e.first_key(),
            Node::Internal { children, .. } => children.first().map(|c| c.key.as_slice()),
        }
    }

    pub fn last_key(&self) -> Option<&[u8]> {
        match self {
            Node::Leaf(e) => e.last_key(),
            Node::Internal { children, .. } => children.last().map(|c| c.key.as_slice()),
        }
    }

    /// Entries in the subtree rooted here.
    pub fn entry_count(&self) -> u64 {
        match self {
            Node::Leaf(e) => e.len() as u64,
            Node::Internal { children, .. } => children.iter().map(|c| c.count).sum(),
        }
    }

    /// Approximate heap footprint of the decoded form, used for cache accounting. Counts
    /// allocator overhead per allocation so many tiny keys are not under-accounted.
    pub fn heap_size(&self) -> usize {
        const ALLOC_OVERHEAD: usize = 16;
        let base = std::mem::size_of::<Node>() + ALLOC_OVERHEAD;
        match self {
            Node::Leaf(e) => base + e.heap_size() + 2 * ALLOC_OVERHEAD,
            Node::Internal { children, .. } => {
                base + children.capacity() * std::mem::size_of::<ChildRef>()
                    + children
                        .iter()
                        .map(|c| c.key.capacity() + ALLOC_OVERHEAD)
                        .sum::<usize>()
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Node::Leaf(entries) => encode_leaf(entries.iter()),
            Node::Internal { level, children } => encode_internal(*level, children),
        }
    }

    /// Parses an encoded node. Never panics; any deviation from the canonical v1 encoding is an
    /// error.
    pub fn decode(bytes: &[u8]) -> Result<Node, DecodeError> {
        if bytes.len() > MAX_ENCODED_NODE {
            return Err(DecodeError::NodeTooLarge(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        let version = r.u8().map_err(|_| DecodeError::Empty)?;
        if version != FORMAT_V1 {
            return Err(DecodeError::UnknownVersion(version));
        }
        let level = r.u8()?;
        if level > MAX_LEVEL {
            return Err(DecodeError::LevelTooHigh(level));
        }
        let n = r.varint()?;
        // Every item takes at least 3 bytes; bounding the pre-allocation by the input length
        // keeps a forged count from reserving gigabytes.
        let cap = (n as usize).min(r.remaining() / 3);
        let node = if level == 0 {
            // Keys decode a little longer than their prefix-compressed form and values are
            // copied verbatim, so the rest of the input is a close first guess.
            let mut leaf = Leaf {
                bytes: Vec::with_capacity(r.remaining()),
                ends: Vec::with_capacity(cap),
            };
            for _ in 0..n {
                let prev = (leaf.len().checked_sub(1)).map(|j| (leaf.start(j), leaf.ends[j].0));
                let (shared, suffix) = key_parts(&mut r, prev.map(|(s, e)| &leaf.bytes[s..e]))?;
                if let Some((s, _)) = prev {
                    leaf.bytes.extend_from_within(s..s + shared);
                }
                leaf.bytes.extend_from_slice(suffix);
                let key_end = leaf.bytes.len();
                let vlen = r.varint()?;
                if vlen > MAX_VALUE_LEN as u64 {
                    return Err(DecodeError::ValueTooLong(vlen));
                }
                leaf.bytes.extend_from_slice(r.take(vlen as usize)?);
                leaf.ends.push((key_end, leaf.bytes.len()));
                if leaf.bytes.len() > MAX_DECODED_NODE {
                    return Err(DecodeError::DecodedTooLarge);
                }
            }
            // The cache accounts capacity: do not let a doubled buffer count twice.
            if leaf.bytes.capacity() - leaf.bytes.len() > leaf.bytes.len() / 8 {
                leaf.bytes.shrink_to_fit();
            }
            Node::Leaf(leaf)
        } else {
            if n == 0 {
                return Err(DecodeError::EmptyInternal);
            }
            let mut children: Vec<ChildRef> = Vec::with_capacity(cap);
            let mut key_bytes = 0usize;
            for _ in 0..n {
                let key = read_key(&mut r, children.last().map(|c| c.key.as_slice()))?;
                key_bytes += key.len() + 48;
                if key_bytes > MAX_DECODED_NODE {
                    return Err(DecodeError::DecodedTooLarge);
                }
                let id = r.take_array()?;
                let count = r.varint()?;
                if count == 0 {
                    return Err(DecodeError::ZeroCount);
                }
                children.push(ChildRef {
                    key,
                    id: NodeId(id),
                    count,
                });
            }
            Node::Internal { level, children }
        };
        r.finish()?;
        Ok(node)
    }
}

/// Encodes a leaf holding `entries`, in order.
pub(crate) fn encode_leaf<'a>(
    entries: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> Vec<u8> {
    // An upper bound (three varints of at most 3 bytes per item for keys and values within
    // the format limits), so the buffer is allocated once.
    let bound = entries
        .clone()
        .map(|(k, v)| k.len() + v.len() + 9)
        .sum::<usize>();
    let mut out = Vec::with_capacity(bound + header_len(entries.len()));
    out.push(FORMAT_V1);
    out.push(0);
    put_varint(&mut out, entries.len() as u64);
    let mut prev: &[u8] = &[];
    for (key, value) in entries {
        put_key(&mut out, prev, key);
        put_varint(&mut out, value.len() as u64);
        out.extend_from_slice(value);
        prev = key;
    }
    out
}

/// Encodes an internal node at `level` with `children`.
pub(crate) fn encode_internal(level: u8, children: &[ChildRef]) -> Vec<u8> {
    let bound = children
        .iter()
        .map(|c| c.key.len() + 32 + 16)
        .sum::<usize>();
    let mut out = Vec::with_capacity(bound + header_len(children.len()));
    out.push(FORMAT_V1);
    out.push(level);
    put_varint(&mut out, children.len() as u64);
    let mut prev: &[u8] = &[];
    for c in children {
        put_key(&mut out, prev, &c.key);
        out.extend_from_slice(&c.id.0);
        put_varint(&mut out, c.count);
        prev = &c.key;
    }
    out
}

pub(crate) fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn put_key(out: &mut Vec<u8>, prev: &[u8], key: &[u8]) {
    let shared = common_prefix(prev, key);
    put_varint(out, shared as u64);
    put_varint(out, (key.len() - shared) as u64);
    out.extend_from_slice(&key[shared..]);
}

/// Encoded size of the key part of an item that follows `prev` in the same node.
pub(crate) fn key_encoded_len(prev: &[u8], key: &[u8]) -> usize {
    let shared = common_prefix(prev, key);
    let suffix = key.len() - shared;
    varint_len(shared as u64) + varint_len(suffix as u64) + suffix
}

pub(crate) fn leaf_item_len(prev: &[u8], key: &[u8], value: &[u8]) -> usize {
    key_encoded_len(prev, key) + varint_len(value.len() as u64) + value.len()
}

pub(crate) fn child_item_len(prev: &[u8], c: &ChildRef) -> usize {
    key_encoded_len(prev, &c.key) + 32 + varint_len(c.count)
}

/// Size of the fixed part of a node holding `n` items.
pub(crate) fn header_len(n: usize) -> usize {
    2 + varint_len(n as u64)
}

/// Reads the prefix-compressed form of a key following `prev`: the length shared with
/// `prev` and the suffix, checked for canonical form. Order against `prev` is the
/// caller's check, once the key is assembled.
fn key_parts<'a>(
    r: &mut Reader<'a>,
    prev: Option<&[u8]>,
) -> Result<(usize, &'a [u8]), DecodeError> {
    let prev_bytes = prev.unwrap_or(&[]);
    let shared = r.varint()?;
    if shared > prev_bytes.len() as u64 {
        return Err(DecodeError::BadPrefix {
            shared,
            prev_len: prev_bytes.len(),
        });
    }
    let shared = shared as usize;
    let suffix_len = r.varint()?;
    let total = shared as u64 + suffix_len;
    if total > MAX_KEY_LEN as u64 {
        return Err(DecodeError::KeyTooLong(total));
    }
    let suffix = r.take(suffix_len as usize)?;
    if shared < prev_bytes.len() && suffix.first() == Some(&prev_bytes[shared]) {
        return Err(DecodeError::NonCanonical("shared prefix not maximal"));
    }
    // The key is `prev[..shared] + suffix`, and the suffix does not continue `prev`
    // (checked above), so it sorts after `prev` exactly when it extends `prev` or its
    // first byte is the greater one at `shared`: no need to compare whole keys.
    if prev.is_some() {
        let after = match (prev_bytes.get(shared), suffix.first()) {
            (None, Some(_)) => true,
            (Some(p), Some(s)) => s > p,
            (_, None) => false,
        };
        if !after {
            return Err(DecodeError::UnsortedKeys);
        }
    }
    Ok((shared, suffix))
}

fn read_key(r: &mut Reader<'_>, prev: Option<&[u8]>) -> Result<Vec<u8>, DecodeError> {
    let (shared, suffix) = key_parts(r, prev)?;
    let mut key = Vec::with_capacity(shared + suffix.len());
    key.extend_from_slice(&prev.unwrap_or(&[])[..shared]);
    key.extend_from_slice(suffix);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The leaf encoding written straight from owned entries, as the format describes it.
    fn reference_leaf_encoding(entries: &[LeafEntry]) -> Vec<u8> {
        let mut out = vec![FORMAT_V1, 0];
        put_varint(&mut out, entries.len() as u64);
        let mut prev: &[u8] = &[];
        for e in entries {
            put_key(&mut out, prev, &e.key);
            put_varint(&mut out, e.value.len() as u64);
            out.extend_from_slice(&e.value);
            prev = &e.key;
        }
        out
    }

    proptest! {
        /// The packed leaf answers every lookup exactly as a slice of owned entries would,
        /// and encodes (and decodes) to the same bytes.
        #[test]
        fn packed_leaf_agrees_with_entry_slice(
            map in prop::collection::btree_map(
                prop::collection::vec(0u8..4, 0..6),
                prop::collection::vec(any::<u8>(), 0..12),
                0..40,
            ),
            probes in prop::collection::vec(prop::collection::vec(0u8..4, 0..6), 0..20),
        ) {
            let entries: Vec<LeafEntry> = map
                .into_iter()
                .map(|(key, value)| LeafEntry { key, value })
                .collect();
            let leaf = Leaf::from(entries.clone());
            prop_assert_eq!(leaf.len(), entries.len());
            prop_assert_eq!(leaf.to_entries(), entries.clone());
            for (i, e) in entries.iter().enumerate() {
                prop_assert_eq!(leaf.get(i), Some((e.key.as_slice(), e.value.as_slice())));
            }
            prop_assert_eq!(leaf.get(entries.len()), None);
            prop_assert_eq!(leaf.first_key(), entries.first().map(|e| e.key.as_slice()));
            prop_assert_eq!(leaf.last_key(), entries.last().map(|e| e.key.as_slice()));
            for p in &probes {
                prop_assert_eq!(
                    leaf.search(p),
                    entries.binary_search_by(|e| e.key.as_slice().cmp(p))
                );
                prop_assert_eq!(
                    leaf.partition_point(|k| k <= p.as_slice()),
                    entries.partition_point(|e| e.key <= *p)
                );
            }
            let node = Node::Leaf(leaf);
            let bytes = node.encode();
            prop_assert_eq!(&bytes, &reference_leaf_encoding(&entries));
            prop_assert_eq!(Node::decode(&bytes).unwrap(), node);
        }
    }

    fn sample_leaf() -> Node {
        Node::Leaf(Leaf::from(vec![
            LeafEntry {
                key: b"".to_vec(),
                value: b"root".to_vec(),
            },
            LeafEntry {
                key: b"a/".to_vec(),
                value: vec![],
            },
            LeafEntry {
                key: b"a/b.txt".to_vec(),
                value: vec![7; 300],
            },
            LeafEntry {
                key: b"a/c.txt".to_vec(),
                value: b"x".to_vec(),
            },
        ]))
    }

    #[test]
    fn leaf_and_internal_round_trip() {
        let leaf = sample_leaf();
        assert_eq!(Node::decode(&leaf.encode()).unwrap(), leaf);
        let internal = Node::Internal {
            level: 3,
            children: vec![
                ChildRef {
                    key: b"a".to_vec(),
                    id: NodeId([1; 32]),
                    count: 1,
                },
                ChildRef {
                    key: b"ab".to_vec(),
                    id: NodeId([2; 32]),
                    count: u64::MAX,
                },
            ],
        };
        assert_eq!(Node::decode(&internal.encode()).unwrap(), internal);
    }

    #[test]
    fn prefix_compression_shrinks_shared_paths() {
        let leaf = sample_leaf();
        let raw: usize = 4 + 300 + 1 + 2 + 7 + 7;
        assert!(leaf.encode().len() < raw + 4 * 3 + 3);
        // "a/c.txt" after "a/b.txt" stores only "c.txt".
        let enc = leaf.encode();
        assert!(enc.windows(5).any(|w| w == b"c.txt"));
        assert!(!enc.windows(7).any(|w| w == b"a/c.txt"));
    }

    #[test]
    fn computed_item_sizes_match_encoding() {
        let leaf = sample_leaf();
        let Node::Leaf(entries) = &leaf else {
            unreachable!()
        };
        let entries = entries.to_entries();
        let mut prev: &[u8] = &[];
        let mut total = header_len(entries.len());
        for e in &entries {
            total += leaf_item_len(prev, &e.key, &e.value);
            prev = &e.key;
        }
        assert_eq!(total, leaf.encode().len());
    }

    #[test]
    fn rejects_non_canonical_forms() {
        assert_eq!(Node::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Node::decode(&[2, 0, 0]),
            Err(DecodeError::UnknownVersion(2))
        );
        assert_eq!(
            Node::decode(&[1, 0, 0, 0]),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(Node::decode(&[1, 1, 0]), Err(DecodeError::EmptyInternal));
        // count 0 written as two bytes
        assert!(matches!(
            Node::decode(&[1, 0, 0x80, 0x00]),
            Err(DecodeError::NonCanonical(_))
        ));
        // duplicate key
        let dup = [1, 0, 2, 0, 1, b'a', 0, 1, 0, 0];
        assert_eq!(Node::decode(&dup), Err(DecodeError::UnsortedKeys));
        // "ab" then "a" (a prefix of it), and "ab" then "aa": both descend
        let prefix = [1, 0, 2, 0, 2, b'a', b'b', 0, 1, 0, 0];
        assert_eq!(Node::decode(&prefix), Err(DecodeError::UnsortedKeys));
        let down = [1, 0, 2, 0, 2, b'a', b'b', 0, 1, 1, b'a', 0];
        assert_eq!(Node::decode(&down), Err(DecodeError::UnsortedKeys));
        let down_internal = [
            &[1u8, 1, 2, 0, 2, b'a', b'b'][..],
            &[7; 32],
            &[1, 1, 1, b'a'],
            &[7; 32],
            &[1],
        ]
        .concat();
        assert_eq!(Node::decode(&down_internal), Err(DecodeError::UnsortedKeys));
        // "ab" then "ac" with shared=0: valid keys, but prefix not maximal
        let loose = [1, 0, 2, 0, 2, b'a', b'b', 0, 0, 2, b'a', b'c', 0];
        assert!(matches!(
            Node::decode(&loose),
            Err(DecodeError::NonCanonical(_))
        ));
        // 11-byte varint
        let mut huge = vec![1, 0];
        huge.extend([0xff; 10]);
        huge.push(0x01);
        assert_eq!(Node::decode(&huge), Err(DecodeError::VarintOverflow));
    }
}
