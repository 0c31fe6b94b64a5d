//! The mass-delete guard's pure part: which state changes delete too much, what a held
//! deletion remembers, how its files stay visible, and the changes that decide it.
//!
//! A hold never touches the merge. The deletion is committed (or merged) as usual, so the
//! engine's tree and every snapshot keep the ordinary merge rules; a hold only remembers the
//! live entries the deletion replaced and lays them over the engine's state in the read view
//! ([`HeldSource`]). The decision is then an ordinary write that every device merges:
//! - reject: the held entries are written again ([`reject_changes`]), with versions that
//!   dominate the tombstones, so every device (the deleting one too) gets the files back;
//! - approve: the tombstones are written again ([`approve_changes`]), with versions that
//!   dominate the held ones, so every device that holds the same deletion sees it decided.
//!
//! A device drops a held path as soon as its tree no longer holds the exact tombstone the
//! hold was made for ([`HeldRecord::prune`]): the path was restored, edited, or deleted
//! again by a decision elsewhere. That is how one decision reaches every holder.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_codec::{Reader, put_bytes, put_varint};
use cairn_crypto::DeviceId;
use cairn_tree::{DiffEntry, NodeId};

use crate::engine::{Attrs, Change};
use crate::entry::{Content, Entry, EntryKind};
use crate::error::{DecodeError, Result};
use crate::path::{EntryKey, MAX_PATH_LEN, VaultPath};
use crate::source::{EntryIter, EntrySource, decode_value, kind_fits_key};
use crate::stores::VaultStores;

/// When a deletion is held: it removes more than `max_delete_share` of the vault's files
/// *and* more than `max_delete_files` files (both, so a small vault can still be emptied by
/// hand and a large one can lose a thousand files without questions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardPolicy {
    /// Share of the live files (0.0 to 1.0).
    pub max_delete_share: f64,
    pub max_delete_files: u64,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        Self {
            max_delete_share: 0.2,
            max_delete_files: 1_000,
        }
    }
}

impl GuardPolicy {
    /// A cheap first test: can `deleted` files be too many in any vault?
    pub fn may_hold(&self, deleted: u64) -> bool {
        deleted > self.max_delete_files
    }

    /// Whether deleting `deleted` of the `live_before` files must be held.
    pub fn holds(&self, deleted: u64, live_before: u64) -> bool {
        // Compared in integers scaled by a million so the result does not depend on rounding
        // of large counts; a share outside 0..=1 is clamped.
        let share = (self.max_delete_share.clamp(0.0, 1.0) * 1_000_000.0).round() as u128;
        self.may_hold(deleted) && u128::from(deleted) * 1_000_000 > share * u128::from(live_before)
    }
}

/// One path a deletion removed: the live entry it had and the tombstone that replaced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldEntry {
    pub key: Vec<u8>,
    pub before: Entry,
    pub tombstone: Entry,
}

impl HeldEntry {
    /// Files and symlinks count toward the guard's limits; directories do not.
    pub fn is_file(&self) -> bool {
        self.before.kind != EntryKind::Dir
    }
}

/// Every path that was live in `old` and is a tombstone in `new`, in key order. Costs one
/// diff walk: proportional to what changed, not to the vault.
pub fn deletions(stores: &VaultStores, old: &NodeId, new: &NodeId) -> Result<Vec<HeldEntry>> {
    let mut out = Vec::new();
    if old == new {
        return Ok(out);
    }
    for d in stores.tree.diff(old, new) {
        if let DiffEntry::Changed { key, old, new } = d? {
            let before = decode_value(&key, &old)?;
            let after = decode_value(&key, &new)?;
            if before.is_live() && after.is_tombstone() {
                out.push(HeldEntry {
                    key,
                    before,
                    tombstone: after,
                });
            }
        }
    }
    Ok(out)
}

/// Live files and symlinks in `source` (a full scan: only worth it once [`GuardPolicy::may_hold`]
/// said the deletion could be too large).
pub fn live_files(source: &dyn EntrySource) -> Result<u64> {
    let mut n = 0u64;
    for item in source.scan(&[], None)? {
        let (_, e) = item?;
        if e.is_live() && e.kind != EntryKind::Dir {
            n += 1;
        }
    }
    Ok(n)
}

/// The device most of `entries` were deleted by (the tombstones' authors).
pub fn main_author(entries: &[HeldEntry]) -> Option<DeviceId> {
    let mut counts: BTreeMap<DeviceId, usize> = BTreeMap::new();
    for e in entries {
        *counts.entry(e.tombstone.version.device).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(d, _)| d)
}

