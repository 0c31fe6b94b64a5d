//! Blob replication over iroh-blobs (`iroh_blobs::ALPN`), bridged to cairn's [`BlobStore`].
//!
//! A [`ChunkId`] is the blake3 hash of the stored bytes, which is exactly an iroh-blobs
//! [`Hash`] of a raw blob, so no id mapping is needed.
//!
//! **Bridge.** Serving: iroh-blobs' provider needs its own store (it serves from data plus
//! a bao outboard). We keep an [`FsStore`] as a *serving index* beside the cairn store and
//! import blobs into it lazily, on the first authorized request for a hash, with
//! [`ImportMode::TryReference`]: the FsStore references the cairn blob file in place (cairn
//! blob files are immutable; they are only ever replaced by an atomic rename of identical
//! bytes), so the cost is one blake3 pass to build the outboard (~1/1024 of the blob size on
//! disk, kept for later requests) and no copy of the data; blobs ≤ 16 KiB are copied into
//! the FsStore's database instead (iroh-blobs inlines them). If a cairn blob is removed later,
//! the FsStore reference dangles and requests for it fail; re-importing is a matter of
//! deleting the serving index directory.
//! Fetching bypasses the FsStore entirely: [`BlobService::fetch`] runs the iroh-blobs get
//! state machine, which verifies every 16 KiB group against the requested hash as it
//! arrives, collects the verified bytes (capped at [`BlobService::max_blob_size`]) and
//! writes them to the cairn store, which re-hashes them. A peer serving wrong bytes fails
//! verification and nothing is stored; [`BlobService::fetch_from_any`] then tries the next
//! peer.
//!
//! Authorization: the endpoint allowlist already refuses non-members on this ALPN; in
//! addition every connection and every request is intercepted through iroh-blobs' event
//! hooks and re-checked against the current [`Members`] (so a member removed mid-connection
//! gets no more data). Only single-blob `Get` and `Observe` requests are served; `GetMany`
//! and `Push` are refused.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bao_tree::io::BaoContentItem;
use cairn_crypto::DeviceId;
use cairn_store::{BlobStore, ChunkId, Durability};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr};
use iroh_blobs::api::blobs::{AddPathOptions, ImportMode};
use iroh_blobs::get::fsm;
use iroh_blobs::protocol::GetRequest;
use iroh_blobs::provider::events::{
    AbortReason, ConnectMode, EventMask, EventSender, ObserveMode, ProviderMessage, RequestMode,
    ThrottleMode,
};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::{BlobFormat, BlobsProtocol, Hash};

use crate::endpoint::{Members, device_id_of};

/// Default cap on a single fetched blob (cairn chunks are at most 256 KiB; snapshot nodes
/// and other blobs stay far below this).
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot open the blob serving index at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("cannot connect to peer {peer} for blobs: {reason}")]
    Connect { peer: String, reason: String },
    #[error(
        "fetching blob {id} from {peer} failed: {reason} (the peer may not have it, or sent data that does not match its hash)"
    )]
    Fetch {
        id: String,
        peer: String,
        reason: String,
    },
    #[error("blob {id} is {size} bytes, more than the {max}-byte limit; refusing to fetch it")]
    TooLarge { id: String, size: u64, max: u64 },
    #[error("storing fetched blob {id} locally failed: {reason}")]
    Store { id: String, reason: String },
    #[error("no peer could provide blob {id}: {}", .errors.join("; "))]
    NoPeer { id: String, errors: Vec<String> },
}

/// Serves local blobs to members and fetches missing ones from peers.
#[derive(Debug, Clone)]
pub struct BlobService {
    index: FsStore,
    blobs: Arc<BlobStore>,
    protocol: BlobsProtocol,
    max_blob_size: u64,
}

impl BlobService {
    /// Opens the serving index in `index_dir` (created if needed; it holds only bao
    /// outboards and references, never needs a backup) for the cairn store `blobs`.
    /// Must be called inside a tokio runtime (it spawns the authorization task).
    pub async fn open(
        index_dir: &Path,
        blobs: Arc<BlobStore>,
        members: Members,
    ) -> Result<Self, BlobError> {
        let index = FsStore::load(index_dir)
            .await
            .map_err(|e| BlobError::Open {
                path: index_dir.display().to_string(),
                reason: e.to_string(),
            })?;
        let mask = EventMask {
            connected: ConnectMode::Intercept,
            get: RequestMode::Intercept,
            get_many: RequestMode::Disabled,
            push: RequestMode::Disabled,
            observe: ObserveMode::Intercept,
            throttle: ThrottleMode::None,
        };
        let (events, rx) = EventSender::channel(64, mask);
        tokio::spawn(authorize(rx, members, index.clone(), blobs.clone()));
        let protocol = BlobsProtocol::new(&index, Some(events));
        Ok(Self {
            index,
            blobs,
            protocol,
            max_blob_size: DEFAULT_MAX_BLOB_SIZE,
        })
    }

