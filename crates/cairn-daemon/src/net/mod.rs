//! The daemon's network side: one iroh endpoint per running vault, a persistent session with
//! every other member, and the two workers that turn what arrives into local state. Each job
//! has its own module:
//!
//! - [`session`]: one task per member: dial with reconnect and jittered exponential backoff;
//!   on each connection exchange rosters, subscribe to the peer's registry, then fetch
//!   everything it holds (subscribing first, so nothing published in between is missed).
//!   Accepted entries wake the sync worker. New local snapshots reach peers through their
//!   subscriptions to us, the moment they are published: no polling.
//! - [`admission`]: the member list: admitting devices that paired with our invitations,
//!   removals, and bringing the allowlist, sessions and snapshot recipients in line with it.
//! - [`pool`]: the blob connections kept per peer and lent to fetches.
//! - [`fetch`]: getting chunks that are not local: deduplicated, batched, from the best peer
//!   first and from the next one when a peer fails or lies; also the on-demand reads of the
//!   mount (see `stores::Remote`), with read-ahead.
//! - [`sync`]: the sync worker (a thread: it blocks on the engine lock and on fetches): for
//!   each member whose head it has not merged yet, loads the snapshot, merges it, publishes,
//!   and shows the result in the mount with the kernel caches of changed paths dropped.
//! - [`replicate`]: the replicator (a thread): fetches every chunk the current state
//!   references that is not local, so the vault is complete offline.
//!
//! Every queue is bounded: wake-ups coalesce into one-slot channels, fetches run with a fixed
//! concurrency, subscriptions lag (and refetch) rather than buffer. The sync worker and the
//! replicator see the network only through small traits, so they are tested without sockets.

mod admission;
mod fetch;
mod keep;
mod pool;
mod replicate;
mod session;
mod sync;
#[cfg(test)]
mod testkit;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_crypto::{DeviceId, VaultId};
use cairn_net::{
    BlobService, Endpoint, EndpointAddr, MemberInfo, Members, NetConfig, PAIR_ALPN, Pairing,
    PairingProtocol, REGISTRY_ALPN, RegistryProtocol, Relays, Router, bind_endpoint, endpoint_addr,
    endpoint_id_of, parse_addrs, peer_addrs,
};
use cairn_registry::RegistryEntry;
use iroh::endpoint::Connection;
use iroh::{TransportAddr, Watcher};
use tokio::sync::Notify;

use crate::open_vault::{OpenVault, now_ms};
use crate::publisher::Publisher;
use crate::state::VaultState;
use crate::status::PeerStatus;
use crate::stores::Remote;

pub use fetch::DEFAULT_FETCH_TIMEOUT;
pub(crate) use fetch::Fetcher;
use fetch::IrohPeers;
pub use keep::EvictReport;
use pool::BlobSlots;
use replicate::Replicator;
use sync::SyncWorker;

/// How often the workers look again at what failed before (unreachable peers, missing
/// blobs), even without a wake-up.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// Network settings for one daemon.
#[derive(Debug, Clone)]
pub struct NetSettings {
    /// UDP address for direct paths (unused when `direct` is false).
    pub bind: SocketAddr,
    pub relays: Relays,
    /// `false`: relay-only, this device's IP addresses are never announced to peers.
    pub direct: bool,
    /// The automatic prune while the daemon serves the vault (`None`: off).
    pub prune: Option<crate::prune::AutoPrune>,
    /// How long one peer may take to deliver a blob before it is given up on (the next
    /// peer is asked, or a read of content only it has fails with EIO).
    pub fetch_timeout: Duration,
    /// The configuration's sync mode, for a vault that never chose one (see `ondemand`).
    pub mode: crate::ondemand::SyncMode,
    /// The local store's budget on an on-demand device (`None`: none; see `keep::reclaim`).
    pub cache_max_bytes: Option<u64>,
}

/// How long after start an unreachable relay is reported (once) in the log.
const RELAY_GRACE: Duration = Duration::from_secs(15);

