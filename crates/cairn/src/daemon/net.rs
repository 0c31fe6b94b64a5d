//! The daemon's network side: one iroh endpoint per running vault, a persistent session with
//! every other member, and the two workers that turn what arrives into local state.
//!
//! - **Peer sessions** (one task per member): dial with reconnect and jittered exponential
//!   backoff; on each connection exchange rosters, subscribe to the peer's registry, then
//!   fetch everything it holds (subscribing first, so nothing published in between is
//!   missed). Every entry goes through the local registry's checks; accepted ones are
//!   relayed to our own subscribers and wake the sync worker. New local snapshots reach
//!   peers through their subscriptions to us, the moment they are published: no polling.
//! - **Sync worker** (a thread: it blocks on the engine lock and on fetches): for each
//!   member whose head it has not merged yet, loads the snapshot (header, parents and tree
//!   nodes come from peers on demand), merges it into the engine, publishes, and shows the
//!   result in the mount with the kernel caches of changed paths dropped.
//! - **Replicator** (a thread): walks what changed since it last caught up and fetches every
//!   chunk that is not local, several at a time, so the vault is complete offline.
//!
//! Reads of content that is not local yet fetch it on demand (see `stores::Remote`), with
//! read-ahead. Every queue is bounded: wake-ups coalesce into one-slot channels, fetches run
//! with a fixed concurrency, subscriptions lag (and refetch) rather than buffer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_crypto::{DeviceId, VaultId};
use cairn_net::{
    BlobService, Endpoint, EndpointAddr, MemberInfo, Members, NetConfig, PAIR_ALPN, Pairing,
    PairingEvent, PairingProtocol, REGISTRY_ALPN, RegistryClient, RegistryProtocol, Router,
    SubscriptionEvent, bind_endpoint, endpoint_id_of,
};
use cairn_registry::{MemberRecord, RegistryEntry};
use cairn_store::ChunkId;
use cairn_tree::DiffEntry;
use cairn_vault::{Content, EntryKind, SnapshotId, VaultStores, load_snapshot, manifest_of};
use iroh::endpoint::Connection;
use tokio::sync::Notify;

use super::device::{Device, now_ms, recipients};
use super::hub::Hub;
use super::stores::Remote;
use crate::state::VaultState;

/// How long one blob may take to arrive before the fetch gives up on that peer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Dial timeout per attempt.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Chunks asked for in one request (one stream): ~64–80 KiB chunks make ~5 MiB batches,
/// enough to amortize a request's round trips, small enough to hold in memory.
const FETCH_BATCH: usize = 64;
/// Batches fetched concurrently by the replicator (and by one read-ahead burst), each on its
/// own blob connection when there are enough (at most 8 × 64 chunks ≤ 128 MiB in flight).
const FETCH_BATCHES_AT_ONCE: usize = 8;
/// Blob connections kept per peer at most (see [`Inner::blob_conn`]). One QUIC connection
/// is driven by a single task on each side (its packets are framed, sealed and acknowledged
/// one after another), which capped a transfer of many small chunks at about half of what one
/// large blob moves; with a connection per concurrent batch the work spreads over the
/// runtime's threads (1 GiB of ~80 KiB chunks on loopback, `scripts/bench/sync.sh xfer`,
/// medians: ~200 → ~380–410 MiB/s).
const BLOB_CONNECTIONS: usize = 8;
/// A spare blob connection (all but the most recently used) idle this long is closed.
const BLOB_IDLE: Duration = Duration::from_secs(60);
/// How often the workers look again at what failed before (unreachable peers, missing
/// blobs), even without a wake-up.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// Network settings for one daemon.
#[derive(Debug, Clone, Copy)]
pub struct NetSettings {
    pub bind: SocketAddr,
    pub relays: bool,
}

/// Connection state of one member, for `cairn peers` and `cairn status`.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub device: DeviceId,
    pub connected: bool,
    pub last_contact_ms: Option<u64>,
    pub addrs: Vec<String>,
}

#[derive(Default)]
struct Peer {
    connected: bool,
    last_contact_ms: Option<u64>,
    /// Blob connections (see [`Inner::blob_conn`]); a closed one is redialed when needed.
    blob_conns: [Option<Connection>; BLOB_CONNECTIONS],
    /// Fetches using (or dialing) each of `blob_conns`.
    blob_busy: [usize; BLOB_CONNECTIONS],
    /// When each slot's last fetch ended (None while busy or never used).
    blob_idle_since: [Option<Instant>; BLOB_CONNECTIONS],
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Peer {
    /// Which of `blob_conns` hold a connection that is still open.
    fn blob_conns_open(&self) -> Vec<bool> {
        self.blob_conns
            .iter()
            .map(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
            .collect()
    }
}

/// Which blob connection slot a fetch takes, given which slots hold an open connection and
/// how many fetches use (or dial) each: an idle open connection; else an idle slot to dial;
/// else the least busy open connection (or slot being dialed).
fn choose_blob_slot(open: &[bool], busy: &[usize]) -> usize {
    let least_busy = |want_open: bool| {
        (0..open.len())
            .filter(|&i| open[i] == want_open)
            .min_by_key(|&i| busy[i])
    };
    match (least_busy(true), least_busy(false)) {
        (Some(i), _) if busy[i] == 0 => i,
        (_, Some(i)) if busy[i] == 0 => i,
        (open, closed) => open.or(closed).unwrap_or(0),
    }
}

/// The slots whose open blob connection has had no fetch for `after`, except one: the most
/// recently used open connection stays for the next on-demand read.
fn idle_spare_slots(
    open: &[bool],
    busy: &[usize],
    idle_since: &[Option<Instant>],
    now: Instant,
    after: Duration,
) -> Vec<usize> {
    let open_slots: Vec<usize> = (0..open.len()).filter(|&i| open[i]).collect();
    let keep = open_slots
        .iter()
        .copied()
        .max_by_key(|&i| (busy[i] > 0, idle_since[i]));
    open_slots
        .into_iter()
        .filter(|&i| Some(i) != keep && busy[i] == 0)
        .filter(|&i| idle_since[i].is_some_and(|t| now.saturating_duration_since(t) >= after))
        .collect()
}

/// A blob connection lent to one fetch (see [`Inner::blob_conn`]).
struct BlobConn<'a> {
    conn: Connection,
    _lease: BlobLease<'a>,
}

impl std::ops::Deref for BlobConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// Counts a fetch on one of a peer's blob connection slots while it lives.
struct BlobLease<'a> {
    inner: &'a Inner,
    device: DeviceId,
    slot: usize,
}

