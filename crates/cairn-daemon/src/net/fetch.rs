//! Getting chunks that are not local: each blob fetched once however many readers want it
//! (in-flight claims), many at a time in batches (one request and stream per batch, a few
//! batches at once), from the best peer first and from the next when a peer is unreachable,
//! times out, lacks a blob or sends bytes that do not match its id. Every fetched byte is
//! verified before it is stored (by iroh-blobs while streaming, and by the store).
//!
//! [`Fetcher`] holds that logic over [`BlobPeers`], the one thing it needs from the network
//! (which peers to ask, and asking one); [`IrohPeers`] is the real one, and the tests below
//! use peers in memory that serve good, corrupted or vanishing data.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cairn_crypto::DeviceId;
use cairn_net::{BlobError, BlobService};
use cairn_store::{BlobStore, ChunkId};

use super::NetNode;
use crate::stores::Remote;

/// How long one blob (or one batch) may take to arrive before the fetch gives up on that peer
/// and asks the next, unless configured (`[sync] fetch_timeout_secs`).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks asked for in one request (one stream): ~64–80 KiB chunks make ~5 MiB batches,
/// enough to amortize a request's round trips, small enough to hold in memory.
const FETCH_BATCH: usize = 64;
/// Batches fetched concurrently by the replicator (and by one read-ahead burst), each on its
/// own blob connection when there are enough (at most 8 × 64 chunks ≤ 128 MiB in flight).
const FETCH_BATCHES_AT_ONCE: usize = 8;
/// Read-ahead bursts running at once; more are skipped rather than queued.
const PREFETCH_BURSTS: usize = 4;

/// One blob's outcome from a peer: its size once stored locally, or why not.
pub(crate) type BlobOutcome = Result<u64, String>;

/// What the fetcher needs from the network.
pub(crate) trait BlobPeers: Send + Sync + 'static {
    /// The members to ask, best first.
    fn sources(&self) -> Vec<DeviceId>;
    /// Fetches `id` from `peer`, verifies it and stores it locally.
    fn fetch_one(&self, peer: DeviceId, id: ChunkId) -> impl Future<Output = BlobOutcome> + Send;
    /// Fetches `ids` from `peer` with one request, verifying and storing each; every id's
    /// outcome in order. `Err` when the peer could not be asked at all (unreachable).
    fn fetch_many(
        &self,
        peer: DeviceId,
        ids: &[ChunkId],
    ) -> impl Future<Output = Result<Vec<(ChunkId, BlobOutcome)>, String>> + Send;
    /// `peer` answered with data: it is alive.
    fn heard_from(&self, peer: DeviceId);
}

/// Deduplicated, batched fetching of chunks into the local store (see the module doc).
pub(crate) struct Fetcher<P> {
    peers: P,
    local: Arc<BlobStore>,
    stop: Arc<AtomicBool>,
    in_flight: Mutex<HashSet<ChunkId>>,
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    active: AtomicU64,
    fetched_bytes: AtomicU64,
    /// Per peer and request: a peer that stops answering (a paused process, a dead link)
    /// costs a reader at most this much before the next peer is asked or the read fails.
    timeout: Duration,
    /// Blobs whose on-demand fetch failed, and when: asked again only a timeout later. The
    /// kernel retries a failed read-ahead at once, page by page, which would otherwise
    /// multiply the wait on a peer that stopped answering.
    failed: Mutex<HashMap<ChunkId, Instant>>,
}

/// Failed fetches remembered at most (older ones are dropped first).
const FAILED_KEPT: usize = 4096;

