//! Content-addressed prolly tree mapping byte-string keys (full paths) to opaque byte values.
//!
//! This crate owns the tree structure only: the node format, where node boundaries fall, and the
//! operations `build`, `get`, `scan`, `apply` and `diff` over nodes kept in a [`NodeStore`]. It
//! knows nothing about what keys and values mean (entries, files, versions), nor about
//! encryption, snapshots headers or the network; callers encode those into values and move nodes
//! around by [`NodeId`].
//!
//! Properties the rest of cairn relies on:
//! - **Canonical**: the root id depends only on the set of entries (and the [`TreeConfig`]), never
//!   on the order in which they were inserted or removed.
//! - **Local updates**: `apply` rewrites only nodes on changed paths — about one node per level for
//!   a single change — and `diff` skips identical subtrees by id.
//! - **Verified reads**: every node read is checked against its blake3 id and decoded strictly;
//!   bad input yields a [`TreeError`], never a panic.
//! - **Bounded memory**: `build`, `scan` and `diff` stream; decoded nodes are cached in an LRU
//!   bounded in bytes ([`CacheConfig`]).
//!
//! The empty tree is the id of an encoded empty leaf ([`Tree::empty_root`]); it is never stored.
//!
//! Limits: keys up to [`MAX_KEY_LEN`] (4 KiB), values up to [`MAX_VALUE_LEN`] (64 KiB), nodes up to
//! `TreeConfig::max_node_bytes` (128 KiB by default) encoded.

mod apply;
mod boundary;
mod build;
mod cache;
mod diff;
mod error;
mod node;
mod read;
mod store;
mod tree;

pub use apply::Edit;
pub use boundary::is_boundary;
pub use cache::{CacheConfig, CacheStats};
pub use diff::{Diff, DiffEntry};
pub use error::{DecodeError, Result, TreeError};
pub use node::{
    ChildRef, FORMAT_V1, Leaf, LeafEntry, MAX_DECODED_NODE, MAX_ENCODED_NODE, MAX_KEY_LEN,
    MAX_LEVEL, MAX_VALUE_LEN, Node, NodeId,
};
pub use read::Scan;
pub use store::{FileNodeStore, FileStoreOptions, MemoryNodeStore, NodeStore};
pub use tree::{NodeSealer, PlainNodes, Tree, TreeConfig, TreeUpdate, WriteStats};
