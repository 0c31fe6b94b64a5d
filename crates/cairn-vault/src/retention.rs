//! Which snapshots history keeps: a restic-style policy (`keep_within`, then hourly, daily,
//! weekly and monthly counts) over the snapshots of every member together.
//!
//! The decision is a pure function of the snapshots' (device, time) and the policy, so every
//! device that knows the same snapshots keeps the same ones. Times are taken relative to the
//! newest snapshot, never to the local clock: a device whose clock is wrong, or that prunes
//! a month after the others, still agrees with them.
//!
//! Rules, applied to all snapshots newest first (ties by device, then id, so the order is
//! total):
//! - the newest snapshot of every device is kept (it is that member's current state);
//! - every snapshot created within `keep_within` of the newest one is kept;
//! - each bucket rule (hour, UTC day, week starting Monday UTC, UTC calendar month) keeps the
//!   newest snapshot of each of its `keep_*` most recent buckets that hold a snapshot.
//!
//! A snapshot is kept if any rule keeps it.

use std::collections::{BTreeSet, HashSet};
use std::hash::Hash;

use cairn_crypto::DeviceId;

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// How much history to keep. The defaults keep a week of everything, then a day's worth of
/// hourly points, a month of daily ones, two months of weekly ones and a year of monthly
/// ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep_within_ms: u64,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            keep_within_ms: 7 * DAY_MS,
            keep_hourly: 24,
            keep_daily: 30,
            keep_weekly: 8,
            keep_monthly: 12,
        }
    }
}

impl RetentionPolicy {
    /// Keeps only the newest snapshot of every device.
    pub fn newest_only() -> Self {
        Self {
            keep_within_ms: 0,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        }
    }
}

/// What the policy needs to know about one snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapTime<Id> {
    pub id: Id,
    pub device: DeviceId,
    pub created_ms: u64,
}

/// The ids of the snapshots `policy` keeps. Duplicated ids count once.
pub fn retained<Id: Copy + Ord + Hash>(
    snaps: &[SnapTime<Id>],
    policy: &RetentionPolicy,
) -> BTreeSet<Id> {
    let mut order: Vec<&SnapTime<Id>> = snaps.iter().collect();
    order.sort_by(|a, b| {
        b.created_ms
            .cmp(&a.created_ms)
            .then(a.device.cmp(&b.device))
            .then(a.id.cmp(&b.id))
    });
    let mut keep = BTreeSet::new();
    let Some(newest) = order.first().map(|s| s.created_ms) else {
        return keep;
    };
    let within_from = newest.saturating_sub(policy.keep_within_ms);
    let mut devices = HashSet::new();
    let mut rules = [
        Bucketer::new(policy.keep_hourly, |t| t / HOUR_MS),
        Bucketer::new(policy.keep_daily, |t| t / DAY_MS),
        // 1970-01-01 was a Thursday: shifting by 3 days starts weeks on Monday.
        Bucketer::new(policy.keep_weekly, |t| (t / DAY_MS + 3) / 7),
        Bucketer::new(policy.keep_monthly, month_of),
    ];
    for s in order {
        let mut kept = devices.insert(s.device);
        kept |= policy.keep_within_ms > 0 && s.created_ms >= within_from;
        for rule in &mut rules {
            kept |= rule.offer(s.created_ms);
        }
        if kept {
            keep.insert(s.id);
        }
    }
    keep
}

/// One bucket rule: keeps the first (newest) snapshot of each new bucket until its count runs
/// out.
struct Bucketer {
    left: u32,
    last: Option<u64>,
    bucket: fn(u64) -> u64,
}

impl Bucketer {
    fn new(count: u32, bucket: fn(u64) -> u64) -> Self {
        Self {
            left: count,
            last: None,
            bucket,
        }
    }

    fn offer(&mut self, t: u64) -> bool {
        if self.left == 0 {
            return false;
        }
        let b = (self.bucket)(t);
        if self.last == Some(b) {
            return false;
        }
        self.last = Some(b);
        self.left -= 1;
        true
    }
}

/// Months since 1970-01 (UTC) of a time in milliseconds.
fn month_of(t: u64) -> u64 {
    let (y, m) = year_month(t / DAY_MS);
    (y - 1970) * 12 + (m - 1)
}