impl Drop for BlobLease<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.inner.peers().get_mut(&self.device) {
            p.blob_busy[self.slot] = p.blob_busy[self.slot].saturating_sub(1);
            if p.blob_busy[self.slot] == 0 {
                p.blob_idle_since[self.slot] = Some(Instant::now());
            }
        }
    }
}

pub(super) struct Inner {
    pub hub: Arc<Hub>,
    pub vault: VaultId,
    pub me: DeviceId,
    pub endpoint: Endpoint,
    pub registry: RegistryProtocol,
    pub pairing: Pairing,
    members: Members,
    blobs: BlobService,
    peers: Mutex<HashMap<DeviceId, Peer>>,
    handle: tokio::runtime::Handle,
    sync_wake: SyncSender<()>,
    replicate_wake: SyncSender<()>,
    /// Woken when the roster changed: sessions re-exchange it, idle dialers retry.
    roster_changed: Notify,
    stop: AtomicBool,
    stop_notify: Notify,
    in_flight: Mutex<HashSet<ChunkId>>,
    /// Read-ahead bursts running at once; more are skipped rather than queued.
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    pub downloads_active: AtomicU64,
    pub downloaded_bytes: AtomicU64,
}

/// The running network side of one vault. Dropping it (or [`Net::shutdown`]) stops
/// everything and closes the endpoint.
pub struct Net {
    rt: Option<tokio::runtime::Runtime>,
    pub(super) inner: Arc<Inner>,
    router: Option<Router>,
    workers: Vec<JoinHandle<()>>,
}

fn port_file(dir: &Path) -> PathBuf {
    dir.join("net.port")
}

impl Net {
    /// Binds the endpoint and starts sessions with every member. `hub` is how merged
    /// snapshots reach the engine and the mount.
    pub fn start(state: &VaultState, hub: Arc<Hub>, settings: NetSettings) -> Result<Self> {
        let device = hub.device.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-net")
            .enable_all()
            .build()
            .context("starting the network runtime")?;
        let vault = device.vault_id;
        let me = device.device_id;
        let members = Members::new(device.registry.members(&vault)?);
        let pairing = Pairing::new(state.secret.clone(), roster_info(&device)?, members.clone());
        let endpoint = rt.block_on(bind_persistent(state, settings, &members, &pairing))?;
        let registry = RegistryProtocol::new(device.registry.clone());
        registry.set_local(me, endpoint.addr().ip_addrs().copied().collect());
        let blobs = rt
            .block_on(BlobService::open(
                &state.dir.join("serve-index"),
                device.blobs.clone(),
                members.clone(),
            ))
            .context("opening the blob serving index")?;
        let router = {
            let _g = rt.enter();
            Router::builder(endpoint.clone())
                .accept(REGISTRY_ALPN, registry.clone())
                .accept(iroh_blobs::ALPN, blobs.protocol())
                .accept(PAIR_ALPN, PairingProtocol::new(pairing.clone(), &endpoint))
                .spawn()
        };
        let (sync_wake, sync_rx) = sync_channel(1);
        let (replicate_wake, replicate_rx) = sync_channel(1);
        let inner = Arc::new(Inner {
            hub: hub.clone(),
            vault,
            me,
            endpoint,
            registry,
            pairing,
            members,
            blobs,
            peers: Mutex::new(HashMap::new()),
            handle: rt.handle().clone(),
            sync_wake,
            replicate_wake,
            roster_changed: Notify::new(),
            stop: AtomicBool::new(false),
            stop_notify: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(4)),
            downloads_active: AtomicU64::new(0),
            downloaded_bytes: AtomicU64::new(0),
        });
        {
            let announcer = inner.registry.clone();
            // A published snapshot may reference new local chunks: the replicator's walk
            // makes them servable before peers ask (see `replicator`).
            let replicate_wake = inner.replicate_wake.clone();
            hub.set_announcer(Some(Arc::new(move |e: RegistryEntry| {
                announcer.announce(e);
                let _ = replicate_wake.try_send(());
            })));
        }
        device
            .remote_blobs
            .set_remote(Some(Arc::new(NetRemote(inner.clone())) as Arc<dyn Remote>));

