//! Garbage collection of the blob store: the caller marks (works out the set of live ids),
//! the store sweeps everything else.
//!
//! The store only knows blobs, not what references them, so the contract is:
//! 1. [`BlobStore::begin_sweep`] starts recording every id written from now on (new blobs,
//!    and puts that found the blob already present);
//! 2. the caller makes sure everything written *before* that is reachable from what it marks
//!    (in cairn: it waits for in-flight flushes to publish, then reads the heads), and builds
//!    the live set;
//! 3. [`Sweep::sweep`] removes every blob that is neither live nor recorded.
//!
//! Why a concurrent writer cannot lose a blob: a put records its id (under the same lock the
//! sweep holds while it checks and removes a blob) *before* it checks whether the blob is
//! already present. Either the record comes first and the sweep keeps the blob, or the removal
//! comes first and the put finds nothing and writes the blob again.
//!
//! Removing a blob only marks its pack record dead; the space comes back when the sweep then
//! **repacks**: a pack mostly garbage is rewritten by copying its live records into the
//! current pack, fsyncing that, and only then deleting the old pack (see
//! [`BlobStore::repack`]). Packs are picked by [`BlobStore::repack_candidates`]: every pack
//! under half live, then more until dead bytes are at most a sixth of the store.
//!
//! Why a kill at any point is harmless: a removal mark only ever names a record that was
//! garbage when the sweep started (a lost mark merely keeps garbage), and a repack deletes a
//! pack only after copies of its live records are durable (a kill in between leaves two good
//! copies). A killed sweep leaves some garbage behind for the next one.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::Duration;

use crate::blobstore::BlobStore;
use crate::error::{Result, StoreError};
use crate::id::ChunkId;

/// What a sweep removed (or, for a dry run, would remove).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Blobs looked at.
    pub examined: u64,
    /// Blobs neither live nor written during the sweep, and their bytes.
    pub garbage: u64,
    pub garbage_bytes: u64,
    /// Of those, the ones actually removed (0 for a dry run).
    pub removed: u64,
    pub removed_bytes: u64,
    /// Garbage kept because a writer touched it while the sweep ran.
    pub kept_touched: u64,
    /// Stale temp files of crashed writers removed before the sweep.
    pub temps: u64,
    /// Packs rewritten to give the space of removed blobs back, and the bytes that freed
    /// on disk.
    pub repacked: u64,
    pub repacked_bytes: u64,
}

/// How far a sweep got; handed to the progress callback after every blob.
#[derive(Clone, Copy, Debug)]
pub struct SweepProgress {
    pub examined: u64,
    pub removed: u64,
    pub removed_bytes: u64,
}

/// A sweep in progress; see the module docs. Dropping it stops recording writes.
#[derive(Debug)]
pub struct Sweep<'a> {
    store: &'a BlobStore,
}

/// Temp files younger than this may belong to a write in progress.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

impl BlobStore {
    /// Starts a sweep: from now on every written id is recorded and kept. At most one sweep
    /// runs per store handle.
    pub fn begin_sweep(&self) -> Result<Sweep<'_>> {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched.is_some() {
            return Err(StoreError::SweepRunning);
        }
        *touched = Some(HashSet::new());
        Ok(Sweep { store: self })
    }
}

