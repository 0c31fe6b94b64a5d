//! The `.cairn/` folder at the mount root: a read-only, hidden window on the vault's past,
//! like ZFS's `.zfs/snapshot`. `.cairn/history/` holds one directory per snapshot of any
//! member, named by its UTC time (`2026-12-01T10-00-00Z`), and a `latest-<device>` symlink per
//! member pointing at that member's newest one. Each snapshot directory is the whole vault
//! tree at that snapshot, read through a base layer the daemon opens on demand.
//!
//! None of this lives in the overlay or the namespace: the nodes have their own table and
//! inode range ([`FIRST_INO`]..), so nothing here can ever reach the flusher, and reading a
//! past tree (which may fetch from peers) never holds the live namespace lock.
//!
//! Names: snapshots made within the same UTC second are ordered by (time, device, id); the
//! first keeps the plain name, the later ones get `.1`, `.2`, ... A `latest-<device>` name
//! uses the device's name (`/` and control characters become `_`), or the first 8 hex digits
//! of its id when it has none; two devices with the same name are told apart the same way.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::{Errno, FileType};

use crate::base::{BaseEntry, BaseError, BaseLayer, ContentRef, EntryKind};
use crate::errno::{FsResult, base_errno};
use crate::namespace::{NAME_MAX, join};
use crate::stat::{Stat, file_type};

/// The name of the folder at the mount root.
pub const HISTORY_ROOT: &str = ".cairn";
/// The snapshot listing inside it.
const HISTORY_DIR: &str = "history";

/// The first inode number of the `.cairn` tree. Live inodes count up from 1 and never get
/// near it; the range ends at `1 << 63` so the two can never meet.
pub(crate) const FIRST_INO: u64 = 1 << 62;
const TOP: u64 = FIRST_INO;
const LISTING: u64 = FIRST_INO + 1;
const LAST_INO: u64 = (1 << 63) - 1;
/// `d_ino` of entries `readdir` lists before anyone looked them up: only userspace sees
/// these (the kernel never asks about them), so they just need to be non-zero.
const COSMETIC_INO: u64 = 1 << 63;
/// Entries prepared per readdir call: more than a kernel reply buffer can take.
const REPLY_BATCH: usize = 1024;

pub(crate) fn is_history_ino(ino: u64) -> bool {
    (FIRST_INO..=LAST_INO).contains(&ino)
}

/// One past snapshot, as the daemon's timeline knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PastSnapshot {
    /// Opaque to the FUSE layer: handed back to [`HistorySource::open`].
    pub key: Vec<u8>,
    pub created_ms: u64,
    /// The author's id (groups `latest-<device>`).
    pub device: Vec<u8>,
    /// The author's name; empty if it has none.
    pub device_name: String,
}

/// Where the `.cairn/history/` folder gets its snapshots from (the daemon's timeline).
pub trait HistorySource: Send + Sync {
    /// Every snapshot this device can read, in any order. Called at each listing of
    /// `.cairn/history/`, so it must be cheap when nothing changed.
    fn snapshots(&self) -> Result<Vec<PastSnapshot>, BaseError>;
    /// The vault tree of one snapshot, read-only. Called for every lookup, listing and read
    /// inside a snapshot directory, so implementations cache recently opened trees.
    fn open(&self, key: &[u8]) -> Result<Arc<dyn BaseLayer>, BaseError>;
}

/// [`HistorySource`] as a mount option (see [`crate::MountOptions::history`]).
#[derive(Clone)]
pub struct HistoryFolder(pub Arc<dyn HistorySource>);

impl fmt::Debug for HistoryFolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HistoryFolder")
    }
}

/// What a name in `.cairn/history/` stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Listed {
    /// Index into the listing's snapshots.
    Snapshot(usize),
    /// A `latest-<device>` symlink to this name.
    Latest(String),
}

/// `YYYY-MM-DDTHH-MM-SSZ` (UTC, no colons so every file manager and shell takes it).
pub(crate) fn second_name(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, sod) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm, on
/// unsigned numbers since times before 1970 cannot be expressed in `ms` anyway).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// A device name fit for a file name: no `/`, no control characters, not empty, bounded.
fn device_label(s: &PastSnapshot) -> String {
    let mut out: String = s
        .device_name
        .chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    // "latest-" plus the label and a ".N" suffix stay within NAME_MAX.
    const MAX: usize = NAME_MAX - 32;
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    if out.is_empty() || out == "." || out == ".." {
        out = s
            .device
            .iter()
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
    }
    out
}

