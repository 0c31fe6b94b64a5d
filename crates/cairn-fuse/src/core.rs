//! The filesystem logic, independent of fuser's reply plumbing: path resolution over overlay
//! and base, the file and directory handle tables, staging-file holds, copy-on-write, and
//! reading and writing file content. The inode table lives in [`crate::namespace`], the
//! flush in [`crate::flusher`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_overlay::path::now_ns;
use cairn_overlay::{Data, Kind, Overlay, Record, StagingId};
use fuser::{Errno, FileType};

use crate::MountOptions;
use crate::base::{BaseEntry, BaseLayer, ContentRef, EntryKind};
use crate::errno::{FsResult, base_errno, io_errno, overlay_errno};
use crate::flusher::FlushCtl;
use crate::namespace::{FileCell, FileState, GoneSrc, Namespace, Node};
use crate::sink::FlushSink;
use crate::space::SpaceGuard;
use crate::stat::{Stat, entry_kind, special_type};

/// Copy-on-write and staging reads move data in blocks of this size, so a file of any size
/// costs at most one block of memory.
pub(crate) const COPY_BLOCK: usize = 1 << 20;

/// Reads that may wait on the network served at once on threads of their own; beyond that
/// they run on the kernel request thread that received them.
const SLOW_READS: usize = 32;

/// Directories whose subdirectory count is remembered; the table is emptied when full.
const DIR_LINKS_CACHED: usize = 4096;

/// Lost races (a namespace change while reading the base unlocked) before an operation
/// takes the lock for its whole run; see [`Core::unlocked`].
const OPTIMISTIC_TRIES: usize = 3;

#[derive(Clone)]
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
    pub ns: Mutex<Namespace>,
    pub handles: Mutex<HashMap<u64, Handle>>,
    pub dirs: Mutex<HashMap<u64, DirHandle>>,
    pub next_fh: AtomicU64,
    pub flush: FlushCtl,
    pub space: SpaceGuard,
    /// The root directory has no record; its times live here.
    pub root_mtime_ns: AtomicI64,
    pub root_ctime_ns: AtomicI64,
    /// Reads running on threads of their own (see [`SlowRead`]).
    slow_reads: AtomicUsize,
    /// `st_nlink` of directories by path, valid while neither the namespace generation nor
    /// the base version moved: a `stat` of a directory then does not list it again.
    dir_links: Mutex<HashMap<String, DirLinks>>,
}

#[derive(Clone, Copy)]
struct DirLinks {
    generation: u64,
    base: u64,
    nlink: u32,
}

/// One of the [`SLOW_READS`] slots for a read that may wait on the network; freed on drop.
pub(crate) struct SlowRead(Arc<Core>);

impl SlowRead {
    pub(crate) fn take(core: &Arc<Core>) -> Option<SlowRead> {
        core.slow_reads
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < SLOW_READS).then_some(n + 1)
            })
            .ok()
            .map(|_| SlowRead(core.clone()))
    }

    pub(crate) fn core(&self) -> &Core {
        &self.0
    }
}

