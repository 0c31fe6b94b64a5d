//! Flushing: folding the overlay's dirty records into the base through the sink in batches
//! of bounded size ([`Core::flush_once`]), and scheduling it — an idle debounce after
//! changes, immediate requests (fsync, explicit flush), and retry after failures — on one
//! background thread so the mount keeps serving.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cairn_overlay::{OverlayError, Record};

use crate::core::Core;
use crate::sink::{FlushBatch, FlushError, FlushItem, StagedFile};

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    /// Tickets: `requested` counts immediate requests, `started` is the highest request a
    /// running or finished flush covers, `completed` the highest a finished flush covered.
    requested: u64,
    started: u64,
    completed: u64,
    last_error: Option<String>,
    shutdown: bool,
}

pub(crate) struct FlushCtl {
    state: Mutex<State>,
    cv: Condvar,
}

impl FlushCtl {
    pub(crate) fn new() -> FlushCtl {
        FlushCtl {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flush once nothing else has happened for `debounce` (each call restarts the wait).
    pub(crate) fn schedule(&self, debounce: Duration) {
        let mut st = self.lock();
        st.deadline = Some(Instant::now() + debounce);
        self.cv.notify_all();
    }

    /// Asks for a flush that starts after this call; returns its ticket.
    pub(crate) fn request(&self) -> u64 {
        let mut st = self.lock();
        st.requested += 1;
        self.cv.notify_all();
        st.requested
    }

    /// Waits for the flush covering `ticket` and returns its outcome.
    pub(crate) fn wait(&self, ticket: u64) -> Result<(), FlushError> {
        let mut st = self.lock();
        while st.completed < ticket && !st.shutdown {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.completed < ticket {
            return Err(FlushError::Failed("the mount is shutting down".into()));
        }
        match &st.last_error {
            Some(e) => Err(FlushError::Failed(e.clone())),
            None => Ok(()),
        }
    }

    pub(crate) fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        self.cv.notify_all();
    }
}

pub(crate) fn spawn(core: Arc<Core>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cairn-flush".into())
        .spawn(move || run(&core))
}

fn run(core: &Core) {
    let ctl = &core.flush;
    loop {
        let target = {
            let mut st = ctl.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if st.requested > st.started {
                    break;
                }
                match st.deadline {
                    Some(d) if d <= Instant::now() => break,
                    Some(d) => {
                        let wait = d.saturating_duration_since(Instant::now());
                        st = ctl
                            .cv
                            .wait_timeout(st, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    None => st = ctl.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                }
            }
            st.deadline = None;
            st.started = st.requested;
            st.requested
        };
        let result = core.flush_once();
        let mut st = ctl.lock();
        // A capped flush did only part of the work its waiters asked for.
        if !matches!(result, Ok(Flushed::Capped)) {
            st.completed = st.completed.max(target);
        }
        match result {
            Ok(flushed) => {
                st.last_error = None;
                match flushed {
                    Flushed::Clean => {}
                    // Part of one backlog: no reason to wait.
                    Flushed::Capped => st.deadline = Some(Instant::now()),
                    Flushed::ChangedMeanwhile => {
                        if st.deadline.is_none() {
                            st.deadline = Some(Instant::now() + core.opts.flush_debounce);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?core.opts.flush_retry, "flush failed; changes stay in the overlay");
                st.last_error = Some(e.to_string());
                st.deadline = Some(Instant::now() + core.opts.flush_retry);
            }
        }
        ctl.cv.notify_all();
    }
}

// ---- the flush itself ----

impl Core {
    /// One flush: hands every dirty record to the sink and retires what did not change
    /// meanwhile. Returns whether records are left (changed during the flush).
    /// Folds the dirty records into the base through the sink. A batch holds one open
    /// descriptor per staged file, so it takes at most [`staged_per_batch`] of them: the
    /// records in path order up to that many, which keeps parents ahead of their children.
    /// The rest stays in the overlay and is taken by the next call ([`Flushed::Capped`]).
    pub(crate) fn flush_once(&self) -> Result<Flushed, FlushError> {
        let to_flush_err = |e: OverlayError| FlushError::Failed(e.to_string());
        let cap = staged_per_batch();
        // The ignore rules read rules files, which may have to come from a peer: read them
        // once without the namespace lock so the locked pass below finds them local.
        if let Ok(dirty) = self.overlay.dirty() {
            self.publishable(dirty);
        }
        let (batch, keys, capped) = {
            let mut ns = self.ns();
            let mut dirty = self.publishable(self.overlay.dirty().map_err(to_flush_err)?);
            if dirty.is_empty() {
                return Ok(Flushed::Clean);
            }
            let capped = cut_after_staged(&mut dirty, cap);
            // Staging files are opened with the batch, so the sink reads exactly what the
            // batch saw even if a later write releases the staging file.
            let mut items = Vec::with_capacity(dirty.len());
            let mut keys = Vec::with_capacity(dirty.len());
            for (path, record) in dirty {
                let staged = match record.staging() {
                    Some(id) => Some(StagedFile {
                        path: self.overlay.staging_path(id),
                        file: self.overlay.open_staging(id).map_err(to_flush_err)?,
                    }),
                    None => None,
                };
                keys.push((path.clone(), record.generation));
                ns.inflight.insert(path.clone());
                items.push(FlushItem {
                    path,
                    record,
                    staged,
                });
            }
            (FlushBatch { items }, keys, capped)
        };
        let n = keys.len();
        let result = self.sink.flush(batch);
        let mut ns = self.ns();
        ns.inflight.clear();
        result?;
        let released = self
            .overlay
            .retire_keeping_owners(&keys, Some((self.opts.uid, self.opts.gid)))
            .map_err(to_flush_err)?;
        self.drop_released(&ns, released);
        // Ignored records stay in the overlay for good; only the others are left to do.
        let left = !self.overlay.is_empty().map_err(to_flush_err)?
            && !self
                .publishable(self.overlay.dirty().map_err(to_flush_err)?)
                .is_empty();
        tracing::debug!(records = n, left, capped, "flushed overlay");
        Ok(match (left, capped) {
            (false, _) => Flushed::Clean,
            (true, true) => Flushed::Capped,
            (true, false) => Flushed::ChangedMeanwhile,
        })
    }

    /// The dirty records that may leave this device: everything but what the ignore rules
    /// (`.cairnignore`) keep local. A deletion is judged by the kind of what it deletes.
    fn publishable(&self, dirty: Vec<(String, Record)>) -> Vec<(String, Record)> {
        let mut rules = self.ignore_rules();
        dirty
            .into_iter()
            .filter(|(path, r)| {
                let is_dir = match r.kind {
                    cairn_overlay::Kind::Dir => true,
                    cairn_overlay::Kind::Whiteout => self
                        .base
                        .get(path)
                        .ok()
                        .flatten()
                        .is_some_and(|e| e.kind == crate::base::EntryKind::Dir),
                    _ => false,
                };
                !rules.is_ignored(path, is_dir)
            })
            .collect()
    }

    /// Flushes until the overlay is empty (used at unmount, when nothing changes any more).
    pub(crate) fn flush_all(&self) -> Result<(), FlushError> {
        // Capped batches always make progress; only changes arriving during the flush
        // could keep it going, so those rounds are bounded.
        let mut changed_rounds = 0;
        loop {
            match self.flush_once()? {
                Flushed::Clean => return Ok(()),
                Flushed::Capped => {}
                Flushed::ChangedMeanwhile => {
                    changed_rounds += 1;
                    if changed_rounds >= 8 {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// What a [`Core::flush_once`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// The overlay is empty.
    Clean,
    /// The batch was cut to bound open descriptors; flush again right away.
    Capped,
    /// Records changed while the flush ran; they wait for the next debounce.
    ChangedMeanwhile,
}

/// How many staged files one flush batch may hold open: a quarter of the soft descriptor
/// limit (the rest is for the files applications hold open through the mount, the stores
/// and the network), between 64 and 4096.
pub(crate) fn staged_per_batch() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    usize::try_from(soft / 4).unwrap_or(4096).clamp(64, 4096)
}

/// Keeps the records up to and including the `cap`-th one with a staged file; returns
/// whether anything was cut.
fn cut_after_staged(dirty: &mut Vec<(String, Record)>, cap: usize) -> bool {
    let mut staged = 0;
    let cut = dirty.iter().position(|(_, r)| {
        if r.staging().is_some() {
            staged += 1;
        }
        staged > cap
    });
    match cut {
        Some(at) => {
            dirty.truncate(at);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use cairn_overlay::{Data, Kind, StagingId};

    use super::*;

    fn records(staged: &[bool]) -> Vec<(String, Record)> {
        staged
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let mut r = Record::whiteout(0);
                if s {
                    r.kind = Kind::File;
                    r.data = Data::Staged(StagingId(i as u64));
                }
                (format!("p{i:02}"), r)
            })
            .collect()
    }

    #[test]
    fn a_batch_keeps_the_path_order_prefix_with_at_most_cap_staged_files() {
        let mut dirty = records(&[true, false, true, true, false, true]);
        assert!(cut_after_staged(&mut dirty, 2));
        let paths: Vec<_> = dirty.iter().map(|(p, _)| p.as_str()).collect();
        // Records without a staged file ride along until the third staged one.
        assert_eq!(paths, ["p00", "p01", "p02"]);

        let mut dirty = records(&[true, false, true, false]);
        assert!(!cut_after_staged(&mut dirty, 2), "exactly cap staged files");
        assert_eq!(dirty.len(), 4);

        let mut dirty = records(&[false; 10]);
        assert!(!cut_after_staged(&mut dirty, 0), "no staged file, no cut");
        assert_eq!(dirty.len(), 10);
    }

    #[test]
    fn the_batch_size_is_bounded_whatever_the_limit() {
        let n = staged_per_batch();
        assert!((64..=4096).contains(&n), "{n}");
    }
}
