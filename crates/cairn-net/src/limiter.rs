//! Rate limiting of failed pairing requests, per remote endpoint and for the whole device.
//!
//! A failure is any pairing request the inviter refused (a wrong, used or expired token, a
//! recovery proof outside a recovery window, a malformed request). Rules, with the numbers in
//! the constants below:
//! - a remote with [`MAX_FAILURES_PER_REMOTE`] failures within [`FAILURE_WINDOW`] is refused
//!   without its proof being looked at for [`REMOTE_BACKOFF`], then starts afresh;
//! - endpoint ids cost nothing to mint, so on top of that the device as a whole accepts at most
//!   [`MAX_FAILURES_PER_MINUTE`] failures per minute (a fixed window starting at the first
//!   failure); past it every request is refused until the minute is over. A flood from fresh
//!   ids therefore delays legitimate joiners by at most a minute at a time, and cannot make the
//!   inviter do more than that many failed checks per minute.
//!
//! Memory stays bounded without a cap of its own: an entry is kept only while one of its
//! remote's failures is less than ten minutes old ([`FAILURE_WINDOW`] and [`REMOTE_BACKOFF`]
//! are both ten minutes), and failures are recorded in disjoint one-minute windows of at most
//! [`MAX_FAILURES_PER_MINUTE`] each, of which at most 11 overlap any ten minutes: at most
//! `MAX_FAILURES_PER_MINUTE × 11` = 330 remotes are ever tracked. Time is [`Instant`]:
//! monotonic, unaffected by clock changes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_crypto::DeviceId;

/// Failed requests a remote may make within [`FAILURE_WINDOW`] before it backs off.
pub const MAX_FAILURES_PER_REMOTE: u32 = 5;
/// The window in which a remote's failures are counted (from its first failure).
pub const FAILURE_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How long a remote that used up its failures is refused.
pub const REMOTE_BACKOFF: Duration = Duration::from_secs(10 * 60);
/// Failed requests per minute from all remotes together.
pub const MAX_FAILURES_PER_MINUTE: u32 = 30;
const MINUTE: Duration = Duration::from_secs(60);

/// Why a request is refused before its proof is checked, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backoff {
    /// This remote failed too often.
    Remote(Duration),
    /// All remotes together failed too often this minute.
    Global(Duration),
}

impl Backoff {
    /// The sentence sent to the refused joiner.
    pub(crate) fn message(&self) -> String {
        match self {
            Backoff::Remote(wait) => format!(
                "too many failed pairing attempts from this device ({MAX_FAILURES_PER_REMOTE} within {} minutes); retry in {} s",
                FAILURE_WINDOW.as_secs() / 60,
                secs_up(*wait)
            ),
            Backoff::Global(wait) => format!(
                "the member refuses pairing for now: too many failed attempts from any device ({MAX_FAILURES_PER_MINUTE} in the last minute); retry in {} s",
                secs_up(*wait)
            ),
        }
    }
}

fn secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[derive(Debug, Clone, Copy)]
struct Remote {
    /// First failure of the current window.
    since: Instant,
    failures: u32,
    /// Set when the remote used up its failures; it is refused until then.
    blocked_until: Option<Instant>,
}

impl Remote {
    fn blocked_at(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .filter(|&until| until > now)
            .map(|until| until - now)
    }

    fn counting_at(&self, now: Instant) -> bool {
        self.failures > 0 && now.saturating_duration_since(self.since) < FAILURE_WINDOW
    }
}

#[derive(Debug, Default)]
pub(crate) struct FailureLimiter {
    remotes: HashMap<DeviceId, Remote>,
    /// Start of the current global minute and the failures in it.
    minute: Option<(Instant, u32)>,
}

impl FailureLimiter {
    /// Whether `remote` may make a request now; if not, how long it must wait.
    pub(crate) fn check(&mut self, remote: &DeviceId, now: Instant) -> Result<(), Backoff> {
        self.prune(now);
        if let Some(wait) = self.remotes.get(remote).and_then(|r| r.blocked_at(now)) {
            return Err(Backoff::Remote(wait));
        }
        if let Some((start, n)) = self.minute
            && n >= MAX_FAILURES_PER_MINUTE
        {
            return Err(Backoff::Global(
                (start + MINUTE).saturating_duration_since(now),
            ));
        }
        Ok(())
    }