        rt.spawn(pairing_events(inner.clone()));
        rt.spawn(roster_events(inner.clone()));
        inner.refresh_members();
        let mut workers = Vec::new();
        {
            let inner = inner.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("cairn-sync".into())
                    .spawn(move || sync_worker(inner, sync_rx))
                    .context("starting the sync worker")?,
            );
        }
        {
            let inner = inner.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("cairn-replicate".into())
                    .spawn(move || replicator(inner, replicate_rx))
                    .context("starting the replicator")?,
            );
        }
        inner.wake_sync();
        inner.wake_replicator();
        tracing::info!(device = %me.short(), addrs = ?inner.endpoint.addr().ip_addrs().collect::<Vec<_>>(), "network up");
        Ok(Self {
            rt: Some(rt),
            inner,
            router: Some(router),
            workers,
        })
    }

    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The addresses this device can be reached at.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.inner.endpoint.addr().ip_addrs().copied().collect()
    }

    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(rt) = self.rt.take() else {
            return;
        };
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.stop_notify.notify_waiters();
        self.inner.hub.set_announcer(None);
        self.inner.hub.device.remote_blobs.set_remote(None);
        let _ = self.inner.sync_wake.try_send(());
        let _ = self.inner.replicate_wake.try_send(());
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("a network worker panicked");
            }
        }
        if let Some(router) = self.router.take() {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(5), router.shutdown()).await;
            });
        }
        rt.shutdown_timeout(Duration::from_secs(2));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds at the configured address; with port 0, reuses the port of the last run when it is