impl Sweep<'_> {
    /// Removes every blob for which `is_live` is false and that no writer touched since
    /// [`BlobStore::begin_sweep`] (a dry run only counts them). Stale temp files go first.
    /// `progress` sees every step and may stop the sweep early (`Break`): what was removed so
    /// far stays removed, the rest is left for the next sweep. A sweep that ran to the end
    /// then repacks what is mostly garbage.
    pub fn sweep(
        &self,
        is_live: impl Fn(&ChunkId) -> bool,
        dry_run: bool,
        mut progress: impl FnMut(SweepProgress) -> ControlFlow<()>,
    ) -> Result<SweepReport> {
        let mut r = SweepReport::default();
        if !dry_run {
            r.temps = self.store.remove_stale_temps(STALE_TEMP_AGE)? as u64;
        }
        for id in self.store.iter()? {
            let id = id?;
            r.examined += 1;
            if !is_live(&id) {
                let Some(len) = self.store.len_of(&id)? else {
                    continue;
                };
                r.garbage += 1;
                r.garbage_bytes += len;
                if !dry_run {
                    match self.remove_unless_touched(&id)? {
                        Some(true) => {
                            r.removed += 1;
                            r.removed_bytes += len;
                        }
                        Some(false) => {}
                        None => r.kept_touched += 1,
                    }
                }
            }
            let step = SweepProgress {
                examined: r.examined,
                removed: r.removed,
                removed_bytes: r.removed_bytes,
            };
            if progress(step).is_break() {
                return Ok(r);
            }
        }
        if !dry_run {
            for n in self.store.repack_candidates() {
                r.repacked_bytes += self.store.repack(n)?;
                r.repacked += 1;
            }
            self.store.sync()?;
        }
        Ok(r)
    }

    /// Removes `id` unless a writer recorded it: `None` if kept, else whether it existed. The
    /// lock is held across the check and the unlink; see the module docs.
    fn remove_unless_touched(&self, id: &ChunkId) -> Result<Option<bool>> {
        let touched = self.store.touched.lock().unwrap_or_else(|e| e.into_inner());
        if touched.as_ref().is_some_and(|t| t.contains(id)) {
            return Ok(None);
        }
        self.store.remove(id).map(Some)
    }

    /// Ids written since the sweep began (tests, diagnostics).
    pub fn touched(&self) -> usize {
        self.store
            .touched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, HashSet::len)
    }
}

impl Drop for Sweep<'_> {
    fn drop(&mut self) {
        *self.store.touched.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Durability;
    use std::sync::Arc;

    #[test]
    fn sweeps_what_is_not_live_and_keeps_what_was_written_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let live = s.put(b"live", Durability::Batch).unwrap();
        let dead = s.put(b"dead", Durability::Batch).unwrap();
        let rewritten = s
            .put(b"garbage but written again", Durability::Batch)
            .unwrap();
        let sweep = s.begin_sweep().unwrap();
        assert!(matches!(s.begin_sweep(), Err(StoreError::SweepRunning)));
        // A dedup hit during the sweep: the blob is referenced again by something unpublished.
        s.put(b"garbage but written again", Durability::Batch)
            .unwrap();
        let new = s.put(b"new during sweep", Durability::Batch).unwrap();
        let dry = sweep
            .sweep(|id| *id == live, true, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!((dry.garbage, dry.removed), (3, 0));
        let r = sweep
            .sweep(|id| *id == live, false, |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!((r.removed, r.kept_touched), (1, 2));
        assert!(!s.has(&dead).unwrap());
        for id in [live, rewritten, new] {
            assert!(s.has(&id).unwrap());
        }
        drop(sweep);
        assert!(s.begin_sweep().is_ok());
    }

    #[test]
    fn a_stopped_sweep_removes_only_garbage() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let ids: Vec<_> = (0..50u32)
            .map(|i| s.put(&i.to_le_bytes(), Durability::Batch).unwrap())
            .collect();
        let live: HashSet<_> = ids.iter().step_by(2).copied().collect();
        let sweep = s.begin_sweep().unwrap();
        let r = sweep
            .sweep(
                |id| live.contains(id),
                false,
                |p| {
                    if p.removed >= 5 {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .unwrap();
        assert_eq!(r.removed, 5);
        assert!(live.iter().all(|id| s.has(id).unwrap()));
        assert_eq!(s.list().unwrap().len(), 45);
    }

    /// Writers racing a sweep of everything: whatever a writer put (again) is present at the
    /// end, however the put and the removal interleave.
    #[test]
    fn concurrent_puts_never_lose_a_blob() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(BlobStore::open(d.path()).unwrap());
        let bodies: Vec<Vec<u8>> = (0..400u32).map(|i| i.to_le_bytes().repeat(64)).collect();
        for b in &bodies {
            s.put(b, Durability::Batch).unwrap();
        }
        for round in 0..5 {
            let sweep = s.begin_sweep().unwrap();
            let writer = {
                let (s, bodies) = (s.clone(), bodies.clone());
                std::thread::spawn(move || {
                    bodies
                        .iter()
                        .skip(round)
                        .step_by(3)
                        .map(|b| s.put(b, Durability::Batch).unwrap())
                        .collect::<Vec<_>>()
                })
            };
            sweep
                .sweep(|_| false, false, |_| ControlFlow::Continue(()))
                .unwrap();
            let written = writer.join().unwrap();
            for id in &written {
                assert_eq!(ChunkId::of(&s.get(id).unwrap()), *id);
            }
            drop(sweep);
            for b in &bodies {
                s.put(b, Durability::Batch).unwrap();
            }
        }
    }
}
