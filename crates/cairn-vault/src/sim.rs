//! Deterministic multi-device simulation (feature `sim`).
//!
//! A seeded run drives 3–5 engines sharing one node store and one blob store (content
//! addressing makes sharing equivalent to perfect blob replication) through random local
//! operations on a small path universe (so edits collide), while snapshot announcements
//! between devices are delayed, dropped, duplicated and reordered and devices are
//! partitioned and healed. At the end everything is healed and exchanged until quiescent,
//! and [`check`] verifies convergence and the no-loss / no-resurrection oracle.
//!
//! The same seed always makes the same decisions (snapshot ids differ between runs because
//! age sealing is randomized, but no decision depends on them).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use cairn_crypto::{AgeIdentity, DeviceId, DeviceKey, VaultSecret};
use cairn_registry::{PublishPolicy, Registry};
use cairn_tree::{DiffEntry, MemoryNodeStore, NodeId};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::conflict::is_conflict_name;
use crate::engine::{Attrs, Change, Vault};
use crate::entry::{Content, Entry, EntryKind};
use crate::path::{EntryKey, VaultPath};
use crate::snapshot::{Keyring, SnapshotId};
use crate::source::{EntrySource, decode_value};
use crate::stores::{MemoryBlobs, VaultStores};
use crate::version::{Causality, Version, VersionVector};

/// Parameters of one run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: usize,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        Self { seed, steps: 160 }
    }
}

/// Counters from a run, for sanity checks and tuning.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub devices: usize,
    pub ops_applied: usize,
    pub ops_rejected: usize,
    pub publishes: usize,
    pub deliveries: usize,
    pub dropped: usize,
    pub conflicts: usize,
    pub final_entries: usize,
    pub exchange_rounds: usize,
}

/// Why a run failed.
#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub reason: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation seed {} failed: {}\n  rerun: CAIRN_SIM_SEED={} cargo test -p cairn-vault --test sim",
            self.seed, self.reason, self.seed
        )
    }
}

/// What the oracle learned from one local commit at one key.
#[derive(Clone, Debug)]
struct Event {
    vv: VersionVector,
    /// File content written (files), `None` for deletions and directories.
    content: Option<Vec<u8>>,
    live: bool,
}

struct Message {
    to: usize,
    id: SnapshotId,
    due: usize,
}

struct Device {
    vault: Vault,
    registry: Registry,
    latest: Option<SnapshotId>,
    skew_ms: i64,
}

const FILES: &[&str] = &[
    "x", "z.txt", "a", "a/c", "a/x", "a/z.txt", "a/c/x", "a/c/y.md", "b/x", "b/y.md", "b/c/x",
];
const DIRS: &[&str] = &["a", "b", "a/c", "b/c"];

fn p(s: &str) -> VaultPath {
    // The universe is a fixed list of valid paths.
    VaultPath::new(s).unwrap_or_else(|e| panic!("bad universe path {s}: {e}"))
}

