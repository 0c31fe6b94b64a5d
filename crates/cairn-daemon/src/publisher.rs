//! The one place that knows what must follow a change of the engine's state: the mount's base
//! shows the new state, the kernel forgets what it cached for changed paths, and a new
//! snapshot is announced to connected peers. Both writers of the engine go through it: the
//! mount's flush (local edits) and the network's sync worker (merged peer snapshots).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use cairn_fuse::Invalidator;
use cairn_registry::RegistryEntry;
use cairn_tree::{DiffEntry, NodeId};
use cairn_vault::guard::{GuardPolicy, HeldEntry, approve_changes, reject_changes};
use cairn_vault::{Change, EntryKey, PublishReport, Vault, VaultPath};

use super::base::VaultBase;
use super::sink::view_with_held;
use crate::guard::Guard;
use crate::open_vault::{OpenVault, now_ms};

/// Beyond this many changed paths one "drop everything" is cheaper than one notification
/// per path.
const INVALIDATE_ALL_OVER: usize = 2_000;

type Announce = Arc<dyn Fn(RegistryEntry) + Send + Sync>;

pub struct Publisher {
    pub vault: Arc<OpenVault>,
    base: Option<Arc<VaultBase>>,
    invalidator: Mutex<Option<Invalidator>>,
    announce: RwLock<Option<Announce>>,
    /// Paths a merged peer snapshot changed while the mount held unflushed local edits of
    /// them: those edits were made on top of the content the peer replaced, so the flush
    /// keeps them as conflict copies instead of silently overwriting the peer's version.
    peer_touched: Mutex<HashSet<String>>,
    /// Mass deletions held on this device (shown in the mount until decided).
    pub guard: Guard,
}

/// Beyond this many remembered peer changes the set is dropped (memory stays bounded; the
/// rare edit racing one of them is then resolved by version order alone).
const PEER_TOUCHED_MAX: usize = 100_000;

impl Publisher {
    #[cfg(test)]
    pub fn new(vault: Arc<OpenVault>, base: Option<Arc<VaultBase>>) -> Self {
        Self::with_policy(vault, base, GuardPolicy::default())
    }

    /// A publisher whose mass-delete guard holds deletions beyond `policy`.
    pub fn with_policy(
        vault: Arc<OpenVault>,
        base: Option<Arc<VaultBase>>,
        policy: GuardPolicy,
    ) -> Self {
        let guard = Guard::open(&vault.dir, policy);
        Self {
            vault,
            base,
            invalidator: Mutex::new(None),
            announce: RwLock::new(None),
            peer_touched: Mutex::new(HashSet::new()),
            guard,
        }
    }