/// free, so peers that remember our address find us again after a restart.
async fn bind_persistent(
    state: &VaultState,
    settings: NetSettings,
    members: &Members,
    pairing: &Pairing,
) -> Result<Endpoint> {
    let mut bind = settings.bind;
    let remembered = std::fs::read_to_string(port_file(&state.dir))
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok());
    let mut tries = Vec::new();
    if bind.port() == 0
        && let Some(p) = remembered
    {
        let mut b = bind;
        b.set_port(p);
        tries.push(b);
    }
    tries.push(bind);
    let mut last_err = None;
    for b in tries {
        let config = NetConfig {
            bind: b,
            relays: settings.relays,
        };
        match bind_endpoint(
            &state.device,
            config,
            members.clone(),
            Some(pairing.clone()),
        )
        .await
        {
            Ok(ep) => {
                bind = b;
                if let Some(port) = ep.bound_sockets().first().map(|s| s.port()) {
                    let _ = std::fs::write(port_file(&state.dir), format!("{port}\n"));
                }
                tracing::debug!(%bind, "endpoint bound");
                return Ok(ep);
            }
            Err(e) => {
                tracing::debug!(bind = %b, error = %e, "bind failed");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.expect("at least one bind attempt")).context("starting the network endpoint")
}

fn roster_info(device: &Device) -> Result<Vec<MemberInfo>> {
    Ok(device
        .registry
        .roster(&device.vault_id)?
        .into_iter()
        .filter(|r| !r.removed)
        .map(|r| MemberInfo {
            device: r.device,
            age_recipient: r.recipient,
        })
        .collect())
}

impl Inner {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn wake_sync(&self) {
        match self.sync_wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {}
        }
    }

    fn wake_replicator(&self) {
        let _ = self.replicate_wake.try_send(());
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings everything that depends on the member list in line with the registry: the
    /// allowlist, the roster handed to joiners, the recipients of our next snapshots, and one
    /// session per member.
    pub fn refresh_members(self: &Arc<Self>) {
        let device = &self.hub.device;
        let members = match device.registry.members(&self.vault) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the member list");
                return;
            }
        };
        self.members.replace(members.iter().copied());
        if let Ok(info) = roster_info(device) {
            self.pairing.set_roster(info);
        }
        let own = device.vault().keys().identity.recipient();
        match recipients(&device.registry, &self.vault, own) {
            Ok(r) => {
                let mut vault = device.vault();
                if vault.keys().recipients != r {
                    vault.set_recipients(r);
                    // Our current head was sealed to the old member list: a new member could
                    // not open it (and so not merge anything of ours until our next edit), a
                    // removed one still could. Re-seal the same state to the new list now.
                    if vault.head().is_some() {
                        match self.hub.publish(&mut vault, now_ms()) {
                            Ok(r) => tracing::info!(
                                revision = r.revision.0,
                                "re-sealed the current snapshot to the new member list"
                            ),
                            Err(e) => {
                                tracing::warn!(error = %format!("{e:#}"), "cannot re-seal the current snapshot; the next flush will")
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read member recipients"),
        }
        let wanted: HashSet<DeviceId> = members.into_iter().filter(|d| *d != self.me).collect();
        let mut peers = self.peers();
        peers.retain(|d, p| {
            if wanted.contains(d) {
                return true;
            }
            if let Some(t) = p.task.take() {
                t.abort();
            }
            for c in p.blob_conns.iter_mut().filter_map(Option::take) {
                c.close(403u32.into(), b"removed from the vault");
            }
            tracing::info!(device = %d.short(), "no longer a member: session closed");
            false
        });
        for d in wanted {
            let p = peers.entry(d).or_default();
            if p.task.as_ref().is_none_or(|t| t.is_finished()) {
                let inner = self.clone();
                p.task = Some(self.handle.spawn(peer_loop(inner, d)));
            }
        }
        drop(peers);
        self.roster_changed.notify_waiters();
    }

    /// Chunk fetches in flight, and bytes fetched since the daemon started.
    pub fn downloads(&self) -> (u64, u64) {
        (
            self.downloads_active.load(Ordering::Relaxed),
            self.downloaded_bytes.load(Ordering::Relaxed),
        )
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let addrs: HashMap<DeviceId, Vec<String>> = self
            .hub
            .device
            .registry
            .addrs(&self.vault)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut out: Vec<PeerStatus> = self
            .peers()
            .iter()
            .map(|(d, p)| PeerStatus {
                device: *d,
                connected: p.connected,
                last_contact_ms: p.last_contact_ms,
                addrs: addrs.get(d).cloned().unwrap_or_default(),
            })
            .collect();
        out.sort_by_key(|p| p.device);
        out
    }

    fn set_connected(&self, d: DeviceId, connected: bool) {
        if let Some(p) = self.peers().get_mut(&d) {
            p.connected = connected;
            if connected {
                p.last_contact_ms = Some(now_ms());
            }
        }
    }

    fn touch(&self, d: DeviceId) {
        if let Some(p) = self.peers().get_mut(&d) {
            p.last_contact_ms = Some(now_ms());
        }
    }

    fn addr_of(&self, d: DeviceId) -> Option<EndpointAddr> {
        let id = endpoint_id_of(&d).ok()?;
        let list = self
            .hub
            .device
            .registry
            .addrs(&self.vault)
            .ok()?
            .into_iter()
            .find(|(x, _)| *x == d)?
            .1;
        let addrs: Vec<SocketAddr> = list.iter().filter_map(|a| a.parse().ok()).collect();
        if addrs.is_empty() {
            return None;
        }
        Some(
            addrs
                .into_iter()
                .fold(EndpointAddr::new(id), |a, s| a.with_ip_addr(s)),
        )
    }

    /// Stores an entry a peer sent us; wakes the sync worker if it is a new head of another
    /// device.
    async fn ingest(&self, entry: RegistryEntry) {
        let device = entry.device;
        match self.registry.submit(entry).await {
            Ok(cairn_net::PushResult::Accepted { .. }) if device != self.me => self.wake_sync(),
            Ok(cairn_net::PushResult::Rejected(why)) => {
                tracing::debug!(device = %device.short(), %why, "peer entry refused")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot store a peer's registry entry"),
        }
    }

    /// Members to ask for a blob: connected ones first, most recently heard from first.
    fn blob_sources(&self) -> Vec<DeviceId> {
        let peers = self.peers();
        let mut v: Vec<(bool, u64, DeviceId)> = peers
            .iter()
            .filter(|(d, _)| self.members.contains(d))
            .map(|(d, p)| (p.connected, p.last_contact_ms.unwrap_or(0), *d))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse((p.0, p.1)));
        v.into_iter().map(|(_, _, d)| d).collect()
    }

    /// A blob connection to `d` for one fetch: the least busy open one if it is idle, else a
    /// new one while the peer has fewer than [`BLOB_CONNECTIONS`], else the least busy. So
    /// single reads share one connection (no handshake per read) and concurrent batches get
    /// one each.
    async fn blob_conn(&self, d: DeviceId) -> Option<BlobConn<'_>> {
        let (slot, open) = {
            let mut peers = self.peers();
            let p = peers.get_mut(&d)?;
            let open = p.blob_conns_open();
            let slot = choose_blob_slot(&open, &p.blob_busy);
            p.blob_busy[slot] += 1;
            p.blob_idle_since[slot] = None;
            (slot, p.blob_conns[slot].clone().filter(|_| open[slot]))
        };
        let lease = BlobLease {
            inner: self,
            device: d,
            slot,
        };
        let conn = match open {
            Some(c) => c,
            None => {
                let addr = self.addr_of(d)?;
                let conn = tokio::time::timeout(
                    DIAL_TIMEOUT,
                    self.endpoint.connect(addr, iroh_blobs::ALPN),
                )
                .await
                .ok()?
                .ok()?;
                if let Some(p) = self.peers().get_mut(&d) {
                    p.blob_conns[slot] = Some(conn.clone());
                }
                conn
            }
        };
        Some(BlobConn {
            conn,
            _lease: lease,
        })
    }

    /// Fetches one blob from the first peer that has a verified copy. A peer that sends bytes
    /// not matching the id is skipped (iroh-blobs verifies every 16 KiB group).
    async fn fetch_one(&self, id: ChunkId) -> Result<(), String> {
        if self.not_local(vec![id]).await.is_empty() {
            return Ok(());
        }
        let mut errors = Vec::new();
        for d in self.blob_sources() {
            let Some(conn) = self.blob_conn(d).await else {
                errors.push(format!("{}: unreachable", d.short()));
                continue;
            };
            self.downloads_active.fetch_add(1, Ordering::Relaxed);
            let r = tokio::time::timeout(FETCH_TIMEOUT, self.blobs.fetch(&conn, id)).await;
            self.downloads_active.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(Ok(())) => {
                    self.touch(d);
                    let len = std::fs::metadata(self.hub.device.blobs.path_of(&id))
                        .map(|m| m.len())
                        .unwrap_or(0);
                    self.downloaded_bytes.fetch_add(len, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(Err(e)) => {
                    if matches!(e, cairn_net::BlobError::Fetch { .. }) {
                        tracing::debug!(peer = %d.short(), blob = %id, error = %e, "fetch failed");
                    }
                    errors.push(format!("{}: {e}", d.short()));
                }
                Err(_) => errors.push(format!("{}: timed out", d.short())),
            }
        }
        if errors.is_empty() {
            errors.push("no peer is known".into());
        }
        Err(format!("blob {id}: {}", errors.join("; ")))
    }

    /// Fetches many blobs with bounded concurrency; returns how many failed.
    async fn fetch_many(self: &Arc<Self>, ids: Vec<ChunkId>) -> usize {
        self.fetch_many_with(ids, None).await
    }

    async fn fetch_many_with(
        self: &Arc<Self>,
        ids: Vec<ChunkId>,
        bar: Option<&indicatif::ProgressBar>,
    ) -> usize {
        // Blobs someone else is already fetching are waited for one by one; the rest are
        // claimed here and asked for in batches (one request and stream per batch), a few
        // batches at a time so one slow blob or peer does not stall the others.
        let (claimed, taken): (Vec<ChunkId>, Vec<ChunkId>) = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let mut seen = HashSet::new();
            ids.into_iter()
                .filter(|id| seen.insert(*id))
                .partition(|id| in_flight.insert(*id))
        };
        let mut set = tokio::task::JoinSet::new();
        let mut failed = 0;
        let done = |n: usize, bar: Option<&indicatif::ProgressBar>| {
            if let Some(b) = bar {
                b.inc(n as u64);
            }
        };
        let mut batches = claimed.chunks(FETCH_BATCH).map(<[ChunkId]>::to_vec);
        loop {
            while set.len() < FETCH_BATCHES_AT_ONCE && !self.stopped() {
                let Some(batch) = batches.next() else {
                    break;
                };
                let inner = self.clone();
                set.spawn(async move {
                    let n = batch.len();
                    let ok = inner.fetch_batch(&batch).await;
                    let mut in_flight = inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    for id in &batch {
                        in_flight.remove(id);
                    }
                    (ok, n - ok)
                });
            }
            let Some(r) = set.join_next().await else {
                break;
            };
            match r {
                Ok((ok, bad)) => {
                    done(ok, bar);
                    failed += bad;
                }
                Err(_) => failed += FETCH_BATCH,
            }
        }
        // Batches never started (shutting down) still hold their claims.
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            for batch in batches {
                failed += batch.len();
                for id in &batch {
                    in_flight.remove(id);
                }
            }
        }
        for id in taken {
            if self.stopped() {
                failed += 1;
                continue;
            }
            match self.fetch_deduped(id).await {
                Ok(()) => done(1, bar),
                Err(_) => failed += 1,
            }
        }
        failed
    }

    /// Fetches `ids` (claimed by the caller) from the first peers that have verified copies,
    /// asking each peer for everything still missing in one request; returns how many are
    /// now local.
    async fn fetch_batch(&self, ids: &[ChunkId]) -> usize {
        let mut missing = self.not_local(ids.to_vec()).await;
        let local = ids.len() - missing.len();
        let mut got = 0;
        for d in self.blob_sources() {
            if missing.is_empty() {
                break;
            }
            let Some(conn) = self.blob_conn(d).await else {
                continue;
            };
            self.downloads_active
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            let r =
                tokio::time::timeout(FETCH_TIMEOUT, self.blobs.fetch_many(&conn, &missing)).await;
            self.downloads_active
                .fetch_sub(missing.len() as u64, Ordering::Relaxed);
            let Ok(results) = r else {
                // Whatever arrived before the timeout is stored; the rest goes to the next peer.
                let before = missing.len();
                missing = self.not_local(missing).await;
                got += before - missing.len();
                tracing::debug!(peer = %d.short(), "batch fetch timed out");
                continue;
            };
            missing.clear();
            let mut ok_any = false;
            for (id, r) in results {
                match r {
                    Ok(size) => {
                        ok_any = true;
                        got += 1;
                        self.downloaded_bytes.fetch_add(size, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if matches!(e, cairn_net::BlobError::Fetch { .. }) {
                            tracing::debug!(peer = %d.short(), blob = %id, error = %e, "fetch failed");
                        }
                        missing.push(id);
                    }
                }
            }
            if ok_any {
                self.touch(d);
            }
        }
        local + got
    }

    /// Closes the peer's spare blob connections that have been idle for [`BLOB_IDLE`]: the
    /// extra connections a bulk transfer opened would otherwise exchange keep-alives forever.
    fn close_idle_blob_conns(&self, d: DeviceId) {
        let mut peers = self.peers();
        let Some(p) = peers.get_mut(&d) else {
            return;
        };
        let spare = idle_spare_slots(
            &p.blob_conns_open(),
            &p.blob_busy,
            &p.blob_idle_since,
            Instant::now(),
            BLOB_IDLE,
        );
        for &i in &spare {
            if let Some(c) = p.blob_conns[i].take() {
                c.close(0u32.into(), b"idle");
            }
        }
        if !spare.is_empty() {
            tracing::debug!(peer = %d.short(), closed = spare.len(), "closed idle blob connections");
        }
    }

    /// The ones of `ids` the local store lacks (the checks are file lookups: off the runtime);
    /// all of them if the check itself fails.
    async fn not_local(&self, ids: Vec<ChunkId>) -> Vec<ChunkId> {
        let (blobs, all) = (self.hub.device.blobs.clone(), ids.clone());
        tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .filter(|id| !blobs.has(id).unwrap_or(false))
                .collect()
        })
        .await
        .unwrap_or(all)
    }

    /// Like [`Self::fetch_one`], but a blob already being fetched by someone else is waited
    /// for instead of fetched twice.
    async fn fetch_deduped(&self, id: ChunkId) -> Result<(), String> {
        let first = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
        if !first {
            let deadline = Instant::now() + FETCH_TIMEOUT;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if !self
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&id)
                {
                    break;
                }
            }
            if self.hub.device.blobs.has(&id).unwrap_or(false) {
                return Ok(());
            }
            return self.fetch_one(id).await;
        }
        let r = self.fetch_one(id).await;
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        r
    }

    /// Signs `device` into the member list (after it joined through one of our invitations).
    fn admit(self: &Arc<Self>, device: DeviceId, recipient: String) {
        let state_key = self.hub.device.key.clone();
        let rec = MemberRecord::add(&state_key, self.vault, device, recipient, now_ms());
        match self.hub.device.registry.merge_roster(&self.vault, &[rec]) {
            Ok(change) => {
                tracing::info!(device = %device.short(), added = change.added.len(), "device joined");
                self.refresh_members();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot add the joined device to the member list")
            }
        }
    }

    /// Signs a removal of `device` and applies it; peers learn it at the next roster exchange
    /// (which this triggers at once).
    pub fn remove_member(self: &Arc<Self>, device: DeviceId) -> Result<()> {
        if device == self.me {
            anyhow::bail!(
                "refusing to remove this device itself; run `cairn remove-device` on another member"
            );
        }
        let rec = MemberRecord::remove(&self.hub.device.key, self.vault, device, now_ms());
        self.hub
            .device
            .registry
            .merge_roster(&self.vault, &[rec])
            .context("recording the removal")?;
        self.refresh_members();
        Ok(())
    }
}

