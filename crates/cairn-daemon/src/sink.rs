//! The mount's write side: overlay flush batches become engine commits, then a published
//! snapshot, then the base the mount reads from.
//!
//! A batch is the final state of each dirty path, not a log of operations, so it is replayed
//! as: deletions deepest-first (a directory after its children), then creations and updates
//! in path order (a directory before its children). Paths are committed in groups of up to
//! [`GROUP`] (one tree update each instead of one per path: a 100k-file copy would otherwise
//! rewrite the tree's upper nodes 100k times); a group the engine refuses is redone path by
//! path, so one path the engine refuses (say, a concurrent peer change made it invalid)
//! cannot hold every other change hostage. A refused change that carries data (file content, a symlink target)
//! is never dropped: it is committed beside its path as `NAME.cairn-rescued-<ms>` (or at the
//! vault root if its directory is gone), and if even that fails the flush fails, so the
//! overlay keeps the record and retries.

use std::io::Read;
use std::sync::Arc;

use cairn_fuse::{Data, FlushBatch, FlushError, FlushItem, FlushSink, Kind};
use cairn_store::{ChunkSealer, WriteOptions, write_file_with};
use cairn_vault::{
    Attrs, Change, Content, INLINE_MAX, MergedView, PublishReport, TreeSource, Vault, VaultPath,
    content_from_manifest,
};

use super::base::entry_of;
use crate::open_vault::{OpenVault, now_ms};
use crate::publisher::Publisher;

/// Paths per engine commit. Large enough that the tree update per group is cheap per path,
/// small enough that redoing a refused group path by path stays quick.
const GROUP: usize = 512;

/// Changes waiting to be committed together; each path's changes stay apart so a refused
/// group can be redone path by path.
#[derive(Default)]
struct Group {
    paths: Vec<(String, Vec<(VaultPath, Change)>)>,
}

/// What became of the paths of a flush.
#[derive(Default)]
struct Outcome {
    refused: usize,
    unsaved: Vec<String>,
}

impl Group {
    fn push(&mut self, path: String, changes: Vec<(VaultPath, Change)>) {
        self.paths.push((path, changes));
    }

    fn is_full(&self) -> bool {
        self.paths.len() >= GROUP
    }

    /// Commits the group in one step, or path by path if the engine refuses it.
    fn commit(&mut self, vault: &mut Vault, now: u64, out: &mut Outcome) {
        let paths = std::mem::take(&mut self.paths);
        if paths.is_empty() {
            return;
        }
        let all = paths.iter().flat_map(|(_, c)| c.iter().cloned());
        if vault.commit(all, now).is_ok() {
            return;
        }
        for (path, changes) in paths {
            commit_one(vault, &path, changes, now, out);
        }
    }
}

/// Commits one path's changes; a refused change that carries data is kept beside its path.
fn commit_one(
    vault: &mut Vault,
    path: &str,
    changes: Vec<(VaultPath, Change)>,
    now: u64,
    out: &mut Outcome,
) {
    let Err(e) = vault.commit(changes.clone(), now) else {
        return;
    };
    out.refused += 1;
    tracing::error!(path, error = %e, "engine refused a change");
    let Some((p, data_change)) = changes
        .into_iter()
        .rev()
        .find(|(_, c)| matches!(c, Change::Write { .. } | Change::Symlink { .. }))
    else {
        return;
    };
    for spot in rescue_paths(&p, now) {
        if vault
            .commit([(spot.clone(), data_change.clone())], now)
            .is_ok()
        {
            tracing::warn!(path, rescued_to = %spot.as_str(), "kept refused data beside its path");
            return;
        }
    }
    out.unsaved.push(path.to_string());
}

pub struct VaultSink {
    pub publisher: Arc<Publisher>,
}

/// The view the mount shows for the engine's current state.
pub fn view_of(source: TreeSource) -> MergedView {
    MergedView::new(vec![("own".to_string(), Arc::new(source))])
}

/// [`view_of`] with held deletions shown again (see [`crate::guard`]).
pub fn view_with_held(
    source: TreeSource,
    held: Arc<std::collections::BTreeMap<Vec<u8>, cairn_vault::Entry>>,
) -> MergedView {
    if held.is_empty() {
        return view_of(source);
    }
    let layer = cairn_vault::HeldSource::new(Arc::new(source), held);
    MergedView::new(vec![("own".to_string(), Arc::new(layer))])
}