    /// The handler to register on the router under [`iroh_blobs::ALPN`]. Note that shutting
    /// the router down also shuts the serving index down.
    pub fn protocol(&self) -> BlobsProtocol {
        self.protocol.clone()
    }

    pub fn blob_store(&self) -> &Arc<BlobStore> {
        &self.blobs
    }

    pub fn max_blob_size(&self) -> u64 {
        self.max_blob_size
    }

    pub fn set_max_blob_size(&mut self, max: u64) {
        self.max_blob_size = max;
    }

    /// Fetches `id` from the peer at the other end of `conn` (ALPN [`iroh_blobs::ALPN`]),
    /// verifying it while streaming, and stores it in the local cairn store.
    pub async fn fetch(&self, conn: &Connection, id: ChunkId) -> Result<(), BlobError> {
        let peer = device_id_of(&conn.remote_id());
        let bytes = fetch_verified(conn, id, self.max_blob_size, peer).await?;
        let blobs = self.blobs.clone();
        // No fsync per blob: a fetched blob can always be fetched again, and whoever publishes a
        // snapshot that needs it syncs the store first (`BlobStore::sync`).
        let stored = tokio::task::spawn_blocking(move || blobs.put(&bytes, Durability::Batch))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|reason| BlobError::Store {
                id: id.to_hex(),
                reason,
            })?;
        if stored != id {
            // Unreachable unless iroh-blobs' verification is broken; never trust it silently.
            return Err(BlobError::Store {
                id: id.to_hex(),
                reason: format!("the verified bytes hash to {}", stored.to_hex()),
            });
        }
        Ok(())
    }

    /// Connects to `peer` and fetches `id` (a no-op if the blob is already local).
    pub async fn fetch_from(
        &self,
        endpoint: &Endpoint,
        peer: impl Into<EndpointAddr>,
        id: ChunkId,
    ) -> Result<(), BlobError> {
        if self.has_local(id).await {
            return Ok(());
        }
        let peer = peer.into();
        let conn = endpoint
            .connect(peer.clone(), iroh_blobs::ALPN)
            .await
            .map_err(|e| BlobError::Connect {
                peer: device_id_of(&peer.id).short(),
                reason: e.to_string(),
            })?;
        let result = self.fetch(&conn, id).await;
        conn.close(0u32.into(), b"done");
        result
    }

    /// Tries each peer in order until one provides a verified copy; returns that peer.
    pub async fn fetch_from_any(
        &self,
        endpoint: &Endpoint,
        peers: &[EndpointAddr],
        id: ChunkId,
    ) -> Result<DeviceId, BlobError> {
        let mut errors = Vec::new();
        for peer in peers {
            match self.fetch_from(endpoint, peer.clone(), id).await {
                Ok(()) => return Ok(device_id_of(&peer.id)),
                Err(e) => {
                    tracing::debug!("blob fetch failed, trying the next peer: {e}");
                    errors.push(e.to_string());
                }
            }
        }
        Err(BlobError::NoPeer {
            id: id.to_hex(),
            errors,
        })
    }

    async fn has_local(&self, id: ChunkId) -> bool {
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || blobs.has(&id).unwrap_or(false))
            .await
            .unwrap_or(false)
    }

    /// Shuts the serving index down (also done by `Router::shutdown`).
    pub async fn shutdown(&self) {
        let _ = self.index.shutdown().await;
    }
}

