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
use cairn_link::LinkGroup;
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
    /// Live names in the converged tree that belong to a link group.
    pub final_linked: usize,
    /// Of those, symlinks.
    pub final_linked_symlinks: usize,
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
            let changes = random_changes(&mut rng, &devices[d].vault, d, counter)
                .map_err(|e| fail(format!("choosing a change on device {d}: {e}")))?;
            if changes.is_empty() {
                stats.ops_rejected += 1;
                continue;
            }
            let t = now(step, &devices[d]);
            let dev = &mut devices[d];
            let before = dev.vault.root();
            match dev.vault.commit(changes, t) {
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
    (
        stats.final_entries,
        stats.final_linked,
        stats.final_linked_symlinks,
    ) = check(&stores, root, &events).map_err(fail)?;
    Ok(stats)
}

/// One local operation as the mount would commit it. Hard links follow the mount's rules
/// (`cairn-fuse`'s links module): every name of a group carries the group and the same
/// content, so a write, unlink or rename through one name rewrites the others in the same
/// commit. Directory operations over linked names are left out (the mount rewrites every
/// group then, which the simulation does not model); an empty list means "skipped".
fn random_changes(
    rng: &mut StdRng,
    vault: &Vault,
    device: usize,
    counter: u64,
) -> crate::Result<Vec<(VaultPath, Change)>> {
    let dir_attrs = Attrs {
        mode: 0o755,
        mtime_ns: 0,
        xattrs: BTreeMap::new(),
    };
    let file = |rng: &mut StdRng| p(FILES[rng.random_range(0..FILES.len())]);
    let dir = |rng: &mut StdRng| p(DIRS[rng.random_range(0..DIRS.len())]);
    // Files and symlinks: both can be hard-linked.
    let live_named = |path: &VaultPath| -> crate::Result<Option<Entry>> {
        Ok(vault
            .entry(&EntryKey::file(path.clone()))?
            .filter(|e| e.is_live() && matches!(e.kind, EntryKind::File | EntryKind::Symlink)))
    };
    let group_of = |path: &VaultPath| -> crate::Result<Option<(Entry, LinkGroup)>> {
        Ok(live_named(path)?.and_then(|e| LinkGroup::of(&e.xattrs).map(|g| (e, g))))
    };
    Ok(match rng.random_range(0..100u32) {
        0..38 => {
            let path = file(rng);
            let bytes = format!("dev{device}-write{counter}").into_bytes();
            match group_of(&path)? {
                Some((e, g)) if e.kind == EntryKind::File => {
                    linked_writes(&g, bytes, counter as i64)
                }
                // Writing to a linked symlink's name would write its target, not the link.
                Some(_) => Vec::new(),
                None => vec![(path, Change::write_inline(bytes, 0o644, counter as i64))],
            }
        }
        38..42 => {
            let target = format!("dev{device}-target{counter}").into_bytes();
            let change = Change::Symlink {
                target,
                mtime_ns: counter as i64,
                xattrs: BTreeMap::new(),
            };
            vec![(file(rng), change)]
        }
        42..56 => {
            let path = file(rng);
            let mut out = vec![(path.clone(), Change::Remove)];
            if let Some((e, g)) = group_of(&path)? {
                out.extend(regroup(&e, &g.without_name(path.as_str()), None));
            }
            out
        }
        56..70 => vec![(dir(rng), Change::Mkdir { attrs: dir_attrs })],
        70..78 => {
            let d = dir(rng);
            if holds_links(vault, &d)? {
                Vec::new()
            } else {
                vec![(d, Change::Rmdir)]
            }
        }
        78..87 => {
            let (from, to) = (file(rng), file(rng));
            if group_of(&to)?.is_some() && from != to {
                // Renaming over a linked name: the mount would shrink that group too.
                return Ok(Vec::new());
            }
            let mut out = vec![(from.clone(), Change::Rename { to: to.clone() })];
            if let Some((e, g)) = group_of(&from)?
                && from != to
            {
                out.extend(regroup(
                    &e,
                    &g.without_name(from.as_str()).with_name(to.as_str()),
                    None,
                ));
            }
            out
        }
        87..92 => {
            let (from, to) = (dir(rng), dir(rng));
            if holds_links(vault, &from)? || holds_links(vault, &to)? {
                Vec::new()
            } else {
                vec![(from, Change::Rename { to })]
            }
        }
        _ => {
            // link(from, to): `to` must be a new name.
            let (from, to) = (file(rng), file(rng));
            let Some(e) = live_named(&from)? else {
                return Ok(Vec::new());
            };
            if vault.lookup(&to)?.is_some() {
                return Ok(Vec::new());
            }
            let g = match LinkGroup::of(&e.xattrs) {
                Some(g) => g.with_name(to.as_str()),
                None => LinkGroup {
                    id: rng.random(),
                    names: vec![from.as_str().to_string()],
                }
                .with_name(to.as_str()),
            };
            regroup(&e, &g, Some(&to))
        }
    })
}