fn rejected(e: impl std::fmt::Display) -> FlushError {
    FlushError::Rejected(e.to_string())
}

impl VaultSink {
    /// Chunks, encrypts and stores staged content; small files stay inline in the tree. The
    /// staging file is taken out of the item, so its descriptor closes once it is read.
    fn store_content(&self, item: &mut FlushItem) -> Result<(u64, Content), FlushError> {
        let Some(staged) = item.staged.take() else {
            return Err(FlushError::Rejected(format!(
                "{}: staged data missing",
                item.path
            )));
        };
        let device = &self.publisher.vault;
        let len = staged.file.metadata()?.len();
        if len as usize <= INLINE_MAX {
            let mut bytes = Vec::with_capacity(len as usize);
            (&staged.file).take(len).read_to_end(&mut bytes)?;
            return Ok((bytes.len() as u64, Content::Inline(bytes)));
        }
        let reader = std::io::BufReader::with_capacity(1 << 20, (&staged.file).take(len));
        let opts = WriteOptions {
            durability: cairn_store::Durability::Batch,
            ..WriteOptions::default()
        };
        // One epoch for the whole file, even if a rotation lands meanwhile.
        let (_, content_key) = device.keys.current_key();
        let manifest =
            write_file_with(&device.blobs, &content_key, reader, opts).map_err(rejected)?;
        let sealer = ChunkSealer::new(&content_key);
        let (content, size) =
            content_from_manifest(device.stores.blobs.as_ref(), &sealer, &manifest)
                .map_err(rejected)?;
        Ok((size, content))
    }

    fn change_for(&self, item: &mut FlushItem, exists: bool) -> Result<Option<Change>, FlushError> {
        let r = &item.record;
        let attrs = Attrs {
            mode: r.mode & 0o7777,
            mtime_ns: r.mtime_ns,
            xattrs: r.xattrs.clone(),
        };
        Ok(match (r.kind, &r.data) {
            (Kind::Whiteout, _) => None,
            // Special files and local owners stay on this device (the overlay never hands
            // them to a flush; this keeps a stray one from reaching a snapshot).
            (Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev | Kind::Owner, _) => None,
            (Kind::Dir, _) if exists => Some(Change::SetAttrs { attrs }),
            (Kind::Dir, _) => Some(Change::Mkdir { attrs }),
            (Kind::Symlink, Data::Target(t)) => Some(Change::Symlink {
                target: t.clone(),
                mtime_ns: r.mtime_ns,
                xattrs: attrs.xattrs,
            }),
            (Kind::Symlink, _) => {
                return Err(rejected(format!("{}: symlink without target", item.path)));
            }
            (Kind::File, Data::Base) if exists => Some(Change::SetAttrs { attrs }),
            (Kind::File, Data::Base) => None,
            (Kind::File, Data::Staged(_)) => {
                let (size, content) = self.store_content(item)?;
                Some(Change::Write {
                    attrs,
                    size,
                    content,
                })
            }
            (Kind::File, Data::Content(bytes)) => {
                let e = entry_of(&cairn_fuse::ContentRef::new(bytes.clone())).map_err(rejected)?;
                Some(Change::Write {
                    attrs,
                    size: e.size,
                    content: e.content,
                })
            }
            (Kind::File, _) => Some(Change::Write {
                attrs,
                size: 0,
                content: Content::Inline(Vec::new()),
            }),
        })
    }
}

