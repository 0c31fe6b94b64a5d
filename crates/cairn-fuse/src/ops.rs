//! The namespace and attribute operations behind the FUSE entry points, as plain methods
//! returning [`FsResult`]: lookup, create, setattr, open, unlink, rename (with the base
//! pinning it needs), opendir and xattr edits. [`crate::fs`] decodes the kernel's calls and
//! replies.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::time::SystemTime;

use cairn_overlay::path::{now_ns, parent_of};
use cairn_overlay::{Data, Kind, Record};
use fuser::{Errno, FileType, INodeNo, RenameFlags, Request, TimeOrNow};

use crate::base::EntryKind;
use crate::core::{DirHandle, Handle};
use crate::errno::{FsResult, base_errno, overlay_errno};
use crate::fs::CairnFs;
use crate::namespace::{NAME_MAX, Namespace, Node, in_subtree, join};
use crate::stat::{Stat, time_to_ns};

/// Set-group-ID on a directory: new entries take its group, new subdirectories the bit.
const S_ISGID: u32 = 0o2000;

/// The optional changes of one setattr call.
pub(crate) struct AttrChange {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) size: Option<u64>,
    pub(crate) atime: Option<TimeOrNow>,
    pub(crate) mtime: Option<TimeOrNow>,
    pub(crate) ctime: Option<SystemTime>,
}

fn name_str(name: &OsStr) -> FsResult<&str> {
    if name.len() > NAME_MAX {
        return Err(Errno::from_i32(libc::ENAMETOOLONG));
    }
    let s = name.to_str().ok_or(Errno::from_i32(libc::EILSEQ))?;
    if s.is_empty() || s == "." || s == ".." || s.contains('/') {
        return Err(Errno::EINVAL);
    }
    Ok(s)
}

