//! Snapshot history: `cairn log` and read-only time-travel mounts (`cairn mount --at TIME`).
//!
//! Every snapshot any member published stays loadable (see [`crate::timeline`] for how they
//! are found), so a past state is just another base layer, mounted read-only.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use cairn_crypto::DeviceId;
use cairn_fuse::{FlushBatch, FlushError, FlushSink, MountOptions};
use cairn_tree::{DiffEntry, NodeId};
use cairn_vault::{
    EntryKey, EntryKind, EntrySource, SnapshotId, VaultPath, VaultStores, decode_value,
};

use super::base::VaultBase;
use super::sink::view_of;
use crate::open_vault::OpenVault;
use crate::state::VaultState;
use crate::timeline::{Query, Refreshed, SnapInfo, Timeline};

/// The vault's timeline, brought up to date: through the running daemon if there is one
/// (it fetches headers this device lacks from peers), else from what is on this disk.
pub fn timeline(device: &OpenVault) -> Result<Timeline> {
    if let Err(e) = crate::control::request_within(&device.dir, "history", FETCH_WAIT) {
        tracing::debug!(error = %format!("{e:#}"), "the daemon could not refresh the history index");
    }
    let t = Timeline::open(&device.dir)?;
    refresh(device, &t)?;
    Ok(t)
}

/// Indexes every snapshot reachable from the members' registry heads and this device's own.
pub fn refresh(device: &OpenVault, t: &Timeline) -> Result<Refreshed> {
    let mut heads: Vec<SnapshotId> = device
        .registry
        .list(&device.vault_id)?
        .into_iter()
        .map(|e| SnapshotId::from(e.payload))
        .collect();
    let (stores, keys, own) = {
        let v = device.engine();
        (v.stores().clone(), v.keys().clone(), v.head().map(|h| h.id))
    };
    heads.extend(own);
    t.refresh(&stores, &keys, heads)
}

/// How long a CLI command waits for the daemon to fetch history from peers.
const FETCH_WAIT: Duration = Duration::from_secs(600);

pub fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// What one snapshot changed compared with its author's previous one.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    /// Paths the author itself wrote, created or deleted (directories end in `/`).
    pub own: Vec<String>,
    pub added: usize,
    pub modified: usize,
    pub deleted: usize,
    /// Bytes of the files added or modified by the author.
    pub bytes: u64,
    /// Entries that came from other members' snapshots merged into this one.
    pub merged: usize,
    /// The previous snapshot is not readable here, so the changes are unknown.
    pub unknown: bool,
}

/// One line of `cairn log`.
pub struct LogLine {
    pub snap: SnapInfo,
    pub changes: Changes,
}

/// One version of a file (`cairn log FILE`).
pub struct FileVersion {
    /// The newest snapshot it is in (as seen walking back from the newest).
    pub snap: SnapInfo,
    /// Who wrote the content of this version.
    pub author: DeviceId,
    /// When it was written (the author's clock).
    pub written_ms: u64,
    pub size: u64,
    pub kind: EntryKind,
}

/// What `cairn log` shows.
pub enum History {
    Timeline(Vec<LogLine>),
    File(Vec<FileVersion>),
}

pub struct LogQuery {
    pub path: Option<VaultPath>,
    pub device: Option<DeviceId>,
    pub before_ms: Option<u64>,
    pub limit: usize,
}

/// Reads a page of the vault's history.
pub fn history(device: &OpenVault, t: &Timeline, q: &LogQuery) -> Result<History> {
    let stores = device.engine().stores().clone();
    if let Some(p) = &q.path
        && !is_dir_in_history(device, &stores, t, p)?
    {
        return file_versions(device, &stores, t, p, q).map(History::File);
    }
    let prefix = q.path.as_ref().map(|p| format!("{}/", p.as_str()));
    let mut out = Vec::new();
    // With a directory filter, snapshots that did not touch it are skipped: read on, a page
    // at a time, until the page is full or history ends.
    let snaps = t.newest_first(Query {
        before_ms: q.before_ms,
        device: q.device,
        limit: q.limit,
    });
    for snap in snaps {
        let snap = snap?;
        let changes = changes(device, &stores, t, &snap, prefix.as_deref())?;
        if prefix.is_some() && changes.own.is_empty() && changes.merged == 0 && !changes.unknown {
            continue;
        }
        out.push(LogLine { snap, changes });
        if out.len() >= q.limit {
            break;
        }
    }
    Ok(History::Timeline(out))
}

