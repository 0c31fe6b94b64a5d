//! The stores a vault engine is handed: tree nodes and blobs (file chunks, chunk lists and
//! sealed snapshot headers). Construction happens in one place, [`VaultStores::new`], so the
//! tree-node sealing hook (nodes encrypted under a vault tree key before they are stored)
//! plugs in there without touching the engine.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use cairn_store::{BlobStore, ChunkId, Durability, StoreError};
use cairn_tree::{CacheConfig, Edit, NodeId, NodeStore, Tree, TreeConfig, WriteStats};

use crate::entry::Entry;
use crate::error::Result;
use crate::merge::{DiffRow, MergeReport, merge_rows};
use crate::source::{EntryIter, EntrySource, decode_value};

/// Content-addressed blob storage. Ids are blake3 of the stored bytes; `get` must verify.
pub trait Blobs: Send + Sync {
    fn put(&self, bytes: &[u8]) -> Result<ChunkId>;
    /// `Ok(None)` if the blob is not stored locally.
    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>>;
    fn has(&self, id: &ChunkId) -> Result<bool>;
}

impl Blobs for BlobStore {
    fn put(&self, bytes: &[u8]) -> Result<ChunkId> {
        Ok(BlobStore::put(self, bytes, Durability::Immediate)?)
    }

    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        match BlobStore::get(self, id) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn has(&self, id: &ChunkId) -> Result<bool> {
        Ok(BlobStore::has(self, id)?)
    }
}

/// Blobs in memory, for simulations and tests. Sharing one between simulated devices models
/// perfect blob replication (the store is content-addressed, so sharing is harmless).
#[derive(Default)]
pub struct MemoryBlobs {
    blobs: RwLock<HashMap<ChunkId, Arc<[u8]>>>,
}

impl MemoryBlobs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces a stored blob's bytes without changing its id: for tamper tests.
    pub fn corrupt(&self, id: &ChunkId, bytes: &[u8]) {
        self.blobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*id, Arc::from(bytes));
    }

    pub fn len(&self) -> usize {
        self.blobs.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Blobs for MemoryBlobs {
    fn put(&self, bytes: &[u8]) -> Result<ChunkId> {
        let id = ChunkId::of(bytes);
        self.blobs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert_with(|| Arc::from(bytes));
        Ok(id)
    }

    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let got = self
            .blobs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|b| b.to_vec());
        match got {
            Some(b) if ChunkId::of(&b) != *id => Err(StoreError::Corrupt {
                id: *id,
                actual: ChunkId::of(&b),
            }
            .into()),
            other => Ok(other),
        }
    }

    fn has(&self, id: &ChunkId) -> Result<bool> {
        Ok(self
            .blobs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id))
    }
}

pub type NodeTree = Tree<Arc<dyn NodeStore>>;

/// Node and blob stores plus the tree handle (with its bounded node cache). Cheap to clone;
/// clones share the cache.
#[derive(Clone)]
pub struct VaultStores {
    pub tree: Arc<NodeTree>,
    pub blobs: Arc<dyn Blobs>,
}

impl VaultStores {
    /// The one place node storage is wired up (see the module docs).
    pub fn new(nodes: Arc<dyn NodeStore>, blobs: Arc<dyn Blobs>) -> Self {
        Self {
            tree: Arc::new(Tree::new(nodes)),
            blobs,
        }
    }

    /// Like [`new`](Self::new) with an explicit node-cache budget.
    pub fn with_cache(
        nodes: Arc<dyn NodeStore>,
        blobs: Arc<dyn Blobs>,
        cache: CacheConfig,
    ) -> Result<Self> {
        Ok(Self {
            tree: Arc::new(Tree::with_config(nodes, TreeConfig::default(), cache)?),
            blobs,
        })
    }

    pub fn empty_root() -> NodeId {
        NodeTree::empty_root()
    }

    /// Read access to the snapshot tree at `root`.
    pub fn source(&self, root: NodeId) -> TreeSource {
        TreeSource {
            tree: self.tree.clone(),
            root,
        }
    }

    /// Writes `batch` (ascending keys) onto `root`.
    pub fn apply(&self, root: &NodeId, batch: &[(Vec<u8>, Entry)]) -> Result<(NodeId, WriteStats)> {
        let up = self.tree.apply(
            root,
            batch
                .iter()
                .map(|(k, e)| Edit::Upsert(k.clone(), e.encode())),
        )?;
        Ok((up.root, up.stats))
    }

    /// Builds a tree from entries in ascending key order.
    pub fn build(
        &self,
        entries: impl IntoIterator<Item = (Vec<u8>, Entry)>,
    ) -> Result<(NodeId, WriteStats)> {
        let up = self
            .tree
            .build(entries.into_iter().map(|(k, e)| (k, e.encode())))?;
        Ok((up.root, up.stats))
    }

    /// Merges the tree `theirs` into `ours`; see [`crate::merge`]. Cost is proportional to
    /// the keys on which they differ.
    pub fn merge(&self, ours: &NodeId, theirs: &NodeId) -> Result<MergeOutcome> {
        if ours == theirs {
            return Ok(MergeOutcome {
                root: *ours,
                report: MergeReport::default(),
                stats: WriteStats::default(),
            });
        }
        let rows = self.tree.diff(ours, theirs).map(|d| {
            let d = d?;
            Ok(match d {
                cairn_tree::DiffEntry::Added { key, value } => DiffRow {
                    theirs: Some(decode_value(&key, &value)?),
                    ours: None,
                    key,
                },
                cairn_tree::DiffEntry::Removed { key, value } => DiffRow {
                    ours: Some(decode_value(&key, &value)?),
                    theirs: None,
                    key,
                },
                cairn_tree::DiffEntry::Changed { key, old, new } => DiffRow {
                    ours: Some(decode_value(&key, &old)?),
                    theirs: Some(decode_value(&key, &new)?),
                    key,
                },
            })
        });
        let source = self.source(*ours);
        let (batch, report) = merge_rows(&source, rows)?;
        let (root, stats) = self.apply(ours, &batch)?;
        Ok(MergeOutcome {
            root,
            report,
            stats,
        })
    }
}

/// The result of [`VaultStores::merge`].
#[derive(Clone, Debug)]
pub struct MergeOutcome {
    pub root: NodeId,
    pub report: MergeReport,
    pub stats: WriteStats,
}

/// A snapshot tree as an [`EntrySource`].
#[derive(Clone)]
pub struct TreeSource {
    tree: Arc<NodeTree>,
    root: NodeId,
}

impl TreeSource {
    pub fn root(&self) -> NodeId {
        self.root
    }
}

impl EntrySource for TreeSource {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        match self.tree.get(&self.root, key)? {
            Some(v) => Ok(Some(decode_value(key, &v)?)),
            None => Ok(None),
        }
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>) -> Result<EntryIter<'_>> {
        let upper = match end {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        let it = self
            .tree
            .scan(&self.root, (Bound::Included(start), upper))
            .map(|r| {
                let (k, v) = r?;
                let e = decode_value(&k, &v)?;
                Ok((k, e))
            });
        Ok(Box::new(it))
    }
}
