//! Garbage collection of a vault's history on this device: `cairn prune` and the daemon's
//! automatic prune.
//!
//! 1. **Retention.** Every snapshot of every member that this device knows (the timeline) is
//!    run through [`cairn_vault::retained`]; every member's registry head is kept whatever
//!    the policy says. All devices apply the same rule to the same snapshots, so they agree.
//! 2. **Mark.** Live are: the tree nodes and file content (chunks, chunk lists) reachable,
//!    through the blobs this device holds, from every kept snapshot; every snapshot header
//!    (a few hundred bytes each, they keep the parent chain walkable past pruned snapshots);
//!    content referenced by the local overlay and by held deletions (not in any snapshot this
//!    device published yet).
//! 3. **Forget.** Pruned snapshots move from the timeline to its pruned list (so `restore`,
//!    `mount --at` and `cairn log` can say "pruned"), and their registry log records go.
//! 4. **Sweep.** The store removes every blob that is not live (see `cairn_store::sweep`).
//!
//! Concurrent writers: the sweep is begun (recording every blob written from then on)
//! *before* the heads are read, and the heads are read under the engine lock, which a flush
//! holds from its first chunk write to its publish. So a blob is either written after the
//! sweep began (recorded, kept) or belongs to a flush that published before the heads were
//! read (reachable from this device's head, which is always kept). Fetched blobs are writes
//! like any other.
//!
//! Kill -9 at any point: nothing is deleted before the mark is complete and the pruned
//! snapshots are recorded; after that each step only removes garbage. A killed prune leaves
//! garbage behind for the next run, never a hole in a kept snapshot.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_store::{ChunkId, SweepProgress};
use cairn_tree::{Node, NodeId};
use cairn_vault::{
    Blobs, Content, Entry, EntryKind, RetentionPolicy, SnapTime, SnapshotId, decode_value,
    manifest_of, retained,
};
use serde::{Deserialize, Serialize};

use crate::open_vault::OpenVault;
use crate::stores::{LocalOrRemote, vault_stores};
use crate::timeline::{Query, SnapInfo, Timeline};

/// Node cache of the mark walk: every node is read once, so a small cache is enough.
const MARK_CACHE_BYTES: usize = 8 << 20;

#[derive(Clone, Copy, Debug)]
pub struct PruneOptions {
    pub policy: RetentionPolicy,
    /// Count what would go, delete nothing.
    pub dry_run: bool,
}

/// What a prune did (or, for a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Snapshots of all members this device knows, before the prune.
    pub snapshots: u64,
    pub kept: u64,
    pub pruned: u64,
    /// Blobs reachable from what is kept.
    pub live_blobs: u64,
    /// Tree nodes or chunk lists of kept snapshots that this device does not hold (another
    /// member's history it never fetched): what is below them is that member's to keep.
    pub not_held: u64,
    pub examined_blobs: u64,
    /// Blobs (and bytes) that are garbage; of those, what was removed.
    pub garbage_blobs: u64,
    pub garbage_bytes: u64,
    pub removed_blobs: u64,
    pub removed_bytes: u64,
    /// Garbage kept because a flush or fetch wrote it again during the prune.
    pub kept_written: u64,
    /// Stale temp files of crashed writers removed.
    pub temps: u64,
    /// Registry log records of pruned snapshots removed.
    pub log_records: u64,
}

/// Where a prune is; the callback may stop it there (tests use this to simulate a kill).
#[derive(Clone, Copy, Debug)]
pub enum Step {
    Marked { snapshots: u64, live: u64 },
    Forgotten,
    Swept(SweepProgress),
}