/// Appends `.1`, `.2`, ... to every repeat of a name, in the order given, skipping suffixed
/// names that are already taken (a device may well be called `laptop.1`).
fn dedupe(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let names: Vec<String> = names.into_iter().collect();
    let mut taken: std::collections::HashSet<String> = names.iter().cloned().collect();
    let mut first: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut next: HashMap<String, usize> = HashMap::new();
    names
        .into_iter()
        .map(|n| {
            if first.insert(n.clone()) {
                return n;
            }
            let k = next.entry(n.clone()).or_insert(1);
            loop {
                let candidate = format!("{n}.{k}");
                *k += 1;
                if taken.insert(candidate.clone()) {
                    return candidate;
                }
            }
        })
        .collect()
}

/// The names `.cairn/history/` shows for `snaps` (see the module docs for the rules).
pub(crate) fn folder_names(snaps: &[PastSnapshot]) -> BTreeMap<String, Listed> {
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&snaps[a], &snaps[b]);
        (a.created_ms, &a.device, &a.key).cmp(&(b.created_ms, &b.device, &b.key))
    });
    let mut out = BTreeMap::new();
    let names = dedupe(order.iter().map(|&i| second_name(snaps[i].created_ms)));
    // The newest of each device is the last one in time order.
    let mut latest: BTreeMap<&[u8], (usize, String)> = BTreeMap::new();
    for (&i, name) in order.iter().zip(names) {
        latest.insert(&snaps[i].device, (i, name.clone()));
        out.insert(name, Listed::Snapshot(i));
    }
    let labels = dedupe(
        latest
            .values()
            .map(|(i, _)| format!("latest-{}", device_label(&snaps[*i]))),
    );
    for (label, (_, target)) in labels.into_iter().zip(latest.into_values()) {
        out.insert(label, Listed::Latest(target));
    }
    out
}

