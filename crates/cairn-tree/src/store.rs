//! Where encoded nodes live. The tree only needs "bytes by id" and "store bytes under id"; it
//! verifies every node it reads against its id, so stores need not be trusted for integrity.
//!
//! Two implementations:
//! - [`MemoryNodeStore`]: a hash map, for tests and transient trees.
//! - [`FileNodeStore`]: one file per node at `<dir>/<2 hex>/<62 hex>`, written to a temporary
//!   file and renamed into place so a reader never sees a partial node under its final name.
//!
//! Why one file per node rather than an append-only pack: nodes are immutable and
//! content-addressed, so individual files need no index, no compaction, and garbage collection is
//! "delete unreachable files"; concurrent writers of the same node are harmless. The price is an
//! inode and (with `fsync`) two syncs per node, which makes bulk builds slower than appending to a
//! pack would be. A pack would also need torn-tail recovery and compaction. For a synced folder
//! where a snapshot usually rewrites a handful of nodes the simpler layout wins.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Result, TreeError};
use crate::node::NodeId;

/// Storage of encoded nodes by id. Implementations must be usable from several threads.
pub trait NodeStore: Send + Sync {
    /// The bytes stored under `id`, or `None` if absent. Need not verify the hash.
    fn get(&self, id: &NodeId) -> Result<Option<Vec<u8>>>;
    /// Stores `bytes` under `id`. The caller guarantees `id == NodeId::of(bytes)`; storing an
    /// id that is already present may be skipped.
    fn put(&self, id: &NodeId, bytes: &[u8]) -> Result<()>;
}

impl<T: NodeStore + ?Sized> NodeStore for Arc<T> {
    fn get(&self, id: &NodeId) -> Result<Option<Vec<u8>>> {
        (**self).get(id)
    }
    fn put(&self, id: &NodeId, bytes: &[u8]) -> Result<()> {
        (**self).put(id, bytes)
    }
}

impl<T: NodeStore + ?Sized> NodeStore for &T {
    fn get(&self, id: &NodeId) -> Result<Option<Vec<u8>>> {
        (**self).get(id)
    }
    fn put(&self, id: &NodeId, bytes: &[u8]) -> Result<()> {
        (**self).put(id, bytes)
    }
}

/// In-memory store.
#[derive(Default)]
pub struct MemoryNodeStore {
    nodes: RwLock<HashMap<NodeId, Arc<[u8]>>>,
}

impl MemoryNodeStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Sum of the encoded sizes of all stored nodes.
    pub fn total_bytes(&self) -> usize {
        self.read().values().map(|b| b.len()).sum()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.read().keys().copied().collect()
    }

    /// Drops a node; lets tests simulate a node that has not arrived yet.
    pub fn remove(&self, id: &NodeId) -> bool {
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .is_some()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, Arc<[u8]>>> {
        // A panic while holding the lock cannot leave the map half-updated (single insert or
        // remove), so poisoning carries no information here.
        self.nodes.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl NodeStore for MemoryNodeStore {
    fn get(&self, id: &NodeId) -> Result<Option<Vec<u8>>> {
        Ok(self.read().get(id).map(|b| b.to_vec()))
    }

    fn put(&self, id: &NodeId, bytes: &[u8]) -> Result<()> {
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*id)
            .or_insert_with(|| Arc::from(bytes));
        Ok(())
    }
}

/// Options for [`FileNodeStore`].
#[derive(Clone, Copy, Debug)]
pub struct FileStoreOptions {
    /// fsync each node file and its directory before `put` returns. Turning this off trades
    /// crash durability for bulk-write speed; a node torn by a crash is then detected on read
    /// (hash mismatch), never returned silently.
    pub fsync: bool,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        FileStoreOptions { fsync: true }
    }
}

/// On-disk store: one file per node under two-hex-digit fan-out directories.
pub struct FileNodeStore {
    dir: PathBuf,
    options: FileStoreOptions,
}

impl FileNodeStore {
    /// Opens (creating if needed) a store rooted at `dir`, with fsync on.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(dir, FileStoreOptions::default())
    }

    pub fn open_with(dir: impl Into<PathBuf>, options: FileStoreOptions) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| io_err("create", &dir, source))?;
        Ok(FileNodeStore { dir, options })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Final location of node `id`.
    pub fn path_for(&self, id: &NodeId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(&hex[2..])
    }
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> TreeError {
    TreeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl NodeStore for FileNodeStore {
    fn get(&self, id: &NodeId) -> Result<Option<Vec<u8>>> {
        let path = self.path_for(id);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    fn put(&self, id: &NodeId, bytes: &[u8]) -> Result<()> {
        let path = self.path_for(id);
        // Content-addressed: an existing file already holds these bytes (or a torn copy that
        // reads will reject by hash).
        if path.exists() {
            return Ok(());
        }
        let Some(parent) = path.parent() else {
            return Err(io_err(
                "locate parent of",
                &path,
                ErrorKind::InvalidInput.into(),
            ));
        };
        fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
        // Process-wide sequence: several stores over one directory in one process (one per
        // engine) must never pick the same temporary name.
        static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = parent.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            if self.options.fsync {
                f.sync_all()?;
            }
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", &tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename into", &path, e));
        }
        if self.options.fsync {
            // The rename is only durable once the directory entry is.
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err("sync", parent, e))?;
        }
        Ok(())
    }
}
