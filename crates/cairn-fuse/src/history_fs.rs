//! The kernel entry points of a mount with a `.cairn` folder: every request about a `.cairn`
//! inode goes to [`HistoryDir`], every other one to the live [`CairnFs`] unchanged. Kept apart
//! from `fs.rs` so the live filesystem knows nothing about history.
//!
//! Every method of [`Filesystem`] is forwarded, the ones `CairnFs` leaves at their defaults
//! too, so an operation added to `CairnFs` later works here without touching this file.
//! (`batch_forget` is left at its default, which calls `forget` here for each node: fuser
//! does not export the type it takes.)
//!
//! Writes: anything that would create, change or remove something inside `.cairn`, move
//! something into or out of it, or create a root entry named `.cairn`, fails with `EROFS`.
//! A real `.cairn` at the vault root (written by an older cairn or a peer) wins: it is shown
//! and behaves like any file, and the history folder is hidden until it is renamed.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents, PollFlags,
    PollNotifier, RenameFlags, ReplyAttr, ReplyBmap, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::CairnFs;
use crate::history::{HISTORY_ROOT, HistoryDir, is_history_ino};
use crate::namespace::ROOT;
use crate::status::STATUS_XATTR;

const GEN: Generation = Generation(0);

fn erofs() -> Errno {
    Errno::from_i32(libc::EROFS)
}

/// The live filesystem plus, when the daemon supplied a history source, the `.cairn` folder.
pub(crate) struct WithHistory {
    pub inner: CairnFs,
    pub history: Option<Arc<HistoryDir>>,
}

impl WithHistory {
    /// The history folder if `ino` is one of its inodes.
    fn hist(&self, ino: INodeNo) -> Option<&HistoryDir> {
        self.history.as_deref().filter(|_| is_history_ino(ino.0))
    }

    /// Whether `parent`/`name` is the `.cairn` folder itself: the history folder is on and
    /// no real root entry of that name hides it.
    fn is_folder_name(&self, parent: INodeNo, name: &OsStr) -> bool {
        self.history.is_some()
            && parent.0 == ROOT
            && name.as_bytes() == HISTORY_ROOT.as_bytes()
            && matches!(self.inner.core.resolve(HISTORY_ROOT), Ok(None))
    }

