//! The sync worker: merges every member's newest snapshot into the engine.
//!
//! It runs on its own thread because it blocks on the engine lock and on fetches. For each
//! member whose registry head it has not merged yet it loads the snapshot (header, parents
//! and the tree nodes on the differing paths come from peers on demand, through the stores'
//! remote fallback, *before* the engine lock is taken so local writes never wait for a slow
//! peer), merges it, publishes the result and shows it in the mount. A head that cannot be
//! merged yet (a peer went away mid-fetch, served bad data, or the registry got ahead of the
//! blobs) is retried at the next pass; one that merged is not looked at again.
//!
//! A head is only merged if its snapshot header names the device that signed the registry
//! entry: a member announcing someone else's snapshot as its own is refused, reported as
//! misbehaving, and not retried until it announces another snapshot. Each file version a
//! merge brings is noted as coming from the signer, so a bad file read later through the
//! mount names the device that sent it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use anyhow::{Context, Result};
use cairn_crypto::DeviceId;
use cairn_net::Members;
use cairn_registry::Payload;
use cairn_tree::DiffEntry;
use cairn_vault::{EntryKind, SnapshotId, VaultError, load_announced};

use super::RETRY_EVERY;
use crate::faults::FaultKind;
use crate::open_vault::now_ms;
use crate::publisher::Publisher;

/// What one pass did.
#[derive(Debug, Default)]
pub(crate) struct SyncPass {
    /// Heads merged (including ones that changed nothing).
    pub merged: usize,
    /// Heads that could not be merged yet, with why.
    pub failed: Vec<(DeviceId, String)>,
    /// Heads refused for good (until the device announces another snapshot), with why.
    pub refused: Vec<(DeviceId, String)>,
}

