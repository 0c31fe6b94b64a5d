//! The namespace: what a path resolves to ([`Node`]), the inode table ([`Namespace`])
//! mapping kernel inode numbers to paths, and the per-inode state open files share
//! ([`FileCell`]). Also the path rules: joining names, subtree tests, the name length limit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_overlay::{LinkId, Record, StagingId};
use fuser::{Errno, FileType};

use crate::base::{BaseEntry, EntryKind};
use crate::errno::FsResult;
use crate::stat::{Stat, entry_kind, file_type, special_type};

pub(crate) const ROOT: u64 = 1;
pub(crate) const NAME_MAX: usize = 255;

pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

pub(crate) fn in_subtree(path: &str, root: &str) -> bool {
    path == root
        || (path.len() > root.len()
            && path.starts_with(root)
            && path.as_bytes()[root.len()] == b'/')
}

/// What a path resolves to in the merged view.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Rec(Record),
    Base(BaseEntry),
}

impl Node {
    pub(crate) fn kind(&self) -> EntryKind {
        match self {
            Node::Rec(r) => entry_kind(r.kind),
            Node::Base(b) => b.kind,
        }
    }

    /// The type readdir reports (special files included).
    pub(crate) fn file_type(&self) -> FileType {
        match self {
            Node::Rec(r) => special_type(r.kind).unwrap_or(file_type(entry_kind(r.kind))),
            Node::Base(b) => file_type(b.kind),
        }
    }

    pub(crate) fn xattrs(&self) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        match self {
            Node::Rec(r) => &r.xattrs,
            Node::Base(b) => &b.xattrs,
        }
    }
}

pub(crate) struct FileState {
    /// The staging file this inode reads and writes, once it has one. Kept for as long as the
    /// inode is in use even after a flush retires its record, so an open file keeps its
    /// content and the next write re-adopts the same staging file instead of copying again.
    pub staging: Option<(StagingId, Arc<File>)>,
    /// Content source while the data still lives in the base layer.
    pub base: Option<BaseEntry>,
    /// Written since the last time all users let go: schedule a flush on release.
    pub written: bool,
}

pub(crate) struct FileCell {
    pub st: Mutex<FileState>,
}

impl FileCell {
    pub(crate) fn lock(&self) -> MutexGuard<'_, FileState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where the content of an unlinked (or replaced) inode lives while the kernel may still
/// open it: a lookup that raced with the unlink or rename-over must still be able to open
/// the old file, like on any local filesystem.
#[derive(Clone, Debug)]
pub(crate) enum GoneSrc {
    /// A staging file, held (see [`Namespace::held`]) until the inode is dropped.
    Staged(StagingId),
    Base(BaseEntry),
}

pub(crate) struct Inode {
    /// `None` once the path was unlinked or replaced while the kernel or a handle still uses
    /// this inode.
    pub path: Option<String>,
    pub nlookup: u64,
    pub file: Option<Arc<FileCell>>,
    pub file_users: u32,
    /// Attributes of an unlinked inode that is still open.
    pub detached: Option<Stat>,
    /// Content of an unlinked inode the kernel still knows.
    pub gone: Option<GoneSrc>,
    /// The link group whose names all stand for this inode (`path` is one of them).
    pub group: Option<LinkId>,
}

/// The inode table: which kernel inode number stands for which path, and what the kernel and
/// open handles still hold.
#[derive(Default)]
pub(crate) struct Namespace {
    pub inodes: HashMap<u64, Inode>,
    pub paths: BTreeMap<String, u64>,
    pub next_ino: u64,
    /// Paths of the batch a flush is committing right now: deleting one of these must leave
    /// a whiteout even if the base does not have it yet, or the flush would resurrect it.
    pub inflight: HashSet<String>,
    /// Staging files held open by in-use inodes, so releasing their record does not delete
    /// them under the handle.
    pub held: HashMap<StagingId, u32>,
    /// Holds of dropped detached inodes, for
    /// [`Core::settle`](crate::core::Core::settle) to release.
    pub unheld: Vec<StagingId>,
    /// The inode of each link group the kernel knows, so every name of it gets one number.
    pub groups: HashMap<LinkId, u64>,
    /// Counts the critical sections that may have changed which paths exist or what they
    /// are (see [`Core::ns`](crate::core::Core::ns)): an
    /// operation that read the base without the lock checks it did not move meanwhile
    /// (see [`Core::unlocked`](crate::core::Core::unlocked)).
    pub generation: u64,
}

impl Namespace {
    pub(crate) fn new() -> Namespace {
        let mut ns = Namespace {
            next_ino: ROOT + 1,
            ..Namespace::default()
        };
        ns.inodes.insert(
            ROOT,
            Inode {
                path: Some(String::new()),
                nlookup: 1,
                file: None,
                file_users: 0,
                detached: None,
                gone: None,
                group: None,
            },
        );
        ns.paths.insert(String::new(), ROOT);
        ns
    }