    /// Runs the mass-delete guard over a change of the engine's state from `before` (see
    /// [`Guard::observe`]); returns the paths it newly holds, which the caller invalidates in
    /// the kernel once the mount shows them again. Called before the change is published, so
    /// a hold is on disk before any device can see the deletion.
    pub fn guard_after(&self, vault: &Vault, before: NodeId) -> Vec<String> {
        match self.guard.observe(vault, before, now_ms()) {
            Ok(o) => o.held,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "mass-delete guard failed; nothing new is held");
                Vec::new()
            }
        }
    }

    /// Brings back the held directories above `p` that the engine has deleted, so a file
    /// created or edited inside a held directory can be committed there (the edit wins over
    /// the held deletion, as it does over any deletion). The directories then leave the hold.
    pub fn revive_held_parents(&self, vault: &mut Vault, p: &VaultPath, now: u64) {
        let held = self.guard.overrides();
        if held.is_empty() {
            return;
        }
        let mut missing: Vec<(VaultPath, cairn_vault::Entry)> = Vec::new();
        let mut above: Vec<VaultPath> = p.ancestors().filter(|a| !a.is_root()).collect();
        above.reverse();
        for a in above {
            if matches!(vault.lookup(&a), Ok(Some(_))) {
                break;
            }
            match held.get(&a.dir_key()) {
                Some(e) => missing.push((a.clone(), e.clone())),
                None => return,
            }
        }
        let changes: Vec<(VaultPath, Change)> = missing
            .into_iter()
            .rev()
            .map(|(a, e)| {
                let attrs = cairn_vault::Attrs {
                    mode: e.mode,
                    mtime_ns: e.mtime_ns,
                    xattrs: e.xattrs,
                };
                (a, Change::Mkdir { attrs })
            })
            .collect();
        if !changes.is_empty()
            && let Err(e) = vault.commit(changes, now)
        {
            tracing::warn!(path = %p.as_str(), error = %e, "cannot bring back the held directories above a new file");
        }
    }

    /// Approves (deletes everywhere) or rejects (restores everywhere) held deletion `id`, or
    /// every held deletion. Returns the number of paths decided.
    pub fn decide(&self, id: Option<u64>, approve: bool) -> anyhow::Result<usize> {
        let mut engine = self.vault.engine();
        let before = engine.root();
        // Paths restored or decided elsewhere meanwhile are not decided again.
        self.guard.observe(&engine, before, now_ms())?;
        let records = self.guard.records(id)?;
        let entries: Vec<HeldEntry> = records.into_iter().flat_map(|r| r.entries).collect();
        let changes = if approve {
            approve_changes(&entries)
        } else {
            reject_changes(&entries)
        };
        let n = changes.len();
        let now = now_ms();
        if engine.commit(changes.clone(), now).is_err() {
            // One refused path (say, a live file now inside a held directory) must not keep
            // the others undecided: each goes alone, and what is refused stays held.
            for (p, c) in changes {
                commit_alone(&mut engine, p, c, now);
            }
        }
        self.guard_after(&engine, before);
        if engine.root() != before {
            self.publish(&mut engine, now)?;
        }
        self.show(&engine, Some(before));
        Ok(n)
    }

    pub fn set_invalidator(&self, inv: Option<Invalidator>) {
        *self.invalidator.lock().unwrap_or_else(|e| e.into_inner()) = inv;
    }

    pub fn set_announcer(&self, f: Option<Announce>) {
        *self.announce.write().unwrap_or_else(|e| e.into_inner()) = f;
    }

    /// Makes every blob written so far durable, publishes the engine's state, and tells
    /// peers. The caller holds the engine lock.
    pub fn publish(&self, vault: &mut Vault, now_ms: u64) -> anyhow::Result<PublishReport> {
        let report = super::sink::publish(&self.vault, vault, now_ms)?;
        let announce = self
            .announce
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(announce) = announce {
            match self
                .vault
                .registry
                .get(&self.vault.vault_id, &self.vault.device_id)
            {
                Ok(Some(entry)) => announce(entry),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read back the published entry"),
            }
        }
        Ok(report)
    }

    fn invalidator(&self) -> Option<Invalidator> {
        self.invalidator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes the set of paths peers changed since the last call (see `peer_touched`).
    pub fn take_peer_touched(&self) -> HashSet<String> {
        std::mem::take(&mut *self.peer_touched.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Drops the kernel's caches for these paths (content the mount showed changed under it).
    pub fn invalidate(&self, paths: &[String]) {
        if let Some(inv) = self.invalidator() {
            inv.base_changed(paths);
        }
    }

    /// Shows the engine's current state in the mount. With `changed_from`, the kernel's
    /// caches for every path that differs from that older root are dropped too (changes
    /// that did not come through the mount itself).
    pub fn show(&self, vault: &Vault, changed_from: Option<NodeId>) {
        let Some(base) = &self.base else {
            return;
        };
        base.set_view(view_with_held(vault.source(), self.guard.overrides()));
        base.set_note(self.guard.note());
        let Some(old) = changed_from else {
            return;
        };
        let new = vault.root();
        // Without a live mount there are no kernel caches and no unflushed edits to compare.
        let Some(inv) = self.invalidator() else {
            return;
        };
        if old == new {
            return;
        }
        let mut paths = Vec::new();
        let mut all = false;
        for d in vault.stores().tree.diff(&old, &new) {
            match d {
                Ok(d) => {
                    if paths.len() >= INVALIDATE_ALL_OVER {
                        all = true;
                        break;
                    }
                    if let Some(p) = path_of_key(&d) {
                        paths.push(p);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list changed paths; dropping all kernel caches");
                    all = true;
                    break;
                }
            }
        }
        {
            // Only paths with unflushed local edits can race this change: a clean path will
            // show the new content before anyone edits it.
            let raced = if all { Vec::new() } else { inv.dirty(&paths) };
            let mut touched = self.peer_touched.lock().unwrap_or_else(|e| e.into_inner());
            if touched.len() + raced.len() > PEER_TOUCHED_MAX {
                touched.clear();
            } else {
                touched.extend(raced);
            }
        }
        if all {
            inv.invalidate_all();
        } else {
            inv.base_changed(&paths);
        }
    }
}

fn commit_alone(engine: &mut Vault, p: VaultPath, c: Change, now: u64) {
    if let Err(e) = engine.commit([(p.clone(), c)], now) {
        tracing::warn!(path = %p.as_str(), error = %e, "held path not decided; it stays held");
    }
}

fn path_of_key(d: &DiffEntry) -> Option<String> {
    EntryKey::from_bytes(d.key())
        .ok()
        .map(|k| k.path.as_str().to_string())
}
