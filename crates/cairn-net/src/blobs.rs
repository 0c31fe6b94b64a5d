//! Blob replication over iroh-blobs (`iroh_blobs::ALPN`), bridged to cairn's [`BlobStore`].
//!
//! A [`ChunkId`] is the blake3 hash of the stored bytes, which is exactly an iroh-blobs
//! [`Hash`] of a raw blob, so no id mapping is needed.
//!
//! **Bridge.** Serving: iroh-blobs' provider needs its own store (it serves from data plus
//! a bao outboard). We keep an [`FsStore`] as a *serving index* beside the cairn store and
//! import blobs into it ahead of requests ([`BlobService::index_local`], which the daemon
//! calls for the chunks of what it publishes) or else on the first authorized request for a
//! hash, with
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
//! writes them to the cairn store under that hash (no second hash pass). A peer serving
//! wrong bytes fails verification and nothing is stored; [`BlobService::fetch_from_any`]
//! then tries the next peer. [`BlobService::fetch_many`] does the same for a batch of blobs
//! in one request.
//!
//! **Pruning.** The serving index runs iroh-blobs' garbage collection hourly, protecting every
//! blob the cairn store holds: entries of blobs `cairn prune` removed are dropped (see
//! [`protect_stored`]).
//!
//! Authorization: the endpoint allowlist already refuses non-members on this ALPN; in
//! addition every connection and every request is intercepted through iroh-blobs' event
//! hooks and re-checked against the current [`Members`] (so a member removed mid-connection
//! gets no more data). `Get`, `GetMany` (what [`BlobService::fetch_many`] sends: one request
//! and stream for a batch of blobs) and `Observe` requests are served; `Push` is refused.

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
use iroh_blobs::protocol::{
    ChunkRanges, ChunkRangesExt, ChunkRangesSeq, GetManyRequest, GetRequest,
};
use iroh_blobs::provider::events::{
    AbortReason, ConnectMode, EventMask, EventSender, ObserveMode, ProviderMessage, RequestMode,
    ThrottleMode,
};
use iroh_blobs::store::fs::FsStore;
use iroh_blobs::store::fs::options::Options;
use iroh_blobs::store::{GcConfig, ProtectCb, ProtectOutcome};
use iroh_blobs::{BlobFormat, BlobsProtocol, Hash};

use crate::endpoint::{Members, device_id_of};

