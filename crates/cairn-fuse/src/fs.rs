//! The fuser `Filesystem`: argument checking, namespace operations and replies.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use cairn_overlay::path::{name_of, now_ns, parent_of};
use cairn_overlay::{Data, Kind, Record};
use fuser::{
    AccessFlags, Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::base::EntryKind;
use crate::core::{COPY_BLOCK, Core, DirHandle, Handle};
use crate::errno::{Res, base_errno, overlay_errno};
use crate::namespace::{NAME_MAX, Node, Ns, ROOT, in_subtree, join};
use crate::stat::{Stat, file_type, time_to_ns};

/// The FUSE filesystem. Cheap to construct; [`crate::mount`] is the usual way to run it.
pub struct CairnFs {
    pub(crate) core: Arc<Core>,
}

const GEN: Generation = Generation(0);
/// Set-group-ID on a directory: new entries take its group, new subdirectories the bit.
const S_ISGID: u32 = 0o2000;

/// The optional changes of one setattr call.
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    ctime: Option<SystemTime>,
}

fn name_str(name: &OsStr) -> Res<&str> {
    if name.len() > NAME_MAX {
        return Err(Errno::from_i32(libc::ENAMETOOLONG));
    }
    let s = name.to_str().ok_or(Errno::from_i32(libc::EILSEQ))?;
    if s.is_empty() || s == "." || s == ".." || s.contains('/') {
        return Err(Errno::EINVAL);
    }
    Ok(s)
}

fn time_or_now(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => now_ns(),
        TimeOrNow::SpecificTime(t) => time_to_ns(t),
    }
}

