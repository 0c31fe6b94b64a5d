//! Error types. Decoding problems get their own enum so a caller can tell "these bytes are not a
//! node" apart from "the tree around this node is inconsistent" or "the store failed".

use std::path::PathBuf;

use crate::node::NodeId;

/// Why a byte string is not a valid encoded node. Produced only by [`crate::Node::decode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty input")]
    Empty,
    #[error("unknown node format version {0}")]
    UnknownVersion(u8),
    #[error("input ends in the middle of a node")]
    Truncated,
    #[error("{0} unexpected bytes after the node")]
    TrailingBytes(usize),
    #[error("varint does not fit in 64 bits")]
    VarintOverflow,
    #[error("non-canonical encoding: {0}")]
    NonCanonical(&'static str),
    #[error("node of {0} bytes exceeds the decoder limit")]
    NodeTooLarge(usize),
    #[error("node decodes to more than the decoder limit (16 MiB of keys and values)")]
    DecodedTooLarge,
    #[error("node level {0} exceeds the maximum depth")]
    LevelTooHigh(u8),
    #[error("internal node without children")]
    EmptyInternal,
    #[error("shared prefix {shared} longer than previous key ({prev_len} bytes)")]
    BadPrefix { shared: u64, prev_len: usize },
    #[error("key of {0} bytes exceeds the format limit")]
    KeyTooLong(u64),
    #[error("value of {0} bytes exceeds the format limit")]
    ValueTooLong(u64),
    #[error("keys are not strictly increasing")]
    UnsortedKeys,
    #[error("child subtree claims zero entries")]
    ZeroCount,
}

impl From<cairn_codec::Error> for DecodeError {
    fn from(e: cairn_codec::Error) -> Self {
        match e {
            cairn_codec::Error::Truncated => DecodeError::Truncated,
            cairn_codec::Error::VarintOverflow => DecodeError::VarintOverflow,
            cairn_codec::Error::NonCanonicalVarint => {
                DecodeError::NonCanonical("varint has trailing zero byte")
            }
            cairn_codec::Error::TrailingBytes(n) => DecodeError::TrailingBytes(n),
        }
    }
}

/// Everything the tree operations can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The store has no node with this id (e.g. not yet synced from a peer).
    #[error("node {0} is missing from the store")]
    MissingNode(NodeId),
    /// The store returned bytes that do not hash to the requested id.
    #[error("node {id} failed verification: content hashes to {actual}")]
    HashMismatch { id: NodeId, actual: NodeId },
    /// The bytes under `id` hash correctly but the sealer refused them (wrong vault key, or
    /// bytes sealed by something else).
    #[error("node {id} cannot be opened: {reason} (is this tree from another vault?)")]
    Unseal { id: NodeId, reason: String },
    /// The bytes under `id` hash correctly but are not a well-formed node.
    #[error("node {id} is malformed: {source}")]
    Decode {
        id: NodeId,
        #[source]
        source: DecodeError,
    },
    /// Individually valid nodes that do not fit together (wrong level, separator mismatch, ...).
    #[error("inconsistent tree at node {id}: {reason}")]
    Corrupt { id: NodeId, reason: &'static str },
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes exceeds the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    /// Input to `build`/`apply` was not strictly increasing by key.
    #[error("input keys are not strictly increasing (at key {})", hex::encode(.key))]
    Unsorted { key: Vec<u8> },
    #[error("invalid tree configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("tree would exceed the maximum depth")]
    TooDeep,
    #[error("{op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Failure of a [`crate::NodeStore`] implemented outside this crate.
    #[error("node store failure: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = TreeError> = std::result::Result<T, E>;
