//! Blob replication over iroh-blobs (`iroh_blobs::ALPN`), bridged to cairn's [`BlobStore`].
//!
//! A [`ChunkId`] is the blake3 hash of the stored bytes, which is exactly an iroh-blobs
//! [`Hash`] of a raw blob, so no id mapping is needed.
//!
//! **Serving.** iroh-blobs' provider reads through its store protocol (`api::proto::Command`),
//! not files. [`PackServer`] answers that protocol straight from the cairn store (pack files):
//! for `ExportBao` it reads the blob (verified against its id), builds its bao outboard in
//! memory (one blake3 pass; blobs are small) and streams the requested ranges, each 16 KiB
//! group validated again before it is sent. `Observe` and `BlobStatus` report presence; every
//! other command is dropped, so its caller gets an error instead of a hang. Nothing is copied
//! into a second store and there is nothing to index or garbage-collect: a blob `cairn prune`
//! removed is simply no longer served. This relies on iroh-blobs' store protocol, which is
//! public but hidden from its docs; the version is pinned and `tests/serve.rs` covers it.
//!
//! **Fetching** bypasses the store protocol: [`BlobService::fetch`] runs the iroh-blobs get
//! state machine, which verifies every 16 KiB group against the requested hash as it
//! arrives, collects the verified bytes (capped at [`BlobService::max_blob_size`]) and
//! appends them to the cairn store under that hash (no second hash pass). A peer serving
//! wrong bytes fails verification and nothing is stored; [`BlobService::fetch_from_any`]
//! then tries the next peer. [`BlobService::fetch_many`] does the same for a batch of blobs
//! in one request.
//!
//! Authorization: the endpoint allowlist already refuses non-members on this ALPN; in
//! addition every connection and every request is intercepted through iroh-blobs' event
//! hooks and re-checked against the current [`Members`] (so a member removed mid-connection
//! gets no more data). `Get`, `GetMany` (what [`BlobService::fetch_many`] sends: one request
//! and stream for a batch of blobs) and `Observe` requests are served; `Push` is refused.

use std::collections::HashMap;
use std::sync::Arc;

use bao_tree::io::BaoContentItem;
use bao_tree::io::mixed::{EncodedItem, traverse_ranges_validated};
use bao_tree::io::outboard::PreOrderMemOutboard;
use cairn_crypto::DeviceId;
use cairn_store::{BlobStore, ChunkId, Durability};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr};
use iroh_blobs::api::blobs::Bitfield;
use iroh_blobs::api::proto::{
    BlobStatus, Command, ExportBaoMsg, ExportBaoRequest, ObserveMsg, ObserveRequest,
};
use iroh_blobs::get::fsm;
use iroh_blobs::protocol::{
    ChunkRanges, ChunkRangesExt, ChunkRangesSeq, GetManyRequest, GetRequest,
};
use iroh_blobs::provider::events::{
    AbortReason, ConnectMode, EventMask, EventSender, ObserveMode, ProviderMessage, RequestMode,
    ThrottleMode,
};
use iroh_blobs::store::IROH_BLOCK_SIZE;
use iroh_blobs::store::mem::MemStore;
use iroh_blobs::{BlobsProtocol, Hash};

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
/// Blobs asked about in one [`BlobService::holds_all`] request.
const HOLD_BATCH: usize = 256;
/// Store-protocol commands waiting for [`PackServer`]; the provider sends one per request.
const SERVER_QUEUE: usize = 64;
/// Failed blobs in a row after which [`BlobService::fetch_many`] stops asking that peer.
const MAX_FAILURES_IN_A_ROW: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
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
    /// The store protocol client [`PackServer`] answers; the provider reads through it.
    server: iroh_blobs::api::Store,
    blobs: Arc<BlobStore>,
    protocol: BlobsProtocol,
    max_blob_size: u64,
}

impl BlobService {
    /// Serves the cairn store `blobs` to `members`. Must be called inside a tokio runtime (it
    /// spawns the authorization task and the store server).
    pub fn open(blobs: Arc<BlobStore>, members: Members) -> Self {
        let server = PackServer::spawn(blobs.clone());
        let mask = EventMask {
            connected: ConnectMode::Intercept,
            get: RequestMode::Intercept,
            get_many: RequestMode::Intercept,
            push: RequestMode::Disabled,
            observe: ObserveMode::Intercept,
            throttle: ThrottleMode::None,
        };
        let (events, rx) = EventSender::channel(64, mask);
        tokio::spawn(authorize(rx, members));
        let protocol = BlobsProtocol::new(&server, Some(events));
        Self {
            server,
            blobs,
            protocol,
            max_blob_size: DEFAULT_MAX_BLOB_SIZE,
        }
    }

    /// The handler to register on the router under [`iroh_blobs::ALPN`]. Note that shutting
    /// the router down also stops the store server.
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

