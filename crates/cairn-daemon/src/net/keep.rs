//! Pinning and evicting (see `crate::ondemand`): making a tree's content local now, and
//! freeing local content that another member verifiably holds.
//!
//! Eviction never removes the last copy: a file's local chunks go only when a reachable
//! member served the verified end of every one of them just now (`BlobService::holds_all`),
//! and never while a pin covers the file or shares one of its chunks. Chunks go through the
//! store's own `remove`, the path prune's sweep uses, under the engine lock, so no flush
//! publishes in between.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_store::{ChunkId, FileManifest};
use cairn_vault::{Content, Entry, EntryKind, VaultPath, manifest_of};
use serde::{Deserialize, Serialize};

use super::NetNode;
use crate::ondemand::SyncMode;
use crate::sink::view_of;

/// Chunks fetched between two progress reports of a pin (~32 MiB at the average size).
const PIN_STEP: usize = 512;
/// How long one member may take to prove it holds a file's chunks.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// What `cairn evict` did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvictReport {
    /// Files whose local content was freed.
    pub evicted_files: u64,
    /// Plaintext bytes of the chunks removed.
    pub freed_bytes: u64,
    /// Files left as they were, with the reason.
    pub refused: Vec<(String, String)>,
}

/// The live file entries at or below `path` in the current state.
fn files_under(node: &NetNode, path: &VaultPath) -> Result<Vec<(String, Entry)>> {
    let vault = &node.publisher.vault;
    let view = view_of(vault.engine().source());
    let mut out = Vec::new();
    if !path.is_root()
        && let Some((_, e)) = view.get(path)?
    {
        out.push((path.as_str().to_string(), e));
    }
    let scan = if path.is_root() {
        view.scan(&[], None)?
    } else {
        view.scan_prefix(path)?
    };
    for item in scan {
        let (key, e) = item?;
        // A file's key is its path (directories', which end in `/`, are dropped below).
        out.push((String::from_utf8_lossy(&key).into_owned(), e));
    }
    out.retain(|(_, e)| e.kind == EntryKind::File && !matches!(e.content, Content::Inline(_)));
    if out.is_empty() && !path.is_root() && view.get(path)?.is_none() {
        bail!("{path} is not in the vault");
    }
    Ok(out)
}

impl NetNode {
    /// Fetches every chunk of the files at or below `path` that is not local, reporting
    /// `(chunks done, chunks to fetch)` as it goes; how many chunks it fetched.
    pub(crate) fn fetch_path(
        &self,
        path: &VaultPath,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64> {
        let vault = &self.publisher.vault;
        let stores = vault.engine().stores().clone();
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        for (p, e) in files_under(self, path)? {
            let m = manifest_of(stores.blobs.as_ref(), &e.content)
                .with_context(|| format!("the chunk list of {p}"))?
                .with_context(|| format!("the chunk list of {p} is on no reachable member"))?;
            for c in m.chunks() {
                if seen.insert(c.id) && !vault.blobs.has(&c.id).unwrap_or(false) {
                    missing.push(c.id);
                }
            }
        }
        let total = missing.len() as u64;
        progress(0, total);
        let mut done = 0;
        let mut failed = 0;
        for step in missing.chunks(PIN_STEP) {
            let fetcher = self.fetcher.clone();
            let ids = step.to_vec();
            failed += self
                .handle
                .block_on(async move { fetcher.fetch_many(ids, None).await });
            done += step.len() as u64;
            progress(done, total);
        }
        vault.blobs.sync()?;
        if failed > 0 {
            bail!(
                "{failed} of {total} chunks of {path} could not be fetched (no reachable member has them); the pin stays and they are fetched when a member holding them is reachable"
            );
        }
        Ok(total)
    }

    /// Whether some reachable member other than this device serves every one of `ids`; the
    /// reasons of those that did not, if none did.
    fn held_elsewhere(&self, ids: &[ChunkId]) -> Result<(), String> {
        let mut why = Vec::new();
        for d in self.blob_sources() {
            let ids = ids.to_vec();
            let r = self.handle.block_on(async {
                let conn = self.blob_conn(d).await.ok_or("unreachable".to_string())?;
                match tokio::time::timeout(HOLD_TIMEOUT, self.blobs.holds_all(&conn, &ids)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_string()),
                }
            });
            match r {
                Ok(()) => return Ok(()),
                Err(e) => why.push(format!("{}: {e}", d.short())),
            }
        }
        if why.is_empty() {
            why.push("no other member is known".into());
        }
        Err(why.join("; "))
    }

