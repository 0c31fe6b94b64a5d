//! Hybrid logical clock: wall-clock milliseconds plus a counter.
//!
//! HLC stamps are only used to break ties between *concurrent* versions (the newest edit
//! keeps the name) and to name conflict copies. Causality is the version vectors' job, so a
//! device with a wrong wall clock can only influence which of two concurrent edits keeps
//! the name, never whether an edit survives.

use std::fmt;

/// A hybrid logical clock stamp. Ordered by `(wall_ms, counter)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hlc {
    pub wall_ms: u64,
    pub counter: u32,
}

impl Hlc {
    pub const ZERO: Hlc = Hlc {
        wall_ms: 0,
        counter: 0,
    };

    /// Advances this clock for a local event at physical time `now_ms` and returns the new
    /// stamp, which is strictly greater than every stamp issued or observed before.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            self.wall_ms = now_ms;
            self.counter = 0;
        } else {
            self.bump_counter();
        }
        *self
    }

    /// Merges a remote stamp so that later local stamps order after it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > *self {
            *self = remote;
        }
    }

    fn bump_counter(&mut self) {
        match self.counter.checked_add(1) {
            Some(c) => self.counter = c,
            // 4 billion events in one millisecond cannot happen honestly; moving the wall
            // clock forward keeps stamps strictly increasing anyway.
            None => {
                self.wall_ms = self.wall_ms.saturating_add(1);
                self.counter = 0;
            }
        }
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.wall_ms, self.counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_monotonic_even_when_time_goes_back() {
        let mut c = Hlc::ZERO;
        let a = c.tick(100);
        let b = c.tick(100);
        let d = c.tick(50);
        let e = c.tick(200);
        assert!(a < b && b < d && d < e);
        assert_eq!(
            e,
            Hlc {
                wall_ms: 200,
                counter: 0
            }
        );
    }

    #[test]
    fn observe_then_tick_orders_after_remote() {
        let mut c = Hlc::ZERO;
        c.tick(10);
        let remote = Hlc {
            wall_ms: 1_000,
            counter: 7,
        };
        c.observe(remote);
        assert!(c.tick(20) > remote);
        let mut m = Hlc {
            wall_ms: 5,
            counter: u32::MAX,
        };
        assert!(
            m.tick(5)
                > Hlc {
                    wall_ms: 5,
                    counter: u32::MAX
                }
        );
    }
}