/// The listing as of the last refresh.
#[derive(Default)]
struct Listing {
    snaps: Vec<PastSnapshot>,
    names: BTreeMap<String, Listed>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum NodeKey {
    Latest(String),
    /// Snapshot key and path inside that snapshot ("" for its root).
    Snap(Arc<[u8]>, String),
}

#[derive(Clone)]
enum HNode {
    Top,
    Listing,
    Latest {
        target: String,
        created_ms: u64,
    },
    Snap {
        key: Arc<[u8]>,
        path: String,
        entry: BaseEntry,
    },
}

struct Slot {
    node: HNode,
    key: Option<NodeKey>,
    nlookup: u64,
}

struct Table {
    slots: HashMap<u64, Slot>,
    by_key: HashMap<NodeKey, u64>,
    next: u64,
}

/// A directory listing taken at opendir.
pub(crate) struct DirList {
    pub ino: u64,
    pub parent: u64,
    pub entries: Vec<(String, DirItem)>,
}

#[derive(Clone)]
pub(crate) enum DirItem {
    /// `history` inside `.cairn`.
    Listing,
    Listed(Listed),
    Snap(BaseEntry),
}

impl DirItem {
    fn file_type(&self) -> FileType {
        match self {
            DirItem::Listing | DirItem::Listed(Listed::Snapshot(_)) => FileType::Directory,
            DirItem::Listed(Listed::Latest(_)) => FileType::Symlink,
            DirItem::Snap(e) => file_type(e.kind),
        }
    }
}

/// The `.cairn` tree of one mount.
pub(crate) struct HistoryDir {
    source: Arc<dyn HistorySource>,
    uid: u32,
    gid: u32,
    umask: u32,
    table: Mutex<Table>,
    listing: Mutex<Arc<Listing>>,
    dirs: Mutex<HashMap<u64, Arc<DirList>>>,
    next_fh: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HistoryDir {
    pub(crate) fn new(source: Arc<dyn HistorySource>, uid: u32, gid: u32, umask: u32) -> Self {
        let mut slots = HashMap::new();
        for (ino, node) in [(TOP, HNode::Top), (LISTING, HNode::Listing)] {
            slots.insert(
                ino,
                Slot {
                    node,
                    key: None,
                    nlookup: 0,
                },
            );
        }
        HistoryDir {
            source,
            uid,
            gid,
            umask,
            table: Mutex::new(Table {
                slots,
                by_key: HashMap::new(),
                next: LISTING + 1,
            }),
            listing: Mutex::new(Arc::new(Listing::default())),
            dirs: Mutex::new(HashMap::new()),
            next_fh: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Re-reads the snapshot list from the source. The source is called without any lock.
    fn refresh(&self) -> FsResult<Arc<Listing>> {
        let snaps = self.source.snapshots().map_err(base_errno)?;
        let names = folder_names(&snaps);
        let listing = Arc::new(Listing { snaps, names });
        *lock(&self.listing) = listing.clone();
        Ok(listing)
    }

    fn newest_ms(&self) -> u64 {
        lock(&self.listing)
            .snaps
            .iter()
            .map(|s| s.created_ms)
            .max()
            .unwrap_or(0)
    }

    fn node(&self, ino: u64) -> FsResult<HNode> {
        lock(&self.table)
            .slots
            .get(&ino)
            .map(|s| s.node.clone())
            .ok_or(Errno::ENOENT)
    }

    fn dir_stat(&self, mtime_ns: i64) -> Stat {
        Stat {
            atime_ns: mtime_ns,
            mtime_ns,
            ctime_ns: mtime_ns,
            // Writable bits so the kernel's permission check lets writes through to us,
            // and they fail with EROFS rather than EACCES.
            ..Stat::new(EntryKind::Dir, 0o755, self.uid, self.gid, 0)
        }
    }

    fn stat_node(&self, node: &HNode) -> Stat {
        let ms_ns = |ms: u64| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
        match node {
            HNode::Top | HNode::Listing => self.dir_stat(ms_ns(self.newest_ms())),
            HNode::Latest { target, created_ms } => {
                let t = ms_ns(*created_ms);
                Stat {
                    atime_ns: t,
                    mtime_ns: t,
                    ctime_ns: t,
                    ..Stat::new(
                        EntryKind::Symlink,
                        0o777,
                        self.uid,
                        self.gid,
                        target.len() as u64,
                    )
                }
            }
            HNode::Snap { entry, .. } => Stat {
                atime_ns: entry.mtime_ns,
                mtime_ns: entry.mtime_ns,
                ctime_ns: entry.mtime_ns,
                ..Stat::new(
                    entry.kind,
                    entry.mode & !self.umask,
                    self.uid,
                    self.gid,
                    entry.size,
                )
            },
        }
    }

    pub(crate) fn stat(&self, ino: u64) -> FsResult<Stat> {
        Ok(self.stat_node(&self.node(ino)?))
    }

    /// Gives `node` an inode (the same one while the kernel holds it) and counts a lookup.
    fn intern(&self, key: NodeKey, node: HNode) -> FsResult<(u64, Stat)> {
        let stat = self.stat_node(&node);
        let mut t = lock(&self.table);
        if let Some(&ino) = t.by_key.get(&key)
            && let Some(slot) = t.slots.get_mut(&ino)
        {
            slot.nlookup += 1;
            // A latest-<device> link moves on when its device publishes.
            slot.node = node;
            return Ok((ino, stat));
        }
        if t.next > LAST_INO {
            return Err(Errno::from_i32(libc::ENFILE));
        }
        let ino = t.next;
        t.next += 1;
        t.by_key.insert(key.clone(), ino);
        t.slots.insert(
            ino,
            Slot {
                node,
                key: Some(key),
                nlookup: 1,
            },
        );
        Ok((ino, stat))
    }

    pub(crate) fn forget(&self, ino: u64, n: u64) {
        let mut t = lock(&self.table);
        let Some(slot) = t.slots.get_mut(&ino) else {
            return;
        };
        let Some(key) = slot.key.clone() else {
            return; // .cairn and history are permanent
        };
        slot.nlookup = slot.nlookup.saturating_sub(n);
        if slot.nlookup == 0 {
            t.slots.remove(&ino);
            t.by_key.remove(&key);
        }
    }

    /// A snapshot's directory. Its attributes are made up (0755, the snapshot's time) rather
    /// than read from the tree, so listing thousands of snapshots opens none of them.
    fn snapshot_root(&self, key: Arc<[u8]>, created_ms: u64) -> (NodeKey, HNode) {
        let t = i64::try_from(created_ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
        let entry = BaseEntry {
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns: t,
            size: 0,
            xattrs: BTreeMap::new(),
            target: Vec::new(),
            content: ContentRef::empty(),
        };
        (
            NodeKey::Snap(key.clone(), String::new()),
            HNode::Snap {
                key,
                path: String::new(),
                entry,
            },
        )
    }

    fn listed_node(&self, listing: &Listing, listed: &Listed) -> FsResult<(NodeKey, HNode)> {
        match listed {
            Listed::Snapshot(i) => {
                let s = listing.snaps.get(*i).ok_or(Errno::ENOENT)?;
                Ok(self.snapshot_root(Arc::from(&s.key[..]), s.created_ms))
            }
            Listed::Latest(target) => {
                let created_ms = match listing.names.get(target) {
                    Some(Listed::Snapshot(i)) => listing.snaps.get(*i).map_or(0, |s| s.created_ms),
                    _ => 0,
                };
                Ok((
                    NodeKey::Latest(target.clone()),
                    HNode::Latest {
                        target: target.clone(),
                        created_ms,
                    },
                ))
            }
        }
    }

    /// `.cairn` itself, looked up at the mount root.
    pub(crate) fn lookup_top(&self) -> (u64, Stat) {
        (TOP, self.stat_node(&HNode::Top))
    }

    pub(crate) fn lookup(&self, parent: u64, name: &str) -> FsResult<(u64, Stat)> {
        match self.node(parent)? {
            HNode::Top if name == HISTORY_DIR => Ok((LISTING, self.stat_node(&HNode::Listing))),
            HNode::Top => Err(Errno::ENOENT),
            HNode::Listing => {
                let mut listing = lock(&self.listing).clone();
                if !listing.names.contains_key(name) {
                    // Looked up before any listing, or a snapshot that arrived since.
                    listing = self.refresh()?;
                }
                let listed = listing.names.get(name).ok_or(Errno::ENOENT)?;
                let (key, node) = self.listed_node(&listing, listed)?;
                self.intern(key, node)
            }
            HNode::Latest { .. } => Err(Errno::ENOTDIR),
            HNode::Snap { key, path, entry } => {
                if entry.kind != EntryKind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                let base = self.source.open(&key).map_err(base_errno)?;
                let child = join(&path, name);
                let entry = base.get(&child).map_err(base_errno)?.ok_or(Errno::ENOENT)?;
                self.intern(
                    NodeKey::Snap(key.clone(), child.clone()),
                    HNode::Snap {
                        key,
                        path: child,
                        entry,
                    },
                )
            }
        }
    }

    /// Takes the listing of a directory (refreshing the snapshot list for `history`).
    pub(crate) fn opendir(&self, ino: u64) -> FsResult<u64> {
        let (parent, entries) = match self.node(ino)? {
            HNode::Top => (
                crate::namespace::ROOT,
                vec![(HISTORY_DIR.to_string(), DirItem::Listing)],
            ),
            HNode::Listing => {
                let listing = self.refresh()?;
                let entries = listing
                    .names
                    .iter()
                    .map(|(n, l)| (n.clone(), DirItem::Listed(l.clone())))
                    .collect();
                (TOP, entries)
            }
            HNode::Latest { .. } => return Err(Errno::ENOTDIR),
            HNode::Snap { key, path, entry } => {
                if entry.kind != EntryKind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                let base = self.source.open(&key).map_err(base_errno)?;
                let mut entries = Vec::new();
                for item in base.children(&path).map_err(base_errno)? {
                    let (name, e) = item.map_err(base_errno)?;
                    entries.push((name, DirItem::Snap(e)));
                }
                let parent = if path.is_empty() {
                    LISTING
                } else {
                    COSMETIC_INO
                };
                (parent, entries)
            }
        };
        let fh = self
            .next_fh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.dirs).insert(
            fh,
            Arc::new(DirList {
                ino,
                parent,
                entries,
            }),
        );
        Ok(fh)
    }

    pub(crate) fn dir(&self, fh: u64) -> Option<Arc<DirList>> {
        lock(&self.dirs).get(&fh).cloned()
    }

    pub(crate) fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// Up to [`REPLY_BATCH`] entries of a listing from `offset` on, as `(ino, next offset,
    /// type, name)`, with "." and ".." first. Inode numbers of names nobody looked up are cosmetic.
    pub(crate) fn plain_entries(
        &self,
        d: &DirList,
        offset: u64,
    ) -> Vec<(u64, u64, FileType, String)> {
        let t = lock(&self.table);
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        let dots = [(d.ino, "."), (d.parent, "..")];
        let mut out: Vec<(u64, u64, FileType, String)> = dots
            .into_iter()
            .enumerate()
            .skip(offset)
            .map(|(i, (ino, n))| (ino, i as u64 + 1, FileType::Directory, n.to_string()))
            .collect();
        let dir_key = t.slots.get(&d.ino).and_then(|s| match &s.node {
            HNode::Snap { key, path, .. } => Some((key.clone(), path.clone())),
            _ => None,
        });
        // One reply holds a few hundred names at most: preparing only those keeps listing
        // thousands of snapshots linear, not quadratic, in their number.
        let first = offset.saturating_sub(2);
        for (i, (name, item)) in d.entries.iter().enumerate().skip(first).take(REPLY_BATCH) {
            let key = match (item, &dir_key) {
                (DirItem::Snap(_), Some((k, p))) => Some(NodeKey::Snap(k.clone(), join(p, name))),
                (DirItem::Listed(Listed::Latest(target)), _) => {
                    Some(NodeKey::Latest(target.clone()))
                }
                _ => None,
            };
            let ino = if d.ino == TOP {
                LISTING
            } else {
                key.and_then(|k| t.by_key.get(&k).copied())
                    .unwrap_or(COSMETIC_INO + i as u64 + 1)
            };
            out.push((ino, i as u64 + 3, item.file_type(), name.clone()));
        }
        out
    }

    /// Looks up entry `index` (0-based, after "." and "..") of a listing for readdirplus:
    /// the same as a lookup by name, without asking the source for the entry again.
    pub(crate) fn lookup_listed(&self, d: &DirList, index: usize) -> FsResult<(u64, Stat)> {
        let (name, item) = d.entries.get(index).ok_or(Errno::ENOENT)?;
        match item {
            DirItem::Snap(entry) => {
                let HNode::Snap { key, path, .. } = self.node(d.ino)? else {
                    return Err(Errno::ENOENT);
                };
                let child = join(&path, name);
                self.intern(
                    NodeKey::Snap(key.clone(), child.clone()),
                    HNode::Snap {
                        key,
                        path: child,
                        entry: entry.clone(),
                    },
                )
            }
            DirItem::Listing | DirItem::Listed(_) => self.lookup(d.ino, name),
        }
    }

    pub(crate) fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match self.node(ino)? {
            HNode::Latest { target, .. } => Ok(target.into_bytes()),
            HNode::Snap { entry, .. } if entry.kind == EntryKind::Symlink => Ok(entry.target),
            _ => Err(Errno::EINVAL),
        }
    }

    pub(crate) fn xattrs(&self, ino: u64) -> FsResult<BTreeMap<Vec<u8>, Vec<u8>>> {
        match self.node(ino)? {
            HNode::Snap { mut entry, .. } => {
                // The link group is cairn's own bookkeeping, hidden in the live mount too.
                entry.xattrs.remove(cairn_overlay::LINK_XATTR);
                Ok(entry.xattrs)
            }
            _ => Ok(BTreeMap::new()),
        }
    }

    /// Opening for reading only; anything that could write is refused.
    pub(crate) fn open(&self, ino: u64, flags: i32) -> FsResult<()> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(Errno::from_i32(libc::EROFS));
        }
        match self.node(ino)? {
            HNode::Snap { entry, .. } if entry.kind == EntryKind::File => Ok(()),
            HNode::Snap { .. } | HNode::Top | HNode::Listing => Err(Errno::EISDIR),
            HNode::Latest { .. } => Err(Errno::ELOOP),
        }
    }