impl<P: BlobPeers> Fetcher<P> {
    pub fn new(peers: P, local: Arc<BlobStore>, stop: Arc<AtomicBool>) -> Self {
        Self {
            peers,
            local,
            stop,
            in_flight: Mutex::new(HashSet::new()),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(PREFETCH_BURSTS)),
            active: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            timeout: DEFAULT_FETCH_TIMEOUT,
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// Gives every peer `timeout` per request (at least a millisecond).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, HashSet<ChunkId>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunk fetches in flight, and bytes fetched since the start.
    pub fn downloads(&self) -> (u64, u64) {
        (
            self.active.load(Ordering::Relaxed),
            self.fetched_bytes.load(Ordering::Relaxed),
        )
    }

    /// The ones of `ids` the local store lacks (the checks are file lookups: off the runtime);
    /// all of them if the check itself fails.
    async fn not_local(&self, ids: Vec<ChunkId>) -> Vec<ChunkId> {
        let (blobs, all) = (self.local.clone(), ids.clone());
        tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .filter(|id| !blobs.has(id).unwrap_or(false))
                .collect()
        })
        .await
        .unwrap_or(all)
    }

    /// Fetches one blob from the first peer that has a verified copy.
    async fn fetch_one(&self, id: ChunkId) -> Result<(), String> {
        if self.not_local(vec![id]).await.is_empty() {
            return Ok(());
        }
        let mut errors = Vec::new();
        for d in self.peers.sources() {
            self.active.fetch_add(1, Ordering::Relaxed);
            let r = tokio::time::timeout(self.timeout, self.peers.fetch_one(d, id)).await;
            self.active.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(Ok(size)) => {
                    self.peers.heard_from(d);
                    self.fetched_bytes.fetch_add(size, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(Err(e)) => errors.push(format!("{}: {e}", d.short())),
                Err(_) => errors.push(format!("{}: timed out", d.short())),
            }
        }
        if errors.is_empty() {
            errors.push("no peer is known".into());
        }
        Err(format!("blob {id}: {}", errors.join("; ")))
    }

    /// Like [`Self::fetch_one`], but a blob already being fetched by someone else is waited
    /// for instead of fetched twice. The wait is bounded by the timeout too, and when that
    /// other fetch ends without the blob its failure is this one's: asking the same peers
    /// again right away would double the time a reader waits on a peer that stopped
    /// answering. The next read asks again.
    pub async fn fetch_deduped(&self, id: ChunkId) -> Result<(), String> {
        let r = self.fetch_deduped_once(id).await;
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match &r {
            Ok(()) => {
                failed.remove(&id);
            }
            Err(_) => {
                if failed.len() >= FAILED_KEPT {
                    let timeout = self.timeout;
                    failed.retain(|_, at| at.elapsed() < timeout);
                    if failed.len() >= FAILED_KEPT {
                        failed.clear();
                    }
                }
                failed.entry(id).or_insert_with(Instant::now);
            }
        }
        r
    }

    async fn fetch_deduped_once(&self, id: ChunkId) -> Result<(), String> {
        let recent = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .map(Instant::elapsed);
        match recent {
            Some(ago) if ago < self.timeout => {
                if self.local.has(&id).unwrap_or(false) {
                    return Ok(());
                }
                return Err(format!(
                    "blob {id}: no peer delivered it {ago:.0?} ago; asked again {:.0?} after that",
                    self.timeout
                ));
            }
            Some(_) => {
                self.failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
            None => {}
        }
        if !self.claims().insert(id) {
            let deadline = Instant::now() + self.timeout;
            let mut ended = false;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if !self.claims().contains(&id) {
                    ended = true;
                    break;
                }
            }
            if self.local.has(&id).unwrap_or(false) {
                return Ok(());
            }
            return Err(if ended {
                format!("blob {id}: the fetch already under way for it failed")
            } else {
                format!(
                    "blob {id}: the fetch already under way for it did not finish within {:?}",
                    self.timeout
                )
            });
        }
        let r = self.fetch_one(id).await;
        self.claims().remove(&id);
        r
    }

    /// Fetches many blobs with bounded concurrency, counting each arrival on `progress`;
    /// returns how many are still missing.
    pub async fn fetch_many(
        self: &Arc<Self>,
        ids: Vec<ChunkId>,
        progress: Option<&indicatif::ProgressBar>,
    ) -> usize {
        // Blobs someone else is already fetching are waited for one by one; the rest are
        // claimed here and asked for in batches (one request and stream per batch), a few
        // batches at a time so one slow blob or peer does not stall the others.
        let (claimed, taken): (Vec<ChunkId>, Vec<ChunkId>) = {
            let mut in_flight = self.claims();
            let mut seen = HashSet::new();
            ids.into_iter()
                .filter(|id| seen.insert(*id))
                .partition(|id| in_flight.insert(*id))
        };
        let done = |n: usize| {
            if let Some(b) = progress {
                b.inc(n as u64);
            }
        };
        let mut set = tokio::task::JoinSet::new();
        let mut failed = 0;
        let mut batches = claimed.chunks(FETCH_BATCH).map(<[ChunkId]>::to_vec);
        loop {
            while set.len() < FETCH_BATCHES_AT_ONCE && !self.stopped() {
                let Some(batch) = batches.next() else {
                    break;
                };
                let me = self.clone();
                set.spawn(async move {
                    let n = batch.len();
                    let ok = me.fetch_batch(&batch).await;
                    let mut in_flight = me.claims();
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
                    done(ok);
                    failed += bad;
                }
                Err(_) => failed += FETCH_BATCH,
            }
        }
        // Batches never started (shutting down) still hold their claims.
        {
            let mut in_flight = self.claims();
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
                Ok(()) => done(1),
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
        for d in self.peers.sources() {
            if missing.is_empty() {
                break;
            }
            let n = missing.len() as u64;
            self.active.fetch_add(n, Ordering::Relaxed);
            let r = tokio::time::timeout(self.timeout, self.peers.fetch_many(d, &missing)).await;
            self.active.fetch_sub(n, Ordering::Relaxed);
            let results = match r {
                Ok(Ok(results)) => results,
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e,
                        _ => "timed out".to_string(),
                    };
                    tracing::debug!(peer = %d.short(), %error, "batch fetch failed");
                    // Whatever arrived before the failure is stored; the rest goes to the
                    // next peer.
                    let before = missing.len();
                    missing = self.not_local(missing).await;
                    got += before - missing.len();
                    continue;
                }
            };
            missing.clear();
            let mut ok_any = false;
            for (id, r) in results {
                match r {
                    Ok(size) => {
                        ok_any = true;
                        got += 1;
                        self.fetched_bytes.fetch_add(size, Ordering::Relaxed);
                    }
                    Err(_) => missing.push(id),
                }
            }
            if ok_any {
                self.peers.heard_from(d);
            }
        }
        local + got
    }
}