impl FlushSink for VaultSink {
    fn flush(&self, mut batch: FlushBatch) -> Result<(), FlushError> {
        let span = tracing::info_span!("flush", paths = batch.items.len());
        let _g = span.enter();
        let device = self.publisher.vault.clone();
        let mut vault = device.engine();
        let before = vault.root();
        let now = now_ms();
        let mut out = Outcome::default();
        let mut diverted: Vec<String> = Vec::new();
        let peer_touched = self.publisher.take_peer_touched();
        let mut group = Group::default();

        // Deletions, deepest first. Each path's lookup sees the state before the group, which
        // is right: a group never holds two changes to one path.
        for item in batch
            .items
            .iter()
            .rev()
            .filter(|i| i.record.kind == Kind::Whiteout)
        {
            let p = VaultPath::new(&item.path).map_err(rejected)?;
            let change = match vault.lookup(&p).map_err(rejected)? {
                Some((key, _)) if key.dir => Change::Rmdir,
                Some(_) => Change::Remove,
                None => continue,
            };
            group.push(item.path.clone(), vec![(p, change)]);
            if group.is_full() {
                group.commit(&mut vault, now, &mut out);
            }
        }
        // Creations wait for every deletion: a directory may replace a removed file.
        group.commit(&mut vault, now, &mut out);
        // Only while a deletion is held can a parent be missing for a reason to undo.
        let holding = !self.publisher.guard.overrides().is_empty();
        // Creations and updates, parents first.
        for item in batch
            .items
            .iter_mut()
            .filter(|i| i.record.kind != Kind::Whiteout && !i.record.kind.is_local())
        {
            let p = VaultPath::new(&item.path).map_err(rejected)?;
            if p.is_root() {
                continue;
            }
            // Inside a held deletion: the directories above come back first (committed
            // with what is queued, so the group sees them).
            if holding
                && p.parent()
                    .is_some_and(|d| !d.is_root() && matches!(vault.lookup(&d), Ok(None)))
            {
                group.commit(&mut vault, now, &mut out);
                self.publisher.revive_held_parents(&mut vault, &p, now);
            }
            let existing = vault.lookup(&p).map_err(rejected)?;
            let want_dir = item.record.kind == Kind::Dir;
            // An entry of another kind must go first, in the same commit: a file replaced by
            // a directory or the reverse without a whiteout in this batch, and anything that
            // is not a directory where a symlink goes (the engine creates symlinks only on a
            // free name, while a file write replaces a file or symlink in place).
            let removal = match &existing {
                Some((k, _)) if k.dir && !want_dir => Some(Change::Rmdir),
                Some((k, _)) if !k.dir && want_dir => Some(Change::Remove),
                Some((k, _)) if !k.dir && item.record.kind == Kind::Symlink => Some(Change::Remove),
                _ => None,
            };
            let exists = existing.is_some() && removal.is_none();
            let change = self.change_for(item, exists)?;
            // A peer replaced this file since the last flush: the local edit may not have
            // seen that version, so it goes beside it as a conflict copy, never over it.
            if let Some(Change::Write { .. }) = &change
                && existing.as_ref().is_some_and(|(k, _)| !k.dir)
                && peer_touched.contains(&item.path)
            {
                // The free name is looked up in the committed state.
                group.commit(&mut vault, now, &mut out);
                if let Some(spot) = free_conflict_path(&vault, &p, device.device_id, now) {
                    tracing::warn!(path = %item.path, copy = %spot.as_str(), "local edit raced a peer's change; kept as a conflict copy");
                    match vault.commit([(spot, change.expect("checked"))], now) {
                        Ok(_) => diverted.push(item.path.clone()),
                        Err(e) => {
                            out.refused += 1;
                            out.unsaved.push(item.path.clone());
                            tracing::error!(path = %item.path, error = %e, "engine refused a conflict copy");
                        }
                    }
                    continue;
                }
            }
            let changes: Vec<(VaultPath, Change)> = removal
                .into_iter()
                .chain(change)
                .map(|c| (p.clone(), c))
                .collect();
            if changes.is_empty() {
                continue;
            }
            group.push(item.path.clone(), changes);
            if group.is_full() {
                group.commit(&mut vault, now, &mut out);
            }
        }
        group.commit(&mut vault, now, &mut out);
        let Outcome { refused, unsaved } = out;
        let held = self.publisher.guard_after(&vault, before);
        // Nodes and chunks were written without per-file fsyncs; the publisher makes them durable
        // before a snapshot that references them is announced.
        let report = self.publisher.publish(&mut vault, now).map_err(rejected)?;
        tracing::info!(
            revision = report.revision.0,
            attempts = report.attempts,
            refused,
            "published snapshot"
        );
        self.publisher.show(&vault, None);
        if !held.is_empty() {
            // Deleted through the mount a moment ago, shown again now: the kernel may still
            // remember them as gone.
            self.publisher.invalidate(&held);
        }
        if !diverted.is_empty() {
            // The mount showed the local edit at these paths; they now hold the peer's.
            self.publisher.invalidate(&diverted);
        }
        if !unsaved.is_empty() {
            // Failing keeps these records in the overlay (durable) for the next attempt.
            return Err(FlushError::Rejected(format!(
                "could not commit {} path(s), kept in the local overlay: {}",
                unsaved.len(),
                unsaved.join(", ")
            )));
        }
        Ok(())
    }
}