impl Drop for SlowRead {
    fn drop(&mut self) {
        self.0.slow_reads.fetch_sub(1, Ordering::AcqRel);
    }
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
        let space = SpaceGuard::new(overlay.dir(), opts.min_free);
        Core {
            space,
            overlay,
            base,
            sink,
            opts,
            ns: Mutex::new(Namespace::new()),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            flush: FlushCtl::new(),
            root_mtime_ns: AtomicI64::new(now_ns()),
            root_ctime_ns: AtomicI64::new(now_ns()),
            slow_reads: AtomicUsize::new(0),
            dir_links: Mutex::new(HashMap::new()),
        }
    }

    /// The namespace, for a critical section that may change which paths exist or what
    /// they are.
    pub(crate) fn ns(&self) -> MutexGuard<'_, Namespace> {
        let mut ns = lock(&self.ns);
        ns.generation = ns.generation.wrapping_add(1);
        ns
    }

    /// The namespace, for a critical section that changes no path's existence, kind or link
    /// group (it may count lookups, hand out inode numbers, or change a file's content and
    /// times: a reply carrying attributes read just before such a change is one ordered
    /// before it, and the kernel's attribute versioning handles it as such).
    pub(crate) fn ns_view(&self) -> MutexGuard<'_, Namespace> {
        lock(&self.ns)
    }

    /// Runs an operation whose base reads may be slow (a tree node or directory a peer has
    /// to send) without holding the namespace lock across them, so one slow peer stalls only
    /// the operations that need what it has. `prepare` runs under the lock (resolving inode
    /// numbers to paths), `read` without it, and `apply` under the lock again, but only if
    /// no change to the namespace happened in between; otherwise the whole thing is
    /// retried. After [`OPTIMISTIC_TRIES`] lost races (a burst of writes) it runs under the
    /// lock from start to end, with whatever the earlier tries read already local.
    pub(crate) fn unlocked<P, R, T>(
        &self,
        prepare: impl Fn(&Namespace) -> FsResult<P>,
        read: impl Fn(&P) -> FsResult<R>,
        apply: impl FnOnce(&mut Namespace, P, R) -> FsResult<T>,
    ) -> FsResult<T> {
        for _ in 0..OPTIMISTIC_TRIES {
            let (generation, p) = {
                let ns = self.ns_view();
                (ns.generation, prepare(&ns)?)
            };
            let r = read(&p);
            let mut ns = self.ns_view();
            if ns.generation == generation {
                return apply(&mut ns, p, r?);
            }
        }
        let mut ns = self.ns_view();
        let p = prepare(&ns)?;
        let r = read(&p)?;
        apply(&mut ns, p, r)
    }

    /// Reads `paths` in the merged view without the namespace lock, so that a change about
    /// to take the lock finds them local: a slow fetch then holds up this caller only.
    /// Errors are left for the locked pass to report.
    pub(crate) fn warm(&self, paths: &[&str]) {
        for p in paths {
            // A record of unchanged content still reads the base entry (its size).
            if let Ok(Some(Node::Rec(r))) = self.resolve(p)
                && r.data == Data::Base
            {
                let _ = self.base.get(p);
            }
        }
    }

    /// [`Self::stat_ino`] without holding the namespace lock across the base reads.
    pub(crate) fn stat_ino_unlocked(&self, ino: u64) -> FsResult<Stat> {
        self.stat_ino_inner(ino, false)
    }

    /// [`Self::stat_ino_unlocked`] with a directory's `st_nlink` counted (see
    /// [`Self::with_dir_links`]): the attributes `getattr` replies with.
    pub(crate) fn attr_ino_unlocked(&self, ino: u64) -> FsResult<Stat> {
        self.stat_ino_inner(ino, true)
    }

    fn stat_ino_inner(&self, ino: u64, dir_links: bool) -> FsResult<Stat> {
        self.unlocked(
            |ns| {
                let inode = ns.inodes.get(&ino).ok_or(Errno::ENOENT)?;
                Ok(match &inode.path {
                    Some(p) => Ok((p.clone(), ns.generation)),
                    None => Err(inode.detached.clone().ok_or(Errno::ENOENT)?),
                })
            },
            |p| match p {
                Ok((path, generation)) => {
                    let st = self.stat_path(path)?;
                    Ok(if dir_links {
                        self.with_dir_links(path, st, *generation)
                    } else {
                        st
                    })
                }
                Err(detached) => Ok(detached.clone()),
            },
            |_, _, st| Ok(st),
        )
    }

    /// `st` (the attributes of `path`) with, for a directory, `st_nlink` = 2 + its
    /// subdirectories, the POSIX convention `find` relies on to skip leaves. Must run where
    /// [`Self::unlocked`] reads (or under the namespace lock), with the generation its
    /// `prepare` saw: a count taken while the namespace moved is then never used. A count
    /// that cannot be taken stays 1, which tells `find` "unknown"; one too low would make it
    /// skip subdirectories.
    pub(crate) fn with_dir_links(&self, path: &str, st: Stat, generation: u64) -> Stat {
        self.dir_links_inner(path, st, generation, true)
    }

    /// [`Self::with_dir_links`] from the cache only, 1 if it does not know: for listings
    /// with attributes, where counting would list every subdirectory of the one listed (and
    /// wait on whichever a slow peer holds).
    pub(crate) fn with_cached_dir_links(&self, path: &str, st: Stat, generation: u64) -> Stat {
        self.dir_links_inner(path, st, generation, false)
    }

    fn dir_links_inner(&self, path: &str, mut st: Stat, generation: u64, count: bool) -> Stat {
        if st.kind != EntryKind::Dir || st.nlink == 0 {
            return st;
        }
        let base = self.base.version();
        if let Some(base) = base
            && let Some(c) = lock(&self.dir_links).get(path)
            && c.generation == generation
            && c.base == base
        {
            st.nlink = c.nlink;
            return st;
        }
        if !count {
            return st;
        }
        let Ok(children) = self.merged_children(path) else {
            return st;
        };
        let subdirs = children
            .iter()
            .filter(|(_, n)| n.kind() == EntryKind::Dir)
            .count();
        let Some(nlink) = u32::try_from(subdirs).ok().and_then(|n| n.checked_add(2)) else {
            return st;
        };
        st.nlink = nlink;
        if let Some(base) = base {
            let mut cache = lock(&self.dir_links);
            if cache.len() >= DIR_LINKS_CACHED {
                cache.clear();
            }
            cache.insert(
                path.to_string(),
                DirLinks {
                    generation,
                    base,
                    nlink,
                },
            );
        }
        st
    }

    /// The path of `ino` and what it resolves to, read without holding the namespace lock.
    pub(crate) fn resolve_ino_unlocked(&self, ino: u64) -> FsResult<(String, Option<Node>)> {
        self.unlocked(
            |ns| Ok(ns.path(ino)?.to_string()),
            |path| self.resolve(path),
            |_, path, node| Ok((path, node)),
        )
    }

    pub(crate) fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        lock(&self.handles)
    }

    /// A copy of an open file's handle, so the table's lock is not held across the call
    /// that uses it.
    pub(crate) fn handle(&self, fh: u64) -> Option<Handle> {
        self.handles().get(&fh).cloned()
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

    pub(crate) fn resolve(&self, path: &str) -> FsResult<Option<Node>> {
        match self.overlay.get(path).map_err(overlay_errno)? {
            Some(r) if r.kind == Kind::Whiteout => Ok(None),
            Some(r) if r.kind == Kind::Owner => Ok(self
                .base
                .get(path)
                .map_err(base_errno)?
                .map(|b| self.owned(b, &r))),
            Some(r) => Ok(Some(Node::Rec(r))),
            None => Ok(self.base.get(path).map_err(base_errno)?.map(Node::Base)),
        }
    }

    pub(crate) fn base_has(&self, path: &str) -> FsResult<bool> {
        Ok(self.base.get(path).map_err(base_errno)?.is_some())
    }

    pub(crate) fn stat_node(&self, path: &str, node: &Node) -> FsResult<Stat> {
        let mut st = self.stat_node_unlinked(path, node)?;
        if let Some(g) = crate::links::group_of(node) {
            st.nlink = g.nlink();
            st.link = Some(g.id);
        }
        Ok(st)
    }

    fn stat_node_unlinked(&self, path: &str, node: &Node) -> FsResult<Stat> {
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
                    atime_ns: r.atime_ns.unwrap_or(r.mtime_ns),
                    mtime_ns: r.mtime_ns,
                    ctime_ns: r.ctime_ns,
                    blocks,
                    special: special_type(r.kind),
                    rdev: match r.data {
                        // The kernel's dev_t is 32 bits wide on the wire (new_encode_dev).
                        Data::Device(d) => d as u32,
                        _ => 0,
                    },
                    ..Stat::new(entry_kind(r.kind), r.mode, r.uid, r.gid, size)
                }
            }
            Node::Base(b) => Stat {
                atime_ns: b.mtime_ns,
                mtime_ns: b.mtime_ns,
                ctime_ns: b.mtime_ns,
                ..Stat::new(
                    b.kind,
                    b.mode & !self.opts.umask,
                    self.opts.uid,
                    self.opts.gid,
                    b.size,
                )
            },
        })
    }

    fn root_stat(&self) -> Stat {
        Stat {
            atime_ns: self.root_mtime_ns.load(Ordering::Relaxed),
            mtime_ns: self.root_mtime_ns.load(Ordering::Relaxed),
            ctime_ns: self.root_ctime_ns.load(Ordering::Relaxed),
            ..Stat::new(EntryKind::Dir, 0o755, self.opts.uid, self.opts.gid, 0)
        }
    }

    /// Attributes of a path in the merged view (ENOENT if it is not there).
    pub(crate) fn stat_path(&self, path: &str) -> FsResult<Stat> {
        match self.resolve(path)? {
            Some(node) => self.stat_node(path, &node),
            None if path.is_empty() => Ok(self.root_stat()),
            None => Err(Errno::ENOENT),
        }
    }

    pub(crate) fn stat_ino(&self, ns: &Namespace, ino: u64) -> FsResult<Stat> {
        let inode = ns.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        match &inode.path {
            Some(p) => self.stat_path(p),
            None => inode.detached.clone().ok_or(Errno::ENOENT),
        }
    }

    /// A base entry with this device's local owner (a [`Kind::Owner`] record) applied: a
    /// record whose content stays the base's, so any change keeps the owner.
    fn owned(&self, b: BaseEntry, owner: &Record) -> Node {
        let mut r = self.materialize(Node::Base(b));
        r.uid = owner.uid;
        r.gid = owner.gid;
        Node::Rec(r)
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
    pub(crate) fn settle(&self, ns: &mut Namespace) {
        for id in std::mem::take(&mut ns.unheld) {
            self.unhold(ns, id);
        }
    }

    pub(crate) fn forget(&self, ino: u64, n: u64) {
        let mut ns = self.ns_view();
        ns.forget(ino, n);
        self.settle(&mut ns);
    }

    /// The entry at `path` (currently `node`) is about to be unlinked or replaced: detaches
    /// its inode, keeping its last attributes and, while the kernel still knows the inode,
    /// its content (a lookup racing with the unlink may still open it). Call before the
    /// overlay change so a staging file is held before the change releases it.
    pub(crate) fn detach(&self, ns: &mut Namespace, path: &str, node: &Node) -> FsResult<()> {
        if self.unlink_linked(ns, path, node)? {
            return Ok(());
        }
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
    pub(crate) fn touch_dir(&self, ns: &Namespace, dir: &str, now: i64) -> FsResult<()> {
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
    pub(crate) fn drop_released(&self, ns: &Namespace, released: Vec<StagingId>) {
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
    pub(crate) fn delete_path(&self, ns: &Namespace, path: &str) -> FsResult<()> {
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
    pub(crate) fn dir_is_empty(&self, path: &str) -> FsResult<bool> {
        let mut hidden = HashSet::new();
        for (name, rec) in self.overlay.children(path).map_err(overlay_errno)? {
            if rec.kind == Kind::Owner {
                continue; // visible only if the base has the entry: the loop below decides
            }
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
    pub(crate) fn merged_children(&self, path: &str) -> FsResult<Vec<(String, Node)>> {
        let mut over = self
            .overlay
            .children(path)
            .map_err(overlay_errno)?
            .into_iter()
            .peekable();
        let mut out = Vec::new();
        // Ownership records without a base entry under them show nothing.
        let emit = |out: &mut Vec<(String, Node)>, name: String, rec: Record| {
            if rec.kind != Kind::Whiteout && rec.kind != Kind::Owner {
                out.push((name, Node::Rec(rec)));
            }
        };
        for item in self.base.children(path).map_err(base_errno)? {
            let (name, entry) = item.map_err(base_errno)?;
            while let Some((oname, rec)) = over.next_if(|(o, _)| o.as_str() < name.as_str()) {
                emit(&mut out, oname, rec);
            }
            match over.next_if(|(o, _)| *o == name) {
                Some((oname, rec)) if rec.kind == Kind::Owner => {
                    out.push((oname, self.owned(entry, &rec)));
                }
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
    pub(crate) fn acquire_file(&self, ino: u64) -> FsResult<Arc<FileCell>> {
        let mut ns = self.ns_view();
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
            let mut ns = self.ns_view();
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
            let mut ns = self.ns_view();
            // Someone may have re-acquired the inode between the two critical sections; the
            // new cell opens its own staging file, so the hold count is what matters.
            self.unhold(&mut ns, id);
        }
        if written {
            self.touched();
        }
    }

    pub(crate) fn hold(&self, ns: &mut Namespace, id: StagingId) {
        *ns.held.entry(id).or_insert(0) += 1;
    }

    fn unhold(&self, ns: &mut Namespace, id: StagingId) {
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
    pub(crate) fn init_source(&self, ino: u64, st: &mut FileState) -> FsResult<()> {
        if st.staging.is_some() || st.base.is_some() {
            return Ok(());
        }
        let path = self.ns_view().path(ino).map(str::to_string);
        if let Ok(p) = path {
            self.warm(&[&p]);
        }
        let mut ns = self.ns_view();
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
    ) -> FsResult<()> {
        if st.staging.is_some() {
            return Ok(());
        }
        self.init_source(ino, st)?;
        if st.staging.is_some() {
            return Ok(());
        }
        let src = st.base.clone().ok_or(Errno::EIO)?;
        let (id, file) = self.overlay.create_staging().map_err(overlay_errno)?;
        self.hold(&mut self.ns_view(), id);
        let want = limit.map_or(src.size, |l| l.min(src.size));
        let copied = (|| -> FsResult<u64> {
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
                let mut ns = self.ns_view();
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
    ) -> FsResult<Stat> {
        let (id, _) = st.staging.as_ref().ok_or(Errno::EIO)?;
        // New content and times for a path that exists already: no path's existence or
        // inode changes, so no generation bump (writes would otherwise make every
        // concurrent lookup retry).
        let mut ns = self.ns_view();
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
        self.put_shared(&ns, &path, rec, &[])?;
        self.stat_path(&path)
    }

    pub(crate) fn truncate(&self, ino: u64, cell: &FileCell, size: u64) -> FsResult<Stat> {
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
    ) -> FsResult<u32> {
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

    /// `fallocate(2)` on the staging file: mode 0 and `KEEP_SIZE` reserve space,
    /// `PUNCH_HOLE | KEEP_SIZE` and `ZERO_RANGE` zero a range (what the snapshot then stores
    /// is exactly the zeros a read returns). Other modes (collapse, insert) are refused with
    /// `EOPNOTSUPP`, what ext4 answers for the modes it lacks.
    pub(crate) fn fallocate(
        &self,
        ino: u64,
        cell: &FileCell,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> FsResult<()> {
        let allowed =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !allowed != 0 {
            return Err(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let (off, n) = (
            i64::try_from(offset).map_err(|_| Errno::from_i32(libc::EFBIG))?,
            i64::try_from(len).map_err(|_| Errno::from_i32(libc::EFBIG))?,
        );
        let mut st = cell.lock();
        self.ensure_staged(ino, &mut st, None)?;
        let file = st.staging.as_ref().ok_or(Errno::EIO)?.1.clone();
        let before = file.metadata().map_err(io_errno)?.len();
        // SAFETY: fallocate only reads its integer arguments; the descriptor stays open
        // for the call because `file` is borrowed.
        if unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&*file), mode, off, n) } != 0 {
            return Err(io_errno(std::io::Error::last_os_error()));
        }
        let size = file.metadata().map_err(io_errno)?.len();
        let changed =
            size != before || mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        st.written |= changed;
        self.record_data_change(ino, &st, size, changed)?;
        Ok(())
    }

    /// `lseek` with `SEEK_DATA` / `SEEK_HOLE` (the kernel does the other whences). A staged
    /// file answers from its staging file, holes included; base content is all data.
    pub(crate) fn seek_data(
        &self,
        ino: u64,
        cell: &FileCell,
        offset: i64,
        whence: i32,
    ) -> FsResult<i64> {
        let (staged, base_size) = {
            let mut st = cell.lock();
            self.init_source(ino, &mut st)?;
            (
                st.staging.as_ref().map(|(_, f)| f.clone()),
                st.base.as_ref().map_or(0, |b| b.size),
            )
        };
        if let Some(f) = staged {
            // SAFETY: lseek on a descriptor `f` keeps open; it moves only that open file
            // description's offset, which nothing else uses (all I/O is positional).
            let r = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&*f), offset, whence) };
            return if r < 0 {
                Err(io_errno(std::io::Error::last_os_error()))
            } else {
                Ok(r)
            };
        }
        seek_dense(base_size, offset, whence)
    }

    /// Whether a read of `size` bytes at `offset` may wait on the network (see
    /// [`BaseLayer::may_wait`]); staged content never does.
    pub(crate) fn read_may_wait(&self, ino: u64, cell: &FileCell, offset: u64, size: u32) -> bool {
        let base = {
            let mut st = cell.lock();
            if self.init_source(ino, &mut st).is_err() || st.staging.is_some() {
                return false;
            }
            st.base.clone()
        };
        base.is_some_and(|b| self.base.may_wait(&b, offset, size as usize))
    }

    pub(crate) fn read(
        &self,
        ino: u64,
        cell: &FileCell,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
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
            let want = end.saturating_sub(offset) as usize;
            filled = self
                .base
                .read_full(&entry, offset, &mut buf[..want])
                .map_err(base_errno)?;
        }
        buf.truncate(filled);
        Ok(buf)
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

/// `SEEK_DATA` / `SEEK_HOLE` in a file of `size` bytes that is all data: one extent, then
/// the hole at its end (vault content has no holes; `ENXIO` past the end, as the kernel says).
pub(crate) fn seek_dense(size: u64, offset: i64, whence: i32) -> FsResult<i64> {
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    match whence {
        _ if offset < 0 => Err(Errno::EINVAL),
        _ if offset >= size => Err(Errno::from_i32(libc::ENXIO)),
        libc::SEEK_DATA => Ok(offset),
        libc::SEEK_HOLE => Ok(size),
        _ => Err(Errno::EINVAL),
    }
}