/// A held deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldRecord {
    /// Small and unique on this device; what `cairn approve ID` names.
    pub id: u64,
    /// Who deleted (the author of most of the tombstones).
    pub origin: DeviceId,
    pub created_ms: u64,
    pub entries: Vec<HeldEntry>,
}

impl HeldRecord {
    pub fn files(&self) -> usize {
        self.entries.iter().filter(|e| e.is_file()).count()
    }

    /// Drops the paths whose current entry (per `current`) is no longer the tombstone the
    /// hold was made for; returns their keys.
    pub fn prune(&mut self, current: &dyn EntrySource) -> Result<Vec<Vec<u8>>> {
        let mut gone = Vec::new();
        let mut kept = Vec::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if current.get(&e.key)?.as_ref() == Some(&e.tombstone) {
                kept.push(e);
            } else {
                gone.push(e.key);
            }
        }
        self.entries = kept;
        Ok(gone)
    }
}

/// Changes that bring every held path back, parents before children (reject).
pub fn reject_changes(entries: &[HeldEntry]) -> Vec<(VaultPath, Change)> {
    let mut out: Vec<(usize, VaultPath, Change)> = Vec::new();
    for e in entries {
        let Ok(key) = EntryKey::from_bytes(&e.key) else {
            continue;
        };
        let b = &e.before;
        let attrs = Attrs {
            mode: b.mode,
            mtime_ns: b.mtime_ns,
            xattrs: b.xattrs.clone(),
        };
        let change = match (&b.kind, &b.content) {
            (EntryKind::Dir, _) => Change::Mkdir { attrs },
            (EntryKind::Symlink, Content::Target(t)) => Change::Symlink {
                target: t.clone(),
                mtime_ns: b.mtime_ns,
                xattrs: b.xattrs.clone(),
            },
            (EntryKind::File, content) => Change::Write {
                attrs,
                size: b.size,
                content: content.clone(),
            },
            _ => continue,
        };
        let depth = key.path.as_str().matches('/').count();
        out.push((depth, key.path, change));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    out.into_iter().map(|(_, p, c)| (p, c)).collect()
}

/// Changes that delete every held path once more (approve), children before parents.
pub fn approve_changes(entries: &[HeldEntry]) -> Vec<(VaultPath, Change)> {
    let mut out: Vec<(usize, VaultPath, Change)> = entries
        .iter()
        .filter_map(|e| {
            let key = EntryKey::from_bytes(&e.key).ok()?;
            let depth = key.path.as_str().matches('/').count();
            Some((depth, key.path, Change::Redelete { dir: key.dir }))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    out.into_iter().map(|(_, p, c)| (p, c)).collect()
}

/// An entry source with held entries laid over another: what the mount shows while
/// deletions are held.
pub struct HeldSource {
    base: Arc<dyn EntrySource>,
    held: Arc<BTreeMap<Vec<u8>, Entry>>,
}

impl HeldSource {
    pub fn new(base: Arc<dyn EntrySource>, held: Arc<BTreeMap<Vec<u8>, Entry>>) -> Self {
        Self { base, held }
    }
}

impl EntrySource for HeldSource {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        match self.held.get(key) {
            Some(e) => Ok(Some(e.clone())),
            None => self.base.get(key),
        }
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>) -> Result<EntryIter<'_>> {
        use std::ops::Bound;
        if end.is_some_and(|e| e <= start) {
            return Ok(Box::new(std::iter::empty()));
        }
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_vec()),
            None => Bound::Unbounded,
        };
        let held = self
            .held
            .range((Bound::Included(start.to_vec()), upper))
            .peekable();
        Ok(Box::new(Overlaid {
            base: self.base.scan(start, end)?.peekable(),
            held,
        }))
    }
}

/// Two sorted streams merged; on equal keys the held entry wins.
struct Overlaid<'a, H: Iterator<Item = (&'a Vec<u8>, &'a Entry)>> {
    base: std::iter::Peekable<EntryIter<'a>>,
    held: std::iter::Peekable<H>,
}

impl<'a, H: Iterator<Item = (&'a Vec<u8>, &'a Entry)>> Iterator for Overlaid<'a, H> {
    type Item = Result<(Vec<u8>, Entry)>;