fn is_dir_in_history(
    device: &OpenVault,
    stores: &VaultStores,
    t: &Timeline,
    p: &VaultPath,
) -> Result<bool> {
    let dir_key = EntryKey::dir(p.clone()).to_bytes();
    let file_key = EntryKey::file(p.clone()).to_bytes();
    for snap in t.page(&Query {
        before_ms: None,
        device: None,
        limit: 64,
    })? {
        if get_fetching(device, stores, snap.root, &dir_key, p).is_some_and(|e| e.is_live()) {
            return Ok(true);
        }
        if get_fetching(device, stores, snap.root, &file_key, p).is_some_and(|e| e.is_live()) {
            return Ok(false);
        }
    }
    Ok(false)
}

/// The entry at `key` in tree `root`; tree nodes this device lacks (another member's old
/// snapshot) are fetched through the running daemon first. `None` if it cannot be read.
fn get_fetching(
    device: &OpenVault,
    stores: &VaultStores,
    root: NodeId,
    key: &[u8],
    path: &VaultPath,
) -> Option<cairn_vault::Entry> {
    match stores.source(root).get(key) {
        Ok(e) => e,
        Err(_) => {
            let line = format!("nodes {} {}", root.to_hex(), path.as_str());
            crate::control::request_within(&device.dir, &line, FETCH_WAIT).ok()??;
            stores.source(root).get(key).ok().flatten()
        }
    }
}

/// What `snap` changed, compared with its first parent (its author's previous snapshot),
/// only below `prefix` if given.
pub fn changes(
    device: &OpenVault,
    stores: &VaultStores,
    t: &Timeline,
    snap: &SnapInfo,
    prefix: Option<&str>,
) -> Result<Changes> {
    let c = diff_changes(stores, t, snap, prefix)?;
    if !c.unknown || snap.parents.is_empty() {
        return Ok(c);
    }
    // Tree nodes of another member's old snapshot may be missing here: the running daemon
    // walks the same diff, fetching them from the members, then read it again.
    let Some(parent) = snap.parents.first().and_then(|p| t.get(p).ok().flatten()) else {
        return Ok(c);
    };
    let line = format!("diff {} {}", parent.root.to_hex(), snap.root.to_hex());
    match crate::control::request_within(&device.dir, &line, FETCH_WAIT) {
        Ok(Some(_)) => diff_changes(stores, t, snap, prefix),
        _ => Ok(c),
    }
}

pub fn diff_changes(
    stores: &VaultStores,
    t: &Timeline,
    snap: &SnapInfo,
    prefix: Option<&str>,
) -> Result<Changes> {
    let mut c = Changes::default();
    let before = match snap.parents.first() {
        None => cairn_vault::NodeTree::empty_root(),
        Some(p) => match t.get(p)? {
            Some(parent) => parent.root,
            None => {
                c.unknown = true;
                return Ok(c);
            }
        },
    };
    for d in stores.tree.diff(&before, &snap.root) {
        let d = match d {
            Ok(d) => d,
            Err(_) => {
                c.unknown = true;
                break;
            }
        };
        let key = d.key().to_vec();
        let Ok(k) = EntryKey::from_bytes(&key) else {
            continue;
        };
        let shown = if k.dir {
            format!("{}/", k.path.as_str())
        } else {
            k.path.as_str().to_string()
        };
        if let Some(pre) = prefix
            && !format!("{shown}/").starts_with(pre)
            && !shown.starts_with(pre)
        {
            continue;
        }
        let (old, new) = match &d {
            DiffEntry::Added { value, .. } => (None, decode_value(&key, value).ok()),
            DiffEntry::Changed { old, new, .. } => {
                (decode_value(&key, old).ok(), decode_value(&key, new).ok())
            }
            DiffEntry::Removed { value, .. } => (decode_value(&key, value).ok(), None),
        };
        let Some(new) = new else { continue };
        if new.version.device != snap.device {
            c.merged += 1;
            continue;
        }
        let was_live = old.as_ref().is_some_and(|o| o.is_live());
        match (was_live, new.is_live()) {
            (false, true) => c.added += 1,
            (true, true) => c.modified += 1,
            (true, false) => c.deleted += 1,
            (false, false) => continue,
        }
        if new.kind == EntryKind::File {
            c.bytes += new.size;
        }
        c.own.push(shown);
    }
    Ok(c)
}