pub(crate) struct SyncWorker {
    publisher: Arc<Publisher>,
    members: Members,
    /// Per device: the last head merged.
    merged: HashMap<DeviceId, Payload>,
    /// Per device: a head refused for good (its header names another device).
    refused: HashMap<DeviceId, Payload>,
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
            refused: HashMap::new(),
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
            // Refusals were reported (and logged) as faults of their device when they happened.
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
                || self.refused.get(&head.device) == Some(&head.payload)
            {
                continue;
            }
            let id = SnapshotId::from(head.payload);
            match self.merge(head.device, id) {
                Ok(()) => {
                    self.merged.insert(head.device, head.payload);
                    out.merged += 1;
                }
                Err(e) => match e.downcast_ref::<VaultError>() {
                    Some(foreign @ VaultError::ForeignSnapshot { .. }) => {
                        vault.faults.report(
                            head.device,
                            FaultKind::ForeignSnapshot,
                            format!("revision {}: {foreign}", head.revision),
                        );
                        self.refused.insert(head.device, head.payload);
                        out.refused.push((head.device, foreign.to_string()));
                    }
                    _ => out
                        .failed
                        .push((head.device, format!("snapshot {id}: {e:#}"))),
                },
            }
        }
        out
    }

    /// Merges the snapshot `id` that `signer`'s registry entry points to. A header naming
    /// another device fails with [`VaultError::ForeignSnapshot`] (not wrapped in context, so
    /// the caller can tell it from a retryable failure).
    fn merge(&self, signer: DeviceId, id: SnapshotId) -> Result<()> {
        let vault = &self.publisher.vault;
        let (stores, keys, our_root) = {
            let v = vault.engine();
            (v.stores().clone(), v.keys().clone(), v.root())
        };
        // Everything that may need the network happens before taking the engine lock: the
        // header, its parents' headers, and the tree nodes on the differing paths (a diff
        // walk reads exactly those).
        let snap = match load_announced(&stores, &keys, id, signer) {
            Err(e @ VaultError::ForeignSnapshot { .. }) => return Err(e.into()),
            other => other.context("loading the snapshot")?,
        };
        for p in &snap.header.parents {
            if !vault.blobs.has(&p.0).unwrap_or(false) {
                // Fetched through the stores' remote fallback; a parent that cannot be had
                // is not needed for the merge itself.
                let _ = stores.blobs.get(&p.0);
            }
        }
        for d in stores.tree.diff(&our_root, &snap.header.root) {
            // File versions the peer has and we do not: remember who sent them.
            if let DiffEntry::Added { key, value }
            | DiffEntry::Changed {
                key, new: value, ..
            } = d.context("reading the peer's tree")?
                && let Ok(entry) = cairn_vault::decode_value(&key, &value)
                && entry.kind == EntryKind::File
            {
                vault.faults.note_origin(&entry, signer);
            }
        }
        let mut engine = vault.engine();
        let before = engine.root();
        let report = match engine.receive_from(signer, id) {
            Err(e @ VaultError::ForeignSnapshot { .. }) => return Err(e.into()),
            other => other.context("merging")?,
        };
        if engine.root() != before {
            tracing::info!(snapshot = %id, conflicts = report.conflicts.len(), "merged a peer snapshot");
            self.publisher.guard_after(&engine, before);
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
    fn a_head_whose_header_names_another_device_is_refused_and_reported() {
        let pair = Pair::new();
        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Honest]));
        let honest = pair.write_on_a("honest.txt", b"from A", NOW);
        // A signs an entry pointing at a header that names B (say, B's own old snapshot).
        let header = {
            let engine = pair.a.engine();
            cairn_vault::SnapshotHeader {
                vault: pair.a.vault_id,
                root: engine.root(),
                parents: vec![SnapshotId::from(honest.payload)],
                device: pair.b.device_id,
                clock: engine.clock(),
                seq: 9,
                created_ms: NOW,
            }
        };
        let id = {
            let engine = pair.a.engine();
            cairn_vault::write_snapshot(engine.stores(), engine.keys(), &header).unwrap()
        };
        let forged = cairn_registry::RegistryEntry::sign(
            &pair.a.key,
            pair.a.vault_id,
            cairn_registry::Revision(honest.revision.0 + 1),
            Payload::from(id),
        );
        // B received it. A's own registry moves past that revision (with its honest head
        // again), so A's next publish is newer than what B holds.
        let skip = cairn_registry::RegistryEntry::sign(
            &pair.a.key,
            pair.a.vault_id,
            forged.revision,
            honest.payload,
        );
        pair.a.registry.put(&pair.a.vault_id, &skip).unwrap();
        pair.deliver_to_b(&forged);
        let (mut w, changes) = worker(&pair);
        let p = w.pass(&go());
        assert_eq!((p.merged, p.failed.len()), (0, 0), "{p:?}");
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].0, pair.a.device_id, "the signer is named");
        assert!(p.refused[0].1.contains(&pair.a.device_id.to_string()));
        assert_eq!(
            pair.read_on_b("honest.txt"),
            None,
            "nothing of it was merged"
        );
        assert_eq!(changes.load(Ordering::SeqCst), 0);
        assert!(
            pair.b
                .faults
                .has(pair.a.device_id, FaultKind::ForeignSnapshot)
        );
        // Refused for good: not retried (or reported again) until A announces another head.
        let p = w.pass(&go());
        assert_eq!((p.merged, p.failed.len(), p.refused.len()), (0, 0, 0));
        let next = pair.write_on_a("later.txt", b"honest again", NOW + 1_000);
        pair.deliver_to_b(&next);
        assert_eq!(w.pass(&go()).merged, 1);
        assert_eq!(
            pair.read_on_b("later.txt").as_deref(),
            Some(&b"honest again"[..])
        );
    }

    #[test]
    fn merged_file_versions_are_attributed_to_the_signer() {
        let pair = Pair::new();
        pair.connect_b(&pair.fetcher_on_b(&[Behaviour::Honest]));
        let e = pair.write_on_a("big.bin", &noise(200_000, 3), NOW);
        pair.deliver_to_b(&e);
        let (mut w, _) = worker(&pair);
        assert_eq!(w.pass(&go()).merged, 1);
        let entry = {
            let engine = pair.b.engine();
            engine
                .lookup(&cairn_vault::VaultPath::new("big.bin").unwrap())
                .unwrap()
                .unwrap()
                .1
        };
        assert_eq!(pair.b.faults.origin(&entry), Some(pair.a.device_id));
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
