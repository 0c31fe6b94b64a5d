//! The merge: two snapshots in, one snapshot out, no data lost.
//!
//! Input is the stream of keys on which the two trees differ (the tree diff skips equal
//! subtrees, so the cost is proportional to the changes, not to the vault). Each differing
//! key is resolved on its own ([`resolve`]); then losers of concurrent edits are placed at
//! conflict names and a post-pass restores the directory invariants around the changed
//! keys only. Every step is a symmetric, deterministic function of the two inputs, so
//! `merge(a, b)` and `merge(b, a)` produce the same entries (and therefore, the tree being
//! history-independent, the same root), and merging a result into either input again
//! changes nothing.
//!
//! The rules, per key:
//! - equal entries, or one version vector dominating the other: keep the newer;
//! - concurrent vectors where one side has already seen the write behind the other's
//!   content (see [`Version::dots`]): the side that saw it wins, with the joined vector;
//! - concurrent tombstone vs live entry: the live entry wins, with the joined vector so
//!   the deletion can never win later;
//! - concurrent tombstones, concurrent directories, or concurrent entries with the same
//!   content: one entry with the joined vector (no conflict copy: nothing would be lost);
//! - concurrent live files/symlinks with different content: the newest by (HLC, device)
//!   keeps the name with the joined vector; the other is kept at a conflict name (see
//!   [`crate::conflict`]) as a new file with a version derived from the loser's.
//!
//! Post-pass, over changed keys and their ancestors:
//! - a live entry whose parent directory is missing or tombstoned resurrects that
//!   directory (directories are merged, never replaced);
//! - a directory that ends up tombstoned while a live entry remains below it is resurrected;
//! - a file and a directory with the same name: the file moves to a conflict name.
//!
//! Hard links (see [`cairn_link`]): every name of a linked file is its own key and is
//! resolved by the rules above like any other. After that, a file whose link group is not
//! coherent — a listed name is gone, holds other content, or lists other names — loses
//! its group (a version invented by the merge) and is an ordinary file with its own
//! content; names that listed it follow. So two devices writing through different names,
//! a write racing an unlink of another name, or a name replaced while another device
//! writes, never lose content: at worst the link is broken and the losing content sits in
//! a conflict copy. Conflict copies never belong to a group.
//!
//! Versions the merge itself must invent (resurrections, the tombstone left where a file
//! lost its name to a directory) are authored by [`MERGE_DEVICE`] and derived only from
//! the entry they replace, so every device invents the identical version.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::clock::Hlc;
use crate::conflict::conflict_path;
use crate::entry::{Content, Entry, EntryKind};
use crate::error::Result;
use crate::path::{EntryKey, VaultPath, prefix_successor};
use crate::source::EntrySource;
use crate::version::{Causality, MERGE_DEVICE, Version, VersionVector};
use cairn_link::{LINK_XATTR, LinkGroup};

/// Default mode of a directory the merge has to create.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// Attempts at a free conflict name before giving up on sensible names. Reaching this
/// needs more than a thousand unrelated live versions at one conflict name.
const MAX_CONFLICT_ATTEMPTS: u32 = 1024;

/// Entries to write, ascending by key.
pub type Batch = Vec<(Vec<u8>, Entry)>;

/// One key on which the two sides differ.
#[derive(Clone, Debug)]
pub struct DiffRow {
    pub key: Vec<u8>,
    pub ours: Option<Entry>,
    pub theirs: Option<Entry>,
}

/// The outcome of resolving one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub keep: Entry,
    /// A losing concurrent version that must be kept under a conflict name.
    pub loser: Option<Entry>,
}

/// A conflict the merge resolved by keeping both versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The path both versions wanted.
    pub path: VaultPath,
    /// Where the losing version now lives.
    pub copy: VaultPath,
    /// Author of the losing version.
    pub loser: cairn_crypto::DeviceId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Keys on which the two inputs differed.
    pub differing: usize,
    /// Keys whose merged value differs from the first input (what gets written).
    pub written: usize,
    pub conflicts: Vec<Conflict>,
    /// Directories brought back because something live remained in them.
    pub resurrected: Vec<VaultPath>,
    /// Files moved aside because a directory took their name.
    pub displaced: Vec<Conflict>,
}