macro_rules! reply_result {
    ($reply:expr, $res:expr, |$v:ident| $ok:expr) => {
        match $res {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

impl CairnFs {
    fn ttl(&self) -> std::time::Duration {
        self.core.opts.ttl
    }

    /// Resolves `parent/name` to a path, checking the name.
    fn child_path(&self, ns: &Ns, parent: INodeNo, name: &OsStr) -> Res<String> {
        let name = name_str(name)?;
        Ok(join(ns.path(parent.0)?, name))
    }

    fn require_dir(&self, path: &str) -> Res<()> {
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
    fn dir_stat(&self, dir: &str) -> Res<Stat> {
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
    fn entry_for(&self, ns: &mut Ns, path: &str) -> Res<(u64, Stat)> {
        let stat = self.core.stat_path(path)?;
        let ino = ns.ino_for(path);
        if let Some(i) = ns.inodes.get_mut(&ino) {
            i.nlookup += 1;
        }
        Ok((ino, stat))
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<(u64, Stat)> {
        let mut ns = self.core.ns();
        let path = self.child_path(&ns, parent, name)?;
        self.entry_for(&mut ns, &path)
    }

    fn create_node(&self, parent: INodeNo, name: &OsStr, mut rec: Record) -> Res<(u64, Stat)> {
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
        self.entry_for(&mut ns, &path)
    }

    fn do_setattr(&self, req: &Request, ino: u64, ch: AttrChange) -> Res<Stat> {
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
                let kind = self.core.stat_ino(&self.core.ns(), ino).map(|s| s.kind);
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
        let mut ns = self.core.ns();
        let cur = self.core.stat_ino(&ns, ino)?;
        let caller = req.uid();
        if let Some(u) = uid
            && u != cur.uid
            && caller != 0
        {
            return Err(Errno::EPERM);
        }
        if let Some(g) = gid
            && g != cur.gid
            && caller != 0
            && (caller != cur.uid || g != req.gid())
        {
            return Err(Errno::EPERM);
        }
        if mode.is_some() && caller != 0 && caller != cur.uid {
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
        let change = self.core.overlay.put(&path, rec).map_err(overlay_errno)?;
        self.core.drop_released(&ns, change.released);
        drop(ns);
        self.core.touched();
        self.core.stat_path(&path)
    }

    fn do_open(&self, ino: u64, flags: i32) -> Res<u64> {
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

    fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Res<(u64, Stat, u64)> {
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
                let stat = self.core.stat_ino(&self.core.ns(), ino)?;
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

    fn do_unlink(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Res<()> {
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
    fn pin_subtree(&self, root: &str) -> Res<Vec<String>> {
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

    fn whiteout_vacated(&self, ns: &Ns, old_paths: &[String], all: &[String]) -> Res<()> {
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

    fn subtree_paths(&self, root: &str) -> Res<Vec<String>> {
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

    fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        if exchange && noreplace {
            return Err(Errno::EINVAL);
        }
        let mut ns = self.core.ns();
        let from = self.child_path(&ns, parent, name)?;
        let to = self.child_path(&ns, newparent, newname)?;
        let src = self.core.resolve(&from)?.ok_or(Errno::ENOENT)?;
        self.require_dir(parent_of(&to))?;
        if from == to {
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
            ns.move_paths(&from, &to);
        }
        // A moved file counts as a metadata change of the file itself (ctime), like ext4.
        let now = now_ns();
        if let Some(Node::Rec(mut r)) = self.core.resolve(&to)? {
            r.ctime_ns = now;
            let change = self.core.overlay.put(&to, r).map_err(overlay_errno)?;
            self.core.drop_released(&ns, change.released);
        }
        self.core.touch_dir(&ns, parent_of(&from), now)?;
        if parent_of(&to) != parent_of(&from) {
            self.core.touch_dir(&ns, parent_of(&to), now)?;
        }
        drop(ns);
        self.core.touched();
        Ok(())
    }

    fn do_opendir(&self, ino: u64) -> Res<u64> {
        let ns = self.core.ns();
        let path = ns.path(ino)?.to_string();
        let kind = self.core.stat_path(&path)?.kind;
        if kind != EntryKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (".".to_string(), FileType::Directory),
            ("..".to_string(), FileType::Directory),
        ];
        for (name, node) in self.core.merged_children(&path)? {
            entries.push((name, file_type(node.kind())));
        }
        drop(ns);
        let fh = self.core.new_fh();
        self.core.dirs().insert(fh, DirHandle { ino, entries });
        Ok(fh)
    }

    fn modify_xattrs(&self, ino: u64, f: impl FnOnce(&mut Record) -> Res<()>) -> Res<()> {
        let ns = self.core.ns();
        let path = ns.path(ino)?.to_string();
        let node = self.core.resolve(&path)?.ok_or(Errno::ENOENT)?;
        let mut rec = self.core.materialize(node);
        f(&mut rec)?;
        rec.ctime_ns = now_ns();
        let change = self.core.overlay.put(&path, rec).map_err(overlay_errno)?;
        self.core.drop_released(&ns, change.released);
        drop(ns);
        self.core.touched();
        Ok(())
    }

    fn xattrs_of(&self, ino: u64) -> Res<std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
        let ns = self.core.ns();
        let path = ns.path(ino)?.to_string();
        match self.core.resolve(&path)? {
            Some(node) => Ok(node.xattrs().clone()),
            None if path.is_empty() => Ok(Default::default()),
            None => Err(Errno::ENOENT),
        }
    }
}

/// The sync state of one path, readable as `getfattr -n user.cairn.status FILE`. Computed on
/// each read, never stored, and left out of `listxattr` so that copying tools (`cp -a`,
/// `rsync -X`) do not carry it to other filesystems.
pub const STATUS_XATTR: &[u8] = b"user.cairn.status";
/// Marks a conflict copy made by the merge: `name.sync-conflict-YYYYMMDD-HHMMSS-<dev>.ext`.
const CONFLICT_MARK: &str = ".sync-conflict-";

/// Whether `sibling` is a conflict copy of `name` (same stem and extension).
fn is_conflict_copy_of(sibling: &str, name: &str) -> bool {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    sibling.len() > name.len()
        && sibling
            .strip_prefix(stem)
            .is_some_and(|rest| rest.starts_with(CONFLICT_MARK) && rest.ends_with(ext))
}

impl CairnFs {
    /// `conflict` when the path is a conflict copy or has one beside it, `pending` when it
    /// has a local change not yet in a snapshot, else `synced`.
    fn sync_status(&self, ino: u64) -> Res<&'static str> {
        let (path, inflight) = {
            let ns = self.core.ns();
            let path = ns.path(ino)?.to_string();
            let inflight = ns.inflight.contains(&path);
            (path, inflight)
        };
        if path.is_empty() {
            return Ok("synced");
        }
        if self.core.resolve(&path)?.is_none() {
            return Err(Errno::ENOENT);
        }
        let name = name_of(&path);
        if name.contains(CONFLICT_MARK)
            || self
                .core
                .merged_children(parent_of(&path))?
                .iter()
                .any(|(sibling, _)| is_conflict_copy_of(sibling, name))
        {
            return Ok("conflict");
        }
        // A record being flushed right now stays in the overlay until the flush succeeds.
        if inflight
            || self
                .core
                .overlay
                .get(&path)
                .map_err(overlay_errno)?
                .is_some()
        {
            return Ok("pending");
        }
        Ok("synced")
    }
}

fn reply_xattr_bytes(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for CairnFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(COPY_BLOCK as u32) {
            let _ = config.set_max_write(max);
        }
        // Listing with attributes in one round trip; AUTO lets the kernel fall back to plain
        // readdir when it is not reading attributes anyway.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_result!(reply, self.do_lookup(parent, name), |v| reply.entry(
            &self.ttl(),
            &v.1.attr(v.0),
            GEN
        ));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.core.stat_ino(&self.core.ns(), ino.0);
        reply_result!(reply, r, |s| reply.attr(&self.ttl(), &s.attr(ino.0)));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ch = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime,
        };
        let r = self.do_setattr(req, ino.0, ch);
        reply_result!(reply, r, |s| reply.attr(&self.ttl(), &s.attr(ino.0)));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = (|| {
            let ns = self.core.ns();
            let path = ns.path(ino.0)?.to_string();
            match self.core.resolve(&path)?.ok_or(Errno::ENOENT)? {
                Node::Rec(Record {
                    data: Data::Target(t),
                    ..
                }) => Ok(t),
                Node::Base(b) if b.kind == EntryKind::Symlink => Ok(b.target),
                _ => Err(Errno::EINVAL),
            }
        })();
        reply_result!(reply, r, |t| reply.data(&t));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // The vault stores regular files, directories and symlinks only.
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return reply.error(Errno::EPERM);
        }
        let r = (|| {
            let (id, _f) = self.core.overlay.create_staging().map_err(overlay_errno)?;
            let rec = self.core.new_record(
                Kind::File,
                mode & !umask,
                req.uid(),
                req.gid(),
                Data::Staged(id),
            );
            let r = self.create_node(parent, name, rec);
            if r.is_err() {
                let _ = self.core.overlay.remove_staging(id);
            }
            r
        })();
        reply_result!(reply, r, |v| reply.entry(&self.ttl(), &v.1.attr(v.0), GEN));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let rec = self
            .core
            .new_record(Kind::Dir, mode & !umask, req.uid(), req.gid(), Data::None);
        let r = self.create_node(parent, name, rec);
        reply_result!(reply, r, |v| reply.entry(&self.ttl(), &v.1.attr(v.0), GEN));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_result!(reply, self.do_unlink(parent, name, false), |_v| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_result!(reply, self.do_unlink(parent, name, true), |_v| reply.ok());
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes().to_vec();
        let rec = self.core.new_record(
            Kind::Symlink,
            0o777,
            req.uid(),
            req.gid(),
            Data::Target(target),
        );
        let r = self.create_node(parent, link_name, rec);
        reply_result!(reply, r, |v| reply.entry(&self.ttl(), &v.1.attr(v.0), GEN));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_result!(
            reply,
            self.do_rename(parent, name, newparent, newname, flags),
            |_v| reply.ok()
        );
    }

    /// Hard links are refused: the vault is keyed by path, so two names cannot share one
    /// inode's content and metadata. Tools that try a link first (git, editors) fall back
    /// to copying or renaming.
    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply_result!(reply, self.do_open(ino.0, flags.0), |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let h = self
            .core
            .handles()
            .get(&fh.0)
            .map(|h| (h.ino, h.cell.clone()));
        let Some((ino, cell)) = h else {
            return reply.error(Errno::EBADF);
        };
        reply_result!(reply, self.core.read(ino, &cell, offset, size), |d| reply
            .data(&d));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let h = self
            .core
            .handles()
            .get(&fh.0)
            .map(|h| (h.ino, h.cell.clone(), h.append));
        let Some((ino, cell, append)) = h else {
            return reply.error(Errno::EBADF);
        };
        reply_result!(
            reply,
            self.core.write(ino, &cell, offset, data, append),
            |n| reply.written(n)
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Data already sits in the staging file after each write; close has nothing to push.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = self.core.handles().remove(&fh.0);
        if let Some(h) = h {
            drop(h.cell);
            self.core.release_file(h.ino);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            let cell = self
                .core
                .handles()
                .get(&fh.0)
                .map(|h| h.cell.clone())
                .ok_or(Errno::EBADF)?;
            let file = cell.lock().staging.as_ref().map(|(_, f)| f.clone());
            if let Some(f) = file {
                if datasync {
                    f.sync_data()
                } else {
                    f.sync_all()
                }
                .map_err(|e| Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)))?;
            }
            self.core.overlay.durable_barrier().map_err(overlay_errno)?;
            // The data is durable locally; folding it into a snapshot can happen meanwhile.
            self.core.flush.request();
            Ok(())
        })();
        reply_result!(reply, r, |_v| reply.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply_result!(reply, self.do_opendir(ino.0), |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dirs = self.core.dirs();
        let Some(d) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut ns = self.core.ns();
        let dir_path = ns.path(d.ino).map(str::to_string).ok();
        for (i, (name, kind)) in d.entries.iter().enumerate().skip(offset as usize) {
            let ino = match (i, &dir_path) {
                (0, _) => d.ino,
                (1, Some(p)) if !p.is_empty() => ns.ino_for(parent_of(p)),
                (1, _) => ROOT,
                (_, Some(p)) => ns.ino_for(&join(p, name)),
                // The directory itself was removed while listing: numbers are only cosmetic.
                (_, None) => u64::MAX - i as u64,
            };
            if reply.add(INodeNo(ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dirs = self.core.dirs();
        let Some(d) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut ns = self.core.ns();
        let Ok(dir_path) = ns.path(d.ino).map(str::to_string) else {
            return reply.ok();
        };
        let ttl = self.ttl();
        for (i, (name, _)) in d.entries.iter().enumerate().skip(offset as usize) {
            // The kernel takes no lookup reference for '.' and '..'.
            let (path, counted) = match i {
                0 => (dir_path.clone(), false),
                1 => (parent_of(&dir_path).to_string(), false),
                _ => (join(&dir_path, name), true),
            };
            let Ok(stat) = self.core.stat_path(&path) else {
                continue; // vanished since opendir
            };
            let ino = if i == 1 && dir_path.is_empty() {
                ROOT
            } else {
                ns.ino_for(&path)
            };
            if reply.add(INodeNo(ino), i as u64 + 1, name, &ttl, &stat.attr(ino), GEN) {
                break;
            }
            if counted && let Some(inode) = ns.inodes.get_mut(&ino) {
                inode.nlookup += 1;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.dirs().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_result!(
            reply,
            self.core.overlay.durable_barrier().map_err(overlay_errno),
            |_v| reply.ok()
        );
    }

    // fsblkcnt_t and friends are u64 here but narrower on some targets.
    #[allow(clippy::unnecessary_cast)]
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = crate::mount::statvfs(self.core.overlay.dir());
        match r {
            Ok(s) => reply.statfs(
                s.f_blocks as u64,
                s.f_bfree as u64,
                s.f_bavail as u64,
                s.f_files as u64,
                s.f_ffree as u64,
                s.f_bsize as u32,
                NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let key = name.as_bytes();
        if key == STATUS_XATTR {
            return reply.error(Errno::EPERM);
        }
        // POSIX ACLs live in system.*; the vault has no ACL model, so do not pretend to store them.
        if key.starts_with(b"system.") {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let r = self.modify_xattrs(ino.0, |rec| {
            let exists = rec.xattrs.contains_key(key);
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(Errno::EEXIST);
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(Errno::NO_XATTR);
            }
            rec.xattrs.insert(key.to_vec(), value.to_vec());
            Ok(())
        });
        reply_result!(reply, r, |_v| reply.ok());
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_bytes() == STATUS_XATTR {
            let r = self.sync_status(ino.0).map(|s| s.as_bytes().to_vec());
            reply_result!(reply, r, |v| reply_xattr_bytes(reply, size, &v));
            return;
        }
        let r = self
            .xattrs_of(ino.0)
            .and_then(|x| x.get(name.as_bytes()).cloned().ok_or(Errno::NO_XATTR));
        reply_result!(reply, r, |v| reply_xattr_bytes(reply, size, &v));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.xattrs_of(ino.0).map(|x| {
            let mut out = Vec::new();
            for k in x.keys() {
                out.extend_from_slice(k);
                out.push(0);
            }
            out
        });
        reply_result!(reply, r, |v| reply_xattr_bytes(reply, size, &v));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if name.as_bytes() == STATUS_XATTR {
            return reply.error(Errno::EPERM);
        }
        let r = self.modify_xattrs(ino.0, |rec| {
            rec.xattrs
                .remove(name.as_bytes())
                .map(|_| ())
                .ok_or(Errno::NO_XATTR)
        });
        reply_result!(reply, r, |_v| reply.ok());
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = (|| {
            let s = self.core.stat_ino(&self.core.ns(), ino.0)?;
            let mask = mask.bits() as u32 & 0o7;
            if mask == 0 {
                return Ok(());
            }
            let granted = if req.uid() == 0 {
                // Root may read and write anything; execute needs some x bit on non-directories.
                if mask & 1 != 0 && s.kind != EntryKind::Dir && s.perm & 0o111 == 0 {
                    0o6
                } else {
                    0o7
                }
            } else if req.uid() == s.uid {
                (s.perm >> 6) & 0o7
            } else if req.gid() == s.gid {
                (s.perm >> 3) & 0o7
            } else {
                s.perm & 0o7
            };
            if mask & !granted == 0 {
                Ok(())
            } else {
                Err(Errno::EACCES)
            }
        })();
        reply_result!(reply, r, |_v| reply.ok());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.do_create(req, parent, name, mode, umask, flags);
        reply_result!(reply, r, |v| reply.created(
            &self.ttl(),
            &v.1.attr(v.0),
            GEN,
            FileHandle(v.2),
            FopenFlags::empty()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::is_conflict_copy_of;

    #[test]
    fn conflict_copies_are_recognised_beside_their_original() {
        assert!(is_conflict_copy_of(
            "report.sync-conflict-20240229-131415-abababab.txt",
            "report.txt"
        ));
        assert!(is_conflict_copy_of(
            ".bashrc.sync-conflict-19700101-000000-abababab",
            ".bashrc"
        ));
        assert!(!is_conflict_copy_of("report.txt", "report.txt"));
        assert!(!is_conflict_copy_of(
            "other.sync-conflict-20240229-131415-abababab.txt",
            "report.txt"
        ));
        assert!(!is_conflict_copy_of(
            "report.sync-conflict-20240229-131415-abababab.md",
            "report.txt"
        ));
    }
}
