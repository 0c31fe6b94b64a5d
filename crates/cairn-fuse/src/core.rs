//! The filesystem logic, independent of fuser's reply plumbing: path resolution over overlay
//! and base, the inode and handle tables, copy-on-write, and flushing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_overlay::path::now_ns;
use cairn_overlay::{Data, Kind, Overlay, OverlayError, Record, StagingId};
use fuser::{Errno, FileAttr, FileType, INodeNo};

use crate::MountOptions;
use crate::base::{BaseEntry, BaseLayer, ContentRef, EntryKind};
use crate::flusher::FlushCtl;
use crate::sink::{FlushBatch, FlushError, FlushItem, FlushSink, StagedFile};

pub(crate) const ROOT: u64 = 1;
/// Copy-on-write and staging reads move data in blocks of this size, so a file of any size
/// costs at most one block of memory.
pub(crate) const COPY_BLOCK: usize = 1 << 20;
pub(crate) const NAME_MAX: usize = 255;

pub(crate) type Res<T> = Result<T, Errno>;

pub(crate) fn ns_to_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

pub(crate) fn time_to_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

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

pub(crate) fn overlay_errno(e: OverlayError) -> Errno {
    let code = match &e {
        OverlayError::Staging { source, .. } | OverlayError::Dir { source, .. } => {
            source.raw_os_error().unwrap_or(libc::EIO)
        }
        OverlayError::Journal {
            source: rusqlite_err,
            ..
        } => {
            if rusqlite_err.to_string().contains("full") {
                libc::ENOSPC
            } else {
                libc::EIO
            }
        }
        OverlayError::InvalidPath { .. } => libc::EINVAL,
        _ => libc::EIO,
    };
    tracing::error!(error = %e, "overlay operation failed");
    Errno::from_i32(code)
}

