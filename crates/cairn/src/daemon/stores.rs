//! Wiring the engine's stores to the local disk: tree nodes and file chunks share one
//! verified blob store, so every byte that may ever travel to a peer is a sealed blob named by
//! the blake3 of its ciphertext.

use std::sync::Arc;

use cairn_crypto::ContentKey;
use cairn_store::{BlobStore, ChunkId, Durability, MetaSealer, StoreError};
use cairn_tree::{CacheConfig, NodeId, NodeSealer, NodeStore, Tree, TreeConfig, TreeError};
use cairn_vault::{Blobs, VaultStores};

/// Tree nodes as blobs. Writes are batched (no fsync per node); whoever publishes a root must
/// call [`BlobStore::sync`] first, so a published snapshot never references a node that a
/// power cut could lose.
pub struct BlobNodeStore(pub Arc<BlobStore>);

impl NodeStore for BlobNodeStore {
    fn get(&self, id: &NodeId) -> cairn_tree::Result<Option<Vec<u8>>> {
        match self.0.get(&ChunkId(id.0)) {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(TreeError::Backend(Box::new(e))),
        }
    }

    fn put(&self, id: &NodeId, bytes: &[u8]) -> cairn_tree::Result<()> {
        let stored = self
            .0
            .put(bytes, Durability::Batch)
            .map_err(|e| TreeError::Backend(Box::new(e)))?;
        debug_assert_eq!(stored.0, id.0);
        Ok(())
    }
}

/// Tree nodes sealed under a vault subkey (see `cairn_store::meta`).
struct SealedNodes(MetaSealer);

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
    blobs: Arc<BlobStore>,
    content_key: &ContentKey,
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
    .with_sealer(Arc::new(SealedNodes(MetaSealer::new(
        content_key,
        "tree node",
    ))));
    Ok(VaultStores {
        tree: Arc::new(tree),
        blobs: blobs as Arc<dyn Blobs>,
    })
}
