//! The sync worker: merges every member's newest snapshot into the engine.
//!
//! It runs on its own thread because it blocks on the engine lock and on fetches. For each
//! member whose registry head it has not merged yet it loads the snapshot (header, parents
//! and the tree nodes on the differing paths come from peers on demand, through the stores'
//! remote fallback, *before* the engine lock is taken so local writes never wait for a slow
//! peer), merges it, publishes the result and shows it in the mount. A head that cannot be
//! merged yet (a peer went away mid-fetch, served bad data, or the registry got ahead of the
//! blobs) is retried at the next pass; one that merged is not looked at again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use anyhow::{Context, Result};
use cairn_crypto::DeviceId;
use cairn_net::Members;
use cairn_registry::Payload;
use cairn_vault::{SnapshotId, load_snapshot};

use super::RETRY_EVERY;
use crate::open_vault::now_ms;
use crate::publisher::Publisher;

/// What one pass did.
#[derive(Debug, Default)]
pub(crate) struct SyncPass {
    /// Heads merged (including ones that changed nothing).
    pub merged: usize,
    /// Heads that could not be merged yet, with why.
    pub failed: Vec<(DeviceId, String)>,
}

pub(crate) struct SyncWorker {
    publisher: Arc<Publisher>,
    members: Members,
    /// Per device: the last head merged.
    merged: HashMap<DeviceId, Payload>,
    /// Called after a merge changed the engine's state (it brings chunks we may lack).
    on_change: Box<dyn Fn() + Send>,
}

impl SyncWorker {
    pub fn new(
        publisher: Arc<Publisher>,
        members: Members,
        on_change: impl Fn() + Send + 'static,
    ) -> Self {
        Self {
            publisher,
            members,
            merged: HashMap::new(),
            on_change: Box::new(on_change),
        }
    }

    /// Passes on every wake-up, and every [`RETRY_EVERY`] anyway, until `stop`.
    pub fn run(mut self, wake: Receiver<()>, stop: &AtomicBool) {
        loop {
            match wake.recv_timeout(RETRY_EVERY) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            for (device, error) in self.pass(stop).failed {
                tracing::warn!(device = %device.short(), %error, "cannot merge a peer snapshot yet; will retry");
            }
        }
    }