/// Prunes the vault's history on this device; see the module docs.
pub fn prune(
    device: &OpenVault,
    opts: &PruneOptions,
    mut step: impl FnMut(Step) -> ControlFlow<()>,
) -> Result<PruneReport> {
    let t = Timeline::open(&device.dir)?;
    let sweep = device.blobs.begin_sweep()?;
    // Under the engine lock: an in-flight flush publishes first (see the module docs).
    let own_head = device.engine().head().map(|h| h.id);
    let mut heads: HashSet<SnapshotId> = device
        .registry
        .list(&device.vault_id)?
        .into_iter()
        .map(|e| SnapshotId::from(e.payload))
        .collect();
    heads.extend(own_head);
    crate::history::refresh(device, &t).context("indexing the vault's snapshots")?;
    let snaps: Vec<SnapInfo> = t
        .newest_first(Query {
            before_ms: None,
            device: None,
            limit: 1024,
        })
        .collect::<Result<_>>()?;
    let times: Vec<SnapTime<SnapshotId>> = snaps
        .iter()
        .map(|s| SnapTime {
            id: s.id,
            device: s.device,
            created_ms: s.created_ms,
        })
        .collect();
    let mut keep = retained(&times, &opts.policy);
    keep.extend(heads.iter().copied());
    let (kept, gone): (Vec<&SnapInfo>, Vec<&SnapInfo>) =
        snaps.iter().partition(|s| keep.contains(&s.id));

    let mut report = PruneReport {
        dry_run: opts.dry_run,
        snapshots: snaps.len() as u64,
        kept: kept.len() as u64,
        pruned: gone.len() as u64,
        ..PruneReport::default()
    };
    let mut mark = Marker::new(device)?;
    // Every header stays: they are tiny, and the parent walk needs them to reach the kept
    // snapshots behind a pruned one.
    for s in &snaps {
        mark.live.insert(s.id.0);
    }
    for id in t.pruned_ids()? {
        mark.live.insert(id.0);
    }
    for h in &heads {
        mark.live.insert(h.0);
    }
    for s in &kept {
        mark.tree(s.root)?;
    }
    mark.unpublished(device)?;
    report.live_blobs = mark.live.len() as u64;
    report.not_held = mark.not_held;
    let live = mark.live;
    if step(Step::Marked {
        snapshots: snaps.len() as u64,
        live: report.live_blobs,
    })
    .is_break()
    {
        return Ok(report);
    }

    if !opts.dry_run {
        let gone_owned: Vec<SnapInfo> = gone.iter().map(|s| (*s).clone()).collect();
        t.mark_pruned(&gone_owned)?;
        let mut by_device: std::collections::HashMap<_, Vec<cairn_registry::Payload>> =
            Default::default();
        for s in &gone {
            by_device
                .entry(s.device)
                .or_default()
                .push(cairn_registry::Payload::from(s.id));
        }
        for (d, payloads) in by_device {
            report.log_records += device
                .registry
                .forget_logged(&device.vault_id, &d, &payloads)?;
        }
        if step(Step::Forgotten).is_break() {
            return Ok(report);
        }
    }

    let swept = sweep.sweep(
        |id| live.contains(id),
        opts.dry_run,
        |p| step(Step::Swept(p)),
    )?;
    report.examined_blobs = swept.examined;
    report.garbage_blobs = swept.garbage;
    report.garbage_bytes = swept.garbage_bytes;
    report.removed_blobs = swept.removed;
    report.removed_bytes = swept.removed_bytes;
    report.kept_written = swept.kept_touched;
    report.temps = swept.temps;
    tracing::info!(?report, "prune done");
    Ok(report)
}

/// The mark phase's walk over local blobs only (a prune never fetches).
struct Marker {
    tree: Arc<cairn_tree::Tree<Arc<dyn cairn_tree::NodeStore>>>,
    blobs: Arc<cairn_store::BlobStore>,
    live: HashSet<ChunkId>,
    not_held: u64,
}

impl Marker {
    fn new(device: &OpenVault) -> Result<Self> {
        let local = Arc::new(LocalOrRemote::new(device.blobs.clone()));
        let stores = vault_stores(local, device.keys.clone(), MARK_CACHE_BYTES)?;
        Ok(Self {
            tree: stores.tree,
            blobs: device.blobs.clone(),
            live: HashSet::new(),
            not_held: 0,
        })
    }