pub(crate) fn base_errno(e: crate::base::BaseError) -> Errno {
    tracing::warn!(error = %e, "base layer operation failed");
    Errno::from_i32(e.errno())
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Attributes in vault terms; turned into a [`FileAttr`] with the inode number at reply time.
#[derive(Clone, Debug)]
pub(crate) struct Stat {
    pub kind: EntryKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Allocated 512-byte blocks when known (staged files: the staging file's allocation);
    /// otherwise derived from the size.
    pub blocks: Option<u64>,
}

impl Stat {
    pub(crate) fn attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: self.size,
            blocks: self.blocks.unwrap_or_else(|| self.size.div_ceil(512)),
            atime: ns_to_time(self.atime_ns),
            mtime: ns_to_time(self.mtime_ns),
            ctime: ns_to_time(self.ctime_ns),
            crtime: ns_to_time(self.mtime_ns),
            kind: file_type(self.kind),
            perm: (self.perm & 0o7777) as u16,
            // Directories report 1 like btrfs: counting subdirectories would make every stat
            // of a directory a listing of it; find and friends treat 1 as "unknown".
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

pub(crate) fn file_type(k: EntryKind) -> FileType {
    match k {
        EntryKind::File => FileType::RegularFile,
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
    }
}

fn entry_kind(k: Kind) -> EntryKind {
    match k {
        Kind::Dir => EntryKind::Dir,
        Kind::Symlink => EntryKind::Symlink,
        _ => EntryKind::File,
    }
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
    /// A staging file, held (see [`Ns::held`]) until the inode is dropped.
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
}

#[derive(Default)]
pub(crate) struct Ns {
    pub inodes: HashMap<u64, Inode>,
    pub paths: BTreeMap<String, u64>,
    pub next_ino: u64,
    /// Paths of the batch a flush is committing right now: deleting one of these must leave
    /// a whiteout even if the base does not have it yet, or the flush would resurrect it.
    pub inflight: HashSet<String>,
    /// Staging files held open by in-use inodes, so releasing their record does not delete
    /// them under the handle.
    pub held: HashMap<StagingId, u32>,
    /// Holds of dropped detached inodes, for [`Core::settle`] to release.
    pub unheld: Vec<StagingId>,
}

impl Ns {
    pub(crate) fn new() -> Ns {
        let mut ns = Ns {
            next_ino: ROOT + 1,
            ..Ns::default()
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
            },
        );
        ns.paths.insert(String::new(), ROOT);
        ns
    }

    pub(crate) fn path(&self, ino: u64) -> Res<&str> {
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
            },
        );
        self.paths.insert(path.to_string(), ino);
        ino
    }

    fn maybe_drop(&mut self, ino: u64) {
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
                i.detached = last;
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

pub(crate) struct Handle {
    pub ino: u64,
    pub cell: Arc<FileCell>,
    pub append: bool,
}

pub(crate) struct DirHandle {
    pub ino: u64,
    /// Names and kinds snapshotted at opendir, '.' and '..' first: readdir offsets are
    /// indexes into this, stable however the directory changes while it is being listed.
    pub entries: Vec<(String, FileType)>,
}

pub(crate) struct Core {
    pub overlay: Overlay,
    pub base: Arc<dyn BaseLayer>,
    pub sink: Arc<dyn FlushSink>,
    pub opts: MountOptions,
    pub ns: Mutex<Ns>,
    pub handles: Mutex<HashMap<u64, Handle>>,
    pub dirs: Mutex<HashMap<u64, DirHandle>>,
    pub next_fh: AtomicU64,
    pub flush: FlushCtl,
    /// The root directory has no record; its times live here.
    pub root_mtime_ns: AtomicI64,
    pub root_ctime_ns: AtomicI64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the tables consistent before anything that can panic, so
    // a poisoned lock still guards sound data; refusing service would lose writes instead.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    pub(crate) fn new(
        base: Arc<dyn BaseLayer>,
        sink: Arc<dyn FlushSink>,
        overlay: Overlay,
        opts: MountOptions,
    ) -> Core {
        Core {
            overlay,
            base,
            sink,
            opts,
            ns: Mutex::new(Ns::new()),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            flush: FlushCtl::new(),
            root_mtime_ns: AtomicI64::new(now_ns()),
            root_ctime_ns: AtomicI64::new(now_ns()),
        }
    }

    pub(crate) fn ns(&self) -> MutexGuard<'_, Ns> {
        lock(&self.ns)
    }

    pub(crate) fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        lock(&self.handles)
    }

    pub(crate) fn dirs(&self) -> MutexGuard<'_, HashMap<u64, DirHandle>> {
        lock(&self.dirs)
    }

    pub(crate) fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// A namespace or metadata change happened: flush after the idle debounce.
    pub(crate) fn touched(&self) {
        self.flush.schedule(self.opts.flush_debounce);
    }

    pub(crate) fn resolve(&self, path: &str) -> Res<Option<Node>> {
        match self.overlay.get(path).map_err(overlay_errno)? {
            Some(r) if r.kind == Kind::Whiteout => Ok(None),
            Some(r) => Ok(Some(Node::Rec(r))),
            None => Ok(self.base.get(path).map_err(base_errno)?.map(Node::Base)),
        }
    }

    pub(crate) fn base_has(&self, path: &str) -> Res<bool> {
        Ok(self.base.get(path).map_err(base_errno)?.is_some())
    }

    pub(crate) fn stat_node(&self, path: &str, node: &Node) -> Res<Stat> {
        Ok(match node {
            Node::Rec(r) => {
                let size = if r.kind == Kind::File && r.data == Data::Base {
                    // "Unchanged content" means whatever the base holds now.
                    self.base
                        .get(path)
                        .map_err(base_errno)?
                        .map(|b| b.size)
                        .unwrap_or(r.size)
                } else {
                    r.size
                };
                let blocks = match (&r.kind, &r.data) {
                    (Kind::File, Data::Staged(id)) => {
                        std::fs::metadata(self.overlay.staging_path(*id))
                            .ok()
                            .map(|m| m.blocks())
                    }
                    _ => None,
                };
                Stat {
                    kind: entry_kind(r.kind),
                    perm: r.mode,
                    uid: r.uid,
                    gid: r.gid,
                    size,
                    atime_ns: r.atime_ns.unwrap_or(r.mtime_ns),
                    mtime_ns: r.mtime_ns,
                    ctime_ns: r.ctime_ns,
                    blocks,
                }
            }
            Node::Base(b) => Stat {
                kind: b.kind,
                perm: b.mode,
                uid: self.opts.uid,
                gid: self.opts.gid,
                size: b.size,
                atime_ns: b.mtime_ns,
                mtime_ns: b.mtime_ns,
                ctime_ns: b.mtime_ns,
                blocks: None,
            },
        })
    }

    fn root_stat(&self) -> Stat {
        Stat {
            kind: EntryKind::Dir,
            perm: 0o755,
            uid: self.opts.uid,
            gid: self.opts.gid,
            size: 0,
            atime_ns: self.root_mtime_ns.load(Ordering::Relaxed),
            mtime_ns: self.root_mtime_ns.load(Ordering::Relaxed),
            ctime_ns: self.root_ctime_ns.load(Ordering::Relaxed),
            blocks: None,
        }
    }

    /// Attributes of a path in the merged view (ENOENT if it is not there).
    pub(crate) fn stat_path(&self, path: &str) -> Res<Stat> {
        match self.resolve(path)? {
            Some(node) => self.stat_node(path, &node),
            None if path.is_empty() => Ok(self.root_stat()),
            None => Err(Errno::ENOENT),
        }
    }

    pub(crate) fn stat_ino(&self, ns: &Ns, ino: u64) -> Res<Stat> {
        let inode = ns.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        match &inode.path {
            Some(p) => self.stat_path(p),
            None => inode.detached.clone().ok_or(Errno::ENOENT),
        }
    }

    /// The record to modify for a metadata change on `path`, materialised from the base if
    /// the overlay has none yet (data stays `Base`: content unchanged).
    pub(crate) fn materialize(&self, node: Node) -> Record {
        match node {
            Node::Rec(r) => r,
            Node::Base(b) => {
                let (kind, data) = match b.kind {
                    EntryKind::File => (Kind::File, Data::Base),
                    EntryKind::Dir => (Kind::Dir, Data::None),
                    EntryKind::Symlink => (Kind::Symlink, Data::Target(b.target.clone())),
                };
                Record {
                    kind,
                    mode: b.mode,
                    uid: self.opts.uid,
                    gid: self.opts.gid,
                    mtime_ns: b.mtime_ns,
                    ctime_ns: b.mtime_ns,
                    atime_ns: None,
                    size: b.size,
                    xattrs: b.xattrs,
                    data,
                    generation: 0,
                }
            }
        }
    }

    pub(crate) fn new_record(
        &self,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        data: Data,
    ) -> Record {
        let now = now_ns();
        let size = match &data {
            Data::Target(t) => t.len() as u64,
            _ => 0,
        };
        Record {
            kind,
            mode: mode & 0o7777,
            uid,
            gid,
            mtime_ns: now,
            ctime_ns: now,
            atime_ns: None,
            size,
            xattrs: BTreeMap::new(),
            data,
            generation: 0,
        }
    }

    /// Releases the staging holds of detached inodes the namespace dropped.
    pub(crate) fn settle(&self, ns: &mut Ns) {
        for id in std::mem::take(&mut ns.unheld) {
            self.unhold(ns, id);
        }
    }

    pub(crate) fn forget(&self, ino: u64, n: u64) {
        let mut ns = self.ns();
        ns.forget(ino, n);
        self.settle(&mut ns);
    }

    /// The entry at `path` (currently `node`) is about to be unlinked or replaced: detaches
    /// its inode, keeping its last attributes and, while the kernel still knows the inode,
    /// its content (a lookup racing with the unlink may still open it). Call before the
    /// overlay change so a staging file is held before the change releases it.
    pub(crate) fn detach(&self, ns: &mut Ns, path: &str, node: &Node) -> Res<()> {
        let Some(&ino) = ns.paths.get(path) else {
            return Ok(());
        };
        let last = self.stat_node(path, node)?;
        let known = ns.inodes.get(&ino).is_some_and(|i| i.nlookup > 0);
        let gone = match node {
            _ if !known => None,
            Node::Rec(r) => match (&r.kind, &r.data) {
                (Kind::File, Data::Staged(id)) => {
                    self.hold(ns, *id);
                    Some(GoneSrc::Staged(*id))
                }
                (Kind::File, Data::Base) => Some(GoneSrc::Base(
                    self.base
                        .get(path)
                        .map_err(base_errno)?
                        .unwrap_or_else(|| content_entry(r, ContentRef::empty())),
                )),
                (Kind::File, Data::Content(c)) => {
                    Some(GoneSrc::Base(content_entry(r, ContentRef::new(c.clone()))))
                }
                (Kind::File, _) => Some(GoneSrc::Base(content_entry(r, ContentRef::empty()))),
                _ => None,
            },
            Node::Base(b) if b.kind == EntryKind::File => Some(GoneSrc::Base(b.clone())),
            Node::Base(_) => None,
        };
        ns.detach(path, Some(last), gone);
        self.settle(ns);
        Ok(())
    }

    /// The entries of directory `dir` changed: its mtime and ctime move to `now`.
    pub(crate) fn touch_dir(&self, ns: &Ns, dir: &str, now: i64) -> Res<()> {
        if dir.is_empty() {
            self.root_mtime_ns.store(now, Ordering::Relaxed);
            self.root_ctime_ns.store(now, Ordering::Relaxed);
            return Ok(());
        }
        let Some(node) = self.resolve(dir)? else {
            return Ok(());
        };
        if node.kind() != EntryKind::Dir {
            return Ok(());
        }
        let mut rec = self.materialize(node);
        rec.mtime_ns = now;
        rec.ctime_ns = now;
        let change = self.overlay.put(dir, rec).map_err(overlay_errno)?;
        self.drop_released(ns, change.released);
        Ok(())
    }

    /// Deletes staging files nobody references or holds open any more.
    pub(crate) fn drop_released(&self, ns: &Ns, released: Vec<StagingId>) {
        for id in released {
            if !ns.held.contains_key(&id)
                && let Err(e) = self.overlay.remove_staging(id)
            {
                tracing::warn!(error = %e, "could not delete a released staging file; the next mount removes it");
            }
        }
    }

    /// Removes `path` from the merged view: a whiteout when the base has it (or a flush in
    /// flight is about to give it to the base), otherwise the record just goes.
    pub(crate) fn delete_path(&self, ns: &Ns, path: &str) -> Res<()> {
        let change = if self.base_has(path)? || ns.inflight.contains(path) {
            self.overlay.whiteout(path)
        } else {
            self.overlay.remove(path)
        }
        .map_err(overlay_errno)?;
        self.drop_released(ns, change.released);
        Ok(())
    }

    /// Whether a directory has no visible child in the merged view.
    pub(crate) fn dir_is_empty(&self, path: &str) -> Res<bool> {
        let mut hidden = HashSet::new();
        for (name, rec) in self.overlay.children(path).map_err(overlay_errno)? {
            if rec.kind != Kind::Whiteout {
                return Ok(false);
            }
            hidden.insert(name);
        }
        for item in self.base.children(path).map_err(base_errno)? {
            let (name, _) = item.map_err(base_errno)?;
            if !hidden.contains(&name) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Merged children of a directory, sorted by name: overlay records win, whiteouts hide.
    pub(crate) fn merged_children(&self, path: &str) -> Res<Vec<(String, Node)>> {
        let mut over = self
            .overlay
            .children(path)
            .map_err(overlay_errno)?
            .into_iter()
            .peekable();
        let mut out = Vec::new();
        let emit = |out: &mut Vec<(String, Node)>, name: String, rec: Record| {
            if rec.kind != Kind::Whiteout {
                out.push((name, Node::Rec(rec)));
            }
        };
        for item in self.base.children(path).map_err(base_errno)? {
            let (name, entry) = item.map_err(base_errno)?;
            while let Some((oname, rec)) = over.next_if(|(o, _)| o.as_str() < name.as_str()) {
                emit(&mut out, oname, rec);
            }
            match over.next_if(|(o, _)| *o == name) {
                Some((oname, rec)) => emit(&mut out, oname, rec),
                None => out.push((name, Node::Base(entry))),
            }
        }
        for (oname, rec) in over {
            emit(&mut out, oname, rec);
        }
        Ok(out)
    }

    // ---- file data ----

    /// Gets (creating if needed) the file state of an inode and counts one more user.
    pub(crate) fn acquire_file(&self, ino: u64) -> Res<Arc<FileCell>> {
        let mut ns = self.ns();
        let inode = ns.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        inode.file_users += 1;
        Ok(inode
            .file
            .get_or_insert_with(|| {
                Arc::new(FileCell {
                    st: Mutex::new(FileState {
                        staging: None,
                        base: None,
                        written: false,
                    }),
                })
            })
            .clone())
    }

    /// Counts one user less; the last one closes the staging file (deleting it if no record
    /// references it any more) and schedules a flush if anything was written.
    pub(crate) fn release_file(&self, ino: u64) {
        let cell = {
            let mut ns = self.ns();
            let Some(inode) = ns.inodes.get_mut(&ino) else {
                return;
            };
            inode.file_users = inode.file_users.saturating_sub(1);
            if inode.file_users > 0 {
                return;
            }
            let cell = inode.file.take();
            ns.maybe_drop(ino);
            self.settle(&mut ns);
            cell
        };
        let Some(cell) = cell else { return };
        let (staging, written) = {
            let mut st = cell.lock();
            st.base = None;
            (st.staging.take(), std::mem::take(&mut st.written))
        };
        if let Some((id, file)) = staging {
            drop(file);
            let mut ns = self.ns();
            // Someone may have re-acquired the inode between the two critical sections; the
            // new cell opens its own staging file, so the hold count is what matters.
            self.unhold(&mut ns, id);
        }
        if written {
            self.touched();
        }
    }

    pub(crate) fn hold(&self, ns: &mut Ns, id: StagingId) {
        *ns.held.entry(id).or_insert(0) += 1;
    }

    fn unhold(&self, ns: &mut Ns, id: StagingId) {
        let last = match ns.held.get_mut(&id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                ns.held.remove(&id);
                true
            }
        };
        if last {
            match self.overlay.is_referenced(id) {
                Ok(false) => {
                    if let Err(e) = self.overlay.remove_staging(id) {
                        tracing::warn!(error = %e, "could not delete an unreferenced staging file");
                    }
                }
                Ok(true) => {}
                Err(e) => tracing::warn!(error = %e, "could not check a staging file's references"),
            }
        }
    }

    /// Makes sure `st` knows where its content comes from (at open, or lazily after a base
    /// change dropped the pinned entry).
    pub(crate) fn init_source(&self, ino: u64, st: &mut FileState) -> Res<()> {
        if st.staging.is_some() || st.base.is_some() {
            return Ok(());
        }
        let mut ns = self.ns();
        let path = match ns.path(ino) {
            Ok(p) => p.to_string(),
            Err(e) => {
                // Unlinked or replaced after the kernel looked it up: the old content.
                match ns.inodes.get(&ino).and_then(|i| i.gone.clone()) {
                    Some(GoneSrc::Staged(id)) => {
                        let f = self.overlay.open_staging(id).map_err(overlay_errno)?;
                        self.hold(&mut ns, id);
                        st.staging = Some((id, Arc::new(f)));
                    }
                    Some(GoneSrc::Base(b)) => st.base = Some(b),
                    None => return Err(e),
                }
                return Ok(());
            }
        };
        let node = self.resolve(&path)?.ok_or(Errno::ENOENT)?;
        match node {
            Node::Rec(r) => match (&r.kind, &r.data) {
                (Kind::Dir, _) => return Err(Errno::EISDIR),
                (Kind::File, Data::Staged(id)) => {
                    let f = self.overlay.open_staging(*id).map_err(overlay_errno)?;
                    self.hold(&mut ns, *id);
                    st.staging = Some((*id, Arc::new(f)));
                }
                (Kind::File, Data::Base) => {
                    st.base = self.base.get(&path).map_err(base_errno)?;
                    if st.base.is_none() {
                        st.base = Some(content_entry(&r, ContentRef::empty()));
                    }
                }
                (Kind::File, Data::Content(c)) => {
                    st.base = Some(content_entry(&r, ContentRef::new(c.clone())));
                }
                _ => st.base = Some(content_entry(&r, ContentRef::empty())),
            },
            Node::Base(b) => {
                if b.kind == EntryKind::Dir {
                    return Err(Errno::EISDIR);
                }
                st.base = Some(b);
            }
        }
        Ok(())
    }

    /// Copy-on-write: gives the inode a staging file holding its content (only the first
    /// `limit` bytes when it is about to be truncated), streamed from the base in blocks.
    pub(crate) fn ensure_staged(
        &self,
        ino: u64,
        st: &mut FileState,
        limit: Option<u64>,
    ) -> Res<()> {
        if st.staging.is_some() {
            return Ok(());
        }
        self.init_source(ino, st)?;
        if st.staging.is_some() {
            return Ok(());
        }
        let src = st.base.clone().ok_or(Errno::EIO)?;
        let (id, file) = self.overlay.create_staging().map_err(overlay_errno)?;
        self.hold(&mut self.ns(), id);
        let want = limit.map_or(src.size, |l| l.min(src.size));
        let copied = (|| -> Res<u64> {
            let mut buf = vec![0u8; COPY_BLOCK.min(want as usize).max(1)];
            let mut off = 0u64;
            while off < want {
                let n = ((want - off) as usize).min(buf.len());
                let got = self
                    .base
                    .read(&src, off, &mut buf[..n])
                    .map_err(base_errno)?;
                if got == 0 {
                    break;
                }
                file.write_all_at(&buf[..got], off).map_err(io_errno)?;
                off += got as u64;
            }
            Ok(off)
        })();
        let copied = match copied {
            Ok(c) => c,
            Err(e) => {
                let mut ns = self.ns();
                self.unhold(&mut ns, id);
                return Err(e);
            }
        };
        st.staging = Some((id, Arc::new(file)));
        st.base = None;
        self.record_data_change(ino, st, copied, false)?;
        Ok(())
    }

    /// After the staging file of `ino` changed: point the path's record at it with the new
    /// size (re-adopting it if a flush retired the record meanwhile), or update the detached
    /// attributes of an unlinked inode.
    pub(crate) fn record_data_change(
        &self,
        ino: u64,
        st: &FileState,
        size: u64,
        touch_mtime: bool,
    ) -> Res<Stat> {
        let (id, _) = st.staging.as_ref().ok_or(Errno::EIO)?;
        let mut ns = self.ns();
        let now = now_ns();
        let inode = ns.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let Some(path) = inode.path.clone() else {
            let d = inode.detached.as_mut().ok_or(Errno::ENOENT)?;
            d.size = size;
            if touch_mtime {
                d.mtime_ns = now;
                d.ctime_ns = now;
            }
            return Ok(d.clone());
        };
        let node = self.resolve(&path)?.ok_or(Errno::ENOENT)?;
        let mut rec = self.materialize(node);
        rec.data = Data::Staged(*id);
        rec.size = size;
        if touch_mtime {
            rec.mtime_ns = now;
            rec.ctime_ns = now;
        }
        let change = self.overlay.put(&path, rec).map_err(overlay_errno)?;
        self.drop_released(&ns, change.released);
        self.stat_path(&path)
    }

    pub(crate) fn truncate(&self, ino: u64, cell: &FileCell, size: u64) -> Res<Stat> {
        let mut st = cell.lock();
        self.ensure_staged(ino, &mut st, Some(size))?;
        let file = st.staging.as_ref().ok_or(Errno::EIO)?.1.clone();
        file.set_len(size).map_err(io_errno)?;
        st.written = true;
        self.record_data_change(ino, &st, size, true)
    }

    pub(crate) fn write(
        &self,
        ino: u64,
        cell: &FileCell,
        offset: u64,
        data: &[u8],
        append: bool,
    ) -> Res<u32> {
        let mut st = cell.lock();
        self.ensure_staged(ino, &mut st, None)?;
        let file = st.staging.as_ref().ok_or(Errno::EIO)?.1.clone();
        let offset = if append {
            file.metadata().map_err(io_errno)?.len()
        } else {
            offset
        };
        file.write_all_at(data, offset).map_err(io_errno)?;
        let size = file.metadata().map_err(io_errno)?.len();
        st.written = true;
        self.record_data_change(ino, &st, size, true)?;
        Ok(data.len() as u32)
    }

    pub(crate) fn read(&self, ino: u64, cell: &FileCell, offset: u64, size: u32) -> Res<Vec<u8>> {
        let (staged, base) = {
            let mut st = cell.lock();
            self.init_source(ino, &mut st)?;
            (st.staging.as_ref().map(|(_, f)| f.clone()), st.base.clone())
        };
        // No lock is held from here on: base reads may be slow fetches.
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0usize;
        if let Some(f) = staged {
            while filled < buf.len() {
                let n = f
                    .read_at(&mut buf[filled..], offset + filled as u64)
                    .map_err(io_errno)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
        } else if let Some(entry) = base {
            let end = entry.size.min(offset.saturating_add(size as u64));
            while offset + (filled as u64) < end {
                let want = (end - offset) as usize;
                let n = self
                    .base
                    .read(&entry, offset + filled as u64, &mut buf[filled..want])
                    .map_err(base_errno)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    // ---- flushing ----

    /// One flush: hands every dirty record to the sink and retires what did not change
    /// meanwhile. Returns whether records are left (changed during the flush).
    /// Folds the dirty records into the base through the sink. A batch holds one open
    /// descriptor per staged file, so it takes at most [`staged_per_batch`] of them: the
    /// records in path order up to that many, which keeps parents ahead of their children.
    /// The rest stays in the overlay and is taken by the next call ([`Flushed::Capped`]).
    pub(crate) fn flush_once(&self) -> Result<Flushed, FlushError> {
        let to_flush_err = |e: OverlayError| FlushError::Failed(e.to_string());
        let cap = staged_per_batch();
        let (batch, keys, capped) = {
            let mut ns = self.ns();
            let mut dirty = self.overlay.dirty().map_err(to_flush_err)?;
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
        let released = self.overlay.retire(&keys).map_err(to_flush_err)?;
        self.drop_released(&ns, released);
        let left = !self.overlay.is_empty().map_err(to_flush_err)?;
        tracing::debug!(records = n, left, capped, "flushed overlay");
        Ok(match (left, capped) {
            (false, _) => Flushed::Clean,
            (true, true) => Flushed::Capped,
            (true, false) => Flushed::ChangedMeanwhile,
        })
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

/// A stand-in base entry for content the overlay describes (a pinned content reference).
fn content_entry(r: &Record, content: ContentRef) -> BaseEntry {
    BaseEntry {
        kind: EntryKind::File,
        mode: r.mode,
        mtime_ns: r.mtime_ns,
        size: r.size,
        xattrs: BTreeMap::new(),
        target: Vec::new(),
        content,
    }
}

#[cfg(test)]
mod tests {
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