/// Orders two entries for tie-breaks: (HLC, author) first, then the encoding, so the order
/// is total even for versions that should never occur (equal stamps from one device).
fn tiebreak_cmp(a: &Entry, b: &Entry) -> Ordering {
    a.version
        .tiebreak()
        .cmp(&b.version.tiebreak())
        .then_with(|| a.encode().cmp(&b.encode()))
}

fn with_vv(e: &Entry, vv: VersionVector) -> Entry {
    let mut e = e.clone();
    e.version.vv = vv;
    e
}

/// `w` with the joined vector, standing for both sides' writes (nothing of `l`'s is lost
/// by folding it in: same content, a directory, or both deletions).
fn folded(w: &Entry, l: &Entry, vv: VersionVector) -> Entry {
    let mut e = with_vv(w, vv);
    e.version.dots = w.version.union_dots(&l.version);
    e
}

/// Resolves two versions of one key. Symmetric: `resolve(a, b) == resolve(b, a)`.
pub fn resolve(a: &Entry, b: &Entry, dir_key: bool) -> Resolution {
    let keep = |e: &Entry| Resolution {
        keep: e.clone(),
        loser: None,
    };
    if a == b {
        return keep(a);
    }
    match a.version.vv.compare(&b.version.vv) {
        Causality::Dominates => return keep(a),
        Causality::DominatedBy => return keep(b),
        // Equal vectors on different entries only arise from several producers on one
        // device racing; treating them as concurrent keeps both.
        Causality::Equal | Causality::Concurrent => {}
    }
    let vv = a.version.vv.join(&b.version.vv);
    // Concurrent vectors, but one side may already have seen the write behind the other's
    // content (the vectors were joined by an earlier merge): then that content is simply
    // older, and the side that saw it wins outright.
    let a_seen = a.version.content_seen_by(&b.version);
    let b_seen = b.version.content_seen_by(&a.version);
    if a_seen != b_seen {
        let newer = if a_seen { b } else { a };
        return keep(&with_vv(newer, vv));
    }
    let (w, l) = match tiebreak_cmp(a, b) {
        Ordering::Less => (b, a),
        _ => (a, b),
    };
    match (w.is_live(), l.is_live()) {
        (false, false) => keep(&folded(w, l, vv)),
        (true, false) => keep(&with_vv(w, vv)),
        (false, true) => keep(&with_vv(l, vv)),
        (true, true) if dir_key || w.same_payload(l) => keep(&folded(w, l, vv)),
        (true, true) => Resolution {
            keep: with_vv(w, vv),
            loser: Some(l.clone()),
        },
    }
}

/// Resolves a key one side may not have (a side without the key never saw the path).
pub fn resolve_opt(a: Option<&Entry>, b: Option<&Entry>, dir_key: bool) -> Option<Resolution> {
    match (a, b) {
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => Some(Resolution {
            keep: x.clone(),
            loser: None,
        }),
        (Some(a), Some(b)) => Some(resolve(a, b, dir_key)),
    }
}

/// A directory standing in for `replaced` (a tombstone, or nothing): its version dominates
/// `replaced` and depends on nothing else.
fn resurrected_dir(replaced: Option<&Entry>) -> Entry {
    let version = match replaced {
        Some(t) => invented(&t.version),
        None => Version::write(&VersionVector::new(), MERGE_DEVICE, Hlc::ZERO),
    };
    Entry {
        kind: EntryKind::Dir,
        mode: DEFAULT_DIR_MODE,
        mtime_ns: 0,
        size: 0,
        xattrs: BTreeMap::new(),
        content: Content::None,
        version,
    }
}