    /// Marks every node below `root` and the content of every entry in it. Subtrees already
    /// marked (shared with another kept snapshot) are skipped whole.
    fn tree(&mut self, root: NodeId) -> Result<()> {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if !self.live.insert(ChunkId(id.0)) {
                continue;
            }
            let node = match self.tree.read_node(&id) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(node = %id.to_hex(), error = %e, "prune: tree node not held here");
                    self.not_held += 1;
                    continue;
                }
            };
            match node.as_ref() {
                Node::Internal { children, .. } => stack.extend(children.iter().map(|c| c.id)),
                Node::Leaf(leaf) => {
                    for (k, v) in leaf.iter() {
                        if let Ok(e) = decode_value(k, v) {
                            self.entry(&e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn entry(&mut self, e: &Entry) {
        if e.kind != EntryKind::File {
            return;
        }
        if let Content::ChunkList { blob, .. } = &e.content {
            self.live.insert(*blob);
        }
        match manifest_of(self.blobs.as_ref() as &dyn Blobs, &e.content) {
            Ok(Some(m)) => self.live.extend(m.chunks().iter().map(|c| c.id)),
            Ok(None) => {}
            Err(_) => self.not_held += 1,
        }
    }

    /// Content not in any published snapshot yet: base content the overlay's pending records
    /// refer to, and held deletions.
    fn unpublished(&mut self, device: &OpenVault) -> Result<()> {
        let refs = cairn_overlay::read_content_refs(&device.dir.join("overlay"))
            .context("reading the local overlay's pending records")?;
        for r in refs {
            if let Ok(e) = Entry::decode(&r) {
                self.entry(&e);
            }
        }
        for e in crate::guard::load_held(&device.dir)?.overrides().values() {
            self.entry(e);
        }
        Ok(())
    }
}

/// Who ran a [`prune_vault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrunedBy {
    /// The daemon serving the vault (so its concurrent writes are accounted for).
    Daemon,
    /// This process, holding the vault's daemon lock so no daemon starts meanwhile.
    ThisProcess,
}

/// `cairn prune`: through the running daemon if there is one, else here, with a progress bar
/// on a terminal. Refused while a history view (`cairn mount --at`) is mounted: it may be
/// showing a snapshot about to be pruned.
pub fn prune_vault(
    state: &crate::state::VaultState,
    opts: &PruneOptions,
) -> Result<(PruneReport, PrunedBy)> {
    if let Some(view) = crate::instance::live_daemons(&state.dir)
        .into_iter()
        .find(|d| d.read_only)
    {
        anyhow::bail!(
            "a history view is mounted ({}); it may show a snapshot this prune would remove. Unmount it first (`cairn unmount DIR`)",
            view.describe()
        );
    }
    if crate::instance::running_daemon(&state.dir).is_some() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(if opts.dry_run {
            "the daemon is working out what a prune would free"
        } else {
            "the daemon is pruning"
        });
        bar.enable_steady_tick(Duration::from_millis(200));
        let reply = crate::control::request_within(
            &state.dir,
            &request_line(opts),
            Duration::from_secs(24 * 3600),
        );
        bar.finish_and_clear();
        if let Some(json) = reply? {
            let report = serde_json::from_str(json.trim())
                .context("reading the daemon's prune report (is the cairn command the same version as the daemon?)")?;
            return Ok((report, PrunedBy::Daemon));
        }
        // The daemon stopped meanwhile: prune here.
    }
    let _lock = crate::instance::lock_vault(&state.dir, &state.name, None)?;
    // A restore without a daemon writes blobs through its own store handle, which this sweep
    // would not see: it holds the overlay's lock for as long as it writes, so take it too.
    let _overlay =
        cairn_overlay::Overlay::open(state.dir.join("overlay")).map_err(|e| match e {
            cairn_overlay::OverlayError::Locked { .. } => anyhow::anyhow!(
                "another cairn command (a restore) is writing to vault {:?}; run the prune again when it is done",
                state.name
            ),
            e => anyhow::Error::new(e).context("opening the local overlay"),
        })?;
    let device = OpenVault::open(state)?;
    let bar = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(4),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {msg} {pos} blobs checked, {elapsed}")
    {
        bar.set_style(style);
    }
    bar.set_message("marking what history keeps");
    let report = prune(&device, opts, |step| {
        match step {
            Step::Marked { live, .. } => {
                bar.set_message(format!("{live} blobs live; sweeping"));
            }
            Step::Forgotten => {}
            Step::Swept(p) => {
                bar.set_position(p.examined);
                if p.removed > 0 {
                    bar.set_message(format!(
                        "removed {} blobs ({} MiB);",
                        p.removed,
                        p.removed_bytes >> 20
                    ));
                }
            }
        }
        ControlFlow::Continue(())
    });
    bar.finish_and_clear();
    let report = report?;
    if !opts.dry_run {
        record_prune(&device);
    }
    Ok((report, PrunedBy::ThisProcess))
}

/// The daemon's automatic prune (`[history]` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoPrune {
    pub policy: RetentionPolicy,
    /// Prune when the last prune is at least this old (`None`: never on a timer).
    pub every: Option<Duration>,
    /// Prune when the store holds more than this many bytes (`None`: no size trigger).
    pub above_bytes: Option<u64>,
    /// How often the triggers are checked (the store size costs a directory walk).
    pub check_every: Duration,
}

/// The control request line for `opts` (see `crate::control`).
pub fn request_line(opts: &PruneOptions) -> String {
    let p = &opts.policy;
    format!(
        "prune {} {} {} {} {} {}",
        if opts.dry_run { "dry" } else { "run" },
        p.keep_within_ms,
        p.keep_hourly,
        p.keep_daily,
        p.keep_weekly,
        p.keep_monthly
    )
}

/// Parses what [`request_line`] wrote (after the `prune` word).
pub(crate) fn request_options(mode: &str, rest: &[&str]) -> Result<PruneOptions> {
    let dry_run = match mode {
        "dry" => true,
        "run" => false,
        other => anyhow::bail!(
            "prune mode {other:?} is not dry or run (is the cairn command the same version as the daemon?)"
        ),
    };
    let [within, h, d, w, m] = rest else {
        anyhow::bail!(
            "prune needs five numbers (is the cairn command the same version as the daemon?)"
        );
    };
    let n = |t: &str| -> Result<u32> { t.parse().with_context(|| format!("{t:?} is not a count")) };
    Ok(PruneOptions {
        policy: RetentionPolicy {
            keep_within_ms: within
                .parse()
                .with_context(|| format!("{within:?} is not milliseconds"))?,
            keep_hourly: n(h)?,
            keep_daily: n(d)?,
            keep_weekly: n(w)?,
            keep_monthly: n(m)?,
        },
        dry_run,
    })
}

/// Touched after every finished prune; its mtime is when the vault was last pruned (so the
/// daily prune survives restarts without a file format to parse).
const STAMP: &str = "prune.stamp";

/// Whether the automatic prune should run now. `last` is when the last prune finished (its
/// age), `store` the store's size now, `after_last` its size right after the last prune in
/// this process: a store whose *live* data is above the limit would otherwise be pruned at
/// every check for nothing, so the size trigger waits for 10 % growth past that.
fn due(a: &AutoPrune, since_last: Option<Duration>, store: u64, after_last: Option<u64>) -> bool {
    let by_time = a
        .every
        .is_some_and(|every| since_last.is_none_or(|s| s >= every));
    let by_size = a.above_bytes.is_some_and(|limit| {
        store > limit && after_last.is_none_or(|prev| store > prev.saturating_add(prev / 10))
    });
    by_time || by_size
}

/// Runs the automatic prune on its own thread until `stop` is set; the first check comes one
/// `check_every` after start, so it never competes with the initial sync.
pub(crate) fn spawn_auto(
    device: Arc<OpenVault>,
    auto: AutoPrune,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name("cairn-prune".into())
        .spawn(move || {
            let stamp = device.dir.join(STAMP);
            let mut after_last = None;
            let mut next = std::time::Instant::now() + auto.check_every;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                if std::time::Instant::now() < next {
                    continue;
                }
                next = std::time::Instant::now() + auto.check_every;
                let since_last = std::fs::metadata(&stamp)
                    .and_then(|m| m.modified())
                    .ok()
                    .map(|t| t.elapsed().unwrap_or_default());
                let size = if auto.above_bytes.is_some() {
                    match device.blobs.usage() {
                        Ok((_, b)) => b,
                        Err(e) => {
                            tracing::warn!(error = %e, "automatic prune: cannot measure the store");
                            continue;
                        }
                    }
                } else {
                    0
                };
                if !due(&auto, since_last, size, after_last) {
                    continue;
                }
                let opts = PruneOptions {
                    policy: auto.policy,
                    dry_run: false,
                };
                let r = prune(&device, &opts, |_| {
                    if stop.load(Ordering::SeqCst) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                });
                match r {
                    Ok(r) => {
                        tracing::info!(
                            pruned = r.pruned,
                            removed_blobs = r.removed_blobs,
                            removed_bytes = r.removed_bytes,
                            "automatic prune"
                        );
                        touch(&stamp);
                        after_last = device.blobs.usage().ok().map(|(_, b)| b);
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "automatic prune failed; retrying at the next check"),
                }
            }
        })
}