async fn fetch_verified(
    conn: &Connection,
    id: ChunkId,
    max: u64,
    peer: DeviceId,
) -> Result<Vec<u8>, BlobError> {
    let fail = |reason: String| BlobError::Fetch {
        id: id.to_hex(),
        peer: peer.short(),
        reason,
    };
    let hash = Hash::from_bytes(*id.as_bytes());
    let initial = fsm::start(conn.clone(), GetRequest::blob(hash), Default::default());
    let connected = initial.next().await.map_err(|e| fail(e.to_string()))?;
    let fsm::ConnectedNext::StartRoot(start) =
        connected.next().await.map_err(|e| fail(e.to_string()))?
    else {
        return Err(fail("unexpected response shape".into()));
    };
    let (mut content, size) = start.next().next().await.map_err(|e| fail(e.to_string()))?;
    // The size is not verified yet (the last chunk proves it), but it bounds the allocation.
    if size > max {
        return Err(BlobError::TooLarge {
            id: id.to_hex(),
            size,
            max,
        });
    }
    let mut buf = Vec::with_capacity(size as usize);
    let end = loop {
        match content.next().await {
            fsm::BlobContentNext::More((next, item)) => {
                if let BaoContentItem::Leaf(leaf) = item.map_err(|e| fail(e.to_string()))? {
                    if leaf.offset != buf.len() as u64 {
                        return Err(fail("leaves arrived out of order".into()));
                    }
                    buf.extend_from_slice(&leaf.data);
                }
                content = next;
            }
            fsm::BlobContentNext::Done(end) => break end,
        }
    };
    if buf.len() as u64 != size {
        return Err(fail(format!("got {} of {size} bytes", buf.len())));
    }
    let fsm::EndBlobNext::Closing(closing) = end.next() else {
        return Err(fail("unexpected extra data".into()));
    };
    closing.next().await.map_err(|e| fail(e.to_string()))?;
    Ok(buf)
}

/// Answers the provider's intercepted events: members only, and lazily imports requested
/// blobs from the cairn store into the serving index.
async fn authorize(
    mut rx: tokio::sync::mpsc::Receiver<ProviderMessage>,
    members: Members,
    index: FsStore,
    blobs: Arc<BlobStore>,
) {
    let mut conns: HashMap<u64, DeviceId> = HashMap::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            ProviderMessage::ClientConnected(msg) => {
                let device = msg
                    .endpoint_id
                    .map(|id| device_id_of(&id))
                    .filter(|d| members.contains(d));
                let res = match device {
                    Some(d) => {
                        conns.insert(msg.connection_id, d);
                        Ok(())
                    }
                    None => Err(AbortReason::Permission),
                };
                msg.tx.send(res).await.ok();
            }
            ProviderMessage::ConnectionClosed(msg) => {
                conns.remove(&msg.connection_id);
            }
            ProviderMessage::GetRequestReceived(msg) => {
                let allowed = conns
                    .get(&msg.connection_id)
                    .is_some_and(|d| members.contains(d));
                if !allowed {
                    msg.tx.send(Err(AbortReason::Permission)).await.ok();
                    continue;
                }
                let (index, blobs) = (index.clone(), blobs.clone());
                tokio::spawn(async move {
                    ensure_indexed(&index, &blobs, msg.request.hash).await;
                    msg.tx.send(Ok(())).await.ok();
                });
            }
            ProviderMessage::ObserveRequestReceived(msg) => {
                let allowed = conns
                    .get(&msg.connection_id)
                    .is_some_and(|d| members.contains(d));
                let res = if allowed {
                    Ok(())
                } else {
                    Err(AbortReason::Permission)
                };
                msg.tx.send(res).await.ok();
            }
            _ => {}
        }
    }
}

/// Makes sure the serving index can serve `hash` if the cairn store has it.
async fn ensure_indexed(index: &FsStore, blobs: &BlobStore, hash: Hash) {
    if index.blobs().has(hash).await.unwrap_or(false) {
        return;
    }
    let path = blobs.path_of(&ChunkId(*hash.as_bytes()));
    if !path.is_file() {
        return; // The provider answers "not found".
    }
    // The serving index runs on its own threads and refuses relative paths.
    let path = std::path::absolute(&path).unwrap_or(path);
    let options = AddPathOptions {
        path,
        format: BlobFormat::Raw,
        mode: ImportMode::TryReference,
    };
    match index.blobs().add_path_with_opts(options).temp_tag().await {
        Ok(tt) if tt.hash() == hash => {
            let name = format!("cairn/{hash}");
            if let Err(e) = index.tags().set(name, tt.hash_and_format()).await {
                tracing::warn!("cannot tag served blob {hash}: {e}");
            }
        }
        Ok(tt) => tracing::warn!(
            "local blob {hash} is corrupt on disk (hashes to {}); not serving it",
            tt.hash()
        ),
        Err(e) => tracing::warn!("cannot index local blob {hash} for serving: {e}"),
    }
}