/// What the node knows of one member.
#[derive(Default)]
struct Peer {
    connected: bool,
    last_contact_ms: Option<u64>,
    /// The current session's connection (registry and roster traffic).
    conn: Option<Connection>,
    blob: BlobSlots,
    /// Bytes sent and received on connections to the peer that are closed now.
    closed_bytes: (u64, u64),
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Bytes sent and received on a connection so far.
fn conn_bytes(c: &Connection) -> (u64, u64) {
    let s = c.stats();
    (s.udp_tx.bytes, s.udp_rx.bytes)
}

/// The path a connection uses now, for people: `direct IP:PORT` or `relay URL`, and its RTT.
fn selected_path(c: &Connection) -> Option<(String, Duration)> {
    c.paths()
        .iter()
        .find(|p| p.is_selected())
        .map(|p| (describe_path(p.remote_addr()), p.rtt()))
}

fn describe_path(addr: &TransportAddr) -> String {
    match addr {
        TransportAddr::Ip(a) => format!("direct {a}"),
        TransportAddr::Relay(u) => format!("relay {u}"),
        other => format!("{other:?}"),
    }
}

/// The network node of one running vault: its endpoint and protocols, the member peers, and
/// the fetcher the workers and the mount share.
pub(crate) struct NetNode {
    pub publisher: Arc<Publisher>,
    pub vault: VaultId,
    pub me: DeviceId,
    pub endpoint: Endpoint,
    pub registry: RegistryProtocol,
    pub pairing: Pairing,
    members: Members,
    peers: Mutex<HashMap<DeviceId, Peer>>,
    handle: tokio::runtime::Handle,
    fetcher: Arc<Fetcher<IrohPeers>>,
    /// This device's blob protocol: asking members what they hold (`keep`).
    blobs: BlobService,
    sync_wake: SyncSender<()>,
    replicate_wake: SyncSender<()>,
    /// Woken when the roster changed: sessions re-exchange it, idle dialers retry.
    pub(crate) roster_changed: Notify,
    stop: Arc<AtomicBool>,
    stop_notify: Notify,
}

/// The running network side of one vault. Dropping it (or [`Net::shutdown`]) stops
/// everything and closes the endpoint.
pub struct Net {
    rt: Option<tokio::runtime::Runtime>,
    node: Arc<NetNode>,
    router: Option<Router>,
    workers: Vec<JoinHandle<()>>,
}

fn port_file(dir: &Path) -> PathBuf {
    dir.join("net.port")
}

fn spawn_worker(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .with_context(|| format!("starting the {name} thread"))
}

impl Net {
    /// Binds the endpoint and starts sessions with every member. `publisher` is how merged
    /// snapshots reach the engine and the mount.
    pub fn start(
        state: &VaultState,
        publisher: Arc<Publisher>,
        settings: NetSettings,
    ) -> Result<Self> {
        let vault_state = publisher.vault.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-net")
            .enable_all()
            .build()
            .context("starting the network runtime")?;
        let vault = vault_state.vault_id;
        let me = vault_state.device_id;
        let members = Members::new(vault_state.registry.members(&vault)?);
        let pairing = Pairing::new(
            state.secret.clone(),
            roster_info(&vault_state)?,
            members.clone(),
        );
        let relays_enabled = settings.relays.enabled();
        let fetch_timeout = settings.fetch_timeout;
        vault_state.ondemand.set_default_mode(settings.mode);
        let cache_max_bytes = settings.cache_max_bytes;
        let endpoint = rt.block_on(bind_persistent(state, settings, &members, &pairing))?;
        let registry = RegistryProtocol::new(vault_state.registry.clone());
        registry.set_local(me, peer_addrs(&endpoint.addr()));
        // Blobs are served straight from the store's packs; the serving index earlier versions
        // kept beside it is dead weight.
        let old_index = state.dir.join("serve-index");
        if old_index.exists()
            && let Err(e) = std::fs::remove_dir_all(&old_index)
        {
            tracing::warn!(path = %old_index.display(), "cannot remove the old serving index: {e}");
        }
        let blobs = {
            let _g = rt.enter();
            BlobService::open(vault_state.blobs.clone(), members.clone())
        };
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
        let stop = Arc::new(AtomicBool::new(false));
        let node = Arc::new_cyclic(|weak| NetNode {
            publisher: publisher.clone(),
            vault,
            me,
            registry,
            pairing,
            members: members.clone(),
            fetcher: Arc::new(
                Fetcher::new(
                    IrohPeers::new(weak.clone(), blobs.clone()),
                    vault_state.blobs.clone(),
                    stop.clone(),
                )
                .with_timeout(fetch_timeout),
            ),
            blobs,
            endpoint,
            peers: Mutex::new(HashMap::new()),
            handle: rt.handle().clone(),
            sync_wake,
            replicate_wake,
            roster_changed: Notify::new(),
            stop: stop.clone(),
            stop_notify: Notify::new(),
        });
        {
            let announcer = node.registry.clone();
            // A published snapshot may reference new local chunks: the replicator's walk
            // makes them servable before peers ask (see `replicate`).
            let replicate_wake = node.replicate_wake.clone();
            publisher.set_announcer(Some(Arc::new(move |e: RegistryEntry| {
                announcer.announce(e);
                let _ = replicate_wake.try_send(());
            })));
        }
        // Pins and mode changes (control socket, xattrs) start a walk at once.
        vault_state
            .ondemand
            .set_waker(Some(node.replicate_wake.clone()));
        vault_state
            .remote_blobs
            .set_remote(Some(Arc::new(fetch::NetRemote {
                fetcher: node.fetcher.clone(),
                handle: node.handle.clone(),
            }) as Arc<dyn Remote>));

        rt.spawn(watch_own_addrs(node.clone()));
        if relays_enabled {
            rt.spawn(report_relay(node.clone()));
        }
        rt.spawn(admission::pairing_events(node.clone()));
        rt.spawn(admission::roster_events(node.clone()));
        node.refresh_members();
        let mut workers = Vec::new();
        {
            let replicate_wake = node.replicate_wake.clone();
            let worker = SyncWorker::new(publisher.clone(), members.clone(), move || {
                let _ = replicate_wake.try_send(());
            });
            let stop = stop.clone();
            workers.push(spawn_worker("cairn-sync", move || {
                worker.run(sync_rx, &stop)
            })?);
        }
        {
            let replicator = Replicator::new(
                vault_state.clone(),
                Arc::new(fetch::BlockingFetch {
                    fetcher: node.fetcher.clone(),
                    handle: node.handle.clone(),
                }),
            );
            let stop = stop.clone();
            workers.push(spawn_worker("cairn-replicate", move || {
                replicator.run(replicate_rx, &stop)
            })?);
        }
        if let Some(max) = cache_max_bytes {
            let node = node.clone();
            workers.push(spawn_worker("cairn-reclaim", move || {
                keep::reclaim_loop(&node, max)
            })?);
        }
        node.wake_sync();
        node.wake_replicator();
        tracing::info!(device = %me.short(), addrs = ?node.endpoint.addr().ip_addrs().collect::<Vec<_>>(), "network up");
        Ok(Self {
            rt: Some(rt),
            node,
            router: Some(router),
            workers,
        })
    }

