//! The replicator: makes the vault complete on this device.
//!
//! Woken by merges (they bring chunks we lack) and by local publishes (they bring chunks
//! peers will ask for), it walks what changed since it last caught up, fetches every chunk
//! the current state references that is not local. A walk
//! that could not finish (a peer was unreachable, a chunk list not fetched yet) is repeated
//! every [`RETRY_EVERY`] until it does; lists are flushed in bounded batches so a huge vault
//! never builds a huge list. On a terminal it draws a progress bar (indicatif hides itself
//! otherwise, so a service's log stays clean).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use cairn_store::{ChunkId, StoreError};
use cairn_tree::{DiffEntry, NodeId};
use cairn_vault::{Content, EntryKind, VaultError, VaultStores, manifest_of};

use super::RETRY_EVERY;
use crate::faults::FaultKind;
use crate::ondemand::SyncMode;
use crate::open_vault::OpenVault;

/// Chunks gathered before they are fetched (or indexed) as one batch.
const WALK_BATCH: usize = 4096;

/// How the replicator gets chunks; blocking, called from its own thread.
pub(crate) trait ChunkFetch: Send + Sync {
    /// Fetches `ids` into the local store, counting arrivals on `progress`; how many are
    /// still missing afterwards.
    fn fetch(&self, ids: Vec<ChunkId>, progress: &indicatif::ProgressBar) -> usize;
}

pub(crate) struct Replicator {
    vault: Arc<OpenVault>,
    fetch: Arc<dyn ChunkFetch>,
    /// The root whose every wanted chunk is local.
    caught_up: NodeId,
    /// The pins and mode `caught_up` was reached under: when they change, what is wanted
    /// changes everywhere, so the next walk starts from the empty tree.
    wanted_generation: u64,
}