/// Default cap on a single fetched blob; a peer announcing more is refused before anything is
/// read. What legitimate blobs weigh: a file chunk at most [`MAX_CHUNK_BLOB`] (256 KiB + 41
/// bytes), a tree node at most 1 MiB + 41 bytes (`cairn_tree::MAX_ENCODED_NODE`, sealed; writers
/// default to 128 KiB), a snapshot header ~33 KiB plus ~100 bytes per member recipient. The
/// one kind without a fixed bound is a file's chunk list (`Content::ChunkList`: 17 + 68 bytes
/// per chunk, sealed), which passes 64 MiB for files beyond ~60 GiB at the average chunk size
/// (~15 GiB if every chunk were minimal); until chunk lists become trees, such files cannot be
/// fetched with this default.
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 64 * 1024 * 1024;
/// The largest sealed file chunk, and what a fetch reserves before any byte arrived: the
/// announced size is the peer's claim until the last group verifies, so a larger blob's buffer
/// grows with bytes already verified against the requested hash instead.
pub const MAX_CHUNK_BLOB: usize = cairn_store::MAX_CHUNK_SIZE + cairn_store::CHUNK_OVERHEAD;
/// How often the serving index drops entries of blobs the cairn store no longer holds (after
/// `cairn prune`); see [`protect_stored`].
const INDEX_GC_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Blobs asked about in one [`BlobService::holds_all`] request.
const HOLD_BATCH: usize = 256;
/// Blobs [`BlobService::index_local`] imports into the serving index at once.
const INDEX_AT_ONCE: usize = 8;
/// Failed blobs in a row after which [`BlobService::fetch_many`] stops asking that peer.
const MAX_FAILURES_IN_A_ROW: usize = 4;

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
        Self::open_with_gc(index_dir, blobs, members, INDEX_GC_EVERY).await
    }

    /// [`open`](Self::open) with the serving index's cleanup every `gc_every` (tests).
    async fn open_with_gc(
        index_dir: &Path,
        blobs: Arc<BlobStore>,
        members: Members,
        gc_every: std::time::Duration,
    ) -> Result<Self, BlobError> {
        let mut options = Options::new(index_dir);
        options.gc = Some(GcConfig {
            interval: gc_every,
            add_protected: Some(protect_stored(blobs.clone())),
        });
        let index = FsStore::load_with_opts(index_dir.join("blobs.db"), options)
            .await
            .map_err(|e| BlobError::Open {
                path: index_dir.display().to_string(),
                reason: e.to_string(),
            })?;
        let mask = EventMask {
            connected: ConnectMode::Intercept,
            get: RequestMode::Intercept,
            get_many: RequestMode::Intercept,
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
        store_verified(self.blobs.clone(), id, bytes).await?;
        Ok(())
    }

    /// Fetches `ids` from the peer at the other end of `conn` and stores them, with one
    /// iroh-blobs `GetMany` request (one stream) for the whole list instead of one request
    /// per blob: per-request costs (a stream, an authorization round trip on the serving side)
    /// are paid once per batch. Every blob is verified while streaming, like [`Self::fetch`].
    /// A blob that fails (the peer lacks it or sends bytes that do not match) breaks the
    /// response stream, so the blobs from it on are asked for again in a new request, and it
    /// counts as failed once it fails as the first blob of a request; blobs before it are
    /// kept. Returns each id's outcome (its size when stored), in order.
    pub async fn fetch_many(
        &self,
        conn: &Connection,
        ids: &[ChunkId],
    ) -> Vec<(ChunkId, Result<u64, BlobError>)> {
        let peer = device_id_of(&conn.remote_id());
        let mut out: Vec<Option<Result<u64, BlobError>>> = ids.iter().map(|_| None).collect();
        // Writing to the cairn store (blocking I/O) overlaps with receiving the next blobs; at
        // worst the whole batch waits in memory, so callers bound the batch size.
        let mut stores = tokio::task::JoinSet::new();
        let mut next = 0;
        let mut failures_in_a_row = 0;
        while next < ids.len() {
            let rest = &ids[next..];
            let (done, failed) = self
                .get_many_once(conn, rest, peer, |i, id, bytes| {
                    spawn_store(&mut stores, self.blobs.clone(), next + i, id, bytes);
                })
                .await;
            if done > 0 {
                failures_in_a_row = 0;
            }
            let Some(e) = failed else {
                break;
            };
            if done > 0 {
                // The provider resets the whole stream when it cannot send some later blob,
                // which can also cut off this one: it is given up on only when it fails as
                // the first blob of a request.
                next += done;
                continue;
            }
            // The provider validates what it sends and resets the stream at a bad or missing
            // blob, which can cut off the blob before it too: only a request for this blob
            // alone tells whether it is the one that fails.
            let id = ids[next];
            match fetch_verified(conn, id, self.max_blob_size, peer).await {
                Ok(bytes) => {
                    spawn_store(&mut stores, self.blobs.clone(), next, id, bytes);
                    next += 1;
                    failures_in_a_row = 0;
                    continue;
                }
                Err(alone) => {
                    tracing::debug!("{e}; alone: {alone}");
                    out[next] = Some(Err(alone));
                }
            }
            next += 1;
            failures_in_a_row += 1;
            // A closed connection, or a peer that has none of what is left, would otherwise
            // cost one request per remaining blob.
            if conn.close_reason().is_some() || failures_in_a_row >= MAX_FAILURES_IN_A_ROW {
                for (i, slot) in out.iter_mut().enumerate().skip(next) {
                    *slot = Some(Err(fetch_error(
                        ids[i],
                        peer,
                        "not asked for: the connection closed or the peer failed several blobs in a row"
                            .into(),
                    )));
                }
                break;
            }
        }
        while let Some(r) = stores.join_next().await {
            if let Ok((i, r)) = r {
                out[i] = Some(r);
            }
        }
        ids.iter()
            .zip(out)
            .map(|(id, r)| {
                let r = r.unwrap_or_else(|| {
                    Err(BlobError::Store {
                        id: id.to_hex(),
                        reason: "the store task failed".into(),
                    })
                });
                (*id, r)
            })
            .collect()
    }

    /// One `GetMany` request for `ids`: hands each verified blob to `got` (with its index in
    /// `ids`) as it arrives; returns how many arrived before the first failure, and that
    /// failure.
    async fn get_many_once(
        &self,
        conn: &Connection,
        ids: &[ChunkId],
        peer: DeviceId,
        mut got: impl FnMut(usize, ChunkId, Vec<u8>),
    ) -> (usize, Option<BlobError>) {
        let hashes: Vec<Hash> = ids
            .iter()
            .map(|id| Hash::from_bytes(*id.as_bytes()))
            .collect();
        let ranges =
            ChunkRangesSeq::from_ranges(std::iter::repeat_n(ChunkRanges::all(), ids.len()));
        let request = GetManyRequest::new(hashes, ranges);
        let fail = |i: usize, reason: String| fetch_error(ids[i], peer, reason);
        let mut child = match fsm::start_get_many(conn.clone(), request, Default::default()).await {
            Ok(Ok(child)) => child,
            Ok(Err(_closing)) => return (0, None),
            Err(e) => return (0, Some(fail(0, e.to_string()))),
        };
        let mut done = 0;
        loop {
            let i = child.offset() as usize;
            if i >= ids.len() {
                return (done, None);
            }
            if i != done {
                // Offsets come from our own request's ranges: all children, in order.
                return (done, Some(fail(i, "unexpected response shape".into())));
            }
            let header = child.next(Hash::from_bytes(*ids[i].as_bytes()));
            let end = match read_blob(header, ids[i], self.max_blob_size, peer).await {
                Ok((end, bytes)) => {
                    got(i, ids[i], bytes);
                    end
                }
                Err(e) => return (done, Some(e)),
            };
            done += 1;
            match end.next() {
                fsm::EndBlobNext::MoreChildren(c) => child = c,
                fsm::EndBlobNext::Closing(closing) => {
                    // Everything asked for arrived; a bad ending changes nothing stored.
                    if let Err(e) = closing.next().await {
                        tracing::debug!("get-many response from {} ended badly: {e}", peer.short());
                    }
                    return (done, None);
                }
            }
        }
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

    /// Makes local blobs servable ahead of the first request for them, so the cost of
    /// indexing them (an outboard pass and database writes per blob) is not paid on a
    /// peer's request path. Blobs not in the local store are skipped.
    pub async fn index_local(&self, ids: &[ChunkId]) {
        let hashes = ids.iter().map(|id| Hash::from_bytes(*id.as_bytes()));
        ensure_all_indexed(&self.index, &self.blobs, hashes, INDEX_AT_ONCE).await;
    }

    /// Whether the peer at the other end of `conn` can serve every blob of `ids` right now.
    /// For each blob it must send the last 1 KiB group with its bao proof, verified against
    /// the blob's hash, which proves it holds the end of the blob and its exact size (a
    /// peer whose serving index still names a blob it removed fails: the data is read from
    /// its store). One `GetMany` request per [`HOLD_BATCH`] blobs; `Err` when some blob was
    /// not served (the one named is where the response broke off, at or just before it).
    pub async fn holds_all(&self, conn: &Connection, ids: &[ChunkId]) -> Result<(), BlobError> {
        let peer = device_id_of(&conn.remote_id());
        for batch in ids.chunks(HOLD_BATCH) {
            let fail = |i: usize, reason: String| fetch_error(batch[i], peer, reason);
            let hashes: Vec<Hash> = batch
                .iter()
                .map(|id| Hash::from_bytes(*id.as_bytes()))
                .collect();
            let ranges = ChunkRangesSeq::from_ranges(std::iter::repeat_n(
                ChunkRanges::last_chunk(),
                batch.len(),
            ));
            let request = GetManyRequest::new(hashes, ranges);
            let mut child =
                match fsm::start_get_many(conn.clone(), request, Default::default()).await {
                    Ok(Ok(child)) => child,
                    Ok(Err(_closing)) => return Err(fail(0, "the peer sent nothing".into())),
                    Err(e) => return Err(fail(0, e.to_string())),
                };
            let mut done = 0;
            loop {
                let i = child.offset() as usize;
                if i != done || i >= batch.len() {
                    // A provider that lacks a blob skips it or ends the stream there.
                    return Err(fail(done.min(batch.len() - 1), "not served".into()));
                }
                let header = child.next(Hash::from_bytes(*batch[i].as_bytes()));
                let (mut content, _size) =
                    header.next().await.map_err(|e| fail(i, e.to_string()))?;
                let end = loop {
                    match content.next().await {
                        fsm::BlobContentNext::More((next, item)) => {
                            item.map_err(|e| fail(i, e.to_string()))?;
                            content = next;
                        }
                        fsm::BlobContentNext::Done(end) => break end,
                    }
                };
                done += 1;
                match end.next() {
                    fsm::EndBlobNext::MoreChildren(c) => child = c,
                    fsm::EndBlobNext::Closing(closing) => {
                        if done < batch.len() {
                            return Err(fail(done, "not served".into()));
                        }
                        if let Err(e) = closing.next().await {
                            tracing::debug!(
                                "has-check response from {} ended badly: {e}",
                                peer.short()
                            );
                        }
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Shuts the serving index down (also done by `Router::shutdown`).
    pub async fn shutdown(&self) {
        let _ = self.index.shutdown().await;
    }
}

/// Writes bytes iroh-blobs verified against `id` (every 16 KiB group, and the size, checked
/// against the bao tree of `id` as they arrived) to the cairn store, without hashing them
/// a second time.
async fn store_verified(
    blobs: Arc<BlobStore>,
    id: ChunkId,
    bytes: Vec<u8>,
) -> Result<(), BlobError> {
    // No fsync per blob: a fetched blob can always be fetched again, and whoever publishes a
    // snapshot that needs it syncs the store first (`BlobStore::sync`).
    tokio::task::spawn_blocking(move || blobs.put_verified(id, &bytes, Durability::Batch))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()))
        .map_err(|reason| BlobError::Store {
            id: id.to_hex(),
            reason,
        })
}

/// Stores a verified blob in the background (blocking I/O overlaps with receiving the next
/// blobs); the task yields the blob's index in the request and its size once stored.
fn spawn_store(
    stores: &mut tokio::task::JoinSet<(usize, Result<u64, BlobError>)>,
    blobs: Arc<BlobStore>,
    i: usize,
    id: ChunkId,
    bytes: Vec<u8>,
) {
    let size = bytes.len() as u64;
    stores.spawn(async move { (i, store_verified(blobs, id, bytes).await.map(|()| size)) });
}

async fn fetch_verified(
    conn: &Connection,
    id: ChunkId,
    max: u64,
    peer: DeviceId,
) -> Result<Vec<u8>, BlobError> {
    let fail = |reason: String| fetch_error(id, peer, reason);
    let hash = Hash::from_bytes(*id.as_bytes());
    let initial = fsm::start(conn.clone(), GetRequest::blob(hash), Default::default());
    let connected = initial.next().await.map_err(|e| fail(e.to_string()))?;
    let fsm::ConnectedNext::StartRoot(start) =
        connected.next().await.map_err(|e| fail(e.to_string()))?
    else {
        return Err(fail("unexpected response shape".into()));
    };
    let (end, buf) = read_blob(start.next(), id, max, peer).await?;
    let fsm::EndBlobNext::Closing(closing) = end.next() else {
        return Err(fail("unexpected extra data".into()));
    };
    closing.next().await.map_err(|e| fail(e.to_string()))?;
    Ok(buf)
}

fn fetch_error(id: ChunkId, peer: DeviceId, reason: String) -> BlobError {
    BlobError::Fetch {
        id: id.to_hex(),
        peer: peer.short(),
        reason,
    }
}

/// Reads one blob of a response, verifying every 16 KiB group against `id` as it arrives.
async fn read_blob(
    header: fsm::AtBlobHeader,
    id: ChunkId,
    max: u64,
    peer: DeviceId,
) -> Result<(fsm::AtEndBlob, Vec<u8>), BlobError> {
    let fail = |reason: String| fetch_error(id, peer, reason);
    let (mut content, size) = header.next().await.map_err(|e| fail(e.to_string()))?;
    // The size is not verified yet (the last chunk proves it), but it bounds the allocation.
    if size > max {
        return Err(BlobError::TooLarge {
            id: id.to_hex(),
            size,
            max,
        });
    }
    let mut buf = Vec::with_capacity(initial_reserve(size));
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
    Ok((end, buf))
}

/// What [`read_blob`] reserves for a blob announced at `size` bytes: all of it for anything
/// up to a sealed file chunk (the bulk of all fetches, filled without reallocating), never
/// more than that on the peer's word alone.
fn initial_reserve(size: u64) -> usize {
    usize::try_from(size).map_or(MAX_CHUNK_BLOB, |s| s.min(MAX_CHUNK_BLOB))
}

/// Whether the connection belongs to a device that is a member now (membership can end
/// while a connection stays open).
fn still_member(conns: &HashMap<u64, DeviceId>, members: &Members, connection: u64) -> bool {
    conns.get(&connection).is_some_and(|d| members.contains(d))
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
                if !still_member(&conns, &members, msg.connection_id) {
                    msg.tx.send(Err(AbortReason::Permission)).await.ok();
                    continue;
                }
                let (index, blobs) = (index.clone(), blobs.clone());
                tokio::spawn(async move {
                    ensure_indexed(&index, &blobs, msg.request.hash).await;
                    msg.tx.send(Ok(())).await.ok();
                });
            }
            ProviderMessage::GetManyRequestReceived(msg) => {
                if !still_member(&conns, &members, msg.connection_id) {
                    msg.tx.send(Err(AbortReason::Permission)).await.ok();
                    continue;
                }
                let (index, blobs) = (index.clone(), blobs.clone());
                tokio::spawn(async move {
                    // A request is already bounded (the fetcher's batch size): all at once.
                    let hashes = msg.request.hashes.iter().copied();
                    ensure_all_indexed(&index, &blobs, hashes, usize::MAX).await;
                    msg.tx.send(Ok(())).await.ok();
                });
            }
            ProviderMessage::ObserveRequestReceived(msg) => {
                let res = if still_member(&conns, &members, msg.connection_id) {
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

/// [`ensure_indexed`] for many blobs, `at_once` at a time: each import mostly waits on the
/// serving index's actor and the disk, so they overlap well.
async fn ensure_all_indexed(
    index: &FsStore,
    blobs: &Arc<BlobStore>,
    hashes: impl IntoIterator<Item = Hash>,
    at_once: usize,
) {
    let mut set = tokio::task::JoinSet::new();
    for hash in hashes {
        while set.len() >= at_once {
            set.join_next().await;
        }
        let (index, blobs) = (index.clone(), blobs.clone());
        set.spawn(async move { ensure_indexed(&index, &blobs, hash).await });
    }
    while set.join_next().await.is_some() {}
}

/// The serving index's garbage collection keeps exactly what the cairn store holds: every
/// entry is only a reference to (or, for small blobs, a copy of) a cairn blob, so once a prune
/// removed the blob its entry goes too. A blob pruned and fetched again between the listing
/// and the index's sweep is merely re-imported on its next request. If the store cannot be
/// listed, the run is skipped.
fn protect_stored(blobs: Arc<BlobStore>) -> ProtectCb {
    Arc::new(move |live| {
        let blobs = blobs.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || blobs.list()).await {
                Ok(Ok(ids)) => {
                    live.extend(ids.into_iter().map(|id| Hash::from_bytes(id.0)));
                    ProtectOutcome::Continue
                }
                Ok(Err(e)) => {
                    tracing::warn!("serving index cleanup skipped: cannot list the store: {e}");
                    ProtectOutcome::Abort
                }
                Err(_) => ProtectOutcome::Abort,
            }
        })
    })
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
    // No named tag keeps the entry: the serving index runs no garbage collection
    // (`FsStore::load` leaves `Options::gc` unset), so untagged entries stay, and a tag
    // per blob cost a database write per first request.
    match index.blobs().add_path_with_opts(options).temp_tag().await {
        Ok(tt) if tt.hash() == hash => {}
        Ok(tt) => tracing::warn!(
            "local blob {hash} is corrupt on disk (hashes to {}); not serving it",
            tt.hash()
        ),
        Err(e) => tracing::warn!("cannot index local blob {hash} for serving: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a prune removed a blob from the cairn store, the serving index drops it too; blobs
    /// still stored stay servable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_serving_index_forgets_pruned_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path().join("store")).unwrap());
        // Large enough to be referenced, not inlined, and one small (copied into the index).
        let kept = store
            .put(&vec![7u8; 40_000], Durability::Immediate)
            .unwrap();
        let pruned = store
            .put(&vec![9u8; 40_000], Durability::Immediate)
            .unwrap();
        let small = store
            .put(b"a small pruned node", Durability::Immediate)
            .unwrap();
        let service = BlobService::open_with_gc(
            &dir.path().join("index"),
            store.clone(),
            Members::new([]),
            std::time::Duration::from_millis(100),
        )
        .await
        .unwrap();
        service.index_local(&[kept, pruned, small]).await;
        let has = |id: ChunkId| {
            let index = service.index.clone();
            async move { index.blobs().has(Hash::from_bytes(id.0)).await.unwrap() }
        };
        assert!(has(kept).await && has(pruned).await && has(small).await);
        store.remove(&pruned).unwrap();
        store.remove(&small).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while has(pruned).await || has(small).await {
            assert!(
                std::time::Instant::now() < deadline,
                "the serving index still lists pruned blobs"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(has(kept).await);
        service.shutdown().await;
    }

    #[test]
    fn a_fetch_reserves_at_most_one_sealed_chunk() {
        assert_eq!(MAX_CHUNK_BLOB, 256 * 1024 + 41);
        assert_eq!(initial_reserve(0), 0);
        assert_eq!(initial_reserve(1000), 1000);
        assert_eq!(initial_reserve(MAX_CHUNK_BLOB as u64), MAX_CHUNK_BLOB);
        assert_eq!(initial_reserve(MAX_CHUNK_BLOB as u64 + 1), MAX_CHUNK_BLOB);
        assert_eq!(initial_reserve(DEFAULT_MAX_BLOB_SIZE), MAX_CHUNK_BLOB);
        assert_eq!(initial_reserve(u64::MAX), MAX_CHUNK_BLOB);
    }

    /// The largest legitimate blobs fit under the default cap: a sealed file chunk, a sealed
    /// tree node at the format limit, and the chunk list of a 32 GiB file cut at the average
    /// chunk size.
    #[test]
    fn legitimate_blobs_fit_the_default_cap() {
        let node = 1024 * 1024 + cairn_store::META_OVERHEAD as u64;
        let list_of_32_gib = 17
            + 68 * ((32u64 << 30) / cairn_store::AVG_CHUNK_SIZE as u64)
            + cairn_store::CHUNK_OVERHEAD as u64;
        for size in [MAX_CHUNK_BLOB as u64, node, list_of_32_gib] {
            assert!(size <= DEFAULT_MAX_BLOB_SIZE, "{size}");
        }
    }
}