/// A write through one name of group `g`: every name gets the bytes.
fn linked_writes(g: &LinkGroup, bytes: Vec<u8>, mtime_ns: i64) -> Vec<(VaultPath, Change)> {
    let attrs = Attrs {
        mode: 0o644,
        mtime_ns,
        xattrs: BTreeMap::new(),
    };
    group_writes(g, attrs, bytes.len() as u64, Content::Inline(bytes))
}

/// Every name of `g` rewritten to carry `g` (or no group, for a single name) and `e`'s
/// content; `fresh` is a name the commit creates. A symlink's names keep their target and
/// change attributes only (the new name is a new symlink), as the mount does.
fn regroup(e: &Entry, g: &LinkGroup, fresh: Option<&VaultPath>) -> Vec<(VaultPath, Change)> {
    let mut attrs = Attrs {
        mode: e.mode,
        mtime_ns: e.mtime_ns,
        xattrs: e.xattrs.clone(),
    };
    let (EntryKind::Symlink, Content::Target(target)) = (&e.kind, &e.content) else {
        return group_writes(g, attrs, e.size, e.content.clone());
    };
    LinkGroup::store(Some(g), &mut attrs.xattrs);
    g.names
        .iter()
        .filter_map(|n| VaultPath::new(n).ok())
        .map(|path| {
            let change = if fresh == Some(&path) {
                Change::Symlink {
                    target: target.clone(),
                    mtime_ns: e.mtime_ns,
                    xattrs: attrs.xattrs.clone(),
                }
            } else {
                Change::SetAttrs {
                    attrs: attrs.clone(),
                }
            };
            (path, change)
        })
        .collect()
}

/// One write per name of `g`, each with `attrs` plus the group and the same content.
fn group_writes(
    g: &LinkGroup,
    mut attrs: Attrs,
    size: u64,
    content: Content,
) -> Vec<(VaultPath, Change)> {
    LinkGroup::store(Some(g), &mut attrs.xattrs);
    g.names
        .iter()
        .filter_map(|n| VaultPath::new(n).ok())
        .map(|path| {
            let change = Change::Write {
                attrs: attrs.clone(),
                size,
                content: content.clone(),
            };
            (path, change)
        })
        .collect()
}

/// Whether any live file at or under directory `d` belongs to a link group.
fn holds_links(vault: &Vault, d: &VaultPath) -> crate::Result<bool> {
    let src = vault.source();
    let prefix = d.child_prefix();
    for item in src.scan(&prefix, crate::path::prefix_successor(&prefix).as_deref())? {
        let (_, e) = item?;
        if e.is_live() && LinkGroup::of(&e.xattrs).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
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

/// Checks the converged tree against the oracle; returns the number of entries, of linked
/// names and of linked symlinks.
fn check(
    stores: &VaultStores,
    root: NodeId,
    events: &BTreeMap<Vec<u8>, Vec<Event>>,
) -> Result<(usize, usize, usize), String> {
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

    // Links: every live member of a link group is listed by it, and every name it lists is
    // a live file with the same group and the same content.
    let (mut linked, mut linked_symlinks) = (0, 0);
    for (k, e) in &live {
        let Some(g) = LinkGroup::of(&e.xattrs) else {
            continue;
        };
        linked += 1;
        linked_symlinks += usize::from(e.kind == EntryKind::Symlink);
        let key = EntryKey::from_bytes(k).map_err(|e| e.to_string())?;
        let linkable = matches!(e.kind, EntryKind::File | EntryKind::Symlink);
        if !linkable || !g.names.iter().any(|n| n == key.path.as_str()) {
            return Err(format!(
                "{} carries link group {:?} that does not list it",
                show(k),
                g.names
            ));
        }
        for name in &g.names {
            let other = VaultPath::new(name)
                .ok()
                .and_then(|p| live.get(p.file_key().as_slice()).copied());
            let coherent = other.is_some_and(|o| {
                o.kind == e.kind
                    && o.content == e.content
                    && o.size == e.size
                    && LinkGroup::of(&o.xattrs).as_ref() == Some(&g)
            });
            if !coherent {
                return Err(format!(
                    "{} is linked to {name}, which is missing or differs: {:?}",
                    show(k),
                    other.map(|o| (&o.content, LinkGroup::of(&o.xattrs)))
                ));
            }
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
    Ok((all.len(), linked, linked_symlinks))
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
