//! The daemon's side of the mount's `.cairn/history/` folder: the vault's timeline (see
//! [`crate::timeline`]) as a [`HistorySource`], and each past snapshot's tree as a read-only
//! [`VaultBase`] that fetches missing nodes and chunks from the members on demand.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use cairn_fuse::{BaseError, BaseLayer, HistorySource, PastSnapshot};
use cairn_tree::NodeId;
use lru::LruCache;

use crate::base::VaultBase;
use crate::names::Labels;
use crate::open_vault::OpenVault;
use crate::sink::view_of;
use crate::timeline::{Query, Timeline};

/// Past trees kept open: a `cp -r` or `ls -lR` moves through one at a time, and each keeps
/// its own small decrypted-chunk cache.
const OPEN_TREES: usize = 8;
const TREE_CHUNK_CACHE_BYTES: usize = 1 << 20;
/// Rows per timeline query while listing.
const PAGE: usize = 4096;

pub(crate) struct HistorySnapshots {
    vault: Arc<OpenVault>,
    timeline: Timeline,
    trees: Mutex<LruCache<NodeId, Arc<VaultBase>>>,
}

fn other(e: anyhow::Error) -> BaseError {
    BaseError::Other(format!("{e:#}"))
}

impl HistorySnapshots {
    pub(crate) fn open(vault: Arc<OpenVault>) -> anyhow::Result<Self> {
        let timeline = Timeline::open(&vault.dir)?;
        Ok(Self {
            vault,
            timeline,
            trees: Mutex::new(LruCache::new(
                NonZeroUsize::new(OPEN_TREES).expect("nonzero"),
            )),
        })
    }
}

/// The key of a past snapshot: its tree root (all [`HistorySource::open`] needs), then its
/// id, so two snapshots with the same tree are still two directories with their own inodes.
fn key_of(s: &crate::timeline::SnapInfo) -> Vec<u8> {
    let mut k = s.root.0.to_vec();
    k.extend_from_slice(&s.id.0.0);
    k
}

impl HistorySource for HistorySnapshots {
    fn snapshots(&self) -> Result<Vec<PastSnapshot>, BaseError> {
        // New snapshots of the members (a warm refresh opens nothing it has seen). When a
        // header cannot be fetched right now the listing shows what is indexed.
        if let Err(e) = crate::history::refresh(&self.vault, &self.timeline) {
            tracing::warn!(error = %format!("{e:#}"), "history folder: refreshing the timeline failed");
        }
        let labels = Labels::load(&self.vault);
        let mut out = Vec::new();
        for s in self.timeline.newest_first(Query {
            limit: PAGE,
            ..Query::default()
        }) {
            let s = s.map_err(other)?;
            out.push(PastSnapshot {
                key: key_of(&s),
                created_ms: s.created_ms,
                device: s.device.0.to_vec(),
                device_name: labels
                    .name(&s.device)
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
            });
        }
        Ok(out)
    }

    fn open(&self, key: &[u8]) -> Result<Arc<dyn BaseLayer>, BaseError> {
        let root = key
            .get(..32)
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .map(NodeId)
            .ok_or_else(|| BaseError::Other("not a snapshot key".into()))?;
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = trees.get(&root) {
            return Ok(t.clone());
        }
        let stores = self.vault.stores.clone();
        let tree = Arc::new(
            VaultBase::with_chunk_cache(
                stores.clone(),
                view_of(stores.source(root)),
                TREE_CHUNK_CACHE_BYTES,
            )
            .with_remote(self.vault.remote_blobs.clone()),
        );
        trees.put(root, tree.clone());
        Ok(tree)
    }
}