    pub(crate) fn path(&self, ino: u64) -> FsResult<&str> {
        self.inodes
            .get(&ino)
            .and_then(|i| i.path.as_deref())
            .ok_or(Errno::ENOENT)
    }

    pub(crate) fn ino_for(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.paths.get(path) {
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                path: Some(path.to_string()),
                nlookup: 0,
                file: None,
                file_users: 0,
                detached: None,
                gone: None,
                group: None,
            },
        );
        self.paths.insert(path.to_string(), ino);
        ino
    }

    /// The inode for `path`, which carries link group `link` (if any): every name of a
    /// group maps to the group's one inode.
    pub(crate) fn ino_linked(&mut self, path: &str, link: Option<LinkId>) -> u64 {
        let Some(id) = link else {
            return self.ino_for(path);
        };
        if let Some(&ino) = self.groups.get(&id)
            && self.inodes.get(&ino).is_some_and(|i| i.path.is_some())
        {
            self.paths.insert(path.to_string(), ino);
            return ino;
        }
        let ino = self.ino_for(path);
        self.join_group(ino, id);
        ino
    }

    /// Makes `ino` the inode of link group `id`.
    pub(crate) fn join_group(&mut self, ino: u64, id: LinkId) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.group = Some(id);
            self.groups.insert(id, ino);
        }
    }

    /// Name `path` of a linked inode goes away while `rest` (not empty) remain: the inode
    /// keeps living under one of them.
    pub(crate) fn unlink_name(&mut self, path: &str, rest: &[String]) {
        let Some(ino) = self.paths.remove(path) else {
            return;
        };
        if let Some(i) = self.inodes.get_mut(&ino)
            && i.path.as_deref() == Some(path)
        {
            i.path = rest.first().cloned();
            if let Some(p) = &i.path {
                self.paths.insert(p.clone(), ino);
            }
        }
    }

    pub(crate) fn maybe_drop(&mut self, ino: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(i) = self.inodes.get(&ino)
            && i.nlookup == 0
            && i.file_users == 0
        {
            if let Some(p) = &i.path
                && self.paths.get(p) == Some(&ino)
            {
                self.paths.remove(p);
            }
            if let Some(id) = i.group {
                // Every name of the group maps here; none may outlive the inode.
                self.paths.retain(|_, v| *v != ino);
                if self.groups.get(&id) == Some(&ino) {
                    self.groups.remove(&id);
                }
            }
            if let Some(i) = self.inodes.remove(&ino)
                && let Some(GoneSrc::Staged(id)) = i.gone
            {
                self.unheld.push(id);
            }
        }
    }

    pub(crate) fn forget(&mut self, ino: u64, n: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.nlookup = i.nlookup.saturating_sub(n);
        }
        self.maybe_drop(ino);
    }

    /// The inode at `path` no longer names anything there (unlinked or replaced).
    pub(crate) fn detach(&mut self, path: &str, last: Option<Stat>, gone: Option<GoneSrc>) {
        if let Some(ino) = self.paths.remove(path) {
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.path = None;
                i.detached = last.map(|mut s| {
                    s.nlink = 0;
                    s
                });
                i.gone = gone;
            } else if let Some(GoneSrc::Staged(id)) = gone {
                self.unheld.push(id);
            }
            self.maybe_drop(ino);
        }
    }

    /// Rewrites the paths of every known inode at or under `from` to live under `to`.
    pub(crate) fn move_paths(&mut self, from: &str, to: &str) {
        let (lo, hi) = (format!("{from}/"), format!("{from}0"));
        let mut moved: Vec<(String, u64)> = self
            .paths
            .range(lo..hi)
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        if let Some(&ino) = self.paths.get(from) {
            moved.push((from.to_string(), ino));
        }
        for (p, _) in &moved {
            self.paths.remove(p);
        }
        for (p, ino) in moved {
            let np = format!("{to}{}", &p[from.len()..]);
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.path = Some(np.clone());
            }
            self.paths.insert(np, ino);
        }
    }
}