async fn pairing_events(inner: Arc<Inner>) {
    let mut rx = inner.pairing.events();
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(PairingEvent::Joined(j)) => {
                    let inner2 = inner.clone();
                    let _ = tokio::task::spawn_blocking(move || inner2.admit(j.device, j.age_recipient)).await;
                }
                Ok(PairingEvent::Refused { device, error }) => {
                    tracing::warn!(device = %device.short(), %error, "refused a join attempt");
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = inner.stop_notify.notified() => return,
        }
    }
}

async fn roster_events(inner: Arc<Inner>) {
    let mut rx = inner.registry.roster_events();
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let inner2 = inner.clone();
                    let _ = tokio::task::spawn_blocking(move || inner2.refresh_members()).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = inner.stop_notify.notified() => return,
        }
    }
}

/// Dials `peer` for as long as it is a member, with backoff between failed attempts.
async fn peer_loop(inner: Arc<Inner>, peer: DeviceId) {
    let mut backoff = BACKOFF_MIN;
    while !inner.stopped() && inner.members.contains(&peer) {
        let started = Instant::now();
        match inner.addr_of(peer) {
            None => {
                tracing::debug!(peer = %peer.short(), "no known address yet; waiting for it to dial us or for a roster update")
            }
            Some(addr) => match session(&inner, peer, addr).await {
                Ok(()) => tracing::debug!(peer = %peer.short(), "session ended"),
                Err(e) => tracing::debug!(peer = %peer.short(), error = %e, "session failed"),
            },
        }
        inner.set_connected(peer, false);
        if started.elapsed() > STABLE_SESSION {
            backoff = BACKOFF_MIN;
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = inner.roster_changed.notified() => {}
            _ = inner.stop_notify.notified() => return,
        }
    }
}