/// The versions of the file at `p`, newest first, one per distinct content version.
fn file_versions(
    device: &OpenVault,
    stores: &VaultStores,
    t: &Timeline,
    p: &VaultPath,
    q: &LogQuery,
) -> Result<Vec<FileVersion>> {
    let key = EntryKey::file(p.clone()).to_bytes();
    let mut out: Vec<FileVersion> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut last_root = None;
    let snaps = t.newest_first(Query {
        before_ms: q.before_ms,
        device: None,
        limit: 256,
    });
    for snap in snaps {
        let snap = snap?;
        if last_root == Some(snap.root) {
            continue;
        }
        last_root = Some(snap.root);
        let Some(e) = get_fetching(device, stores, snap.root, &key, p) else {
            continue;
        };
        let v = &e.version;
        if !seen.insert((v.device, v.hlc.wall_ms, v.hlc.counter, e.kind)) {
            continue;
        }
        if q.device.is_some_and(|d| d != v.device) {
            continue;
        }
        out.push(FileVersion {
            author: v.device,
            written_ms: v.hlc.wall_ms,
            size: if e.is_live() { e.size } else { 0 },
            kind: e.kind,
            snap,
        });
        if out.len() >= q.limit {
            break;
        }
    }
    Ok(out)
}

/// Parses `2026-11-23T10:00:00Z`, `2026-11-23 10:00:00` (UTC), `@1700000000` (Unix seconds),
/// or a relative `15m` / `2h` / `3days` meaning that long ago.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64> {
    if let Some(secs) = s.strip_prefix('@').and_then(|n| n.parse::<u64>().ok()) {
        return Ok(secs.saturating_mul(1000));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')) {
        return Ok(t.duration_since(UNIX_EPOCH)?.as_millis() as u64);
    }
    if let Ok(ago) = humantime::parse_duration(s.trim_start_matches('-')) {
        return Ok(now_ms.saturating_sub(ago.as_millis() as u64));
    }
    bail!(
        "cannot read time {s:?}: use 2026-11-23T10:00:00Z (UTC), \"2026-11-23 10:00:00\" or an age such as 90m or 2days"
    )
}

/// The newest snapshot of any member created at or before `at_ms`.
pub fn snapshot_at(device: &OpenVault, t: &Timeline, at_ms: u64) -> Result<SnapInfo> {
    if let Some(s) = t.at_or_before(at_ms)? {
        let pruned = t.pruned_between(s.created_ms.saturating_add(1), at_ms)?;
        if pruned > 0 {
            eprintln!(
                "cairn: the vault's state at {} was pruned ({pruned} snapshot(s) after {} are gone, [history] retention policy); using the nearest kept snapshot, from {}",
                format_time(at_ms),
                format_time(s.created_ms),
                format_time(s.created_ms)
            );
        }
        return Ok(s);
    }
    let pruned = t.pruned_between(0, at_ms)?;
    if pruned > 0 {
        bail!(
            "the vault's state at {} was pruned: {pruned} snapshot(s) from then or before are gone ([history] retention policy){}",
            format_time(at_ms),
            match t.oldest_ms()? {
                Some(o) => format!("; the oldest kept snapshot is from {}", format_time(o)),
                None => String::new(),
            }
        );
    }
    match t.oldest_ms()? {
        Some(o) => bail!(
            "no snapshot at or before {}; the oldest is from {} (see `cairn log`)",
            format_time(at_ms),
            format_time(o)
        ),
        None => bail!(
            "the vault has no snapshot this device can read yet{}",
            if device.engine().head().is_none() {
                " (mount it and write something, or wait for the members' snapshots)"
            } else {
                ""
            }
        ),
    }
}

/// Asks the running daemon (if any) to fetch everything below `path` (everything for
/// `None`) of snapshot `root` that this device lacks, so this process can read it.
pub fn prefetch(device: &OpenVault, root: NodeId, path: Option<&VaultPath>) -> Result<()> {
    let line = format!(
        "prefetch {} {}",
        root.to_hex(),
        path.map_or("", |p| p.as_str())
    );
    crate::control::request_within(&device.dir, line.trim_end(), FETCH_WAIT)
        .context("the running daemon could not fetch that version from the members")?;
    Ok(())
}