    /// Merges each member's registry head not merged yet.
    pub fn pass(&mut self, stop: &AtomicBool) -> SyncPass {
        let mut out = SyncPass::default();
        let vault = self.publisher.vault.clone();
        let heads = match vault.registry.list(&vault.vault_id) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot list registry heads");
                return out;
            }
        };
        for head in heads {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if head.device == vault.device_id
                || !self.members.contains(&head.device)
                || self.merged.get(&head.device) == Some(&head.payload)
            {
                continue;
            }
            let id = SnapshotId::from(head.payload);
            match self.merge(id) {
                Ok(()) => {
                    self.merged.insert(head.device, head.payload);
                    out.merged += 1;
                }
                Err(e) => out
                    .failed
                    .push((head.device, format!("snapshot {id}: {e:#}"))),
            }
        }
        out
    }

    fn merge(&self, id: SnapshotId) -> Result<()> {
        let vault = &self.publisher.vault;
        let (stores, keys, our_root) = {
            let v = vault.engine();
            (v.stores().clone(), v.keys().clone(), v.root())
        };
        // Everything that may need the network happens before taking the engine lock: the
        // header, its parents' headers, and the tree nodes on the differing paths (a diff
        // walk reads exactly those).
        let snap = load_snapshot(&stores, &keys, id).context("loading the snapshot")?;
        for p in &snap.header.parents {
            if !vault.blobs.has(&p.0).unwrap_or(false) {
                // Fetched through the stores' remote fallback; a parent that cannot be had
                // is not needed for the merge itself.
                let _ = stores.blobs.get(&p.0);
            }
        }
        for d in stores.tree.diff(&our_root, &snap.header.root) {
            d.context("reading the peer's tree")?;
        }
        let mut engine = vault.engine();
        let before = engine.root();
        let report = engine.receive(id).context("merging")?;
        if engine.root() != before {
            tracing::info!(snapshot = %id, conflicts = report.conflicts.len(), "merged a peer snapshot");
            self.publisher
                .publish(&mut engine, now_ms())
                .context("publishing the merged state")?;
            self.publisher.show(&engine, Some(before));
            drop(engine);
            (self.on_change)();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::super::fetch::testing::Behaviour;
    use super::super::testkit::{NOW, Pair, noise};
    use super::*;

    fn worker(pair: &Pair) -> (SyncWorker, Arc<AtomicUsize>) {
        let changes = Arc::new(AtomicUsize::new(0));
        let c = changes.clone();
        let members = Members::new(pair.b.registry.members(&pair.b.vault_id).unwrap());
        let publisher = Arc::new(Publisher::new(pair.b.clone(), None));
        let w = SyncWorker::new(publisher, members, move || {
            c.fetch_add(1, Ordering::SeqCst);
        });
        (w, changes)
    }

    /// Not stopping.
    fn go() -> AtomicBool {
        AtomicBool::new(false)
    }

    #[test]
    fn a_peer_snapshot_is_merged_and_published_once_its_entry_arrives() {
        let pair = Pair::new();
        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Honest]));
        let (mut w, changes) = worker(&pair);
        // The registry lags: A wrote, but B has not heard yet.
        let e1 = pair.write_on_a("notes.txt", b"first", NOW);
        let p = w.pass(&go());
        assert_eq!((p.merged, p.failed.len()), (0, 0));
        assert_eq!(pair.read_on_b("notes.txt"), None);

        pair.deliver_to_b(&e1);
        let p = w.pass(&go());
        assert_eq!((p.merged, p.failed.len()), (1, 0), "{:?}", p.failed);
        assert_eq!(pair.read_on_b("notes.txt").as_deref(), Some(&b"first"[..]));
        assert_eq!(changes.load(Ordering::SeqCst), 1);
        let b_head = pair
            .b
            .registry
            .get(&pair.b.vault_id, &pair.b.device_id)
            .unwrap();
        assert!(b_head.is_some(), "B published the merged state");
        // The same head is not merged twice.
        assert_eq!(w.pass(&go()).merged, 0);

        // A newer head of A replaces the old one only when B's registry has it.
        let e2 = pair.write_on_a("notes.txt", b"second", NOW + 1_000);
        assert_eq!(w.pass(&go()).merged, 0);
        pair.deliver_to_b(&e2);
        assert_eq!(w.pass(&go()).merged, 1);
        assert_eq!(pair.read_on_b("notes.txt").as_deref(), Some(&b"second"[..]));
    }

    #[test]
    fn a_snapshot_only_a_lying_peer_serves_is_retried_until_an_honest_one_does() {
        let pair = Pair::new();
        // Enough entries that the tree has nodes to fetch, not just an inline root.
        let mut last = None;
        for i in 0..300 {
            last = Some(pair.write_on_a(&format!("f{i:03}"), &noise(200, i), NOW + i));
        }
        pair.deliver_to_b(&last.unwrap());
        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Corrupts, Behaviour::Unreachable]));
        let (mut w, changes) = worker(&pair);
        let p = w.pass(&go());
        assert_eq!(p.merged, 0);
        assert_eq!(p.failed.len(), 1, "{p:?}");
        assert_eq!(
            p.failed[0].0, pair.a.device_id,
            "the failure names the device"
        );
        assert_eq!(pair.read_on_b("f000"), None);
        assert_eq!(changes.load(Ordering::SeqCst), 0);

        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Corrupts, Behaviour::Honest]));
        let p = w.pass(&go());
        assert_eq!((p.merged, p.failed.len()), (1, 0), "{:?}", p.failed);
        for i in [0u64, 150, 299] {
            assert_eq!(pair.read_on_b(&format!("f{i:03}")), Some(noise(200, i)));
        }
    }

    #[test]
    fn a_peer_vanishing_mid_fetch_leaves_the_merge_for_later_not_half_done() {
        let pair = Pair::new();
        let mut last = None;
        for i in 0..300 {
            last = Some(pair.write_on_a(&format!("v{i:03}"), &noise(100, i), NOW + i));
        }
        pair.deliver_to_b(&last.unwrap());
        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::VanishesAfter(2)]));
        let (mut w, _) = worker(&pair);
        let p = w.pass(&go());
        assert_eq!(p.merged, 0, "{p:?}");
        assert_eq!(p.failed.len(), 1);
        assert_eq!(pair.read_on_b("v000"), None);

        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Honest]));
        assert_eq!(w.pass(&go()).merged, 1);
        assert_eq!(pair.read_on_b("v299"), Some(noise(100, 299)));
    }

    #[test]
    fn heads_of_devices_that_are_not_members_are_left_alone() {
        let pair = Pair::new();
        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Honest]));
        let e = pair.write_on_a("x", b"x", NOW);
        pair.deliver_to_b(&e);
        let (mut w, _) = worker(&pair);
        w.members.remove(&pair.a.device_id);
        assert_eq!(w.pass(&go()).merged, 0);
        assert_eq!(pair.read_on_b("x"), None);
    }
}