    pub(crate) fn file_size(&self, ino: u64) -> FsResult<u64> {
        match self.node(ino)? {
            HNode::Snap { entry, .. } => Ok(entry.size),
            _ => Err(Errno::EISDIR),
        }
    }

    /// Reads a past file's content; no lock is held while the source reads (or fetches).
    pub(crate) fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let HNode::Snap { key, entry, .. } = self.node(ino)? else {
            return Err(Errno::EISDIR);
        };
        if entry.kind != EntryKind::File {
            return Err(Errno::EISDIR);
        }
        let base = self.source.open(&key).map_err(base_errno)?;
        let end = entry.size.min(offset.saturating_add(size as u64));
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        let filled = base
            .read_full(&entry, offset, &mut buf)
            .map_err(base_errno)?;
        buf.truncate(filled);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::MemBase;

    fn snap(key: u8, ms: u64, device: u8, name: &str) -> PastSnapshot {
        PastSnapshot {
            key: vec![key],
            created_ms: ms,
            device: vec![device; 4],
            device_name: name.into(),
        }
    }

    #[test]
    fn seconds_are_named_in_utc_without_colons() {
        assert_eq!(second_name(0), "1970-01-01T00-00-00Z");
        // 2026-12-01T10:00:00Z
        assert_eq!(second_name(1_796_119_200_123), "2026-12-01T10-00-00Z");
        assert_eq!(second_name(951_782_400_000), "2000-02-29T00-00-00Z");
        // Far-future times from a confused clock still make a name, never a panic.
        assert!(second_name(u64::MAX).ends_with('Z'));
    }