/// Whether the calling process has `gid` as its group or one of its supplementary groups
/// (FUSE passes only the primary one; the rest are in /proc).
fn caller_in_group(req: &Request, gid: u32) -> bool {
    if req.gid() == gid {
        return true;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", req.pid())) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

fn time_or_now(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => now_ns(),
        TimeOrNow::SpecificTime(t) => time_to_ns(t),
    }
}

impl CairnFs {
    pub(crate) fn ttl(&self) -> std::time::Duration {
        self.core.opts.ttl
    }

    /// Resolves `parent/name` to a path, checking the name.
    fn child_path(&self, ns: &Namespace, parent: INodeNo, name: &OsStr) -> FsResult<String> {
        let name = name_str(name)?;
        Ok(join(ns.path(parent.0)?, name))
    }

    fn require_dir(&self, path: &str) -> FsResult<()> {
        if path.is_empty() {
            return Ok(());
        }
        match self.core.resolve(path)? {
            Some(n) if n.kind() == EntryKind::Dir => Ok(()),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Checks that `dir` is a directory and returns its attributes.
    fn dir_stat(&self, dir: &str) -> FsResult<Stat> {
        let st = self.core.stat_path(dir)?;
        if st.kind != EntryKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(st)
    }

    /// A new entry in a set-group-ID directory takes the directory's group, and a new
    /// subdirectory inherits the bit (Linux/System V semantics).
    fn inherit_setgid(parent: &Stat, rec: &mut Record) {
        if parent.perm & S_ISGID != 0 {
            rec.gid = parent.gid;
            if rec.kind == Kind::Dir {
                rec.mode |= S_ISGID;
            }
        }
    }

    /// Counts a kernel lookup of `path` and returns its inode and attributes.
    fn entry_for(&self, ns: &mut Namespace, path: &str) -> FsResult<(u64, Stat)> {
        let stat = self.core.stat_path(path)?;
        let ino = ns.ino_linked(path, stat.link);
        if let Some(i) = ns.inodes.get_mut(&ino) {
            i.nlookup += 1;
        }
        Ok((ino, stat))
    }

    pub(crate) fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> FsResult<(u64, Stat)> {
        self.core.unlocked(
            |ns| Ok((self.child_path(ns, parent, name)?, ns.generation)),
            |(path, generation)| {
                let st = self.core.stat_path(path)?;
                // Counting here would make a lookup wait on the directory's own listing
                // (a slow peer's); the reply leaves an uncounted one to getattr instead.
                Ok(self.core.with_cached_dir_links(path, st, *generation))
            },
            |ns, (path, _), stat| {
                let ino = ns.ino_linked(&path, stat.link);
                if let Some(i) = ns.inodes.get_mut(&ino) {
                    i.nlookup += 1;
                }
                Ok((ino, stat))
            },
        )
    }

    /// Reads `parent/name` and its parent into the base's caches before a change takes the
    /// namespace lock (see [`crate::core::Core::warm`]); returns the path.
    fn warm_child(&self, parent: INodeNo, name: &OsStr) -> Option<String> {
        let path = self.child_path(&self.core.ns_view(), parent, name).ok()?;
        self.core.warm(&[parent_of(&path), &path]);
        Some(path)
    }

    pub(crate) fn create_node(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mut rec: Record,
    ) -> FsResult<(u64, Stat)> {
        self.core.space.admit(0)?;
        self.warm_child(parent, name);
        let mut ns = self.core.ns();
        let path = self.child_path(&ns, parent, name)?;
        let pst = self.dir_stat(parent_of(&path))?;
        if self.core.resolve(&path)?.is_some() {
            return Err(Errno::EEXIST);
        }
        Self::inherit_setgid(&pst, &mut rec);
        let change = self.core.overlay.put(&path, rec).map_err(overlay_errno)?;
        self.core.drop_released(&ns, change.released);
        self.core.touch_dir(&ns, parent_of(&path), now_ns())?;
        self.core.touched();
        let (ino, st) = self.entry_for(&mut ns, &path)?;
        // A new directory's count reads only what warm_child made local.
        let generation = ns.generation;
        Ok((ino, self.core.with_dir_links(&path, st, generation)))
    }

    pub(crate) fn do_setattr(&self, req: &Request, ino: u64, ch: AttrChange) -> FsResult<Stat> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime,
        } = ch;
        if let Some(size) = size {
            let cell = self.core.acquire_file(ino)?;
            let r = {
                let kind = self.core.stat_ino_unlocked(ino).map(|s| s.kind);
                match kind {
                    Ok(EntryKind::Dir) => Err(Errno::EISDIR),
                    Ok(EntryKind::Symlink) => Err(Errno::EINVAL),
                    Ok(EntryKind::File) => self.core.truncate(ino, &cell, size).map(|_| ()),
                    Err(e) => Err(e),
                }
            };
            self.core.release_file(ino);
            r?;
        }
        let _ = self.core.stat_ino_unlocked(ino);
        let mut ns = self.core.ns();
        let cur = self.core.stat_ino(&ns, ino)?;
        let caller = req.uid();
        if let Some(u) = uid
            && u != cur.uid
            && caller != 0
        {
            return Err(Errno::EPERM);
        }
        // chown(2): the owner may change the group to one it belongs to, supplementary
        // groups included (the kernel checks the same with default_permissions).
        if let Some(g) = gid
            && g != cur.gid
            && caller != 0
            && (caller != cur.uid || !caller_in_group(req, g))
        {
            return Err(Errno::EPERM);
        }
        // Only the owner changes the mode, except that anyone's write or chown clears the
        // set-user/group-ID bits (the kernel sends that as a mode change by the writer).
        if let Some(m) = mode
            && caller != 0
            && caller != cur.uid
            && !(m & 0o7777 & !cur.perm == 0 && (cur.perm & !m) & !0o6000 == 0)
        {
            return Err(Errno::EPERM);
        }
        if mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && atime.is_none()
            && mtime.is_none()
            && ctime.is_none()
        {
            return Ok(cur);
        }
        let now = now_ns();
        let inode = ns.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let Some(path) = inode.path.clone() else {
            let d = inode.detached.as_mut().ok_or(Errno::ENOENT)?;
            if let Some(m) = mode {
                d.perm = m & 0o7777;
            }
            if let Some(u) = uid {
                d.uid = u;
            }
            if let Some(g) = gid {
                d.gid = g;
            }
            if let Some(t) = atime {
                d.atime_ns = time_or_now(t);
            }
            if let Some(t) = mtime {
                d.mtime_ns = time_or_now(t);
            }
            d.ctime_ns = ctime.map(time_to_ns).unwrap_or(now);
            return Ok(d.clone());
        };
        let node = self.core.resolve(&path)?.ok_or(Errno::ENOENT)?;
        let mut rec = self.core.materialize(node);
        if let Some(m) = mode {
            rec.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            rec.uid = u;
        }
        if let Some(g) = gid {
            rec.gid = g;
        }
        if let Some(t) = atime {
            rec.atime_ns = Some(time_or_now(t));
        }
        if let Some(t) = mtime {
            rec.mtime_ns = time_or_now(t);
        }
        rec.ctime_ns = ctime.map(time_to_ns).unwrap_or(now);
        self.core.put_shared(&ns, &path, rec, &[])?;
        drop(ns);
        self.core.touched();
        self.core.stat_path(&path)
    }

    pub(crate) fn do_open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let cell = self.core.acquire_file(ino)?;
        let r = (|| {
            {
                let mut st = cell.lock();
                self.core.init_source(ino, &mut st)?;
            }
            if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
                self.core.truncate(ino, &cell, 0)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.core.release_file(ino);
            return Err(e);
        }
        let fh = self.core.new_fh();
        self.core.handles().insert(
            fh,
            Handle {
                ino,
                cell,
                append: flags & libc::O_APPEND != 0,
            },
        );
        Ok(fh)
    }

    pub(crate) fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(u64, Stat, u64)> {
        self.core.space.admit(0)?;
        self.warm_child(parent, name);
        let (ino, stat) = {
            let mut ns = self.core.ns();
            let path = self.child_path(&ns, parent, name)?;
            let pst = self.dir_stat(parent_of(&path))?;
            if self.core.resolve(&path)?.is_some() {
                if flags & libc::O_EXCL != 0 {
                    return Err(Errno::EEXIST);
                }
                // Lost a race with another creator: open what is there instead.
                let (ino, stat) = self.entry_for(&mut ns, &path)?;
                if stat.kind == EntryKind::Dir {
                    return Err(Errno::EISDIR);
                }
                drop(ns);
                let fh = self.do_open(ino, flags)?;
                let stat = self.core.stat_ino_unlocked(ino)?;
                return Ok((ino, stat, fh));
            }
            let (id, _file) = self.core.overlay.create_staging().map_err(overlay_errno)?;
            let mut rec = self.core.new_record(
                Kind::File,
                mode & !umask,
                req.uid(),
                req.gid(),
                Data::Staged(id),
            );
            Self::inherit_setgid(&pst, &mut rec);
            let change = self.core.overlay.put(&path, rec).map_err(overlay_errno)?;
            self.core.drop_released(&ns, change.released);
            self.core.touch_dir(&ns, parent_of(&path), now_ns())?;
            self.entry_for(&mut ns, &path)?
        };
        self.core.touched();
        let fh = self.do_open(ino, flags & !libc::O_TRUNC)?;
        Ok((ino, stat, fh))
    }

    pub(crate) fn do_unlink(&self, parent: INodeNo, name: &OsStr, dir: bool) -> FsResult<()> {
        if let Some(path) = self.warm_child(parent, name)
            && dir
        {
            let _ = self.core.dir_is_empty(&path);
        }
        let mut ns = self.core.ns();
        let path = self.child_path(&ns, parent, name)?;
        let node = self.core.resolve(&path)?.ok_or(Errno::ENOENT)?;
        let is_dir = node.kind() == EntryKind::Dir;
        if dir && !is_dir {
            return Err(Errno::ENOTDIR);
        }
        if !dir && is_dir {
            return Err(Errno::EISDIR);
        }
        if dir && !self.core.dir_is_empty(&path)? {
            return Err(Errno::ENOTEMPTY);
        }
        self.core.detach(&mut ns, &path, &node)?;
        self.core.delete_path(&ns, &path)?;
        self.core.touch_dir(&ns, parent_of(&path), now_ns())?;
        drop(ns);
        self.core.touched();
        Ok(())
    }

    /// Walks the merged subtree at `root`, pinning every entry into the overlay so that
    /// `rename_subtree` can move it: base-only entries get records, and file content that
    /// refers to the base by path is pinned to its content reference. Returns the paths that
    /// existed in the base (they need whiteouts once their records moved away).
    fn pin_subtree(&self, root: &str) -> FsResult<Vec<String>> {
        let mut puts = Vec::new();
        let mut base_paths = Vec::new();
        let mut stack = vec![(
            root.to_string(),
            self.core.resolve(root)?.ok_or(Errno::ENOENT)?,
        )];
        while let Some((path, node)) = stack.pop() {
            let base = self.core.base.get(&path).map_err(base_errno)?;
            if base.is_some() {
                base_paths.push(path.clone());
            }
            let is_dir = node.kind() == EntryKind::Dir;
            match node {
                Node::Rec(r) if r.data == Data::Base => {
                    let mut r = r;
                    if let Some(b) = &base {
                        r.size = b.size;
                        r.data = Data::Content(b.content.as_bytes().to_vec());
                    } else {
                        r.data = Data::Content(Vec::new());
                        r.size = 0;
                    }
                    puts.push((path.clone(), r));
                }
                Node::Rec(_) => {}
                Node::Base(b) => {
                    let content = b.content.as_bytes().to_vec();
                    let mut r = self.core.materialize(Node::Base(b));
                    if r.kind == Kind::File {
                        r.data = Data::Content(content);
                    }
                    puts.push((path.clone(), r));
                }
            }
            if is_dir {
                for (name, child) in self.core.merged_children(&path)? {
                    stack.push((join(&path, &name), child));
                }
            }
        }
        if !puts.is_empty() {
            let change = self.core.overlay.put_many(puts).map_err(overlay_errno)?;
            debug_assert!(change.released.is_empty());
        }
        Ok(base_paths)
    }

    fn whiteout_vacated(
        &self,
        ns: &Namespace,
        old_paths: &[String],
        all: &[String],
    ) -> FsResult<()> {
        let mut puts = Vec::new();
        let base: HashSet<&String> = old_paths.iter().collect();
        for p in all {
            if (base.contains(p) || ns.inflight.contains(p))
                && self.core.overlay.get(p).map_err(overlay_errno)?.is_none()
            {
                puts.push((p.clone(), Record::whiteout(now_ns())));
            }
        }
        if !puts.is_empty() {
            self.core.overlay.put_many(puts).map_err(overlay_errno)?;
        }
        Ok(())
    }

    fn subtree_paths(&self, root: &str) -> FsResult<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_string()];
        while let Some(p) = stack.pop() {
            let is_dir = self
                .core
                .resolve(&p)?
                .is_some_and(|n| n.kind() == EntryKind::Dir);
            if is_dir {
                for (name, _) in self.core.merged_children(&p)? {
                    stack.push(join(&p, &name));
                }
            }
            out.push(p);
        }
        Ok(out)
    }

    pub(crate) fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> FsResult<()> {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        if exchange && noreplace {
            return Err(Errno::EINVAL);
        }
        if let (Some(from), Some(to)) = (
            self.warm_child(parent, name),
            self.warm_child(newparent, newname),
        ) {
            // Everything the locked pass lists or pins: the moved subtree and, if a
            // directory is replaced, its (empty) listing.
            let _ = self.subtree_paths(&from);
            let _ = self.core.dir_is_empty(&to);
        }
        let mut ns = self.core.ns();
        let from = self.child_path(&ns, parent, name)?;
        let to = self.child_path(&ns, newparent, newname)?;
        let src = self.core.resolve(&from)?.ok_or(Errno::ENOENT)?;
        self.require_dir(parent_of(&to))?;
        if from == to {
            return Ok(());
        }
        let dst_pre = self.core.resolve(&to)?;
        // Two names of one inode: rename(2) does nothing and succeeds.
        if let (Some(a), Some(b)) = (
            crate::links::group_of(&src),
            dst_pre.as_ref().and_then(crate::links::group_of),
        ) && a.id == b.id
        {
            return Ok(());
        }
        if in_subtree(&to, &from) {
            return Err(Errno::EINVAL);
        }
        let dst = self.core.resolve(&to)?;
        if exchange {
            if dst.is_none() {
                return Err(Errno::ENOENT);
            }
            if in_subtree(&from, &to) {
                return Err(Errno::EINVAL);
            }
            let a_paths = self.subtree_paths(&from)?;
            let b_paths = self.subtree_paths(&to)?;
            let a_base = self.pin_subtree(&from)?;
            let b_base = self.pin_subtree(&to)?;
            let change = self
                .core
                .overlay
                .exchange_subtrees(&from, &to)
                .map_err(overlay_errno)?;
            self.core.drop_released(&ns, change.released);
            self.whiteout_vacated(&ns, &a_base, &a_paths)?;
            self.whiteout_vacated(&ns, &b_base, &b_paths)?;
            let mut moved = crate::links::moved_pairs(&a_paths, &from, &to);
            moved.extend(crate::links::moved_pairs(&b_paths, &to, &from));
            self.core.relink_moved(&ns, &moved)?;
            let tmp = "/exchange";
            ns.move_paths(&from, tmp);
            ns.move_paths(&to, &from);
            ns.move_paths(tmp, &to);
        } else {
            if let Some(dst) = &dst {
                if noreplace {
                    return Err(Errno::EEXIST);
                }
                match (src.kind() == EntryKind::Dir, dst.kind() == EntryKind::Dir) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !self.core.dir_is_empty(&to)? => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
                self.core.detach(&mut ns, &to, dst)?;
            }
            let old_paths = self.subtree_paths(&from)?;
            let base_paths = self.pin_subtree(&from)?;
            let change = self
                .core
                .overlay
                .rename_subtree(&from, &to)
                .map_err(overlay_errno)?;
            self.core.drop_released(&ns, change.released);
            self.whiteout_vacated(&ns, &base_paths, &old_paths)?;
            self.core
                .relink_moved(&ns, &crate::links::moved_pairs(&old_paths, &from, &to))?;
            ns.move_paths(&from, &to);
        }
        // A moved file counts as a metadata change of the file itself (ctime), like ext4.
        let now = now_ns();
        if let Some(Node::Rec(mut r)) = self.core.resolve(&to)? {
            r.ctime_ns = now;
            self.core.put_shared(&ns, &to, r, &[])?;
        }
        self.core.touch_dir(&ns, parent_of(&from), now)?;
        if parent_of(&to) != parent_of(&from) {
            self.core.touch_dir(&ns, parent_of(&to), now)?;
        }
        drop(ns);
        self.core.touched();
        Ok(())
    }

    pub(crate) fn do_opendir(&self, ino: u64) -> FsResult<u64> {
        let entries = self.core.unlocked(
            |ns| Ok(ns.path(ino)?.to_string()),
            |path| {
                if self.core.stat_path(path)?.kind != EntryKind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                let mut entries = vec![
                    (".".to_string(), FileType::Directory),
                    ("..".to_string(), FileType::Directory),
                ];
                for (name, node) in self.core.merged_children(path)? {
                    entries.push((name, node.file_type()));
                }
                Ok(entries)
            },
            |_, _, entries| Ok(entries),
        )?;
        let fh = self.core.new_fh();
        self.core.dirs().insert(fh, DirHandle { ino, entries });
        Ok(fh)
    }

    pub(crate) fn modify_xattrs(
        &self,
        ino: u64,
        f: impl FnOnce(&mut Record) -> FsResult<()>,
    ) -> FsResult<()> {
        let _ = self.core.resolve_ino_unlocked(ino);
        let ns = self.core.ns();
        let path = ns.path(ino)?.to_string();
        let node = self.core.resolve(&path)?.ok_or(Errno::ENOENT)?;
        let mut rec = self.core.materialize(node);
        f(&mut rec)?;
        rec.ctime_ns = now_ns();
        self.core.put_shared(&ns, &path, rec, &[])?;
        drop(ns);
        self.core.touched();
        Ok(())
    }

    pub(crate) fn xattrs_of(
        &self,
        ino: u64,
    ) -> FsResult<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
        let (path, node) = self.core.resolve_ino_unlocked(ino)?;
        match node {
            Some(node) => {
                let mut x = node.xattrs().clone();
                x.remove(cairn_overlay::LINK_XATTR);
                Ok(x)
            }
            None if path.is_empty() => Ok(Default::default()),
            None => Err(Errno::ENOENT),
        }
    }
}