async fn session(inner: &Arc<Inner>, peer: DeviceId, addr: EndpointAddr) -> Result<()> {
    let client = tokio::time::timeout(DIAL_TIMEOUT, RegistryClient::connect(&inner.endpoint, addr))
        .await
        .context("dial timed out")??;
    exchange_roster(inner, peer, &client).await?;
    let mut sub = client.subscribe(&inner.vault).await?;
    inner.set_connected(peer, true);
    tracing::info!(peer = %peer.short(), "connected");
    for e in client.fetch_all(&inner.vault).await? {
        inner.ingest(e).await;
    }
    let mut idle_check = tokio::time::interval(BLOB_IDLE / 2);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = idle_check.tick() => inner.close_idle_blob_conns(peer),
            ev = sub.next() => {
                inner.touch(peer);
                match ev? {
                    Some(SubscriptionEvent::Entry(e)) => inner.ingest(e).await,
                    Some(SubscriptionEvent::Lagged(n)) => {
                        tracing::debug!(peer = %peer.short(), skipped = n, "fell behind; refetching");
                        for e in client.fetch_all(&inner.vault).await? {
                            inner.ingest(e).await;
                        }
                    }
                    None => return Ok(()),
                }
            }
            _ = inner.roster_changed.notified() => {
                if !inner.members.contains(&peer) {
                    client.connection().close(403u32.into(), b"removed from the vault");
                    return Ok(());
                }
                exchange_roster(inner, peer, &client).await?;
            }
            _ = inner.stop_notify.notified() => {
                client.connection().close(0u32.into(), b"shutting down");
                return Ok(());
            }
        }
    }
}

