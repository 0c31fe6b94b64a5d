//! Per-path versions: a version vector for causality plus an HLC stamp and the author's
//! device id for deterministic tie-breaks between concurrent versions.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use cairn_crypto::DeviceId;

use crate::clock::Hlc;

/// Pseudo-device that "authors" the versions the merge itself must invent (a directory
/// resurrected under a live child, a file tombstoned because a directory took its name).
/// No real device can have this id: all-zero bytes are not a usable ed25519 public key
/// (small-order point, refused by strict verification). Its counter only ever moves in
/// lockstep with the entry it is derived from, so two devices inventing the version from
/// the same input invent the same version.
pub const MERGE_DEVICE: DeviceId = DeviceId([0; 32]);

/// How two version vectors relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The left side has seen everything the right side has, and more.
    Dominates,
    DominatedBy,
    Concurrent,
}

/// Per-path version vector: for each device, how many of its writes to this path are known.
/// Zero counters are never stored, so equal histories have equal encodings.
#[derive(Clone, PartialEq, Eq, Hash, Default, Debug)]
pub struct VersionVector(BTreeMap<DeviceId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, device: &DeviceId) -> u64 {
        self.0.get(device).copied().unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &u64)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Builds from pairs, dropping zero counters and keeping the maximum per device.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (DeviceId, u64)>) -> Self {
        let mut m = BTreeMap::new();
        for (d, c) in pairs {
            if c > 0 {
                let e = m.entry(d).or_insert(0);
                *e = c.max(*e);
            }
        }
        Self(m)
    }

    /// Records one more write by `device`. Saturates: 2^64 writes to one path by one device
    /// cannot happen, and a wrap-around would silently reorder history.
    pub fn bump(&mut self, device: DeviceId) {
        let e = self.0.entry(device).or_insert(0);
        *e = e.saturating_add(1);
    }

    pub fn bumped(&self, device: DeviceId) -> Self {
        let mut v = self.clone();
        v.bump(device);
        v
    }

    /// Least upper bound: everything either side has seen.
    pub fn join(&self, other: &Self) -> Self {
        let mut m = self.0.clone();
        for (d, &c) in &other.0 {
            let e = m.entry(*d).or_insert(0);
            *e = c.max(*e);
        }
        Self(m)
    }

    pub fn compare(&self, other: &Self) -> Causality {
        let mut greater = false;
        let mut less = false;
        // Walk both sorted maps once.
        let mut a = self.0.iter().peekable();
        let mut b = other.0.iter().peekable();
        loop {
            let step = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((da, _)), Some((db, _))) => da.cmp(db),
            };
            match step {
                Ordering::Less => {
                    greater = true;
                    a.next();
                }
                Ordering::Greater => {
                    less = true;
                    b.next();
                }
                Ordering::Equal => {
                    let (ca, cb) = (a.next().map(|x| *x.1), b.next().map(|x| *x.1));
                    match ca.cmp(&cb) {
                        Ordering::Greater => greater = true,
                        Ordering::Less => less = true,
                        Ordering::Equal => {}
                    }
                }
            }
            if greater && less {
                return Causality::Concurrent;
            }
        }
        match (greater, less) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::DominatedBy,
            (true, true) => Causality::Concurrent,
        }
    }

    /// `self ≥ other` component-wise.
    pub fn covers(&self, other: &Self) -> bool {
        matches!(self.compare(other), Causality::Equal | Causality::Dominates)
    }
}

/// The version of one entry.
///
/// `vv` is everything known about the path's history; `dots` name the writes whose effect
/// this entry carries (one for a local write; several after a merge folded concurrent
/// writes with identical content, or concurrent directory creations, into one entry).
/// They differ from `vv` after a merge joins two versions: the joined vector also covers
/// the losing side's history, but the content is still the winner's. Keeping the writes'
/// identities is what lets a later merge see that a deletion had already seen this
/// content (and must win) — and, conversely, that it had seen only one of two folded
/// writes (and must not) — instead of mistaking a joined vector for a newer edit.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Version {
    pub vv: VersionVector,
    /// When the content of this version was written (by `device`'s clock).
    pub hlc: Hlc,
    /// Author of the content of this version; after a merge join, the winner's author.
    pub device: DeviceId,
    /// The writes (device, that device's counter at the write) this entry's content stands
    /// for; sorted, unique, never empty, each covered by `vv`.
    pub dots: Vec<(DeviceId, u64)>,
}

impl Version {
    /// A fresh local write by `device` on top of `prev` (the path's current vector).
    pub fn write(prev: &VersionVector, device: DeviceId, hlc: Hlc) -> Self {
        let vv = prev.bumped(device);
        let dots = vec![(device, vv.get(&device))];
        Self {
            vv,
            hlc,
            device,
            dots,
        }
    }

    /// Whether `other`'s history includes every write this version's content stands for.
    pub fn content_seen_by(&self, other: &Version) -> bool {
        self.dots.iter().all(|(d, c)| other.vv.get(d) >= *c)
    }

    /// Sorted union of both versions' dots.
    pub fn union_dots(&self, other: &Version) -> Vec<(DeviceId, u64)> {
        let mut dots: Vec<_> = self.dots.iter().chain(&other.dots).copied().collect();
        dots.sort_unstable();
        dots.dedup();
        dots
    }

    /// The deterministic tie-break key between concurrent versions: newest stamp wins,
    /// then the larger device id.
    pub fn tiebreak(&self) -> (Hlc, DeviceId) {
        (self.hlc, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: u8) -> DeviceId {
        DeviceId([b; 32])
    }

    #[test]
    fn compare_basics() {
        let a = VersionVector::from_pairs([(d(1), 1)]);
        let b = VersionVector::from_pairs([(d(2), 1)]);
        let ab = a.join(&b);
        assert_eq!(a.compare(&b), Causality::Concurrent);
        assert_eq!(ab.compare(&a), Causality::Dominates);
        assert_eq!(a.compare(&ab), Causality::DominatedBy);
        assert_eq!(ab.compare(&ab.clone()), Causality::Equal);
        assert_eq!(VersionVector::new().compare(&a), Causality::DominatedBy);
        assert_eq!(a.bumped(d(1)).compare(&a), Causality::Dominates);
        assert_eq!(VersionVector::from_pairs([(d(1), 0)]), VersionVector::new());
    }
}