    #[test]
    fn same_second_snapshots_get_numbered_and_each_device_its_latest_link() {
        let t = 1_796_119_200_000;
        let snaps = vec![
            snap(3, t + 900, 2, "desk"),
            snap(1, t + 100, 1, "laptop"),
            snap(2, t + 100, 2, "desk"),
            snap(4, t + 5_000, 1, "laptop"),
            snap(5, t + 6_000, 3, "a/b"),
            snap(6, t + 7_000, 4, ""),
            snap(7, t + 8_000, 5, "laptop"),
            snap(8, t + 9_000, 0, "laptop.1"),
        ];
        let names = folder_names(&snaps);
        let get = |n: &str| names.get(n).cloned();
        assert_eq!(get("2026-12-01T10-00-00Z"), Some(Listed::Snapshot(1)));
        assert_eq!(get("2026-12-01T10-00-00Z.1"), Some(Listed::Snapshot(2)));
        assert_eq!(get("2026-12-01T10-00-00Z.2"), Some(Listed::Snapshot(0)));
        assert_eq!(get("2026-12-01T10-00-05Z"), Some(Listed::Snapshot(3)));
        assert_eq!(
            get("latest-laptop"),
            Some(Listed::Latest("2026-12-01T10-00-05Z".into()))
        );
        // A second device called laptop is told apart (devices sort by id), around a
        // device that is really called laptop.1.
        assert_eq!(
            get("latest-laptop.2"),
            Some(Listed::Latest("2026-12-01T10-00-08Z".into()))
        );
        assert_eq!(
            get("latest-laptop.1"),
            Some(Listed::Latest("2026-12-01T10-00-09Z".into()))
        );
        assert_eq!(
            get("latest-desk"),
            Some(Listed::Latest("2026-12-01T10-00-00Z.2".into()))
        );
        assert_eq!(
            get("latest-a_b"),
            Some(Listed::Latest("2026-12-01T10-00-06Z".into()))
        );
        assert_eq!(
            get("latest-04040404"),
            Some(Listed::Latest("2026-12-01T10-00-07Z".into()))
        );
        assert_eq!(names.len(), 8 + 6);
        assert!(
            names
                .keys()
                .all(|n| n.len() <= NAME_MAX && !n.contains('/'))
        );
    }