    /// Frees the local content of the files at or below `path` that another member holds
    /// (see the module docs).
    pub(crate) fn evict(&self, path: &VaultPath) -> Result<EvictReport> {
        let vault = &self.publisher.vault;
        let od = &vault.ondemand;
        if od.mode() == SyncMode::Full {
            bail!(
                "this device keeps a full replica (sync mode \"full\"), which would fetch evicted content right back; switch it to on-demand first (`cairn mode on-demand`)"
            );
        }
        if let Some(pin) = od.pinned_by(path.as_str()) {
            bail!("{path} is pinned (by the pin {pin:?}); unpin it first (`cairn unpin`)");
        }
        let files = files_under(self, path)?;
        // Chunks a pinned file shares (identical content) must stay.
        let kept = self.pinned_chunks();
        let mut report = EvictReport::default();
        for (p, e) in files {
            if let Some(pin) = od.pinned_by(&p) {
                report
                    .refused
                    .push((p, format!("pinned by {pin:?}; unpin it first")));
                continue;
            }
            // Only what is local matters; a missing chunk list means nothing is.
            let Ok(Some(m)) = manifest_of(vault.blobs.as_ref(), &e.content) else {
                continue;
            };
            let local = self.local_chunks(&m, &HashSet::new());
            if local.is_empty() {
                continue;
            }
            // Every chunk of the file, not only the local ones: the member must be able to
            // give the whole file back.
            let all: Vec<ChunkId> = m.chunks().iter().map(|c| c.id).collect();
            if let Err(why) = self.held_elsewhere(&all) {
                report.refused.push((
                    p,
                    format!(
                        "no other member can serve all of it right now, so this may be its last copy ({why})"
                    ),
                ));
                continue;
            }
            report.freed_bytes += self
                .remove_chunks(&local, &kept)
                .with_context(|| format!("removing the chunks of {p}"))?;
            report.evicted_files += 1;
            od.forget(&e);
        }
        // Removed blobs only leave the disk when their pack is rewritten.
        vault.blobs.compact()?;
        Ok(report)
    }

    /// The chunks of `m` held here, but those in `kept`, with their plaintext sizes.
    fn local_chunks(&self, m: &FileManifest, kept: &HashSet<ChunkId>) -> Vec<(ChunkId, u64)> {
        let blobs = &self.publisher.vault.blobs;
        m.chunks()
            .iter()
            .filter(|c| !kept.contains(&c.id) && blobs.has(&c.id).unwrap_or(false))
            .map(|c| (c.id, u64::from(c.len)))
            .collect()
    }

    /// Removes `chunks` but those in `kept`; their plaintext bytes.
    fn remove_chunks(&self, chunks: &[(ChunkId, u64)], kept: &HashSet<ChunkId>) -> Result<u64> {
        let vault = &self.publisher.vault;
        // Under the engine lock: no flush publishes a snapshot that reuses one of these
        // chunks while they go (such a snapshot's chunks are on the member that just
        // served them).
        let _engine = vault.engine();
        let mut freed = 0;
        for (id, len) in chunks {
            if !kept.contains(id) && vault.blobs.remove(id)? {
                freed += len;
            }
        }
        Ok(freed)
    }

    /// The chunks of every pinned file.
    fn pinned_chunks(&self) -> HashSet<ChunkId> {
        let vault = &self.publisher.vault;
        let mut kept = HashSet::new();
        for pin in vault.ondemand.pins() {
            let Ok(p) = VaultPath::new(&pin) else {
                continue;
            };
            for (_, e) in files_under(self, &p).unwrap_or_default() {
                if let Ok(Some(m)) = manifest_of(vault.blobs.as_ref(), &e.content) {
                    kept.extend(m.chunks().iter().map(|c| c.id));
                }
            }
        }
        kept
    }

    /// Brings the local store under `max` bytes if it is over: evicts the least recently
    /// read files first, down to 90 % of `max`, with the rules of `cairn evict` (never
    /// pinned content, never content no other member can serve right now). Returns the
    /// store's size afterwards.
    pub(crate) fn reclaim(&self, max: u64) -> Result<u64> {
        let vault = &self.publisher.vault;
        let (_, mut used) = vault.blobs.usage()?;
        if used <= max || vault.ondemand.mode() != SyncMode::OnDemand {
            return Ok(used);
        }
        let target = max - max / 10;
        let kept = self.pinned_chunks();
        let (mut files, mut freed) = (0u64, 0u64);
        for e in vault.ondemand.least_recent() {
            if used <= target || self.stopped() {
                break;
            }
            let Ok(Some(m)) = manifest_of(vault.blobs.as_ref(), &e.content) else {
                continue;
            };
            let local = self.local_chunks(&m, &kept);
            if local.is_empty() {
                continue;
            }
            let all: Vec<ChunkId> = m.chunks().iter().map(|c| c.id).collect();
            if let Err(why) = self.held_elsewhere(&all) {
                tracing::debug!(%why, "cache budget: keeping a file no other member can serve");
                continue;
            }
            let n = self.remove_chunks(&local, &kept)?;
            vault.ondemand.forget(&e);
            files += 1;
            freed += n;
            used = used.saturating_sub(n);
        }
        // Removed blobs only leave the disk when their pack is rewritten.
        vault.blobs.compact()?;
        let (_, after) = vault.blobs.usage()?;
        if files > 0 {
            tracing::info!(
                files,
                freed_bytes = freed,
                store_bytes = after,
                budget = max,
                "cache budget: evicted the least recently read content"
            );
        }
        if after > max {
            tracing::warn!(
                store_bytes = after,
                budget = max,
                "the store is over the cache budget: the rest is pinned, only on this device, or not read through the mount since the daemon started"
            );
        }
        Ok(after)
    }
}

/// How often the cache budget is checked while content arrives.
const RECLAIM_EVERY: Duration = Duration::from_secs(2);

/// Keeps the store within `max` bytes while the daemon runs: checked whenever content was
/// fetched since the last check.
pub(crate) fn reclaim_loop(node: &NetNode, max: u64) {
    let mut seen = u64::MAX;
    while !node.stopped() {
        let (_, fetched) = node.downloads();
        if fetched != seen {
            seen = fetched;
            if let Err(e) = node.reclaim(max) {
                tracing::warn!(error = %format!("{e:#}"), "cache budget check failed");
            }
        }
        let until = std::time::Instant::now() + RECLAIM_EVERY;
        while std::time::Instant::now() < until && !node.stopped() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