    fn next(&mut self) -> Option<Self::Item> {
        let base_key = match self.base.peek() {
            Some(Ok((k, _))) => Some(k.clone()),
            Some(Err(_)) => return self.base.next(),
            None => None,
        };
        match (base_key, self.held.peek()) {
            (None, None) => None,
            (Some(_), None) => self.base.next(),
            (None, Some(_)) => self.held.next().map(|(k, e)| Ok((k.clone(), e.clone()))),
            (Some(bk), Some((hk, _))) => {
                if bk.as_slice() < hk.as_slice() {
                    return self.base.next();
                }
                if bk.as_slice() == hk.as_slice() {
                    self.base.next();
                }
                self.held.next().map(|(k, e)| Ok((k.clone(), e.clone())))
            }
        }
    }
}

// ---- the held state on disk ----

const MAGIC: &[u8; 8] = b"cairnHLD";
/// The held-state file format this build writes.
pub const HELD_FORMAT_V1: u8 = 1;
/// More records than this are refused on decode (a device holds a handful at most).
pub const MAX_HELD_RECORDS: usize = 4_096;
/// One entry encodes to at least this many bytes (key length, two entry lengths, and each
/// entry's fixed header), which bounds a count against the bytes actually present.
const MIN_ENTRY_BYTES: usize = 3;

/// Every held deletion of one vault, as kept on disk between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldSet {
    pub next_id: u64,
    pub records: Vec<HeldRecord>,
}