async fn exchange_roster(
    inner: &Arc<Inner>,
    peer: DeviceId,
    client: &RegistryClient,
) -> Result<()> {
    let ours = inner.registry.roster_message(inner.vault).await?;
    let theirs = client.exchange_roster(&inner.vault, &ours).await?;
    inner.registry.absorb(inner.vault, peer, theirs).await?;
    Ok(())
}

/// The on-demand side: what the engine and the mount call when a blob is not local.
struct NetRemote(Arc<Inner>);

impl Remote for NetRemote {
    fn fetch(&self, id: ChunkId) -> Result<(), String> {
        if self.0.stopped() {
            return Err("the network is shutting down".into());
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // Never block a runtime thread; callers inside the runtime use fetch_one.
            return Err("blob fetch requested from inside the network runtime".into());
        }
        let inner = self.0.clone();
        self.0
            .handle
            .block_on(async move { inner.fetch_deduped(id).await })
    }

    fn prefetch(&self, ids: Vec<ChunkId>) {
        if self.0.stopped() {
            return;
        }
        let Ok(permit) = self.0.prefetch_slots.clone().try_acquire_owned() else {
            return;
        };
        let inner = self.0.clone();
        self.0.handle.spawn(async move {
            inner.fetch_many(ids).await;
            drop(permit);
        });
    }
}

/// Merges every member's newest snapshot we have not merged yet.
fn sync_worker(inner: Arc<Inner>, wake: Receiver<()>) {
    let device = inner.hub.device.clone();
    // Per device: the last head merged (or found unusable, so it is not retried forever).
    let mut done: HashMap<DeviceId, cairn_registry::Payload> = HashMap::new();
    loop {
        match wake.recv_timeout(RETRY_EVERY) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if inner.stopped() {
            return;
        }
        let heads = match device.registry.list(&inner.vault) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot list registry heads");
                continue;
            }
        };
        for head in heads {
            if inner.stopped() {
                return;
            }
            if head.device == inner.me
                || !inner.members.contains(&head.device)
                || done.get(&head.device) == Some(&head.payload)
            {
                continue;
            }
            let id = SnapshotId::from(head.payload);
            match merge_snapshot(&inner, id) {
                Ok(()) => {
                    done.insert(head.device, head.payload);
                }
                Err(e) => {
                    tracing::warn!(device = %head.device.short(), snapshot = %id, error = %format!("{e:#}"), "cannot merge a peer snapshot yet; will retry");
                }
            }
        }
    }
}

fn merge_snapshot(inner: &Arc<Inner>, id: SnapshotId) -> Result<()> {
    let device = &inner.hub.device;
    let (stores, keys, our_root) = {
        let v = device.vault();
        (v.stores().clone(), v.keys().clone(), v.root())
    };
    // Everything that may need the network happens before taking the engine lock, so local
    // writes never wait for a slow peer: the header, its parents' headers, and the tree
    // nodes on the differing paths (a diff walk reads exactly those).
    let snap = load_snapshot(&stores, &keys, id).context("loading the snapshot")?;
    for p in &snap.header.parents {
        if !device.blobs.has(&p.0).unwrap_or(false) {
            // Fetched through the stores' remote fallback.
            let _ = stores.blobs.get(&p.0);
        }
    }
    for d in stores.tree.diff(&our_root, &snap.header.root) {
        d.context("reading the peer's tree")?;
    }
    let mut vault = device.vault();
    let before = vault.root();
    let report = vault.receive(id).context("merging")?;
    if vault.root() != before {
        tracing::info!(snapshot = %id, conflicts = report.conflicts.len(), "merged a peer snapshot");
        inner
            .hub
            .publish(&mut vault, now_ms())
            .context("publishing the merged state")?;
        inner.hub.show(&vault, Some(before));
        drop(vault);
        inner.wake_replicator();
    }
    Ok(())
}

/// Fetches `ids` from the replicator thread; true if every one arrived.
fn fetch_batch(inner: &Arc<Inner>, ids: Vec<ChunkId>, bar: &indicatif::ProgressBar) -> bool {
    bar.inc_length(ids.len() as u64);
    let (inner2, bar2) = (inner.clone(), bar.clone());
    inner
        .handle
        .block_on(async move { inner2.fetch_many_with(ids, Some(&bar2)).await })
        == 0
}

fn replication_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(0),
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{bar:30}] {pos}/{len} chunks, {elapsed} (eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("fetching");
    bar
}

/// Makes local chunks servable now rather than on a peer's first request for each.
fn index_local(inner: &Arc<Inner>, ids: Vec<ChunkId>) {
    if ids.is_empty() || inner.stopped() {
        return;
    }
    let inner2 = inner.clone();
    inner
        .handle
        .block_on(async move { inner2.blobs.index_local(&ids).await });
}