fn progress_bar() -> indicatif::ProgressBar {
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

impl Replicator {
    pub fn new(vault: Arc<OpenVault>, fetch: Arc<dyn ChunkFetch>) -> Self {
        Self {
            vault,
            fetch,
            caught_up: VaultStores::empty_root(),
            wanted_generation: 0,
        }
    }

    /// Walks when woken, and on a timer only while the last walk left something missing.
    pub fn run(mut self, wake: Receiver<()>, stop: &AtomicBool) {
        let mut incomplete = true;
        loop {
            match wake.recv_timeout(RETRY_EVERY) {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) if incomplete => {}
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match self.pass(stop) {
                Some(complete) => incomplete = !complete,
                None => return,
            }
        }
    }

    /// One walk from the last caught-up root to the current one: whether every chunk is now
    /// local (`None` when stopped midway).
    pub fn pass(&mut self, stop: &AtomicBool) -> Option<bool> {
        let (stores, root) = {
            let v = self.vault.engine();
            (v.stores().clone(), v.root())
        };
        let generation = self.vault.ondemand.generation();
        if generation != self.wanted_generation {
            self.caught_up = VaultStores::empty_root();
        }
        if root == self.caught_up {
            return Some(true);
        }
        let mut missing = Vec::new();
        let mut complete = true;
        let bar = progress_bar();
        let fetch = |ids: Vec<ChunkId>| {
            bar.inc_length(ids.len() as u64);
            self.fetch.fetch(ids, &bar) == 0
        };
        for d in stores.tree.diff(&self.caught_up, &root) {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            let (key, value) = match d {
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
            let Ok(entry) = cairn_vault::decode_value(&key, &value) else {
                continue;
            };
            if entry.kind != EntryKind::File || matches!(entry.content, Content::Inline(_)) {
                continue;
            }
            // An on-demand device fetches nothing of what is not pinned (not even chunk
            // lists); what it holds of such files, it still serves.
            let wanted = self
                .vault
                .ondemand
                .wants(String::from_utf8_lossy(&key).as_ref());
            if !wanted {
                continue;
            }
            match manifest_of(stores.blobs.as_ref(), &entry.content) {
                Ok(Some(m)) => {
                    for id in m.chunks().iter().map(|c| c.id) {
                        if !self.vault.blobs.has(&id).unwrap_or(false) {
                            missing.push(id);
                        }
                    }
                }
                Ok(None) => {}
                // A chunk list that arrived intact but makes no sense never will: waiting
                // for it would re-walk the vault every RETRY_EVERY forever. The file's reads
                // fail on their own; the sender is named once here.
                Err(e) if is_malformed(&e) => {
                    let (device, why) = self.vault.faults.blame(&entry);
                    self.vault.faults.report(
                        device,
                        FaultKind::BadFile,
                        format!(
                            "{}: {e} (device {} {why})",
                            String::from_utf8_lossy(&key),
                            device.short()
                        ),
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, "chunk list not available yet");
                    complete = false;
                }
            }
            if missing.len() >= WALK_BATCH && !fetch(std::mem::take(&mut missing)) {
                complete = false;
            }
        }
        if !missing.is_empty() && !fetch(missing) {
            complete = false;
        }
        if bar.length().unwrap_or(0) > 0 {
            bar.finish_with_message(if complete {
                match self.vault.ondemand.mode() {
                    SyncMode::Full => "vault complete on this device",
                    SyncMode::OnDemand => "pinned content complete on this device",
                }
            } else {
                "some chunks could not be fetched yet; retrying"
            });
        }
        if let Err(e) = self.vault.blobs.sync() {
            tracing::warn!(error = %e, "cannot sync fetched blobs");
            complete = false;
        }
        if complete {
            self.caught_up = root;
            self.wanted_generation = generation;
        }
        Some(complete)
    }
}

/// Whether a chunk list failed for a reason refetching cannot fix: it was delivered (its
/// id verified) but does not decrypt with the entry's key or does not decode.
fn is_malformed(e: &VaultError) -> bool {
    matches!(
        e,
        VaultError::Store(
            StoreError::InvalidManifest { .. }
                | StoreError::Decrypt { .. }
                | StoreError::Truncated { .. }
                | StoreError::UnsupportedFormat { .. }
                | StoreError::LengthMismatch { .. }
        )
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::fetch::BlockingFetch;
    use super::super::fetch::testing::Behaviour;
    use super::super::sync::SyncWorker;
    use super::super::testkit::{NOW, Pair, noise};
    use super::*;
    use crate::publisher::Publisher;

    /// The replicator's fetch, swappable mid-test (peers come and go), counting index calls.
    struct Swap {
        inner: Mutex<Arc<dyn ChunkFetch>>,
    }

    impl ChunkFetch for Swap {
        fn fetch(&self, ids: Vec<ChunkId>, progress: &indicatif::ProgressBar) -> usize {
            let f = self.inner.lock().unwrap().clone();
            f.fetch(ids, progress)
        }
    }

    fn blocking(pair: &Pair, peers: &[Behaviour]) -> Arc<dyn ChunkFetch> {
        Arc::new(BlockingFetch {
            fetcher: pair.fetcher_on_b(peers),
            handle: pair.rt.handle().clone(),
        })
    }

    /// A has a few large files, B merged A's snapshot (metadata only): B's chunks of them.
    fn merged_pair() -> (Pair, Vec<ChunkId>) {
        let pair = Pair::new();
        let mut last = None;
        for i in 0..3 {
            last = Some(pair.write_on_a(&format!("big{i}"), &noise(700_000, i), NOW + i));
        }
        pair.deliver_to_b(&last.unwrap());
        // Only the tree and headers cross here: the merge reads no file content.
        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Honest]));
        let publisher = Arc::new(Publisher::new(pair.b.clone(), None));
        let members = cairn_net::Members::new(pair.b.registry.members(&pair.b.vault_id).unwrap());
        let mut sync = SyncWorker::new(publisher, members, || {});
        assert_eq!(sync.pass(&AtomicBool::new(false)).merged, 1);
        let chunks: Vec<ChunkId> = {
            let engine = pair.b.engine();
            (0..3)
                .flat_map(|i| {
                    let p = cairn_vault::VaultPath::new(&format!("big{i}")).unwrap();
                    let (_, e) = engine.lookup(&p).unwrap().unwrap();
                    manifest_of(pair.b.stores.blobs.as_ref(), &e.content)
                        .unwrap()
                        .unwrap()
                        .chunks()
                        .iter()
                        .map(|c| c.id)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        pair.b.remote_blobs.set_remote(None);
        (pair, chunks)
    }

    #[test]
    fn every_chunk_of_a_merged_snapshot_becomes_local() {
        let (pair, chunks) = merged_pair();
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|c| !pair.b.blobs.has(c).unwrap()));
        let mut r = Replicator::new(pair.b.clone(), blocking(&pair, &[Behaviour::Honest]));
        assert_eq!(r.pass(&AtomicBool::new(false)), Some(true));
        for c in &chunks {
            pair.b.blobs.verify(c).unwrap();
        }
        for i in 0..3 {
            assert_eq!(pair.read_on_b(&format!("big{i}")), Some(noise(700_000, i)));
        }
        // Caught up: the next pass has nothing to walk.
        assert_eq!(r.pass(&AtomicBool::new(false)), Some(true));
    }

    #[test]
    fn a_pass_cut_short_by_a_vanishing_peer_is_finished_by_the_next() {
        let (pair, chunks) = merged_pair();
        let swap = Arc::new(Swap {
            inner: Mutex::new(blocking(
                &pair,
                &[Behaviour::VanishesAfter(5), Behaviour::Corrupts],
            )),
        });
        let mut r = Replicator::new(pair.b.clone(), swap.clone());
        assert_eq!(r.pass(&AtomicBool::new(false)), Some(false));
        let local = chunks
            .iter()
            .filter(|c| pair.b.blobs.has(c).unwrap())
            .count();
        assert_eq!(local, 5, "what the vanished peer sent is kept");
        *swap.inner.lock().unwrap() = blocking(&pair, &[Behaviour::Honest]);
        assert_eq!(r.pass(&AtomicBool::new(false)), Some(true));
        for c in &chunks {
            pair.b.blobs.verify(c).unwrap();
        }
    }

    #[test]
    fn a_stop_request_ends_the_walk() {
        let (pair, _) = merged_pair();
        let mut r = Replicator::new(pair.b.clone(), blocking(&pair, &[Behaviour::Honest]));
        assert_eq!(r.pass(&AtomicBool::new(true)), None);
    }
}