    /// A change of a name in `parent`: refused inside `.cairn` and for `.cairn` itself.
    fn refuses_name(&self, parent: INodeNo, name: &OsStr) -> bool {
        self.hist(parent).is_some() || self.is_folder_name(parent, name)
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

macro_rules! refuse_or {
    ($cond:expr, $reply:ident, $call:expr) => {
        if $cond { $reply.error(erofs()) } else { $call }
    };
}

impl Filesystem for WithHistory {
    fn init(&mut self, req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.inner.init(req, config)
    }

    fn destroy(&mut self) {
        self.inner.destroy()
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ttl = self.inner.ttl();
        if let Some(h) = self.hist(parent) {
            let r = match name.to_str() {
                Some(n) => h.lookup(parent.0, n),
                None => Err(Errno::ENOENT),
            };
            return match r {
                Ok((ino, st)) => reply.entry(&ttl, &st.attr(ino), GEN),
                Err(e) => reply.error(e),
            };
        }
        if self.is_folder_name(parent, name)
            && let Some(h) = &self.history
        {
            let (ino, st) = h.lookup_top();
            return reply.entry(&ttl, &st.attr(ino), GEN);
        }
        self.inner.lookup(req, parent, name, reply)
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        match self.hist(ino) {
            Some(h) => h.forget(ino.0, nlookup),
            None => self.inner.forget(req, ino, nlookup),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.hist(ino) {
            Some(h) => match h.stat(ino.0) {
                Ok(st) => reply.attr(&self.inner.ttl(), &st.attr(ino.0)),
                Err(e) => reply.error(e),
            },
            None => self.inner.getattr(req, ino, fh, reply),
        }
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
        fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        refuse_or!(
            self.hist(ino).is_some(),
            reply,
            self.inner.setattr(
                req, ino, mode, uid, gid, size, atime, mtime, ctime, fh, crtime, chgtime, bkuptime,
                flags, reply
            )
        )
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.hist(ino) {
            Some(h) => match h.readlink(ino.0) {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(e),
            },
            None => self.inner.readlink(req, ino, reply),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        refuse_or!(
            self.refuses_name(parent, name),
            reply,
            self.inner
                .mknod(req, parent, name, mode, umask, rdev, reply)
        )
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
        refuse_or!(
            self.refuses_name(parent, name),
            reply,
            self.inner.mkdir(req, parent, name, mode, umask, reply)
        )
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_or!(
            self.refuses_name(parent, name),
            reply,
            self.inner.unlink(req, parent, name, reply)
        )
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_or!(
            self.refuses_name(parent, name),
            reply,
            self.inner.rmdir(req, parent, name, reply)
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        refuse_or!(
            self.refuses_name(parent, link_name),
            reply,
            self.inner.symlink(req, parent, link_name, target, reply)
        )
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        refuse_or!(
            self.refuses_name(parent, name) || self.refuses_name(newparent, newname),
            reply,
            self.inner
                .rename(req, parent, name, newparent, newname, flags, reply)
        )
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        refuse_or!(
            self.hist(ino).is_some() || self.refuses_name(newparent, newname),
            reply,
            self.inner.link(req, ino, newparent, newname, reply)
        )
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.hist(ino) {
            // A past file never changes: the kernel may keep its pages across opens.
            Some(h) => match h.open(ino.0, flags.0) {
                Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(e),
            },
            None => self.inner.open(req, ino, flags, reply),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.hist(ino) {
            Some(h) => match h.read(ino.0, offset, size) {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(e),
            },
            None => self
                .inner
                .read(req, ino, fh, offset, size, flags, lock_owner, reply),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        refuse_or!(
            self.hist(ino).is_some(),
            reply,
            self.inner.write(
                req,
                ino,
                fh,
                offset,
                data,
                write_flags,
                flags,
                lock_owner,
                reply
            )
        )
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.hist(ino) {
            Some(_) => reply.ok(),
            None => self.inner.flush(req, ino, fh, lock_owner, reply),
        }
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.hist(ino) {
            Some(_) => reply.ok(),
            None => self
                .inner
                .release(req, ino, fh, flags, lock_owner, flush, reply),
        }
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.hist(ino) {
            Some(_) => reply.ok(),
            None => self.inner.fsync(req, ino, fh, datasync, reply),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.hist(ino) {
            Some(h) => match h.opendir(ino.0) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(e),
            },
            None => self.inner.opendir(req, ino, flags, reply),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(h) = self.hist(ino) else {
            return self.inner.readdir(req, ino, fh, offset, reply);
        };
        let Some(d) = h.dir(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (ino, next, kind, name) in h.plain_entries(&d, offset) {
            if reply.add(INodeNo(ino), next, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(h) = self.hist(ino) else {
            return self.inner.readdirplus(req, ino, fh, offset, reply);
        };
        let Some(d) = h.dir(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let ttl = self.inner.ttl();
        for (i, (_, next, _, name)) in h.plain_entries(&d, offset).into_iter().enumerate() {
            let index = offset as usize + i;
            // The kernel takes no lookup reference for "." and "..", and ignores their
            // attributes: the directory's own serve for both.
            let found = if index < 2 {
                h.stat(d.ino).map(|st| (d.ino, st))
            } else {
                h.lookup_listed(&d, index - 2)
            };
            let Ok((ino, st)) = found else {
                continue; // e.g. a snapshot that could not be opened: a plain lookup says why
            };
            if reply.add(INodeNo(ino), next, &name, &ttl, &st.attr(ino), GEN) {
                if index >= 2 {
                    h.forget(ino, 1); // not sent: the kernel holds no reference
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        match self.hist(ino) {
            Some(h) => {
                h.releasedir(fh.0);
                reply.ok()
            }
            None => self.inner.releasedir(req, ino, fh, flags, reply),
        }
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.hist(ino) {
            Some(_) => reply.ok(),
            None => self.inner.fsyncdir(req, ino, fh, datasync, reply),
        }
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.inner.statfs(req, ino, reply)
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        refuse_or!(
            self.hist(ino).is_some(),
            reply,
            self.inner
                .setxattr(req, ino, name, value, flags, position, reply)
        )
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(h) = self.hist(ino) else {
            return self.inner.getxattr(req, ino, name, size, reply);
        };
        let r = if name.as_bytes() == STATUS_XATTR {
            Ok(b"history".to_vec())
        } else {
            h.xattrs(ino.0)
                .and_then(|x| x.get(name.as_bytes()).cloned().ok_or(Errno::NO_XATTR))
        };
        match r {
            Ok(v) => reply_xattr_bytes(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(h) = self.hist(ino) else {
            return self.inner.listxattr(req, ino, size, reply);
        };
        match h.xattrs(ino.0) {
            Ok(x) => {
                let mut out = Vec::new();
                for k in x.keys() {
                    out.extend_from_slice(k);
                    out.push(0);
                }
                reply_xattr_bytes(reply, size, &out)
            }
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_or!(
            self.hist(ino).is_some(),
            reply,
            self.inner.removexattr(req, ino, name, reply)
        )
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let Some(h) = self.hist(ino) else {
            return self.inner.access(req, ino, mask, reply);
        };
        let r = h.stat(ino.0).and_then(|st| {
            if mask.contains(AccessFlags::W_OK) {
                return Err(erofs());
            }
            let want = mask.bits() as u32 & 0o5;
            let granted = if req.uid() == 0 {
                0o5
            } else if req.uid() == st.uid {
                (st.perm >> 6) & 0o5
            } else if req.gid() == st.gid {
                (st.perm >> 3) & 0o5
            } else {
                st.perm & 0o5
            };
            if want & !granted == 0 {
                Ok(())
            } else {
                Err(Errno::EACCES)
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
        refuse_or!(
            self.refuses_name(parent, name),
            reply,
            self.inner
                .create(req, parent, name, mode, umask, flags, reply)
        )
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        self.inner
            .getlk(req, ino, fh, lock_owner, start, end, typ, pid, reply)
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        self.inner
            .setlk(req, ino, fh, lock_owner, start, end, typ, pid, sleep, reply)
    }

    fn bmap(&self, req: &Request, ino: INodeNo, blocksize: u32, idx: u64, reply: ReplyBmap) {
        self.inner.bmap(req, ino, blocksize, idx, reply)
    }

    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        match self.hist(ino) {
            Some(_) => reply.error(Errno::from_i32(libc::ENOTTY)),
            None => self
                .inner
                .ioctl(req, ino, fh, flags, cmd, in_data, out_size, reply),
        }
    }

    fn poll(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        ph: PollNotifier,
        events: PollEvents,
        flags: PollFlags,
        reply: ReplyPoll,
    ) {
        self.inner.poll(req, ino, fh, ph, events, flags, reply)
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        refuse_or!(
            self.hist(ino).is_some(),
            reply,
            self.inner
                .fallocate(req, ino, fh, offset, length, mode, reply)
        )
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(h) = self.hist(ino) else {
            return self.inner.lseek(req, ino, fh, offset, whence, reply);
        };
        // A past file is all data: one extent, then the hole at its end.
        let r = h
            .file_size(ino.0)
            .and_then(|size| crate::core::seek_dense(size, offset, whence));
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if self.hist(ino_out).is_some() {
            return reply.error(erofs());
        }
        if self.hist(ino_in).is_some() {
            // The kernel falls back to copying through read and write for this one call
            // (ENOSYS would switch copy_file_range off for the whole mount).
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        self.inner.copy_file_range(
            req, ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len, flags, reply,
        )
    }
}