/// The first conflict-copy name for a local edit of `p` that is not taken.
fn free_conflict_path(
    vault: &cairn_vault::Vault,
    p: &VaultPath,
    device: cairn_crypto::DeviceId,
    now_ms: u64,
) -> Option<VaultPath> {
    (0..100)
        .map(|attempt| cairn_vault::conflict_path_for(p, &device, now_ms, attempt))
        .find(|c| c != p && matches!(vault.lookup(c), Ok(None)))
}

/// Announces the engine's current state as this device's next snapshot.
pub fn publish(
    device: &OpenVault,
    vault: &mut Vault,
    now_ms: u64,
) -> anyhow::Result<PublishReport> {
    // Nodes and chunks were written without per-file fsyncs; make them durable before a
    // snapshot that references them is announced.
    device.blobs.sync()?;
    Ok(vault.publish(&device.registry, now_ms)?)
}

/// Where refused data goes: beside its path, else at the vault root (its directory may be
/// what the engine refused).
fn rescue_paths(p: &VaultPath, now_ms: u64) -> Vec<VaultPath> {
    let name = format!("{}.cairn-rescued-{now_ms}", p.name());
    let mut out = Vec::new();
    if let Some(parent) = p.parent()
        && let Ok(beside) = parent.join(&name)
    {
        out.push(beside);
    }
    let flat = format!("{}.cairn-rescued-{now_ms}", p.as_str().replace('/', "_"));
    if let Ok(root) = VaultPath::root().join(&flat) {
        out.push(root);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_crypto::{AgeIdentity, DeviceKey, VaultSecret};
    use cairn_tree::MemoryNodeStore;
    use cairn_vault::{Keyring, MemoryBlobs, VaultStores};

    fn vault() -> Vault {
        let identity = AgeIdentity::generate();
        let keys = Keyring {
            vault: VaultSecret::from_bytes([3; 32]).vault_id(),
            recipients: vec![identity.recipient()],
            history: Vec::new(),
            identity,
        };
        let stores = VaultStores::new(
            Arc::new(MemoryNodeStore::new()),
            Arc::new(MemoryBlobs::new()),
        );
        Vault::new(stores, keys, DeviceKey::from_bytes([4; 32]))
    }

    fn p(s: &str) -> VaultPath {
        VaultPath::new(s).unwrap()
    }

    fn write(data: &[u8]) -> Change {
        Change::Write {
            attrs: Attrs {
                mode: 0o644,
                mtime_ns: 1,
                xattrs: Default::default(),
            },
            size: data.len() as u64,
            content: Content::Inline(data.to_vec()),
        }
    }

    fn content(vault: &Vault, path: &str) -> Option<Vec<u8>> {
        match vault.lookup(&p(path)).unwrap()?.1.content {
            Content::Inline(bytes) => Some(bytes),
            other => panic!("{path}: unexpected content {other:?}"),
        }
    }

    #[test]
    fn a_refused_path_does_not_hold_back_the_rest_of_its_group_and_keeps_its_data() {
        let mut vault = vault();
        let mkdir = Change::Mkdir {
            attrs: Attrs {
                mode: 0o755,
                mtime_ns: 1,
                xattrs: Default::default(),
            },
        };
        let mut group = Group::default();
        group.push("a".into(), vec![(p("a"), mkdir)]);
        group.push("a/x".into(), vec![(p("a/x"), write(b"x"))]);
        // Its directory does not exist, so the engine refuses it, and with it the group.
        group.push("gone/y".into(), vec![(p("gone/y"), write(b"y"))]);
        group.push("z".into(), vec![(p("z"), write(b"z"))]);
        let mut out = Outcome::default();
        group.commit(&mut vault, 1_000, &mut out);

        assert_eq!(out.refused, 1);
        assert!(out.unsaved.is_empty(), "{:?}", out.unsaved);
        assert!(vault.lookup(&p("a")).unwrap().is_some_and(|(k, _)| k.dir));
        assert_eq!(content(&vault, "a/x").as_deref(), Some(&b"x"[..]));
        assert_eq!(content(&vault, "z").as_deref(), Some(&b"z"[..]));
        assert_eq!(content(&vault, "gone/y"), None);
        assert_eq!(
            content(&vault, "gone_y.cairn-rescued-1000").as_deref(),
            Some(&b"y"[..]),
            "the refused data is kept at the vault root"
        );
        assert!(group.paths.is_empty());
    }
}
