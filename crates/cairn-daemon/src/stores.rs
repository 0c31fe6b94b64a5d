//! Wiring the engine's stores to the local disk: tree nodes and file chunks share one
//! verified blob store, so every byte that may ever travel to a peer is a sealed blob named by
//! the blake3 of its ciphertext.

use std::sync::{Arc, RwLock};

use cairn_crypto::KeyEpochs;
use cairn_store::{BlobStore, ChunkId, Durability, EpochMetaSealer, StoreError};
use cairn_tree::{CacheConfig, NodeId, NodeSealer, NodeStore, Tree, TreeConfig, TreeError};
use cairn_vault::{Blobs, VaultStores};

/// Where blobs missing locally come from: the peers, once the network is up. Fetching is
/// blocking and must not be called from inside the async runtime (the engine and FUSE
/// threads call it; the runtime's own tasks never read through the stores).
pub trait Remote: Send + Sync {
    /// Fetches `id` from some peer into the local store; `Err` with a reason if none had it.
    fn fetch(&self, id: ChunkId) -> Result<(), String>;
    /// Starts fetching `ids` in the background (read-ahead); never blocks.
    fn prefetch(&self, ids: Vec<ChunkId>);
}

/// The local blob store, falling back to peers for blobs it does not hold. Without a remote
/// (offline, history views, before the network starts) it is just the local store.
pub struct LocalOrRemote {
    pub local: Arc<BlobStore>,
    remote: RwLock<Option<Arc<dyn Remote>>>,
}

impl LocalOrRemote {
    pub fn new(local: Arc<BlobStore>) -> Self {
        Self {
            local,
            remote: RwLock::new(None),
        }
    }

    pub fn set_remote(&self, remote: Option<Arc<dyn Remote>>) {
        *self.remote.write().unwrap_or_else(|e| e.into_inner()) = remote;
    }

    pub fn remote(&self) -> Option<Arc<dyn Remote>> {
        self.remote
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The blob's bytes, fetched from a peer if needed; `Ok(None)` when no one has it.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        match self.local.get(id) {
            Ok(b) => return Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let Some(remote) = self.remote() else {
            return Ok(None);
        };
        if let Err(reason) = remote.fetch(*id) {
            tracing::debug!(blob = %id, %reason, "blob not available from any peer");
            return Ok(None);
        }
        match self.local.get(id) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Blobs for LocalOrRemote {
    fn put(&self, bytes: &[u8]) -> cairn_vault::Result<ChunkId> {
        Blobs::put(self.local.as_ref(), bytes)
    }

    fn get(&self, id: &ChunkId) -> cairn_vault::Result<Option<Vec<u8>>> {
        Ok(LocalOrRemote::get(self, id)?)
    }

    /// Local presence only: asking the network is the caller's decision.
    fn has(&self, id: &ChunkId) -> cairn_vault::Result<bool> {
        Blobs::has(self.local.as_ref(), id)
    }
}

/// Tree nodes as blobs. Writes are batched (no fsync per node); whoever publishes a root must
/// call [`BlobStore::sync`] first, so a published snapshot never references a node that a
/// power cut could lose.
pub struct BlobNodeStore(pub Arc<LocalOrRemote>);

impl NodeStore for BlobNodeStore {
    fn get(&self, id: &NodeId) -> cairn_tree::Result<Option<Vec<u8>>> {
        self.0
            .get(&ChunkId(id.0))
            .map_err(|e| TreeError::Backend(Box::new(e)))
    }

    fn put(&self, id: &NodeId, bytes: &[u8]) -> cairn_tree::Result<()> {
        let stored = self
            .0
            .local
            .put(bytes, Durability::Batch)
            .map_err(|e| TreeError::Backend(Box::new(e)))?;
        debug_assert_eq!(stored.0, id.0);
        Ok(())
    }
}

/// Tree nodes sealed under the current key epoch's subkey (see `cairn_store::meta`).
struct SealedNodes(EpochMetaSealer);

impl NodeSealer for SealedNodes {
    fn seal(&self, plain: Vec<u8>) -> Vec<u8> {
        self.0.seal(&plain)
    }
    fn open(&self, stored: &[u8]) -> Result<Vec<u8>, String> {
        self.0.open(stored).map_err(|e| e.to_string())
    }
}

/// The engine's stores for one vault on this device.
pub fn vault_stores(
    blobs: Arc<LocalOrRemote>,
    keys: Arc<KeyEpochs>,
    cache_bytes: usize,
) -> cairn_vault::Result<VaultStores> {
    let nodes: Arc<dyn NodeStore> = Arc::new(BlobNodeStore(blobs.clone()));
    let tree = Tree::with_config(
        nodes,
        TreeConfig::default(),
        CacheConfig {
            max_bytes: cache_bytes,
        },
    )?
    .with_sealer(Arc::new(SealedNodes(EpochMetaSealer::new(
        keys,
        "tree node",
    ))));
    Ok(VaultStores {
        tree: Arc::new(tree),
        blobs: blobs as Arc<dyn Blobs>,
    })
}