/// Records that a prune finished now (see [`STAMP`]).
pub(crate) fn touch(stamp: &std::path::Path) {
    if let Err(e) = std::fs::write(stamp, b"") {
        tracing::warn!(error = %e, path = %stamp.display(), "cannot record the prune time");
    }
}

/// After a prune run by hand (`cairn prune`), so the timer starts over.
pub fn record_prune(device: &OpenVault) {
    touch(&device.dir.join(STAMP));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::VaultState;
    use cairn_store::{ChunkSealer, WriteOptions, read_file, write_file_with};
    use cairn_vault::{Attrs, Change, VaultPath, content_from_manifest};
    use rand::{RngExt, SeedableRng};
    use std::collections::BTreeMap;

    /// Writes `files` (path, bytes) into the engine and publishes one snapshot.
    fn write_and_publish(device: &OpenVault, files: &[(&str, Vec<u8>)], now: u64) {
        let mut changes = Vec::new();
        for (path, bytes) in files {
            let (_, key) = device.keys.current_key();
            let opts = WriteOptions {
                durability: cairn_store::Durability::Batch,
                ..WriteOptions::default()
            };
            let m = write_file_with(&device.blobs, &key, &bytes[..], opts).unwrap();
            let (content, size) =
                content_from_manifest(device.stores.blobs.as_ref(), &ChunkSealer::new(&key), &m)
                    .unwrap();
            changes.push((
                VaultPath::new(path).unwrap(),
                Change::Write {
                    attrs: Attrs {
                        mode: 0o644,
                        ..Attrs::default()
                    },
                    size,
                    content,
                },
            ));
        }
        let mut vault = device.engine();
        vault.commit(changes, now).unwrap();
        crate::sink::publish(device, &mut vault, now).unwrap();
    }

    /// Every file of snapshot `root`, read fully from the local store.
    fn read_all(device: &OpenVault, root: NodeId) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for item in device.stores.tree.scan_all(&root) {
            let (k, v) = item.expect("every node of a kept snapshot is readable");
            let e = decode_value(&k, &v).unwrap();
            if e.kind != EntryKind::File || !e.is_live() {
                continue;
            }
            let key = cairn_vault::EntryKey::from_bytes(&k).unwrap();
            let bytes = match &e.content {
                Content::Inline(b) => b.clone(),
                c => {
                    let m = manifest_of(device.blobs.as_ref() as &dyn Blobs, c)
                        .expect("chunk list of a kept snapshot is readable")
                        .unwrap();
                    let mut buf = Vec::new();
                    read_file(&device.blobs, &m, &mut buf)
                        .expect("every chunk of a kept snapshot is readable");
                    buf
                }
            };
            out.insert(key.path.as_str().to_string(), bytes);
        }
        out
    }

    fn random_bytes(rng: &mut impl RngExt, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rng.fill(&mut v[..]);
        v
    }

    /// A vault whose history rewrote a file `rounds` times (and deleted another): returns
    /// what the newest snapshot holds.
    fn churned(
        data: &std::path::Path,
        rng: &mut impl RngExt,
        rounds: u64,
    ) -> BTreeMap<String, Vec<u8>> {
        let state = VaultState::create(data, "v").unwrap();
        let device = OpenVault::open(&state).unwrap();
        let stable = random_bytes(rng, 300_000);
        let mut newest = BTreeMap::new();
        for r in 0..rounds {
            let churn = random_bytes(rng, 400_000);
            let mut files = vec![("stable.bin", stable.clone()), ("churn.bin", churn.clone())];
            if r + 1 < rounds {
                files.push(("gone.bin", random_bytes(rng, 200_000)));
            }
            write_and_publish(&device, &files, 1_000_000 + r * 3_600_000);
            newest = files.into_iter().map(|(p, b)| (p.to_string(), b)).collect();
        }
        let mut vault = device.engine();
        vault
            .commit(
                [(VaultPath::new("gone.bin").unwrap(), Change::Remove)],
                1_000_000 + rounds * 3_600_000,
            )
            .unwrap();
        crate::sink::publish(&device, &mut vault, 1_000_000 + rounds * 3_600_000).unwrap();
        newest.remove("gone.bin");
        newest
    }

    fn listed(device: &OpenVault) -> Vec<SnapInfo> {
        Timeline::open(&device.dir)
            .unwrap()
            .newest_first(Query {
                before_ms: None,
                device: None,
                limit: 100,
            })
            .collect::<Result<_>>()
            .unwrap()
    }

    fn newest_only(dry_run: bool) -> PruneOptions {
        PruneOptions {
            policy: RetentionPolicy::newest_only(),
            dry_run,
        }
    }

    #[test]
    fn prune_keeps_the_newest_and_frees_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let newest = churned(d.path(), &mut rng, 6);
        let state = VaultState::load(d.path(), "v").unwrap();
        let device = OpenVault::open(&state).unwrap();
        let (_, before) = device.blobs.usage().unwrap();
        let dry = prune(&device, &newest_only(true), |_| ControlFlow::Continue(())).unwrap();
        assert_eq!((dry.snapshots, dry.kept, dry.pruned), (7, 1, 6));
        assert_eq!(dry.removed_blobs, 0);
        assert!(dry.garbage_bytes > 0);
        assert_eq!(
            device.blobs.usage().unwrap().1,
            before,
            "a dry run deletes nothing"
        );
        let r = prune(&device, &newest_only(false), |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(r.removed_bytes, dry.garbage_bytes);
        let (_, after) = device.blobs.usage().unwrap();
        let live: usize = newest.values().map(Vec::len).sum();
        assert!(
            (after as f64) < 1.2 * live as f64,
            "store {after} bytes for {live} bytes of live data"
        );
        let snaps = listed(&device);
        assert_eq!(snaps.len(), 1);
        assert_eq!(read_all(&device, snaps[0].root), newest);
        let t = Timeline::open(&device.dir).unwrap();
        assert_eq!(t.pruned_between(0, u64::MAX).unwrap(), 6);
        // The registry log forgot the pruned revisions, not the head.
        let log = device
            .registry
            .log(&device.vault_id, &device.device_id)
            .unwrap();
        assert_eq!(log.len(), 1);
        // Nothing left to do.
        let again = prune(&device, &newest_only(false), |_| ControlFlow::Continue(())).unwrap();
        assert_eq!((again.pruned, again.removed_blobs), (0, 0));
    }

    /// Test (b): a prune stopped at a random point (what a kill -9 leaves: each step is an
    /// unlink or a committed SQLite transaction) never costs a listed snapshot a blob.
    #[test]
    fn prune_killed_at_random_points_loses_no_kept_blob() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        for trial in 0..24 {
            let d = tempfile::tempdir().unwrap();
            let newest = churned(d.path(), &mut rng, 4);
            let state = VaultState::load(d.path(), "v").unwrap();
            // The dry run also indexes the timeline.
            let total = {
                let device = OpenVault::open(&state).unwrap();
                let dry =
                    prune(&device, &newest_only(true), |_| ControlFlow::Continue(())).unwrap();
                dry.examined_blobs + 2
            };
            let expected: Vec<(SnapInfo, BTreeMap<String, Vec<u8>>)> = {
                let device = OpenVault::open(&state).unwrap();
                listed(&device)
                    .into_iter()
                    .map(|s| {
                        let files = read_all(&device, s.root);
                        (s, files)
                    })
                    .collect()
            };
            assert_eq!(expected.len(), 5);
            let kill_at = rng.random_range(0..=total);
            {
                let device = OpenVault::open(&state).unwrap();
                let mut n = 0;
                let _ = prune(&device, &newest_only(false), |_| {
                    n += 1;
                    if n > kill_at {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
                .unwrap();
            }
            // "Restart": every snapshot still listed reads back byte-identical.
            let device = OpenVault::open(&state).unwrap();
            let still = listed(&device);
            assert!(
                !still.is_empty(),
                "trial {trial}: the head is always listed"
            );
            for s in &still {
                let want = &expected.iter().find(|(e, _)| e.id == s.id).unwrap().1;
                assert_eq!(
                    &read_all(&device, s.root),
                    want,
                    "trial {trial}, kill at {kill_at}"
                );
            }
            // A later prune finishes the job.
            prune(&device, &newest_only(false), |_| ControlFlow::Continue(())).unwrap();
            let snaps = listed(&device);
            assert_eq!(snaps.len(), 1);
            assert_eq!(read_all(&device, snaps[0].root), newest, "trial {trial}");
        }
    }

    /// Test (c): flushes that run while a prune marks and sweeps lose nothing. They write
    /// content of the snapshots being pruned again, so the store finds those blobs present
    /// (the dangerous case: a dedup hit on garbage). The flushes run from the prune's own
    /// step callback, right after the mark and between removals, so the interleaving is
    /// the worst one every time rather than by chance.
    #[test]
    fn concurrent_flushes_during_prune_lose_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        churned(d.path(), &mut rng, 5);
        let state = VaultState::load(d.path(), "v").unwrap();
        let device = OpenVault::open(&state).unwrap();
        crate::history::refresh(&device, &Timeline::open(&device.dir).unwrap()).unwrap();
        let old: Vec<(String, Vec<u8>)> = listed(&device)
            .iter()
            .skip(1)
            .flat_map(|s| read_all(&device, s.root))
            .collect();
        assert!(old.len() >= 8);
        let mut next = old.iter().enumerate();
        let mut written = BTreeMap::new();
        let mut now = 90_000_000;
        let mut flush = |written: &mut BTreeMap<String, Vec<u8>>| {
            if let Some((i, (path, bytes))) = next.next() {
                let name = format!("again-{i}-{path}");
                now += 1;
                write_and_publish(&device, &[(&name, bytes.clone())], now);
                written.insert(name, bytes.clone());
            }
        };
        let r = prune(&device, &newest_only(false), |step| {
            match step {
                Step::Marked { .. } => flush(&mut written),
                Step::Swept(p) if p.examined.is_multiple_of(3) => flush(&mut written),
                _ => {}
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        assert!(r.kept_written > 0, "the flushes hit garbage: {r:?}");
        let head = device.engine().head().unwrap().header.root;
        let files = read_all(&device, head);
        for (name, bytes) in &written {
            assert_eq!(files.get(name), Some(bytes), "{name}");
        }
        // Once their flushes are in a kept snapshot, a second prune keeps them too.
        prune(&device, &newest_only(false), |_| ControlFlow::Continue(())).unwrap();
        let head = device.engine().head().unwrap().header.root;
        assert_eq!(read_all(&device, head), files);
    }

    /// `cairn prune` without a daemon: prunes here, and waits for a restore that holds the
    /// overlay (it writes blobs this sweep would not see).
    #[test]
    fn prune_without_a_daemon_runs_here_and_not_beside_a_restore() {
        let d = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let newest = churned(d.path(), &mut rng, 3);
        let state = VaultState::load(d.path(), "v").unwrap();
        let restore = cairn_overlay::Overlay::open(state.dir.join("overlay")).unwrap();
        let err = prune_vault(&state, &newest_only(false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("restore"), "{err}");
        drop(restore);
        let (r, by) = prune_vault(&state, &newest_only(false)).unwrap();
        assert_eq!(by, PrunedBy::ThisProcess);
        assert_eq!((r.kept, r.pruned), (1, 3));
        assert!(r.removed_bytes > 0);
        let device = OpenVault::open(&state).unwrap();
        assert_eq!(read_all(&device, listed(&device)[0].root), newest);
        assert!(
            device.dir.join(STAMP).exists(),
            "the prune time is recorded"
        );
    }

    #[test]
    fn automatic_prune_is_due_daily_or_past_the_size_limit() {
        let day = Duration::from_secs(86_400);
        let a = AutoPrune {
            policy: RetentionPolicy::default(),
            every: Some(day),
            above_bytes: Some(1000),
            check_every: Duration::from_secs(600),
        };
        assert!(due(&a, None, 0, None), "never pruned");
        assert!(!due(&a, Some(day / 2), 10, None));
        assert!(due(&a, Some(day), 10, None));
        assert!(due(&a, Some(day / 2), 1001, None), "past the limit");
        // Live data alone is past the limit: wait for growth.
        assert!(!due(&a, Some(day / 2), 1500, Some(1400)));
        assert!(due(&a, Some(day / 2), 1600, Some(1400)));
        let off = AutoPrune {
            every: None,
            above_bytes: None,
            ..a
        };
        assert!(!due(&off, None, u64::MAX, None));
    }
}
