//! The mount's write side: overlay flush batches become engine commits, then a published
//! snapshot, then the base the mount reads from.
//!
//! A batch is the final state of each dirty path, not a log of operations, so it is replayed
//! as: deletions deepest-first (a directory after its children), then creations and updates
//! in path order (a directory before its children). Each path is committed on its own, so one
//! path the engine refuses (say, a concurrent peer change made it invalid) cannot hold every
//! other change hostage. A refused change that carries data (file content, a symlink target)
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
use super::device::{Device, now_ms};
use super::hub::Hub;

pub struct VaultSink {
    pub hub: Arc<Hub>,
}

/// The view the mount shows for the engine's current state.
pub fn view_of(source: TreeSource) -> MergedView {
    MergedView::new(vec![("own".to_string(), Arc::new(source))])
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
        let device = &self.hub.device;
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
        let manifest =
            write_file_with(&device.blobs, &device.content_key, reader, opts).map_err(rejected)?;
        let sealer = ChunkSealer::new(&device.content_key);
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
            (Kind::Dir, _) if exists => Some(Change::SetAttrs { attrs }),
            (Kind::Dir, _) => Some(Change::Mkdir { attrs }),
            (Kind::Symlink, Data::Target(t)) => Some(Change::Symlink {
                target: t.clone(),
                mtime_ns: r.mtime_ns,
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
        let device = self.hub.device.clone();
        let mut vault = device.vault();
        let now = now_ms();
        let mut refused = 0usize;
        let mut unsaved: Vec<String> = Vec::new();
        let mut diverted: Vec<String> = Vec::new();
        let peer_touched = self.hub.take_peer_touched();

        // Deletions, deepest first.
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
            if let Err(e) = vault.commit([(p, change)], now) {
                refused += 1;
                tracing::error!(path = %item.path, error = %e, "engine refused a deletion");
            }
        }
        // Creations and updates, parents first.
        for item in batch
            .items
            .iter_mut()
            .filter(|i| i.record.kind != Kind::Whiteout)
        {
            let p = VaultPath::new(&item.path).map_err(rejected)?;
            if p.is_root() {
                continue;
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
                && let Some(spot) = free_conflict_path(&vault, &p, device.device_id, now)
            {
                tracing::warn!(path = %item.path, copy = %spot.as_str(), "local edit raced a peer's change; kept as a conflict copy");
                match vault.commit([(spot, change.expect("checked"))], now) {
                    Ok(_) => diverted.push(item.path.clone()),
                    Err(e) => {
                        refused += 1;
                        unsaved.push(item.path.clone());
                        tracing::error!(path = %item.path, error = %e, "engine refused a conflict copy");
                    }
                }
                continue;
            }
            let changes: Vec<(VaultPath, Change)> = removal
                .into_iter()
                .chain(change)
                .map(|c| (p.clone(), c))
                .collect();
            if changes.is_empty() {
                continue;
            }
            if let Err(e) = vault.commit(changes.clone(), now) {
                refused += 1;
                tracing::error!(path = %item.path, error = %e, "engine refused a change");
                let Some((_, data_change)) = changes
                    .into_iter()
                    .rev()
                    .find(|(_, c)| matches!(c, Change::Write { .. } | Change::Symlink { .. }))
                else {
                    continue;
                };
                let mut saved = false;
                for spot in rescue_paths(&p, now) {
                    if vault
                        .commit([(spot.clone(), data_change.clone())], now)
                        .is_ok()
                    {
                        tracing::warn!(path = %item.path, rescued_to = %spot.as_str(), "kept refused data beside its path");
                        saved = true;
                        break;
                    }
                }
                if !saved {
                    unsaved.push(item.path.clone());
                }
            }
        }
        // Nodes and chunks were written without per-file fsyncs; the hub makes them durable
        // before a snapshot that references them is announced.
        let report = self.hub.publish(&mut vault, now).map_err(rejected)?;
        tracing::info!(
            revision = report.revision.0,
            attempts = report.attempts,
            refused,
            "published snapshot"
        );
        self.hub.show(&vault, None);
        if !diverted.is_empty() {
            // The mount showed the local edit at these paths; they now hold the peer's.
            self.hub.invalidate(&diverted);
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
pub fn publish(device: &Device, vault: &mut Vault, now_ms: u64) -> anyhow::Result<PublishReport> {
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