    /// Whether the peer at the other end of `conn` can serve every blob of `ids` right now.
    /// For each blob it must send the last 1 KiB group with its bao proof, verified against
    /// the blob's hash, which proves it holds the end of the blob and its exact size (blobs
    /// are served straight from the peer's packs, so one it removed is not served). One `GetMany` request per [`HOLD_BATCH`] blobs; `Err` when some blob was
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

    /// Stops the store server (also done by `Router::shutdown`).
    pub async fn shutdown(&self) {
        let _ = self.server.shutdown().await;
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

/// Answers the provider's intercepted events: members only.
async fn authorize(mut rx: tokio::sync::mpsc::Receiver<ProviderMessage>, members: Members) {
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
                let res = if still_member(&conns, &members, msg.connection_id) {
                    Ok(())
                } else {
                    Err(AbortReason::Permission)
                };
                msg.tx.send(res).await.ok();
            }
            ProviderMessage::GetManyRequestReceived(msg) => {
                let res = if still_member(&conns, &members, msg.connection_id) {
                    Ok(())
                } else {
                    Err(AbortReason::Permission)
                };
                msg.tx.send(res).await.ok();
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

/// Answers iroh-blobs' store protocol from the cairn store, for the provider (see the module
/// docs). Read-only: peers cannot push, and fetching writes to the cairn store directly.
struct PackServer;

impl PackServer {
    fn spawn(blobs: Arc<BlobStore>) -> iroh_blobs::api::Store {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Command>(SERVER_QUEUE);
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::ExportBao(ExportBaoMsg {
                        inner: ExportBaoRequest { hash, ranges, .. },
                        tx,
                        ..
                    }) => {
                        tokio::spawn(export_bao(blobs.clone(), hash, ranges, tx));
                    }
                    Command::Observe(ObserveMsg {
                        inner: ObserveRequest { hash },
                        tx,
                        ..
                    }) => {
                        let size = local_size(&blobs, hash).await;
                        let bitfield = size.map_or_else(Bitfield::empty, Bitfield::complete);
                        tx.send(bitfield).await.ok();
                    }
                    Command::BlobStatus(msg) => {
                        let status = match local_size(&blobs, msg.inner.hash).await {
                            Some(size) => BlobStatus::Complete { size },
                            None => BlobStatus::NotFound,
                        };
                        msg.tx.send(status).await.ok();
                    }
                    Command::Shutdown(msg) => {
                        msg.tx.send(()).await.ok();
                        break;
                    }
                    // Dropping the message drops its reply channel: the caller gets an error.
                    other => drop(other),
                }
            }
        });
        MemStore::from_sender(tx.into()).into()
    }
}

async fn local_size(blobs: &Arc<BlobStore>, hash: Hash) -> Option<u64> {
    let blobs = blobs.clone();
    let id = ChunkId(*hash.as_bytes());
    tokio::task::spawn_blocking(move || blobs.len_of(&id).ok().flatten())
        .await
        .ok()
        .flatten()
}

/// Streams `ranges` of blob `hash` in bao format. A blob that is missing or corrupt ends the
/// stream with an error (the provider then resets the request): never unverified bytes.
async fn export_bao(
    blobs: Arc<BlobStore>,
    hash: Hash,
    ranges: ChunkRanges,
    tx: irpc::channel::mpsc::Sender<EncodedItem>,
) {
    let id = ChunkId(*hash.as_bytes());
    let read = tokio::task::spawn_blocking(move || {
        // `get` checks the bytes against the id; the outboard is then built from them.
        let bytes = blobs.get(&id)?;
        let outboard = PreOrderMemOutboard::create(&bytes, IROH_BLOCK_SIZE);
        Ok::<_, cairn_store::StoreError>((bytes, outboard))
    })
    .await;
    let (bytes, outboard) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            tracing::debug!(blob = %id, "not serving: {e}");
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string());
            tx.send(EncodedItem::Error(bao_tree::io::EncodeError::Io(e)))
                .await
                .ok();
            return;
        }
        Err(e) => {
            let e = std::io::Error::other(e.to_string());
            tx.send(EncodedItem::Error(bao_tree::io::EncodeError::Io(e)))
                .await
                .ok();
            return;
        }
    };
    let mut sender = IrpcSender(tx);
    let data = bytes::Bytes::from(bytes);
    if let Err(e) = traverse_ranges_validated(data, outboard, &ranges, &mut sender).await {
        tracing::debug!(blob = %id, "serving ended early: {e}");
    }
}

/// iroh-blobs' own adapter from the irpc channel to bao-tree's `Sender` is private.
struct IrpcSender(irpc::channel::mpsc::Sender<EncodedItem>);

impl bao_tree::io::mixed::Sender for IrpcSender {
    type Error = irpc::channel::SendError;

    async fn send(&mut self, item: EncodedItem) -> Result<(), Self::Error> {
        self.0.send(item).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