    struct Fixed(Vec<PastSnapshot>, Arc<MemBase>);

    impl HistorySource for Fixed {
        fn snapshots(&self) -> Result<Vec<PastSnapshot>, BaseError> {
            Ok(self.0.clone())
        }
        fn open(&self, key: &[u8]) -> Result<Arc<dyn BaseLayer>, BaseError> {
            if key == [1] {
                Ok(self.1.clone())
            } else {
                Err(BaseError::Unavailable("no such snapshot".into()))
            }
        }
    }

    #[test]
    fn a_snapshot_tree_is_browsable_and_refuses_writes() {
        let base = Arc::new(MemBase::new());
        base.insert_file("docs/report.txt", b"version one", 0o640);
        base.insert_symlink("link", b"docs/report.txt");
        let h = HistoryDir::new(
            Arc::new(Fixed(vec![snap(1, 1_000, 9, "laptop")], base)),
            1000,
            100,
            0o022,
        );
        let (top, _) = h.lookup_top();
        let (listing, st) = h.lookup(top, "history").unwrap();
        assert_eq!(st.kind, EntryKind::Dir);
        let fh = h.opendir(listing).unwrap();
        let names: Vec<String> = h
            .plain_entries(&h.dir(fh).unwrap(), 0)
            .into_iter()
            .map(|e| e.3)
            .collect();
        assert_eq!(names, [".", "..", "1970-01-01T00-00-01Z", "latest-laptop"]);
        let (latest, _) = h.lookup(listing, "latest-laptop").unwrap();
        assert_eq!(h.readlink(latest).unwrap(), b"1970-01-01T00-00-01Z");
        let (root, _) = h.lookup(listing, "1970-01-01T00-00-01Z").unwrap();
        let (docs, _) = h.lookup(root, "docs").unwrap();
        let (file, st) = h.lookup(docs, "report.txt").unwrap();
        assert!(is_history_ino(file));
        assert_eq!((st.size, st.perm, st.uid), (11, 0o640, 1000));
        assert_eq!(h.read(file, 8, 100).unwrap(), b"one");
        assert_eq!(h.lookup(docs, "missing").unwrap_err(), Errno::ENOENT);
        for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
            assert_eq!(
                h.open(file, flags).unwrap_err(),
                Errno::from_i32(libc::EROFS)
            );
        }
        h.open(file, libc::O_RDONLY).unwrap();
        // The same path keeps its inode while looked up, and loses it once forgotten.
        assert_eq!(h.lookup(docs, "report.txt").unwrap().0, file);
        h.forget(file, 2);
        assert_eq!(h.stat(file).unwrap_err(), Errno::ENOENT);
        assert_eq!(
            h.lookup(listing, "2000-01-01T00-00-00Z").unwrap_err(),
            Errno::ENOENT
        );
    }