/// Civil year and month of a day count since 1970-01-01 (Howard Hinnant's algorithm, for
/// non-negative day counts).
fn year_month(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap(id: u32, device: u8, created_ms: u64) -> SnapTime<u32> {
        SnapTime {
            id,
            device: DeviceId([device; 32]),
            created_ms,
        }
    }

    #[test]
    fn month_boundaries_are_calendar_months() {
        // 2024-02-29 (leap day) and 2024-03-01.
        let feb29 = 19_782 * DAY_MS;
        assert_eq!(year_month(19_782), (2024, 2));
        assert_eq!(year_month(19_783), (2024, 3));
        assert_eq!(month_of(feb29) + 1, month_of(feb29 + DAY_MS));
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(365), (1971, 1));
    }

    #[test]
    fn newest_only_keeps_the_head_of_every_device() {
        let snaps = [
            snap(1, 1, 10),
            snap(2, 1, 20),
            snap(3, 2, 5),
            snap(4, 2, 15),
        ];
        let kept = retained(&snaps, &RetentionPolicy::newest_only());
        assert_eq!(kept, BTreeSet::from([2, 4]));
    }

    #[test]
    fn keep_within_is_relative_to_the_newest_snapshot() {
        let p = RetentionPolicy {
            keep_within_ms: 100,
            ..RetentionPolicy::newest_only()
        };
        let snaps = [
            snap(1, 1, 1_000),
            snap(2, 1, 5_000),
            snap(3, 1, 4_900),
            snap(4, 1, 4_899),
        ];
        assert_eq!(retained(&snaps, &p), BTreeSet::from([2, 3]));
    }

    #[test]
    fn daily_keeps_the_newest_of_each_of_the_last_days() {
        let p = RetentionPolicy {
            keep_daily: 2,
            ..RetentionPolicy::newest_only()
        };
        let d = DAY_MS;
        let snaps = [
            snap(1, 1, d + 1),
            snap(2, 1, d + 2),
            snap(3, 1, 3 * d + 1),
            snap(4, 1, 3 * d + 5),
            snap(5, 1, 4 * d + 1),
        ];
        // Day 4 (5, also the head), day 3 (its newest, 4); day 1 is past the count.
        assert_eq!(retained(&snaps, &p), BTreeSet::from([4, 5]));
    }

    fn arb_snaps() -> impl Strategy<Value = Vec<SnapTime<u32>>> {
        prop::collection::vec((0u8..4, 0u64..(400 * DAY_MS)), 0..80).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (d, t))| snap(i as u32, d, t))
                .collect()
        })
    }

    fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
        (0u64..(30 * DAY_MS), 0u32..30, 0u32..40, 0u32..10, 0u32..14).prop_map(
            |(w, h, d, wk, m)| RetentionPolicy {
                keep_within_ms: w,
                keep_hourly: h,
                keep_daily: d,
                keep_weekly: wk,
                keep_monthly: m,
            },
        )
    }

    proptest! {
        #![proptest_config(cairn_fuzzkit::config())]

        /// Deterministic whatever order the snapshots are listed in; every device's newest is
        /// kept; everything within the window is kept; nothing but listed ids comes out.
        #[test]
        fn retention_invariants(snaps in arb_snaps(), policy in arb_policy(), seed in any::<u64>()) {
            let kept = retained(&snaps, &policy);
            let mut shuffled = snaps.clone();
            let n = shuffled.len();
            for i in (1..n).rev() {
                let j = (seed.wrapping_mul(i as u64 + 7).rotate_left(i as u32 % 64) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(&retained(&shuffled, &policy), &kept);
            let newest = snaps.iter().map(|s| s.created_ms).max();
            for s in &snaps {
                let head = !snaps.iter().any(|o| {
                    o.device == s.device
                        && (o.created_ms > s.created_ms || (o.created_ms == s.created_ms && o.id < s.id))
                });
                if head {
                    prop_assert!(kept.contains(&s.id), "head of a device dropped");
                }
                if policy.keep_within_ms > 0 && newest.is_some_and(|n| s.created_ms + policy.keep_within_ms >= n) {
                    prop_assert!(kept.contains(&s.id), "snapshot within keep_within dropped");
                }
            }
            prop_assert!(kept.iter().all(|id| snaps.iter().any(|s| s.id == *id)));
            // Bucket rules keep at most their counts beyond the heads and the window.
            let budget = snaps.iter().map(|s| s.device).collect::<HashSet<_>>().len() as u64
                + u64::from(policy.keep_hourly) + u64::from(policy.keep_daily)
                + u64::from(policy.keep_weekly) + u64::from(policy.keep_monthly);
            let within = snaps.iter().filter(|s| policy.keep_within_ms > 0 && newest.is_some_and(|n| s.created_ms + policy.keep_within_ms >= n)).count() as u64;
            prop_assert!(kept.len() as u64 <= budget + within);
        }

        /// A bigger policy never keeps less.
        #[test]
        fn retention_is_monotonic_in_the_policy(snaps in arb_snaps(), p in arb_policy(), extra in 0u32..5) {
            let bigger = RetentionPolicy {
                keep_within_ms: p.keep_within_ms + u64::from(extra) * HOUR_MS,
                keep_hourly: p.keep_hourly + extra,
                keep_daily: p.keep_daily + extra,
                keep_weekly: p.keep_weekly + extra,
                keep_monthly: p.keep_monthly + extra,
            };
            let small = retained(&snaps, &p);
            let big = retained(&snaps, &bigger);
            prop_assert!(small.is_subset(&big));
        }
    }
}