/// The version of a conflict copy: a new file at a new path, so it starts a history of its
/// own instead of carrying the loser's vector (per-path counters mean nothing at another
/// path, and an unrelated history there could compare as equal or dominating). It is
/// authored by a pseudo-device derived from the loser's version and the copy's path, so
/// every device that makes this copy makes the identical entry, and any later edit or
/// deletion of the copy dominates it.
fn copy_version(loser: &Version, copy: &VaultPath) -> Version {
    let mut enc = Vec::new();
    crate::entry::encode_version(&mut enc, loser);
    let mut h = blake3::Hasher::new_derive_key("cairn conflict copy version v1");
    h.update(&(copy.as_str().len() as u64).to_le_bytes());
    h.update(copy.as_str().as_bytes());
    h.update(&enc);
    let author = cairn_crypto::DeviceId(*h.finalize().as_bytes());
    Version {
        vv: VersionVector::from_pairs([(author, 1)]),
        hlc: loser.hlc,
        device: loser.device,
        dots: vec![(author, 1)],
    }
}

/// A conflict copy of `loser`: its content under its own version, outside any link group
/// (it is a new file at a new name; the group's names do not include it).
fn unlinked_copy(loser: &Entry, version: Version) -> Entry {
    let mut e = Entry {
        version,
        ..loser.clone()
    };
    e.xattrs.remove(LINK_XATTR);
    e
}

/// A version the merge invents in place of `replaced`: it dominates `replaced`, and is a
/// function of it alone.
fn invented(replaced: &Version) -> Version {
    Version::write(&replaced.vv, MERGE_DEVICE, replaced.hlc)
}

/// The merged state under construction: `ours` plus the values decided so far.
struct State<'a> {
    ours: &'a dyn EntrySource,
    /// Every key whose merged value is decided, with that value.
    decided: BTreeMap<Vec<u8>, Entry>,
    /// What `ours` holds for each decided key (to compute the write batch).
    ours_at: BTreeMap<Vec<u8>, Option<Entry>>,
    /// Point lookups already made in `ours` during this merge (`ours` never changes, and
    /// many changed keys share ancestors), so each key is read from the tree at most once.
    ours_memo: HashMap<Vec<u8>, Option<Entry>>,
    report: MergeReport,
}