/// The members of a running node, reached over iroh-blobs on pooled connections.
pub(crate) struct IrohPeers {
    node: Weak<NetNode>,
    service: BlobService,
}

impl IrohPeers {
    pub fn new(node: Weak<NetNode>, service: BlobService) -> Self {
        Self { node, service }
    }

    fn node(&self) -> Result<Arc<NetNode>, String> {
        self.node
            .upgrade()
            .ok_or_else(|| "the network is shutting down".to_string())
    }
}

fn log_fetch_error(peer: DeviceId, id: &ChunkId, e: &BlobError) {
    if matches!(e, BlobError::Fetch { .. }) {
        tracing::debug!(peer = %peer.short(), blob = %id, error = %e, "fetch failed");
    }
}

impl BlobPeers for IrohPeers {
    fn sources(&self) -> Vec<DeviceId> {
        self.node().map(|n| n.blob_sources()).unwrap_or_default()
    }

    async fn fetch_one(&self, peer: DeviceId, id: ChunkId) -> BlobOutcome {
        let node = self.node()?;
        let conn = node
            .blob_conn(peer)
            .await
            .ok_or_else(|| "unreachable".to_string())?;
        if let Err(e) = self.service.fetch(&conn, id).await {
            log_fetch_error(peer, &id, &e);
            return Err(e.to_string());
        }
        Ok(self
            .service
            .blob_store()
            .len_of(&id)
            .ok()
            .flatten()
            .unwrap_or(0))
    }

    async fn fetch_many(
        &self,
        peer: DeviceId,
        ids: &[ChunkId],
    ) -> Result<Vec<(ChunkId, BlobOutcome)>, String> {
        let node = self.node()?;
        let conn = node
            .blob_conn(peer)
            .await
            .ok_or_else(|| "unreachable".to_string())?;
        Ok(self
            .service
            .fetch_many(&conn, ids)
            .await
            .into_iter()
            .map(|(id, r)| {
                (
                    id,
                    r.map_err(|e| {
                        log_fetch_error(peer, &id, &e);
                        e.to_string()
                    }),
                )
            })
            .collect())
    }

    fn heard_from(&self, peer: DeviceId) {
        if let Ok(n) = self.node() {
            n.touch(peer);
        }
    }
}

/// The on-demand side: what the engine and the mount call when a blob is not local.
pub(crate) struct NetRemote<P> {
    pub fetcher: Arc<Fetcher<P>>,
    pub handle: tokio::runtime::Handle,
}

