//! Flush scheduling: an idle debounce after changes, immediate requests (fsync, explicit
//! flush), and retry after failures, run on one background thread so the mount keeps serving.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::core::{Core, Flushed};
use crate::sink::FlushError;

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