    /// Records a refused request from `remote`.
    pub(crate) fn failed(&mut self, remote: &DeviceId, now: Instant) {
        self.prune(now);
        let minute = self.minute.get_or_insert((now, 0));
        minute.1 = minute.1.saturating_add(1);
        let r = self.remotes.entry(*remote).or_insert(Remote {
            since: now,
            failures: 0,
            blocked_until: None,
        });
        if !r.counting_at(now) {
            r.since = now;
            r.failures = 0;
        }
        r.failures += 1;
        if r.failures >= MAX_FAILURES_PER_REMOTE {
            // It starts afresh once the back-off is over.
            r.blocked_until = Some(now + REMOTE_BACKOFF);
            r.failures = 0;
        }
    }

    /// Forgets what can no longer refuse anybody.
    fn prune(&mut self, now: Instant) {
        if self
            .minute
            .is_some_and(|(start, _)| now.saturating_duration_since(start) >= MINUTE)
        {
            self.minute = None;
        }
        self.remotes
            .retain(|_, r| r.blocked_at(now).is_some() || r.counting_at(now));
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.remotes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> DeviceId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        DeviceId(b)
    }

    #[test]
    fn a_remote_backs_off_after_its_failures_then_starts_afresh() {
        let mut l = FailureLimiter::default();
        let t0 = Instant::now();
        let (a, b) = (id(1), id(2));
        for i in 0..MAX_FAILURES_PER_REMOTE {
            assert_eq!(l.check(&a, t0), Ok(()), "failure {i}");
            l.failed(&a, t0 + Duration::from_secs(u64::from(i)));
        }
        let last = t0 + Duration::from_secs(u64::from(MAX_FAILURES_PER_REMOTE - 1));
        assert_eq!(l.check(&a, last), Err(Backoff::Remote(REMOTE_BACKOFF)));
        let later = last + REMOTE_BACKOFF - Duration::from_secs(1);
        assert_eq!(
            l.check(&a, later),
            Err(Backoff::Remote(Duration::from_secs(1)))
        );
        // Another remote is not affected.
        assert_eq!(l.check(&b, last), Ok(()));
        // After the back-off, a full budget again.
        let after = last + REMOTE_BACKOFF;
        for i in 0..MAX_FAILURES_PER_REMOTE - 1 {
            assert_eq!(l.check(&a, after), Ok(()), "failure {i} after the back-off");
            l.failed(&a, after);
        }
        assert_eq!(l.check(&a, after), Ok(()));
        l.failed(&a, after);
        assert!(matches!(l.check(&a, after), Err(Backoff::Remote(_))));
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_block() {
        let mut l = FailureLimiter::default();
        let a = id(1);
        let mut t = Instant::now();
        for _ in 0..3 * MAX_FAILURES_PER_REMOTE {
            assert_eq!(l.check(&a, t), Ok(()));
            l.failed(&a, t);
            t += FAILURE_WINDOW / (MAX_FAILURES_PER_REMOTE - 1);
        }
    }

    #[test]
    fn fresh_ids_hit_the_global_cap_for_the_rest_of_the_minute() {
        let mut l = FailureLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_FAILURES_PER_MINUTE {
            assert_eq!(l.check(&id(i), t0), Ok(()), "id {i}");
            l.failed(&id(i), t0);
        }
        let t = t0 + Duration::from_secs(20);
        let fresh = id(u32::MAX);
        assert_eq!(
            l.check(&fresh, t),
            Err(Backoff::Global(Duration::from_secs(40)))
        );
        assert!(
            Backoff::Global(Duration::from_millis(1500))
                .message()
                .contains("retry in 2 s")
        );
        assert_eq!(l.check(&fresh, t0 + MINUTE), Ok(()));
    }

    #[test]
    fn tracking_stays_bounded_under_a_flood_of_fresh_ids() {
        let mut l = FailureLimiter::default();
        let mut t = Instant::now();
        // An hour of fresh ids, one a second, each failing if it is let through.
        for n in 0..60 * 60 {
            let fresh = id(n);
            if l.check(&fresh, t).is_ok() {
                l.failed(&fresh, t);
            }
            assert!(
                l.tracked() <= MAX_FAILURES_PER_MINUTE as usize * 11,
                "{}",
                l.tracked()
            );
            t += Duration::from_secs(1);
        }
        assert!(l.tracked() > 0);
        // Quiet for longer than any window: nothing is kept.
        l.prune(t + FAILURE_WINDOW + REMOTE_BACKOFF);
        assert_eq!(l.tracked(), 0);
    }
}