    pub(crate) fn node(&self) -> &Arc<NetNode> {
        &self.node
    }

    /// The addresses this device can be reached at.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.node.endpoint.addr().ip_addrs().copied().collect()
    }

    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(rt) = self.rt.take() else {
            return;
        };
        self.node.stop.store(true, Ordering::SeqCst);
        self.node.stop_notify.notify_waiters();
        self.node.publisher.set_announcer(None);
        self.node.publisher.vault.remote_blobs.set_remote(None);
        self.node.publisher.vault.ondemand.set_waker(None);
        let _ = self.node.sync_wake.try_send(());
        let _ = self.node.replicate_wake.try_send(());
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
            relays: settings.relays.clone(),
            direct: settings.direct,
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

fn roster_info(vault: &OpenVault) -> Result<Vec<MemberInfo>> {
    Ok(vault
        .registry
        .roster(&vault.vault_id)?
        .into_iter()
        .filter(|r| !r.removed)
        .map(|r| MemberInfo {
            device: r.device,
            age_recipient: r.recipient,
        })
        .collect())
}

impl NetNode {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn wake_sync(&self) {
        let _ = self.sync_wake.try_send(());
    }

    fn wake_replicator(&self) {
        let _ = self.replicate_wake.try_send(());
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the endpoint has an address to give out (direct or relay), waiting up to
    /// `limit` for a relay-only endpoint to reach its relay.
    pub fn wait_addressable(&self, limit: Duration) -> bool {
        if !self.endpoint.addr().is_empty() {
            return true;
        }
        let endpoint = self.endpoint.clone();
        self.handle.block_on(async move {
            let _ = tokio::time::timeout(limit, endpoint.online()).await;
        });
        !self.endpoint.addr().is_empty()
    }

    /// Chunk fetches in flight, and bytes fetched since the daemon started.
    pub fn downloads(&self) -> (u64, u64) {
        self.fetcher.downloads()
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let addrs: HashMap<DeviceId, Vec<String>> = self
            .publisher
            .vault
            .registry
            .addrs(&self.vault)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let names = self
            .publisher
            .vault
            .registry
            .name_map(&self.vault)
            .unwrap_or_default();
        let mut out: Vec<(DeviceId, PeerStatus)> = self
            .peers()
            .iter()
            .map(|(d, p)| {
                let path = p
                    .conn
                    .as_ref()
                    .filter(|_| p.connected)
                    .and_then(selected_path);
                let (mut sent, mut received) = p.closed_bytes;
                for c in p.conn.iter().chain(p.blob.open_conns()) {
                    let (s, r) = conn_bytes(c);
                    sent += s;
                    received += r;
                }
                let status = PeerStatus {
                    device: d.to_string(),
                    name: names.get(d).map(ToString::to_string),
                    connected: p.connected,
                    last_contact_ms: p.last_contact_ms,
                    addrs: addrs.get(d).cloned().unwrap_or_default(),
                    rtt_us: path.as_ref().map(|(_, rtt)| rtt.as_micros() as u64),
                    path: path.map(|(p, _)| p),
                    bytes_sent: sent,
                    bytes_received: received,
                };
                (*d, status)
            })
            .collect();
        out.sort_by_key(|(d, _)| *d);
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// The session with `d` started on `conn` (`Some`) or ended (`None`).
    fn set_session(&self, d: DeviceId, conn: Option<&Connection>) {
        if let Some(p) = self.peers().get_mut(&d) {
            p.connected = conn.is_some();
            if let Some(old) = p.conn.take() {
                let (s, r) = conn_bytes(&old);
                p.closed_bytes.0 += s;
                p.closed_bytes.1 += r;
            }
            if let Some(c) = conn {
                p.conn = Some(c.clone());
                p.last_contact_ms = Some(now_ms());
            }
        }
    }

    fn touch(&self, d: DeviceId) {
        if let Some(p) = self.peers().get_mut(&d) {
            p.last_contact_ms = Some(now_ms());
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

    /// What to dial for member `d`: the direct addresses and relays it announced.
    fn addr_of(&self, d: DeviceId) -> Option<EndpointAddr> {
        let id = endpoint_id_of(&d).ok()?;
        let list = self
            .publisher
            .vault
            .registry
            .addrs(&self.vault)
            .ok()?
            .into_iter()
            .find(|(x, _)| *x == d)?
            .1;
        let addrs = parse_addrs(list.iter().map(String::as_str));
        (!addrs.is_empty()).then(|| endpoint_addr(id, &addrs))
    }
}

/// Keeps what we announce to peers (direct addresses, home relay) current: when it changes
/// (a new home relay, a new local address), the next roster exchange of every session
/// carries it, so members find this device again without a new ticket.
async fn watch_own_addrs(node: Arc<NetNode>) {
    let mut watcher = node.endpoint.watch_addr();
    loop {
        tokio::select! {
            r = watcher.updated() => {
                let Ok(addr) = r else { return };
                let addrs = peer_addrs(&addr);
                tracing::debug!(addrs = ?addrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "own addresses changed");
                node.registry.set_local(node.me, addrs);
                node.roster_changed.notify_waiters();
            }
            _ = node.stop_notify.notified() => return,
        }
    }
}

/// Logs once if no relay answers soon after start (peers reachable directly still sync),
/// and once when one does.
async fn report_relay(node: Arc<NetNode>) {
    let online = tokio::time::timeout(RELAY_GRACE, node.endpoint.online());
    tokio::select! {
        r = online => match r {
            Ok(()) => {
                let relays: Vec<String> = node.endpoint.addr().relay_urls().map(ToString::to_string).collect();
                tracing::info!(?relays, "connected to the relay");
                return;
            }
            Err(_) => tracing::warn!(
                "no relay answered within {} s; syncing with directly reachable members only and retrying in the background (check the network, or net.relay in config.toml)",
                RELAY_GRACE.as_secs()
            ),
        },
        _ = node.stop_notify.notified() => return,
    }
    tokio::select! {
        _ = node.endpoint.online() => {
            let relays: Vec<String> = node.endpoint.addr().relay_urls().map(ToString::to_string).collect();
            tracing::info!(?relays, "connected to the relay");
        }
        _ = node.stop_notify.notified() => {}
    }
}