impl State<'_> {
    /// `ours.get(key)`, memoized for the duration of the merge.
    fn ours_get(&mut self, key: &[u8]) -> Result<Option<Entry>> {
        if let Some(e) = self.ours_memo.get(key) {
            return Ok(e.clone());
        }
        let e = self.ours.get(key)?;
        self.ours_memo.insert(key.to_vec(), e.clone());
        Ok(e)
    }

    /// Reads into the memo what the post-pass will read for the live decided key `key`: its
    /// ancestors' directory keys and its file/directory twin. Called while the diff streams,
    /// when the leaves around `key` were just loaded: the post-pass runs only after the whole
    /// diff, and by then a large merge has pushed those leaves out of the node cache, so
    /// reading them there loaded each a second time.
    fn prefetch_neighbours(&mut self, key: &[u8]) -> Result<()> {
        // A malformed key is the post-pass's to report; there is nothing to prefetch for it.
        let Ok(ekey) = EntryKey::from_bytes(key) else {
            return Ok(());
        };
        let twin = if ekey.dir {
            ekey.path.file_key()
        } else {
            ekey.path.dir_key()
        };
        for k in ekey
            .path
            .ancestors()
            .map(|a| a.dir_key())
            .chain(std::iter::once(twin))
        {
            if !self.decided.contains_key(&k) {
                self.ours_get(&k)?;
            }
        }
        Ok(())
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Entry>> {
        match self.decided.get(key) {
            Some(e) => Ok(Some(e.clone())),
            // Undecided keys are equal on both sides, so reading ours is symmetric.
            None => self.ours_get(key),
        }
    }

    fn set(&mut self, key: Vec<u8>, entry: Entry) -> Result<()> {
        if !self.ours_at.contains_key(&key) {
            let old = self.ours_get(&key)?;
            self.ours_at.insert(key.clone(), old);
        }
        self.decided.insert(key, entry);
        Ok(())
    }

    /// Puts `loser` (which lost the name `path`) at the first free conflict name. Returns
    /// the chosen path, or `None` if the entry at the name already stands on the loser's
    /// writes (the copy was made before, maybe edited or deleted since: re-creating it
    /// would resurrect a deleted copy). A name held by anything else — live or deleted —
    /// is skipped, so a user never sees a deleted copy come back with other content.
    fn place_copy(&mut self, path: &VaultPath, loser: &Entry) -> Result<Option<VaultPath>> {
        for attempt in 0..MAX_CONFLICT_ATTEMPTS {
            let copy = conflict_path(path, &loser.version, attempt);
            let key = EntryKey::file(copy.clone()).to_bytes();
            let entry = unlinked_copy(loser, copy_version(&loser.version, &copy));
            match self.get(&key)? {
                None => {
                    self.set(key, entry)?;
                    return Ok(Some(copy));
                }
                Some(e) if e == entry => return Ok(Some(copy)),
                Some(e) if entry.version.content_seen_by(&e.version) => return Ok(None),
                Some(_) => continue,
            }
        }
        // Degenerate input (a peer filled every candidate name): keep the content at a name
        // derived from the loser's encoding, which cannot collide with a different version.
        let hash = blake3::hash(&loser.encode());
        let name = format!(
            "{}.sync-conflict-{}",
            path.name(),
            &hash.to_hex().as_str()[..16]
        );
        let copy = path
            .parent()
            .unwrap_or_default()
            .join(&name)
            .unwrap_or_else(|_| path.clone());
        let entry = unlinked_copy(loser, copy_version(&loser.version, &copy));
        self.set(EntryKey::file(copy.clone()).to_bytes(), entry)?;
        Ok(Some(copy))
    }

    /// Whether any live entry lies strictly inside directory key `dir_key`.
    fn has_live_descendant(&self, dir_key: &[u8]) -> Result<bool> {
        let end = prefix_successor(dir_key);
        let end_ref = end.as_deref();
        let inside = |k: &[u8]| k.len() > dir_key.len() && k.starts_with(dir_key);
        for (k, e) in self.decided.range(dir_key.to_vec()..) {
            if !inside(k) {
                break;
            }
            if e.is_live() {
                return Ok(true);
            }
        }
        let mut start = dir_key.to_vec();
        start.push(0);
        for item in self.ours.scan(&start, end_ref)? {
            let (k, e) = item?;
            if !self.decided.contains_key(&k) && e.is_live() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Merges: `rows` are the keys on which `ours` and theirs differ, ascending. Returns the
/// entries to write onto `ours` (ascending by key) and a report. Never removes a key.
pub fn merge_rows(
    ours: &dyn EntrySource,
    rows: impl IntoIterator<Item = Result<DiffRow>>,
) -> Result<(Batch, MergeReport)> {
    let mut st = State {
        ours,
        decided: BTreeMap::new(),
        ours_at: BTreeMap::new(),
        ours_memo: HashMap::new(),
        report: MergeReport::default(),
    };
    let mut losers: Vec<(Vec<u8>, Entry)> = Vec::new();
    for row in rows {
        let row = row?;
        st.report.differing += 1;
        let dir_key = row.key.last() == Some(&b'/');
        let Some(res) = resolve_opt(row.ours.as_ref(), row.theirs.as_ref(), dir_key) else {
            continue;
        };
        let live = res.keep.is_live();
        st.ours_at.insert(row.key.clone(), row.ours);
        st.decided.insert(row.key.clone(), res.keep);
        if live {
            st.prefetch_neighbours(&row.key)?;
        }
        if let Some(l) = res.loser {
            losers.push((row.key, l));
        }
    }

    // Sorted so the placement order (which decides who gets `-1`) is input-order free.
    losers.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.encode().cmp(&b.1.encode())));
    for (key, loser) in losers {
        let path = EntryKey::from_bytes(&key)?.path;
        if let Some(copy) = st.place_copy(&path, &loser)? {
            st.report.conflicts.push(Conflict {
                path,
                copy,
                loser: loser.version.device,
            });
        }
    }

    post_pass(&mut st)?;
    check_links(&mut st)?;

    let mut batch = Vec::new();
    for (k, e) in st.decided {
        if st.ours_at.get(&k).and_then(|o| o.as_ref()) != Some(&e) {
            batch.push((k, e));
        }
    }
    st.report.written = batch.len();
    Ok((batch, st.report))
}

/// Whether file entry `e` at `key` stands in a coherent link group: every name of its
/// group holds a live file with the same group (id and names) and the same content.
fn link_coherent(st: &mut State<'_>, key: &[u8], e: &Entry, g: &LinkGroup) -> Result<bool> {
    for name in &g.names {
        let Ok(path) = VaultPath::new(name) else {
            return Ok(false);
        };
        let k = path.file_key();
        if k == key {
            continue;
        }
        let ok = st.get(&k)?.is_some_and(|o| {
            o.kind == e.kind
                && o.content == e.content
                && o.size == e.size
                && LinkGroup::of(&o.xattrs).as_ref() == Some(g)
        });
        if !ok {
            return Ok(false);
        }
    }
    Ok(g.names
        .iter()
        .any(|n| VaultPath::new(n).is_ok_and(|p| p.file_key() == key)))
}

/// Breaks incoherent link groups (see the module docs): a changed file whose group lists a
/// name that is gone, carries other content or another group loses its group and becomes
/// an ordinary file with its own content, and so, in turn, does every name that listed it.
/// Only the link goes; every name keeps its content. The result is the largest set of
/// coherent groups, whatever order the keys are visited in.
fn check_links(st: &mut State<'_>) -> Result<()> {
    let mut work: BTreeSet<Vec<u8>> = st.decided.keys().cloned().collect();
    while let Some(key) = work.pop_first() {
        let Some(e) = st.get(&key)? else { continue };
        // A symlink's target is its content: its names are linked like a file's.
        if !matches!(e.kind, EntryKind::File | EntryKind::Symlink) {
            continue;
        }
        let Some(g) = LinkGroup::of(&e.xattrs) else {
            continue;
        };
        if link_coherent(st, &key, &e, &g)? {
            continue;
        }
        let mut plain = e.clone();
        plain.xattrs.remove(LINK_XATTR);
        // Only the link goes, the content stays the same write: keeping its dots lets a
        // concurrent deletion that saw that content still win, so breaking a link on one
        // device never resurrects a file another device deleted.
        plain.version = invented(&e.version);
        plain.version.dots = e.version.dots.clone();
        st.set(key.clone(), plain)?;
        for name in &g.names {
            if let Ok(p) = VaultPath::new(name) {
                work.insert(p.file_key());
            }
        }
    }
    Ok(())
}

/// Restores directory invariants around every decided key (see the module docs).
fn post_pass(st: &mut State<'_>) -> Result<()> {
    let mut work: BTreeSet<Vec<u8>> = st.decided.keys().cloned().collect();
    while let Some(key) = work.pop_first() {
        let Some(entry) = st.decided.get(&key).cloned() else {
            continue;
        };
        let ekey = EntryKey::from_bytes(&key)?;
        if entry.is_live() {
            for anc in ekey.path.ancestors() {
                let dk = anc.dir_key();
                let cur = st.get(&dk)?;
                if cur.as_ref().is_none_or(|e| e.is_tombstone()) {
                    st.set(dk.clone(), resurrected_dir(cur.as_ref()))?;
                    st.report.resurrected.push(anc);
                    work.insert(dk);
                }
            }
            // A file and a directory with one name: the directory keeps it.
            let (file_key, dir_key) = (ekey.path.file_key(), ekey.path.dir_key());
            let file = st.get(&file_key)?;
            let dir = st.get(&dir_key)?;
            if let (Some(f), Some(d)) = (file, dir)
                && f.is_live()
                && d.is_live()
            {
                let tomb = Entry::tombstone(invented(&f.version));
                st.set(file_key.clone(), tomb)?;
                if let Some(copy) = st.place_copy(&ekey.path, &f)? {
                    work.insert(EntryKey::file(copy.clone()).to_bytes());
                    st.report.displaced.push(Conflict {
                        path: ekey.path.clone(),
                        copy,
                        loser: f.version.device,
                    });
                }
            }
        } else if ekey.dir && st.has_live_descendant(&key)? {
            st.set(key.clone(), resurrected_dir(Some(&entry)))?;
            st.report.resurrected.push(ekey.path.clone());
            work.insert(key);
        }
    }
    Ok(())
}
