//! One session per member: dial with reconnect and jittered exponential backoff; on each
//! connection exchange rosters, subscribe to the peer's registry, then fetch everything it
//! holds (subscribing first, so nothing published in between is missed). Every entry goes
//! through the local registry's checks; accepted ones are relayed to our own subscribers and
//! wake the sync worker. The session also closes the peer's idle spare blob connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_crypto::DeviceId;
use cairn_net::{EndpointAddr, PushResult, RegistryClient, SubscriptionEvent};
use cairn_registry::RegistryEntry;

use super::NetNode;
use super::pool::{BLOB_IDLE, DIAL_TIMEOUT};

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Dials `peer` for as long as it is a member, with backoff between failed attempts.
pub(super) async fn peer_loop(node: Arc<NetNode>, peer: DeviceId) {
    let mut backoff = BACKOFF_MIN;
    while !node.stopped() && node.members.contains(&peer) {
        let started = Instant::now();
        match node.addr_of(peer) {
            None => {
                tracing::debug!(peer = %peer.short(), "no known address yet; waiting for it to dial us or for a roster update")
            }
            Some(addr) => match session(&node, peer, addr).await {
                Ok(()) => tracing::debug!(peer = %peer.short(), "session ended"),
                Err(e) => tracing::debug!(peer = %peer.short(), error = %e, "session failed"),
            },
        }
        node.set_session(peer, None);
        if started.elapsed() > STABLE_SESSION {
            backoff = BACKOFF_MIN;
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = node.roster_changed.notified() => {}
            _ = node.stop_notify.notified() => return,
        }
    }
}

async fn session(node: &Arc<NetNode>, peer: DeviceId, addr: EndpointAddr) -> Result<()> {
    let client = tokio::time::timeout(DIAL_TIMEOUT, RegistryClient::connect(&node.endpoint, addr))
        .await
        .context("dial timed out")??;
    exchange_roster(node, peer, &client).await?;
    let mut sub = client.subscribe(&node.vault).await?;
    node.set_session(peer, Some(client.connection()));
    let path = super::selected_path(client.connection()).map(|(p, _)| p);
    tracing::info!(peer = %peer.short(), path = path.as_deref().unwrap_or("-"), "connected");
    let _path_log = log_path_changes(node, peer, client.connection());
    node.ingest_all(client.fetch_all(&node.vault).await?).await;
    let mut idle_check = tokio::time::interval(BLOB_IDLE / 2);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = idle_check.tick() => node.close_idle_blob_conns(peer),
            ev = sub.next() => {
                node.touch(peer);
                match ev? {
                    Some(SubscriptionEvent::Entry(e)) => node.ingest(e).await,
                    Some(SubscriptionEvent::Lagged(n)) => {
                        tracing::debug!(peer = %peer.short(), skipped = n, "fell behind; refetching");
                        node.ingest_all(client.fetch_all(&node.vault).await?).await;
                    }
                    None => return Ok(()),
                }
            }
            _ = node.roster_changed.notified() => {
                if !node.members.contains(&peer) {
                    client.connection().close(403u32.into(), b"removed from the vault");
                    return Ok(());
                }
                exchange_roster(node, peer, &client).await?;
            }
            _ = node.stop_notify.notified() => {
                client.connection().close(0u32.into(), b"shutting down");
                return Ok(());
            }
        }
    }
}

/// Logs each change of the path the session's connection uses (direct ↔ relay), once per
/// change; the task ends with the connection (or when the returned guard drops).
fn log_path_changes(
    node: &NetNode,
    peer: DeviceId,
    conn: &iroh::endpoint::Connection,
) -> AbortOnDrop {
    use iroh::endpoint::PathEvent;
    use n0_future::StreamExt;
    let mut events = conn.path_events();
    AbortOnDrop(node.handle.spawn(async move {
        let mut last: Option<String> = None;
        while let Some(ev) = events.next().await {
            if let PathEvent::Selected { remote_addr, .. } = ev {
                let now = super::describe_path(&remote_addr);
                if last.as_ref() != Some(&now) {
                    tracing::info!(peer = %peer.short(), path = %now, "path changed");
                    last = Some(now);
                }
            }
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn exchange_roster(
    node: &Arc<NetNode>,
    peer: DeviceId,
    client: &RegistryClient,
) -> Result<()> {
    let ours = node.registry.roster_message(node.vault).await?;
    let theirs = client.exchange_roster(&node.vault, &ours).await?;
    node.registry.absorb(node.vault, peer, theirs).await?;
    Ok(())
}

impl NetNode {
    /// Stores a fetch-all reply: every entry, then the equivocation evidence it carries.
    async fn ingest_all(&self, entries: Vec<RegistryEntry>) {
        for e in &entries {
            self.ingest(e.clone()).await;
        }
        match self.registry.absorb_evidence(&entries).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    cases = n,
                    "a peer passed on evidence of equivocating devices; see `cairn status`"
                );
                self.wake_sync();
            }
            Err(e) => tracing::warn!(error = %e, "cannot store equivocation evidence"),
        }
    }

    /// Stores an entry a peer sent us; wakes the sync worker if it is a new head of another
    /// device.
    async fn ingest(&self, entry: RegistryEntry) {
        let device = entry.device;
        match self.registry.submit(entry).await {
            Ok(PushResult::Accepted { .. }) if device != self.me => self.wake_sync(),
            Ok(PushResult::Rejected(why)) => {
                tracing::debug!(device = %device.short(), %why, "peer entry refused")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot store a peer's registry entry"),
        }
    }
}