impl<P: BlobPeers> Remote for NetRemote<P> {
    fn fetch(&self, id: ChunkId) -> Result<(), String> {
        if self.fetcher.stopped() {
            return Err("the network is shutting down".into());
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // Never block a runtime thread; nothing inside the runtime reads through the
            // stores.
            return Err("blob fetch requested from inside the network runtime".into());
        }
        let fetcher = self.fetcher.clone();
        self.handle
            .block_on(async move { fetcher.fetch_deduped(id).await })
    }

    fn prefetch(&self, ids: Vec<ChunkId>) {
        if self.fetcher.stopped() {
            return;
        }
        let Ok(permit) = self.fetcher.prefetch_slots.clone().try_acquire_owned() else {
            return;
        };
        let fetcher = self.fetcher.clone();
        self.handle.spawn(async move {
            fetcher.fetch_many(ids, None).await;
            drop(permit);
        });
    }
}

/// The replicator's way to the fetcher (it runs on its own thread, outside the runtime).
pub(crate) struct BlockingFetch<P> {
    pub fetcher: Arc<Fetcher<P>>,
    pub handle: tokio::runtime::Handle,
}

impl<P: BlobPeers> super::replicate::ChunkFetch for BlockingFetch<P> {
    fn fetch(&self, ids: Vec<ChunkId>, progress: &indicatif::ProgressBar) -> usize {
        let (fetcher, bar) = (self.fetcher.clone(), progress.clone());
        self.handle
            .block_on(async move { fetcher.fetch_many(ids, Some(&bar)).await })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Peers in memory, each with its own blob store and a way to misbehave.

    use std::collections::HashMap;

    use cairn_store::Durability;

    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Behaviour {
        Honest,
        /// Serves every blob with one byte flipped.
        Corrupts,
        /// Serves this many blobs, then the connection drops for good.
        VanishesAfter(usize),
        Unreachable,
        /// Accepts requests and never answers (a paused process).
        Hangs,
    }

    pub struct MemPeer {
        pub store: Arc<BlobStore>,
        pub behaviour: Behaviour,
        /// Blobs this peer delivered (verified and stored on our side).
        pub served: AtomicU64,
        /// Requests it received.
        pub asked: AtomicU64,
    }

    pub struct MemPeers {
        pub local: Arc<BlobStore>,
        pub peers: Vec<(DeviceId, MemPeer)>,
        pub heard: Mutex<HashMap<DeviceId, u64>>,
    }

    impl MemPeers {
        pub fn new(local: Arc<BlobStore>) -> Self {
            Self {
                local,
                peers: Vec::new(),
                heard: Mutex::new(HashMap::new()),
            }
        }

        pub fn with(mut self, id: u8, store: Arc<BlobStore>, behaviour: Behaviour) -> Self {
            self.peers.push((
                DeviceId([id; 32]),
                MemPeer {
                    store,
                    behaviour,
                    served: AtomicU64::new(0),
                    asked: AtomicU64::new(0),
                },
            ));
            self
        }

        pub fn served_by(&self, id: u8) -> u64 {
            self.peer(DeviceId([id; 32]))
                .map(|p| p.served.load(Ordering::SeqCst))
                .unwrap_or(0)
        }

        fn peer(&self, d: DeviceId) -> Option<&MemPeer> {
            self.peers.iter().find(|(x, _)| *x == d).map(|(_, p)| p)
        }

        /// One blob from `peer`, checked against its id as iroh-blobs checks a stream, then
        /// stored the way real fetches store it.
        fn deliver(&self, p: &MemPeer, id: ChunkId) -> BlobOutcome {
            if let Behaviour::VanishesAfter(n) = p.behaviour
                && p.served.load(Ordering::SeqCst) >= n as u64
            {
                return Err("connection lost".into());
            }
            let mut bytes = p.store.get(&id).map_err(|e| e.to_string())?;
            if p.behaviour == Behaviour::Corrupts
                && let Some(b) = bytes.first_mut()
            {
                *b ^= 0x55;
            }
            if ChunkId::of(&bytes) != id {
                return Err(format!("blob {id}: data does not match its hash"));
            }
            self.local
                .put_verified(id, &bytes, Durability::Batch)
                .map_err(|e| e.to_string())?;
            p.served.fetch_add(1, Ordering::SeqCst);
            Ok(bytes.len() as u64)
        }
    }

    impl BlobPeers for MemPeers {
        fn sources(&self) -> Vec<DeviceId> {
            self.peers.iter().map(|(d, _)| *d).collect()
        }

        async fn fetch_one(&self, peer: DeviceId, id: ChunkId) -> BlobOutcome {
            let p = self.peer(peer).ok_or("not a peer")?;
            p.asked.fetch_add(1, Ordering::SeqCst);
            if p.behaviour == Behaviour::Unreachable {
                return Err("unreachable".into());
            }
            if p.behaviour == Behaviour::Hangs {
                std::future::pending::<()>().await;
            }
            self.deliver(p, id)
        }

        async fn fetch_many(
            &self,
            peer: DeviceId,
            ids: &[ChunkId],
        ) -> Result<Vec<(ChunkId, BlobOutcome)>, String> {
            let p = self.peer(peer).ok_or("not a peer")?;
            p.asked.fetch_add(1, Ordering::SeqCst);
            if p.behaviour == Behaviour::Unreachable {
                return Err("unreachable".into());
            }
            if p.behaviour == Behaviour::Hangs {
                std::future::pending::<()>().await;
            }
            let mut out = Vec::new();
            for id in ids {
                match self.deliver(p, *id) {
                    // Like a dropped stream: the request fails, what arrived is stored.
                    Err(e) if e == "connection lost" => return Err(e),
                    r => out.push((*id, r)),
                }
            }
            Ok(out)
        }

        fn heard_from(&self, peer: DeviceId) {
            *self.heard.lock().unwrap().entry(peer).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use cairn_store::Durability;

    use super::testing::{Behaviour, MemPeers};
    use super::*;

    fn store() -> (tempfile::TempDir, Arc<BlobStore>) {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(BlobStore::open(d.path().join("store")).unwrap());
        (d, s)
    }

    /// A peer store holding `n` distinct blobs; their ids.
    fn filled(store: &BlobStore, n: usize, seed: u8) -> Vec<ChunkId> {
        (0..n)
            .map(|i| {
                let bytes: Vec<u8> = (0..1000 + i).map(|j| (j as u8) ^ seed ^ i as u8).collect();
                store.put(&bytes, Durability::Batch).unwrap()
            })
            .collect()
    }

    fn fetcher(peers: MemPeers) -> Arc<Fetcher<MemPeers>> {
        let local = peers.local.clone();
        Arc::new(Fetcher::new(peers, local, Arc::new(AtomicBool::new(false))))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_peer_serving_bad_blobs_is_passed_over_for_one_that_has_them() {
        let (_a, liar) = store();
        let (_b, honest) = store();
        let (_c, local) = store();
        let ids = filled(&liar, 150, 1);
        assert_eq!(filled(&honest, 150, 1), ids);
        let f = fetcher(
            MemPeers::new(local.clone())
                .with(1, liar, Behaviour::Corrupts)
                .with(2, honest, Behaviour::Honest),
        );
        let missing = rt().block_on(f.fetch_many(ids.clone(), None));
        assert_eq!(missing, 0);
        for id in &ids {
            local.verify(id).unwrap();
        }
        assert_eq!(f.peers.served_by(1), 0, "nothing corrupted was stored");
        assert_eq!(f.peers.served_by(2), 150);
        assert_eq!(f.downloads().0, 0, "no fetch left counted as active");
        assert!(f.downloads().1 > 150 * 1000);
    }

    #[test]
    fn a_peer_vanishing_mid_batch_leaves_the_rest_to_the_next_without_refetching() {
        let (_a, flaky) = store();
        let (_b, steady) = store();
        let (_c, local) = store();
        // One batch, so the split between the peers is exact.
        let ids = filled(&flaky, 60, 2);
        filled(&steady, 60, 2);
        let f = fetcher(
            MemPeers::new(local.clone())
                .with(1, flaky, Behaviour::VanishesAfter(25))
                .with(2, steady, Behaviour::Honest),
        );
        assert_eq!(rt().block_on(f.fetch_many(ids.clone(), None)), 0);
        assert_eq!(f.peers.served_by(1), 25);
        assert_eq!(
            f.peers.served_by(2),
            35,
            "the second peer is asked only for the rest"
        );
        for id in &ids {
            local.verify(id).unwrap();
        }
    }

    #[test]
    fn blobs_no_peer_can_give_are_counted_missing_and_fetched_later() {
        let (_a, liar) = store();
        let (_b, gone) = store();
        let (_c, local) = store();
        let ids = filled(&liar, 10, 3);
        let f = fetcher(
            MemPeers::new(local.clone())
                .with(1, liar.clone(), Behaviour::Corrupts)
                .with(2, gone, Behaviour::Unreachable),
        );
        let rt = rt();
        assert_eq!(rt.block_on(f.fetch_many(ids.clone(), None)), 10);
        for id in &ids {
            assert!(!local.has(id).unwrap());
        }
        let one = rt.block_on(f.fetch_deduped(ids[0])).unwrap_err();
        assert!(one.contains("unreachable"), "{one}");
        assert!(f.claims().is_empty(), "failed fetches release their claims");
        // Once an honest peer appears, the same fetcher completes.
        let f2 = fetcher(MemPeers::new(local.clone()).with(3, liar, Behaviour::Honest));
        assert_eq!(rt.block_on(f2.fetch_many(ids, None)), 0);
        assert!(
            f.peers.heard.lock().unwrap().is_empty(),
            "no one who failed counts as heard from"
        );
    }

    #[test]
    fn one_blob_wanted_by_many_readers_is_fetched_once() {
        let (_a, peer) = store();
        let (_c, local) = store();
        let ids = filled(&peer, 1, 4);
        let f = fetcher(MemPeers::new(local.clone()).with(1, peer, Behaviour::Honest));
        let rt = rt();
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..16 {
                let f = f.clone();
                let id = ids[0];
                set.spawn(async move { f.fetch_deduped(id).await });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
        });
        assert_eq!(f.peers.served_by(1), 1);
        assert!(local.has(&ids[0]).unwrap());
    }

    #[test]
    fn a_peer_that_stops_answering_costs_one_timeout_then_the_next_is_asked() {
        let (_a, paused) = store();
        let (_b, honest) = store();
        let (_c, local) = store();
        let ids = filled(&paused, 2, 5);
        filled(&honest, 2, 5);
        let peers = MemPeers::new(local.clone())
            .with(1, paused.clone(), Behaviour::Hangs)
            .with(2, honest, Behaviour::Honest);
        let f = Arc::new(
            Fetcher::new(peers, local.clone(), Arc::new(AtomicBool::new(false)))
                .with_timeout(Duration::from_millis(200)),
        );
        let rt = rt();
        rt.block_on(f.fetch_deduped(ids[0])).unwrap();
        local.verify(&ids[0]).unwrap();
        assert_eq!(f.peers.served_by(2), 1);
        assert_eq!(f.peers.served_by(1), 0);

        // Only the paused peer has it: the fetch fails instead of hanging, and a second
        // reader of the same blob shares that failure instead of asking the peer again.
        let (_d, local2) = store();
        let alone = MemPeers::new(local2.clone()).with(1, paused, Behaviour::Hangs);
        let f = Arc::new(
            Fetcher::new(alone, local2.clone(), Arc::new(AtomicBool::new(false)))
                .with_timeout(Duration::from_millis(200)),
        );
        let (first, second) = rt.block_on(async {
            let (f1, f2) = (f.clone(), f.clone());
            let id = ids[1];
            let a = tokio::spawn(async move { f1.fetch_deduped(id).await });
            // The second reader starts once the first holds the claim.
            while !f.claims().contains(&id) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let b = tokio::spawn(async move { f2.fetch_deduped(id).await });
            (a.await.unwrap(), b.await.unwrap())
        });
        let first = first.unwrap_err();
        assert!(first.contains("timed out"), "{first}");
        let second = second.unwrap_err();
        assert!(second.contains("already under way"), "{second}");
        // A retry right away (the kernel re-reading a failed read-ahead) fails at once.
        let again = rt.block_on(f.fetch_deduped(ids[1])).unwrap_err();
        assert!(again.contains("asked again"), "{again}");
        let asked = f.peers.peers[0].1.asked.load(Ordering::SeqCst);
        assert_eq!(asked, 1, "the paused peer was asked again");
        assert!(!local2.has(&ids[1]).unwrap());
        assert!(f.claims().is_empty());
    }
}