impl HeldSet {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(HELD_FORMAT_V1);
        put_varint(&mut out, self.next_id);
        put_varint(&mut out, self.records.len() as u64);
        for r in &self.records {
            put_varint(&mut out, r.id);
            out.extend_from_slice(&r.origin.0);
            put_varint(&mut out, r.created_ms);
            put_varint(&mut out, r.entries.len() as u64);
            for e in &r.entries {
                put_bytes(&mut out, &e.key);
                put_bytes(&mut out, &e.before.encode());
                put_bytes(&mut out, &e.tombstone.encode());
            }
        }
        out
    }

    /// Decodes [`HeldSet::encode`]'s output. Every count is checked against the bytes that
    /// remain before anything is allocated for it, and every entry must be valid and fit its
    /// key (a live entry before, a tombstone after).
    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(DecodeError::Invalid("not a cairn held-deletions file"));
        }
        let format = r.u8()?;
        if format != HELD_FORMAT_V1 {
            return Err(DecodeError::UnknownFormat {
                what: "held deletions",
                version: format,
            });
        }
        let next_id = r.varint()?;
        let n = r.varint()?;
        if n > MAX_HELD_RECORDS as u64 {
            return Err(DecodeError::Invalid("too many held deletions"));
        }
        // A record is at least an id, an origin, a time and a count.
        if n.saturating_mul(35) > r.remaining() as u64 {
            return Err(DecodeError::Truncated);
        }
        let mut records = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let id = r.varint()?;
            if id >= next_id || records.iter().any(|x: &HeldRecord| x.id == id) {
                return Err(DecodeError::Invalid("held deletion ids are not unique"));
            }
            let origin = DeviceId(r.take_array()?);
            let created_ms = r.varint()?;
            let m = r.varint()?;
            if m.saturating_mul(MIN_ENTRY_BYTES as u64) > r.remaining() as u64 {
                return Err(DecodeError::Truncated);
            }
            let mut entries = Vec::with_capacity(m as usize);
            let mut prev: Option<Vec<u8>> = None;
            for _ in 0..m {
                let key = r.bytes()?;
                if key.len() > MAX_PATH_LEN + 1 {
                    return Err(DecodeError::Invalid("held path too long"));
                }
                if prev.as_deref().is_some_and(|p| p >= key) {
                    return Err(DecodeError::NonCanonical("held paths not increasing"));
                }
                let parsed = EntryKey::from_bytes(key)
                    .map_err(|_| DecodeError::Invalid("held key is not a vault path"))?;
                let before = Entry::decode(r.bytes()?)?;
                let tombstone = Entry::decode(r.bytes()?)?;
                before.validate()?;
                tombstone.validate()?;
                if !before.is_live()
                    || !tombstone.is_tombstone()
                    || !kind_fits_key(&parsed, &before)
                {
                    return Err(DecodeError::Invalid(
                        "a held path must pair a live entry with a tombstone",
                    ));
                }
                prev = Some(key.to_vec());
                entries.push(HeldEntry {
                    key: key.to_vec(),
                    before,
                    tombstone,
                });
            }
            records.push(HeldRecord {
                id,
                origin,
                created_ms,
                entries,
            });
        }
        r.finish()?;
        Ok(Self { next_id, records })
    }

    /// The held entries of every record, by key (what the view lays over the engine).
    pub fn overrides(&self) -> BTreeMap<Vec<u8>, Entry> {
        self.records
            .iter()
            .flat_map(|r| r.entries.iter().map(|e| (e.key.clone(), e.before.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::source::MemorySource;
    use crate::version::{Version, VersionVector};
    use proptest::prelude::*;

    fn dev(b: u8) -> DeviceId {
        DeviceId([b; 32])
    }

    fn version(d: u8, n: u64) -> Version {
        Version::write(
            &VersionVector::from_pairs([(dev(d), n)]),
            dev(d),
            Hlc {
                wall_ms: n,
                counter: 0,
            },
        )
    }

    fn file(data: &[u8], d: u8) -> Entry {
        Entry {
            kind: EntryKind::File,
            mode: 0o644,
            mtime_ns: 7,
            size: data.len() as u64,
            xattrs: BTreeMap::new(),
            content: Content::Inline(data.to_vec()),
            version: version(d, 1),
        }
    }

    fn dir(d: u8) -> Entry {
        Entry {
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns: 7,
            size: 0,
            xattrs: BTreeMap::new(),
            content: Content::None,
            version: version(d, 1),
        }
    }

    fn held(key: &str, before: Entry, by: u8) -> HeldEntry {
        HeldEntry {
            key: key.as_bytes().to_vec(),
            before,
            tombstone: Entry::tombstone(version(by, 2)),
        }
    }

    fn sample() -> HeldSet {
        HeldSet {
            next_id: 3,
            records: vec![
                HeldRecord {
                    id: 1,
                    origin: dev(9),
                    created_ms: 1_700_000_000_000,
                    entries: vec![
                        held("a/", dir(1), 9),
                        held("a/x.txt", file(b"hello", 1), 9),
                        held("b", file(b"", 2), 9),
                    ],
                },
                HeldRecord {
                    id: 2,
                    origin: dev(8),
                    created_ms: 5,
                    entries: vec![],
                },
            ],
        }
    }

    #[test]
    fn the_policy_needs_both_limits() {
        let p = GuardPolicy::default();
        // 1001 of 3000: over the count, over 20 %.
        assert!(p.holds(1_001, 3_000));
        // 1000 is not more than 1000.
        assert!(!p.holds(1_000, 3_000));
        // Over the count, but only 10 % of a large vault.
        assert!(!p.holds(2_000, 20_000));
        assert!(p.holds(2_000, 9_999));
        // Exactly 20 % is not more than 20 %.
        assert!(!p.holds(2_000, 10_000));
        // Nothing counted before (a vault that was empty): any deletion over the count.
        assert!(p.holds(1_001, 0));
        let strict = GuardPolicy {
            max_delete_share: 0.0,
            max_delete_files: 0,
        };
        assert!(strict.holds(1, 1_000_000));
        assert!(!strict.holds(0, 10));
        let off = GuardPolicy {
            max_delete_share: 1.0,
            max_delete_files: 0,
        };
        assert!(!off.holds(10, 10));
    }

    proptest! {
        #[test]
        fn holding_is_monotonic_in_the_deleted_count(
            share in 0.0f64..=1.0, files in 0u64..5_000, live in 0u64..100_000, d in 0u64..100_000,
        ) {
            let p = GuardPolicy { max_delete_share: share, max_delete_files: files };
            if p.holds(d, live) {
                prop_assert!(p.holds(d + 1, live));
                prop_assert!(d > files);
                prop_assert!(d as f64 >= share * live as f64 - 1e-6 * live as f64);
            }
        }
    }

    #[test]
    fn the_held_view_shows_held_entries_over_the_base() {
        let mut base = MemorySource::new();
        base.0
            .insert(b"a/".to_vec(), Entry::tombstone(version(9, 2)));
        base.0
            .insert(b"a/x.txt".to_vec(), Entry::tombstone(version(9, 2)));
        base.0.insert(b"c".to_vec(), file(b"c", 1));
        let set = sample();
        let view = HeldSource::new(Arc::new(base), Arc::new(set.overrides()));
        let keys: Vec<(Vec<u8>, bool)> = view
            .scan(&[], None)
            .unwrap()
            .map(|r| r.map(|(k, e)| (k, e.is_live())).unwrap())
            .collect();
        assert_eq!(
            keys,
            vec![
                (b"a/".to_vec(), true),
                (b"a/x.txt".to_vec(), true),
                (b"b".to_vec(), true),
                (b"c".to_vec(), true)
            ]
        );
        assert_eq!(view.get(b"a/x.txt").unwrap(), Some(file(b"hello", 1)));
        let part: Vec<Vec<u8>> = view
            .scan(b"a/x", Some(b"c"))
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(part, vec![b"a/x.txt".to_vec(), b"b".to_vec()]);
        assert_eq!(view.scan(b"c", Some(b"b")).unwrap().count(), 0);
    }

    #[test]
    fn prune_keeps_only_paths_still_at_the_held_tombstone() {
        let mut set = sample();
        let mut current = MemorySource::new();
        current
            .0
            .insert(b"a/".to_vec(), Entry::tombstone(version(9, 2)));
        // Restored by somebody: a live entry.
        current.0.insert(b"a/x.txt".to_vec(), file(b"back", 3));
        // Deleted again by a decision elsewhere: another tombstone.
        current
            .0
            .insert(b"b".to_vec(), Entry::tombstone(version(9, 3)));
        let gone = set.records[0].prune(&current).unwrap();
        assert_eq!(gone, vec![b"a/x.txt".to_vec(), b"b".to_vec()]);
        assert_eq!(set.records[0].entries.len(), 1);
        assert_eq!(set.records[0].entries[0].key, b"a/");
    }

    #[test]
    fn decisions_order_parents_around_children() {
        let set = sample();
        let back: Vec<String> = reject_changes(&set.records[0].entries)
            .into_iter()
            .map(|(p, _)| p.as_str().to_string())
            .collect();
        assert_eq!(back, vec!["a", "b", "a/x.txt"]);
        let gone: Vec<String> = approve_changes(&set.records[0].entries)
            .into_iter()
            .map(|(p, _)| p.as_str().to_string())
            .collect();
        assert_eq!(gone, vec!["a/x.txt", "a", "b"]);
    }

    #[test]
    fn main_author_is_whoever_deleted_most() {
        let e = vec![
            held("a", file(b"", 1), 3),
            held("b", file(b"", 1), 4),
            held("c", file(b"", 1), 4),
        ];
        assert_eq!(main_author(&e), Some(dev(4)));
        assert_eq!(main_author(&[]), None);
    }

    /// Two engines sharing stores, like two devices that have exchanged every blob.
    fn two_devices() -> (crate::engine::Vault, crate::engine::Vault) {
        use cairn_crypto::{AgeIdentity, DeviceKey, VaultSecret};
        let identity = AgeIdentity::generate();
        let keys = crate::snapshot::Keyring {
            vault: VaultSecret::from_bytes([7; 32]).vault_id(),
            recipients: vec![identity.recipient()],
            history: Vec::new(),
            identity,
        };
        let stores = VaultStores::new(
            Arc::new(cairn_tree::MemoryNodeStore::new()),
            Arc::new(crate::stores::MemoryBlobs::new()),
        );
        let a =
            crate::engine::Vault::new(stores.clone(), keys.clone(), DeviceKey::from_bytes([1; 32]));
        let b = crate::engine::Vault::new(stores, keys, DeviceKey::from_bytes([2; 32]));
        (a, b)
    }

    fn vp(s: &str) -> VaultPath {
        VaultPath::new(s).unwrap()
    }

    /// Deletes `d` with its files on `a`, hands the result to `b`; returns what each would hold.
    fn delete_tree(
        a: &mut crate::engine::Vault,
        b: &mut crate::engine::Vault,
        now: u64,
    ) -> (Vec<HeldEntry>, Vec<HeldEntry>) {
        let before = a.root();
        let mut changes: Vec<(VaultPath, Change)> = (0..10)
            .map(|i| (vp(&format!("d/f{i}")), Change::Remove))
            .collect();
        changes.push((vp("d"), Change::Rmdir));
        a.commit(changes, now).unwrap();
        let held_a = deletions(a.stores(), &before, &a.root()).unwrap();
        let s = a.snapshot(now).unwrap();
        let before = b.root();
        b.receive(s.id).unwrap();
        let held_b = deletions(b.stores(), &before, &b.root()).unwrap();
        (held_a, held_b)
    }

    #[test]
    fn decisions_reach_every_holder_through_ordinary_merges() {
        let (mut a, mut b) = two_devices();
        let mut setup = vec![(
            vp("d"),
            Change::Mkdir {
                attrs: Attrs {
                    mode: 0o755,
                    ..Attrs::default()
                },
            },
        )];
        for i in 0..10 {
            setup.push((
                vp(&format!("d/f{i}")),
                Change::write_inline(format!("file {i}").into_bytes(), 0o644, 1),
            ));
        }
        setup.push((vp("keep"), Change::write_inline(b"keep".to_vec(), 0o644, 1)));
        a.commit(setup, 10).unwrap();
        let s = a.snapshot(10).unwrap();
        b.receive(s.id).unwrap();
        let policy = GuardPolicy {
            max_delete_share: 0.5,
            max_delete_files: 5,
        };
        assert_eq!(live_files(&b.source()).unwrap(), 11);

        // Deleted on A: both devices see the same eleven deletions, too many for the policy.
        let (held_a, held_b) = delete_tree(&mut a, &mut b, 20);
        assert_eq!(held_a.len(), 11);
        assert_eq!(held_a, held_b);
        assert!(policy.holds(10, 11));
        assert_eq!(main_author(&held_b), Some(a.device()));
        let mut rec_a = HeldRecord {
            id: 1,
            origin: a.device(),
            created_ms: 20,
            entries: held_a,
        };

        // Rejected on B: the files come back on A through an ordinary merge, A's hold lets go,
        // and nothing new looks deleted there.
        b.commit(reject_changes(&held_b), 30).unwrap();
        let s = b.snapshot(30).unwrap();
        let before = a.root();
        a.receive(s.id).unwrap();
        assert_eq!(rec_a.prune(&a.source()).unwrap().len(), 11);
        assert!(rec_a.entries.is_empty());
        assert!(
            deletions(a.stores(), &before, &a.root())
                .unwrap()
                .is_empty()
        );
        let (_, f3) = a.lookup(&vp("d/f3")).unwrap().unwrap();
        assert_eq!(f3.content, Content::Inline(b"file 3".to_vec()));
        assert_eq!(live_files(&a.source()).unwrap(), 11);

        // Deleted again on A, approved on B: A's hold lets go and the files stay deleted.
        let (held_a, held_b) = delete_tree(&mut a, &mut b, 40);
        let mut rec_a = HeldRecord {
            id: 2,
            origin: a.device(),
            created_ms: 40,
            entries: held_a,
        };
        b.commit(approve_changes(&held_b), 50).unwrap();
        let s = b.snapshot(50).unwrap();
        let before = a.root();
        a.receive(s.id).unwrap();
        assert_eq!(rec_a.prune(&a.source()).unwrap().len(), 11);
        assert!(
            deletions(a.stores(), &before, &a.root())
                .unwrap()
                .is_empty()
        );
        assert_eq!(a.lookup(&vp("d/f3")).unwrap(), None);
        assert_eq!(live_files(&a.source()).unwrap(), 1);
        // And the two devices agree.
        let s = a.snapshot(60).unwrap();
        b.receive(s.id).unwrap();
        assert_eq!(a.root(), b.root());
    }

    #[test]
    fn held_sets_round_trip() {
        let set = sample();
        assert_eq!(HeldSet::decode(&set.encode()).unwrap(), set);
        assert_eq!(
            HeldSet::decode(&HeldSet::default().encode()).unwrap(),
            HeldSet::default()
        );
    }

    #[test]
    fn forged_counts_fail_before_allocating() {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.push(HELD_FORMAT_V1);
        put_varint(&mut b, 10);
        put_varint(&mut b, MAX_HELD_RECORDS as u64);
        assert!(HeldSet::decode(&b).is_err());
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.push(HELD_FORMAT_V1);
        put_varint(&mut b, 10);
        put_varint(&mut b, 1);
        put_varint(&mut b, 1);
        b.extend_from_slice(&[1; 32]);
        put_varint(&mut b, 0);
        put_varint(&mut b, u64::MAX);
        assert!(HeldSet::decode(&b).is_err());
    }

    proptest! {
        #![proptest_config(cairn_fuzzkit::config())]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = HeldSet::decode(&bytes);
        }

        #[test]
        fn mutated_sets_decode_or_fail_cleanly(edits in cairn_fuzzkit::edits()) {
            let mut bytes = sample().encode();
            for (op, at, x) in edits {
                cairn_fuzzkit::mutate(&mut bytes, op, at, x);
            }
            if let Ok(set) = HeldSet::decode(&bytes) {
                // Whatever decodes is canonical: it encodes back to the same bytes.
                prop_assert_eq!(set.encode(), bytes);
            }
        }
    }
}