/// Fetches every chunk the current state references and the local store lacks, and makes
/// the ones already local servable (see [`index_local`]). Woken by merges (they bring chunks
/// we lack) and by local publishes (they bring chunks peers will ask for).
fn replicator(inner: Arc<Inner>, wake: Receiver<()>) {
    let device = inner.hub.device.clone();
    let mut caught_up = VaultStores::empty_root();
    // The walk runs when a merge or a local publish wakes it, and on a timer only while the
    // last walk left something missing.
    let mut incomplete = true;
    loop {
        match wake.recv_timeout(RETRY_EVERY) {
            Ok(()) => {}
            Err(RecvTimeoutError::Timeout) if incomplete => {}
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if inner.stopped() {
            return;
        }
        let (stores, root) = {
            let v = device.vault();
            (v.stores().clone(), v.root())
        };
        if root == caught_up {
            continue;
        }
        let mut missing = Vec::new();
        let mut local = Vec::new();
        let mut complete = true;
        // Drawn only on a terminal (indicatif hides itself otherwise): `cairn join` in a
        // shell shows the initial fetch, a service's log stays clean.
        let bar = replication_bar();
        for d in stores.tree.diff(&caught_up, &root) {
            if inner.stopped() {
                return;
            }
            let value = match d {
                Ok(DiffEntry::Added { key, value })
                | Ok(DiffEntry::Changed {
                    key, new: value, ..
                }) => (key, value),
                Ok(DiffEntry::Removed { .. }) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "replicator cannot read the tree yet");
                    complete = false;
                    break;
                }
            };
            let Ok(entry) = cairn_vault::decode_value(&value.0, &value.1) else {
                continue;
            };
            if entry.kind != EntryKind::File || matches!(entry.content, Content::Inline(_)) {
                continue;
            }
            match manifest_of(stores.blobs.as_ref(), &entry.content) {
                Ok(Some(m)) => {
                    for id in m.chunks().iter().map(|c| c.id) {
                        if device.blobs.has(&id).unwrap_or(false) {
                            local.push(id);
                        } else {
                            missing.push(id);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "chunk list not available yet");
                    complete = false;
                }
            }
            // Bounded batches: a huge vault never builds a huge list.
            if missing.len() >= 4096 && !fetch_batch(&inner, std::mem::take(&mut missing), &bar) {
                complete = false;
            }
            if local.len() >= 4096 {
                index_local(&inner, std::mem::take(&mut local));
            }
        }
        if !missing.is_empty() && !fetch_batch(&inner, missing, &bar) {
            complete = false;
        }
        index_local(&inner, local);
        if bar.length().unwrap_or(0) > 0 {
            bar.finish_with_message(if complete {
                "vault complete on this device"
            } else {
                "some chunks could not be fetched yet; retrying"
            });
        }
        if let Err(e) = device.blobs.sync() {
            tracing::warn!(error = %e, "cannot sync fetched blobs");
            complete = false;
        }
        if complete {
            caught_up = root;
        }
        incomplete = !complete;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{choose_blob_slot, idle_spare_slots};

    #[test]
    fn idle_spare_connections_close_and_the_latest_stays() {
        let now = Instant::now();
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let minute = Duration::from_secs(60);
        // Three idle open connections past the limit: all but the most recently used close.
        assert_eq!(
            idle_spare_slots(
                &[true, true, true, false],
                &[0; 4],
                &[ago(300), ago(90), ago(200), None],
                now,
                minute
            ),
            vec![0, 2]
        );
        // Not idle long enough, or busy: kept.
        assert_eq!(
            idle_spare_slots(
                &[true, true, true],
                &[0, 1, 0],
                &[ago(30), None, ago(120)],
                now,
                minute
            ),
            vec![2]
        );
        // A single open connection is never closed for idleness.
        assert!(
            idle_spare_slots(&[false, true], &[0, 0], &[None, ago(999)], now, minute).is_empty()
        );
        // Closed slots are not reported.
        assert!(
            idle_spare_slots(&[false, false], &[0, 0], &[ago(999), ago(999)], now, minute)
                .is_empty()
        );
    }

    #[test]
    fn single_fetches_share_one_connection_and_concurrent_ones_spread() {
        // Nothing open yet: dial the first slot.
        assert_eq!(choose_blob_slot(&[false; 4], &[0; 4]), 0);
        // An idle open connection is reused, wherever it is.
        assert_eq!(choose_blob_slot(&[false, false, true, false], &[0; 4]), 2);
        // The only open one is busy: dial another slot rather than queue behind it.
        assert_eq!(
            choose_blob_slot(&[true, false, false, false], &[1, 0, 0, 0]),
            1
        );
        // A slot being dialed (not open yet, busy) is not dialed twice while another is free.
        assert_eq!(
            choose_blob_slot(&[true, false, false, false], &[1, 1, 0, 0]),
            2
        );
        // Every slot open and busy: the least busy one.
        assert_eq!(
            choose_blob_slot(&[true, true, true, true], &[3, 2, 1, 2]),
            2
        );
        // Every slot busy, some still dialing: the least busy open connection.
        assert_eq!(
            choose_blob_slot(&[true, false, true, false], &[2, 1, 1, 1]),
            2
        );
        // A connection closed with nothing on it is redialed in its slot.
        assert_eq!(choose_blob_slot(&[false, true], &[0, 1]), 0);
    }
}