/// Runs one seeded simulation and checks it.
pub fn run(cfg: &SimConfig) -> Result<SimStats, SimFailure> {
    let fail = |reason: String| SimFailure {
        seed: cfg.seed,
        reason,
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let n = rng.random_range(3..=5usize);
    let secret = VaultSecret::from_bytes(rng.random());
    let vault_id = secret.vault_id();
    let stores = VaultStores::new(
        Arc::new(MemoryNodeStore::new()),
        Arc::new(MemoryBlobs::new()),
    );
    let keys: Vec<DeviceKey> = (0..n)
        .map(|_| DeviceKey::from_bytes(rng.random()))
        .collect();
    let ids: Vec<AgeIdentity> = (0..n).map(|_| AgeIdentity::generate()).collect();
    let recipients: Vec<_> = ids.iter().map(AgeIdentity::recipient).collect();
    let mut devices = Vec::new();
    for i in 0..n {
        let registry = Registry::open_in_memory().map_err(|e| fail(e.to_string()))?;
        for k in &keys {
            registry
                .add_member(&vault_id, &k.device_id())
                .map_err(|e| fail(e.to_string()))?;
        }
        let mut vault = Vault::new(
            stores.clone(),
            Keyring {
                vault: vault_id,
                identity: ids[i].clone(),
                recipients: recipients.clone(),
                history: Vec::new(),
            },
            keys[i].clone(),
        );
        vault.set_publish_policy(PublishPolicy {
            sleep: |_| {},
            jitter_seed: Some(cfg.seed),
            ..PublishPolicy::default()
        });
        devices.push(Device {
            vault,
            registry,
            latest: None,
            skew_ms: rng.random_range(-3_000..=3_000),
        });
    }

    let mut stats = SimStats {
        devices: n,
        ..SimStats::default()
    };
    let mut events: BTreeMap<Vec<u8>, Vec<Event>> = BTreeMap::new();
    let mut queue: Vec<Message> = Vec::new();
    let mut partitioned: BTreeSet<(usize, usize)> = BTreeSet::new();
    let base_ms: u64 = 1_700_000_000_000;
    let now = |step: usize, d: &Device| -> u64 {
        // ~137 ms per step: many events share a second, which exercises conflict-name
        // collisions; the skew exercises the HLC.
        (base_ms as i64 + step as i64 * 137 + d.skew_ms) as u64
    };
    let mut counter = 0u64;

    for step in 0..cfg.steps {
        let roll = rng.random_range(0..100u32);
        if roll < 55 {
            let d = rng.random_range(0..n);
            counter += 1;
            let change = random_change(&mut rng, d, counter);
            let t = now(step, &devices[d]);
            let dev = &mut devices[d];
            let before = dev.vault.root();
            match dev.vault.commit([change], t) {
                Ok(_) => {
                    stats.ops_applied += 1;
                    record(&stores, before, dev.vault.root(), &mut events)
                        .map_err(|e| fail(format!("recording a commit: {e}")))?;
                }
                Err(crate::VaultError::Rejected { .. }) => stats.ops_rejected += 1,
                Err(e) => return Err(fail(format!("commit failed: {e}"))),
            }
        } else if roll < 72 {
            let d = rng.random_range(0..n);
            let t = now(step, &devices[d]);
            let dev = &mut devices[d];
            let rep = dev
                .vault
                .publish(&dev.registry, t)
                .map_err(|e| fail(format!("publish on device {d}: {e}")))?;
            dev.latest = Some(rep.snapshot.id);
            stats.publishes += 1;
            for to in (0..n).filter(|&to| to != d) {
                let blocked = partitioned.contains(&(d.min(to), d.max(to)));
                let copies = if blocked || rng.random_bool(0.1) {
                    0
                } else if rng.random_bool(0.1) {
                    2
                } else {
                    1
                };
                if copies == 0 {
                    stats.dropped += 1;
                }
                for _ in 0..copies {
                    queue.push(Message {
                        to,
                        id: rep.snapshot.id,
                        due: step + rng.random_range(0..30usize),
                    });
                }
            }
        } else if roll < 95 {
            let ready: Vec<usize> = (0..queue.len()).filter(|&i| queue[i].due <= step).collect();
            if !ready.is_empty() {
                let m = queue.swap_remove(ready[rng.random_range(0..ready.len())]);
                let r = devices[m.to]
                    .vault
                    .receive(m.id)
                    .map_err(|e| fail(format!("receive on device {}: {e}", m.to)))?;
                stats.deliveries += 1;
                stats.conflicts += r.conflicts.len();
            }
        } else {
            let a = rng.random_range(0..n);
            let b = rng.random_range(0..n);
            if a != b {
                let pair = (a.min(b), a.max(b));
                if !partitioned.remove(&pair) {
                    partitioned.insert(pair);
                }
            } else {
                partitioned.clear();
            }
        }
    }

    // Heal and exchange until every device holds the same root.
    let end = cfg.steps + 1;
    for round in 0..12 {
        stats.exchange_rounds = round + 1;
        let mut snaps = Vec::new();
        for d in devices.iter_mut() {
            let t = now(end + round, d);
            let rep = d
                .vault
                .publish(&d.registry, t)
                .map_err(|e| fail(format!("final publish: {e}")))?;
            d.latest = Some(rep.snapshot.id);
            snaps.push(rep.snapshot.id);
        }
        let roots: BTreeSet<NodeId> = devices.iter().map(|d| d.vault.root()).collect();
        if roots.len() == 1 && round > 0 {
            break;
        }
        for (i, d) in devices.iter_mut().enumerate() {
            for (j, s) in snaps.iter().enumerate() {
                if i != j {
                    let r = d
                        .vault
                        .receive(*s)
                        .map_err(|e| fail(format!("final receive: {e}")))?;
                    stats.conflicts += r.conflicts.len();
                }
            }
        }
    }
    let roots: BTreeSet<NodeId> = devices.iter().map(|d| d.vault.root()).collect();
    if roots.len() != 1 {
        return Err(fail(format!(
            "devices did not converge: {} distinct roots after full exchange",
            roots.len()
        )));
    }
    let root = devices[0].vault.root();
    stats.final_entries = check(&stores, root, &events).map_err(fail)?;
    Ok(stats)
}

fn random_change(rng: &mut StdRng, device: usize, counter: u64) -> (VaultPath, Change) {
    let dir_attrs = Attrs {
        mode: 0o755,
        mtime_ns: 0,
        xattrs: BTreeMap::new(),
    };
    match rng.random_range(0..100u32) {
        0..45 => {
            let path = p(FILES[rng.random_range(0..FILES.len())]);
            let bytes = format!("dev{device}-write{counter}").into_bytes();
            (path, Change::write_inline(bytes, 0o644, counter as i64))
        }
        45..60 => (p(FILES[rng.random_range(0..FILES.len())]), Change::Remove),
        60..75 => (
            p(DIRS[rng.random_range(0..DIRS.len())]),
            Change::Mkdir { attrs: dir_attrs },
        ),
        75..85 => (p(DIRS[rng.random_range(0..DIRS.len())]), Change::Rmdir),
        85..95 => {
            let from = p(FILES[rng.random_range(0..FILES.len())]);
            let to = p(FILES[rng.random_range(0..FILES.len())]);
            (from, Change::Rename { to })
        }
        _ => {
            let from = p(DIRS[rng.random_range(0..DIRS.len())]);
            let to = p(DIRS[rng.random_range(0..DIRS.len())]);
            (from, Change::Rename { to })
        }
    }
}

/// Records every key a local commit changed as an oracle event.
fn record(
    stores: &VaultStores,
    before: NodeId,
    after: NodeId,
    events: &mut BTreeMap<Vec<u8>, Vec<Event>>,
) -> crate::Result<()> {
    for d in stores.tree.diff(&before, &after) {
        let (key, value) = match d? {
            DiffEntry::Added { key, value } => (key, value),
            DiffEntry::Changed { key, new, .. } => (key, new),
            DiffEntry::Removed { key, .. } => {
                return Err(crate::VaultError::Publish(format!(
                    "a commit removed key {}",
                    String::from_utf8_lossy(&key)
                )));
            }
        };
        let e = decode_value(&key, &value)?;
        let content = match (&e.kind, &e.content) {
            (EntryKind::File, Content::Inline(b)) => Some(b.clone()),
            _ => None,
        };
        events.entry(key).or_default().push(Event {
            vv: e.version.vv.clone(),
            content,
            live: e.is_live(),
        });
    }
    Ok(())
}

/// Checks the converged tree against the oracle; returns the number of entries.
fn check(
    stores: &VaultStores,
    root: NodeId,
    events: &BTreeMap<Vec<u8>, Vec<Event>>,
) -> Result<usize, String> {
    let src = stores.source(root);
    let all: Vec<(Vec<u8>, Entry)> = src
        .scan(b"", None)
        .and_then(|it| it.collect::<crate::Result<Vec<_>>>())
        .map_err(|e| format!("scanning the final tree: {e}"))?;
    let live: BTreeMap<&[u8], &Entry> = all
        .iter()
        .filter(|(_, e)| e.is_live())
        .map(|(k, e)| (k.as_slice(), e))
        .collect();
    let show = |k: &[u8]| String::from_utf8_lossy(k).into_owned();

    // Structure: every live entry's ancestors are live directories; no name is both a
    // file and a directory.
    for k in live.keys() {
        let key = EntryKey::from_bytes(k).map_err(|e| e.to_string())?;
        for anc in key.path.ancestors() {
            if !live.contains_key(anc.dir_key().as_slice()) {
                return Err(format!(
                    "live {} has no live parent directory {anc}",
                    show(k)
                ));
            }
        }
        if !key.dir && live.contains_key(key.path.dir_key().as_slice()) {
            return Err(format!("{} is both a file and a directory", show(k)));
        }
    }

    // Content is unique per original write, so a write event elsewhere with the same bytes
    // is a rename that moved it (of the original or of its conflict copy); that event is
    // then the one the oracle holds to account.
    let mut written_at: BTreeMap<&[u8], BTreeSet<&[u8]>> = BTreeMap::new();
    for (key, evs) in events {
        for ev in evs {
            if let Some(c) = &ev.content {
                written_at
                    .entry(c.as_slice())
                    .or_default()
                    .insert(key.as_slice());
            }
        }
    }
    for (key, evs) in events {
        let ekey = EntryKey::from_bytes(key).map_err(|e| e.to_string())?;
        let dominated = |ev: &Event| {
            evs.iter()
                .any(|o| o.vv.compare(&ev.vv) == Causality::Dominates)
        };
        for ev in evs.iter().filter(|e| e.live && !dominated(e)) {
            match &ev.content {
                Some(bytes) => {
                    // No write lost: at its path or in a conflict copy beside it.
                    let here = live
                        .get(key.as_slice())
                        .is_some_and(|e| matches!(&e.content, Content::Inline(b) if b == bytes));
                    let moved = written_at
                        .get(bytes.as_slice())
                        .is_some_and(|keys| keys.len() > 1);
                    if !here && !moved && !in_conflict_copy(&live, &ekey.path, bytes) {
                        let near: Vec<String> = all
                            .iter()
                            .filter(|(k, _)| {
                                k.starts_with(
                                    &ekey.path.parent().unwrap_or_default().child_prefix(),
                                )
                            })
                            .map(|(k, e)| {
                                format!("{} {:?} {:?} {:?}", show(k), e.kind, e.content, e.version)
                            })
                            .collect();
                        return Err(format!(
                            "write {:?} at {} (vv {:?}) was lost; events {:?}; entries nearby: {near:#?}",
                            String::from_utf8_lossy(bytes),
                            show(key),
                            ev.vv,
                            evs
                        ));
                    }
                }
                None if ekey.dir && !live.contains_key(key.as_slice()) => {
                    return Err(format!(
                        "directory {} was lost: final {:?}, events {:?}",
                        show(key),
                        all.iter().find(|(k, _)| k == key).map(|(_, e)| &e.version),
                        evs
                    ));
                }
                None => {}
            }
        }
        // No resurrection: a deletion that dominates every write at the key.
        for del in evs.iter().filter(|e| !e.live) {
            let final_all = evs
                .iter()
                .filter(|w| w.live)
                .all(|w| matches!(del.vv.compare(&w.vv), Causality::Dominates));
            if !final_all {
                continue;
            }
            if let Some(e) = live.get(key.as_slice()) {
                // Live again is fine only with content from a write the deletion never saw
                // (a directory the merge restored for a live child, or a later conflict
                // copy that landed on a deleted copy's name); never with deleted content.
                let unseen = !e.version.content_seen_by(&Version {
                    vv: del.vv.clone(),
                    ..e.version.clone()
                });
                let deleted_content = evs.iter().any(|w| {
                    w.live
                        && matches!(del.vv.compare(&w.vv), Causality::Dominates)
                        && matches!((&w.content, &e.content), (Some(a), Content::Inline(b)) if a == b)
                });
                if !unseen || deleted_content {
                    return Err(format!(
                        "{} was deleted (vv {:?}) but is live again (vv {:?}); events at the key: {:?}",
                        show(key),
                        del.vv,
                        e.version.vv,
                        evs
                    ));
                }
            }
        }
    }
    Ok(all.len())
}

fn in_conflict_copy(live: &BTreeMap<&[u8], &Entry>, path: &VaultPath, bytes: &[u8]) -> bool {
    let name = path.name();
    let stem = match name.rfind('.') {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    };
    let parent = path.parent().unwrap_or_default();
    let prefix = parent.child_prefix();
    live.iter().any(|(k, e)| {
        k.starts_with(&prefix)
            && std::str::from_utf8(&k[prefix.len()..])
                .is_ok_and(|n| !n.contains('/') && n.starts_with(stem) && is_conflict_name(n))
            && matches!(&e.content, Content::Inline(b) if b == bytes)
    })
}

/// Device id of simulated device `i` in a run with `seed` (for debugging output).
pub fn device_ids(seed: u64) -> Vec<DeviceId> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.random_range(3..=5usize);
    let _: [u8; 32] = rng.random();
    (0..n)
        .map(|_| DeviceKey::from_bytes(rng.random()).device_id())
        .collect()
}