    proptest::proptest! {
        #![proptest_config(cairn_fuzzkit::config())]

        /// Times and device names come from members' snapshots: whatever they say, every
        /// name is a valid, distinct file name and every link points at a listed snapshot.
        #[test]
        fn fuzz_any_times_and_device_names_make_valid_distinct_names(
            raw in proptest::collection::vec(
                (
                    proptest::prelude::any::<u64>(),
                    0u8..6,
                    proptest::prop_oneof![
                        proptest::strategy::Just("laptop".to_string()),
                        proptest::strategy::Just("laptop.1".to_string()),
                        ".{0,300}",
                    ],
                ),
                0..24,
            ),
        ) {
            let snaps: Vec<PastSnapshot> = raw
                .into_iter()
                .enumerate()
                .map(|(i, (ms, dev, name))| PastSnapshot {
                    key: vec![i as u8],
                    // Mostly within a few seconds of each other, to force same-second names.
                    created_ms: if ms % 2 == 0 { ms } else { 1_000 + ms % 3_000 },
                    device: vec![dev; 4],
                    device_name: name,
                })
                .collect();
            let names = folder_names(&snaps);
            let devices: std::collections::HashSet<_> = snaps.iter().map(|s| &s.device).collect();
            proptest::prop_assert_eq!(names.len(), snaps.len() + devices.len());
            for (name, listed) in &names {
                proptest::prop_assert!(!name.is_empty() && name.len() <= NAME_MAX);
                proptest::prop_assert!(!name.contains('/') && !name.contains('\0'));
                proptest::prop_assert!(name != "." && name != "..");
                if let Listed::Latest(target) = listed {
                    proptest::prop_assert!(
                        matches!(names.get(target), Some(Listed::Snapshot(_)))
                    );
                }
            }
        }
    }
}