/// Reads the tree nodes on the way to `path` in tree `root` (both kinds of key), fetching
/// what is not local.
pub fn fetch_nodes(vault: &OpenVault, root: NodeId, path: &VaultPath) -> Result<()> {
    let stores = vault.engine().stores().clone();
    let src = stores.source(root);
    src.get(&EntryKey::file(path.clone()).to_bytes())?;
    src.get(&EntryKey::dir(path.clone()).to_bytes())?;
    vault.blobs.sync()?;
    Ok(())
}

/// Walks the diff of two trees, fetching the nodes it needs that are not local.
pub fn fetch_diff(vault: &OpenVault, old: NodeId, new: NodeId) -> Result<usize> {
    let stores = vault.engine().stores().clone();
    let mut n = 0;
    for d in stores.tree.diff(&old, &new) {
        d?;
        n += 1;
    }
    vault.blobs.sync()?;
    Ok(n)
}

/// Reads every file below `path` of the tree `root`, fetching what is not local.
pub fn fetch_tree(vault: &OpenVault, root: NodeId, path: Option<&VaultPath>) -> Result<usize> {
    let stores = vault.engine().stores().clone();
    let view = view_of(stores.source(root));
    let mut entries = Vec::new();
    match path {
        Some(p) => {
            if let Some((_, e)) = view.get(p)? {
                entries.push(e);
            }
            if !p.is_root() {
                for item in view.scan_prefix(p)? {
                    entries.push(item?.1);
                }
            }
        }
        None => {
            for item in view.scan(&[], None)? {
                entries.push(item?.1);
            }
        }
    }
    let mut fetched = 0;
    for e in entries {
        if e.kind != EntryKind::File || matches!(e.content, cairn_vault::Content::Inline(_)) {
            continue;
        }
        if let Some(m) = cairn_vault::manifest_of(stores.blobs.as_ref(), &e.content)? {
            for c in m.chunks() {
                if !vault.blobs.has(&c.id).unwrap_or(false) {
                    stores
                        .blobs
                        .get(&c.id)?
                        .context("a chunk of that version is on no reachable member")?;
                    fetched += 1;
                }
            }
        }
    }
    vault.blobs.sync()?;
    Ok(fetched)
}

/// Refuses every flush: a history mount is read-only, the kernel already answers EROFS.
struct ReadOnly;

impl FlushSink for ReadOnly {
    fn flush(&self, batch: FlushBatch) -> Result<(), FlushError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        Err(FlushError::Rejected("history views are read-only".into()))
    }
}

/// Mounts the vault as it was at `at_ms`, read-only, until stopped.
pub fn mount_at(
    state: &VaultState,
    mountpoint: &Path,
    at_ms: u64,
    opts: MountOptions,
) -> Result<()> {
    // Before any thread exists, so every thread inherits the blocked stop signals.
    let sigset = super::mount::block_stop_signals();
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let lock = crate::instance::lock_view(&state.dir, &std::fs::canonicalize(&abs).unwrap_or(abs))?;
    let device = OpenVault::open(state)?;
    let t = timeline(&device)?;
    let entry = snapshot_at(&device, &t, at_ms)?;
    // Another member's snapshot may reference content this device never fetched: the
    // running daemon gets it from the members (this process has no network).
    prefetch(&device, entry.root, None)?;
    let base = Arc::new(VaultBase::new(
        device.stores.clone(),
        view_of(device.stores.source(entry.root)),
    ));
    // A private, throwaway overlay: the writable mount's overlay stays untouched (and may be
    // in use by a running daemon).
    let scratch = tempfile::Builder::new()
        .prefix("overlay-history-")
        .tempdir_in(&state.dir)
        .context("creating a scratch overlay for the history view")?;
    let overlay = cairn_fuse::Overlay::open(scratch.path())?;
    eprintln!(
        "cairn: showing snapshot {} of device {} from {} (read-only)",
        &entry.id.to_string()[..16],
        crate::names::Labels::load(&device).label(&entry.device),
        format_time(entry.created_ms)
    );
    let opts = MountOptions {
        read_only: true,
        ..opts
    };
    super::mount::serve(
        state,
        mountpoint,
        base,
        Arc::new(ReadOnly),
        overlay,
        opts,
        sigset,
        lock,
        None,
        None,
    )
}
