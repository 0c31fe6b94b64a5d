//! The fuser `Filesystem`: the FUSE entry points, which decode the kernel's arguments, call
//! the operations in [`crate::ops`] and [`crate::core`], and send the replies.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use cairn_overlay::path::parent_of;
use cairn_overlay::{Data, Kind, Record};
use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::base::EntryKind;
use crate::core::{COPY_BLOCK, Core, SlowRead};
use crate::errno::overlay_errno;
use crate::namespace::{NAME_MAX, Node, ROOT, join};
use crate::ops::AttrChange;
use crate::status::STATUS_XATTR;

/// The FUSE filesystem. Cheap to construct; [`crate::mount`] is the usual way to run it.
pub struct CairnFs {
    pub(crate) core: Arc<Core>,
}

const GEN: Generation = Generation(0);
/// Background requests (read-ahead) the kernel keeps outstanding; see `init`.
const MAX_BACKGROUND: u16 = 64;
/// Entries of a readdirplus reply whose attributes are read per round without the
/// namespace lock: few enough that little is read for nothing when the reply fills up.
const PLUS_BATCH: usize = 32;

macro_rules! reply_result {
    ($reply:expr, $res:expr, |$v:ident| $ok:expr) => {
        match $res {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
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
        // Read-ahead is queued as background requests, and once `max_background` of them
        // are outstanding the kernel holds back every new one, local reads included: reads
        // waiting on a peer that stopped answering (up to the fetch timeout) must not use up
        // the default 12. The kernel clamps it for unprivileged mounts.
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Listing with attributes in one round trip; AUTO lets the kernel fall back to plain
        // readdir when it is not reading attributes anyway.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_result!(reply, self.do_lookup(parent, name), |v| {
            // A directory whose subdirectories were not counted: its attributes expire at
            // once, so a stat asks getattr, which counts them.
            let attr_ttl = if v.1.kind == EntryKind::Dir && v.1.nlink == 1 {
                std::time::Duration::ZERO
            } else {
                self.ttl()
            };
            reply.entry_with_ttls(&attr_ttl, &self.ttl(), &v.1.attr(v.0), GEN)
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.core.attr_ino_unlocked(ino.0);
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
            let (_, node) = self.core.resolve_ino_unlocked(ino.0)?;
            match node.ok_or(Errno::ENOENT)? {
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

    /// Regular files as by `creat`; FIFOs, sockets and device nodes become local records
    /// that are never flushed (see [`Kind::is_local`]). The kernel already checked that
    /// the caller may make device nodes (`CAP_MKNOD`); `nodev` keeps them from opening.
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
        let special = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => None,
            libc::S_IFIFO => Some((Kind::Fifo, Data::None)),
            libc::S_IFSOCK => Some((Kind::Socket, Data::None)),
            libc::S_IFCHR => Some((Kind::CharDev, Data::Device(rdev.into()))),
            libc::S_IFBLK => Some((Kind::BlockDev, Data::Device(rdev.into()))),
            _ => return reply.error(Errno::EINVAL),
        };
        if let Some((kind, data)) = special {
            let rec = self
                .core
                .new_record(kind, mode & !umask, req.uid(), req.gid(), data);
            let r = self.create_node(parent, name, rec);
            return reply_result!(reply, r, |v| reply.entry(&self.ttl(), &v.1.attr(v.0), GEN));
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

    /// Hard links: see [`crate::links`].
    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_result!(reply, self.do_link(ino.0, newparent, newname), |v| reply
            .entry(&self.ttl(), &v.1.attr(v.0), GEN));
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
        let Some(crate::core::Handle { ino, cell, .. }) = self.core.handle(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        // Content a peer has yet to send: waited for on a thread of its own, so readers of
        // a peer that stops answering cannot occupy every kernel request thread.
        if self.core.read_may_wait(ino, &cell, offset, size)
            && let Some(slot) = SlowRead::take(&self.core)
        {
            let spawned = std::thread::Builder::new()
                .name("cairn-read".into())
                .spawn(move || {
                    let r = slot.core().read(ino, &cell, offset, size);
                    reply_result!(reply, r, |d| reply.data(&d));
                });
            if let Err(e) = spawned {
                // The reply went down with the closure, which answers EIO.
                tracing::warn!(error = %e, "could not start a thread for a read");
            }
            return;
        }
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
        let Some(crate::core::Handle { ino, cell, append }) = self.core.handle(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        if let Err(e) = self.core.space.admit(data.len() as u64) {
            return reply.error(e);
        }
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
            let cell = self.core.handle(fh.0).ok_or(Errno::EBADF)?.cell;
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

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(crate::core::Handle { ino, cell, .. }) = self.core.handle(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        // Punching a hole frees space; only reserving it can fill the disk.
        if mode & libc::FALLOC_FL_PUNCH_HOLE == 0
            && let Err(e) = self.core.space.admit(length)
        {
            return reply.error(e);
        }
        reply_result!(
            reply,
            self.core.fallocate(ino, &cell, offset, length, mode),
            |_v| reply.ok()
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Some(crate::core::Handle { ino, cell, .. }) = self.core.handle(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        reply_result!(
            reply,
            self.core.seek_data(ino, &cell, offset, whence),
            |o| { reply.offset(o) }
        );
    }

    /// No file here is a terminal or a device: `ENOTTY`, the errno `isatty()` and every
    /// caller of a device-specific request expect. (fuser's default answers `ENOSYS` and logs
    /// a warning per call, which is one per `open()` of a file by Python.)
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
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
        // Inode numbers only: nothing here reads the base.
        let mut ns = self.core.ns_view();
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
        // '.', '..' and the names from opendir; the kernel takes a lookup reference for the
        // names only.
        let entry_path = |dir: &str, i: usize, name: &str| match i {
            0 => (dir.to_string(), false),
            1 => (parent_of(dir).to_string(), false),
            _ => (join(dir, name), true),
        };
        let ttl = self.ttl();
        let mut next = offset as usize;
        loop {
            // Copied out so neither the handle table nor the namespace is locked while the
            // attributes are read.
            let (dir_ino, batch) = {
                let dirs = self.core.dirs();
                let Some(d) = dirs.get(&fh.0) else {
                    return reply.error(Errno::EBADF);
                };
                let batch: Vec<String> = d
                    .entries
                    .iter()
                    .skip(next)
                    .take(PLUS_BATCH)
                    .map(|(n, _)| n.clone())
                    .collect();
                (d.ino, batch)
            };
            if batch.is_empty() {
                break;
            }
            let full = self.core.unlocked(
                |ns| Ok((ns.path(dir_ino).map(str::to_string).ok(), ns.generation)),
                |(dir, generation)| {
                    Ok(dir.as_ref().map(|dir| {
                        batch
                            .iter()
                            .enumerate()
                            .map(|(k, name)| {
                                let (path, _) = entry_path(dir, next + k, name);
                                let st = self.core.stat_path(&path).ok()?;
                                Some(self.core.with_cached_dir_links(&path, st, *generation))
                            })
                            .collect::<Vec<_>>()
                    }))
                },
                |ns, (dir, _), stats| {
                    // The directory itself went away while listing: nothing more to say.
                    let (Some(dir), Some(stats)) = (dir, stats) else {
                        return Ok(true);
                    };
                    for (k, (name, stat)) in batch.iter().zip(stats).enumerate() {
                        let i = next + k;
                        let Some(stat) = stat else {
                            continue; // vanished since opendir
                        };
                        let (path, counted) = entry_path(&dir, i, name);
                        let ino = if i == 1 && dir.is_empty() {
                            ROOT
                        } else {
                            ns.ino_linked(&path, stat.link)
                        };
                        if reply.add(INodeNo(ino), i as u64 + 1, name, &ttl, &stat.attr(ino), GEN) {
                            return Ok(true);
                        }
                        if counted && let Some(inode) = ns.inodes.get_mut(&ino) {
                            inode.nlookup += 1;
                        }
                    }
                    Ok(false)
                },
            );
            match full {
                Ok(false) => next += batch.len(),
                _ => break,
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
        if key == STATUS_XATTR || key == cairn_overlay::LINK_XATTR {
            return reply.error(Errno::EPERM);
        }
        if crate::local_attrs::is_local_attr(key) {
            let r = self.set_local_attr(ino.0, key, Some(value));
            return reply_result!(reply, r, |_v| reply.ok());
        }
        if let Err(e) = self.core.space.admit(value.len() as u64) {
            return reply.error(e);
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
        if crate::local_attrs::is_local_attr(name.as_bytes()) {
            let r = self.local_attr(ino.0, name.as_bytes());
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
        if name.as_bytes() == STATUS_XATTR || name.as_bytes() == cairn_overlay::LINK_XATTR {
            return reply.error(Errno::EPERM);
        }
        if crate::local_attrs::is_local_attr(name.as_bytes()) {
            let r = self.set_local_attr(ino.0, name.as_bytes(), None);
            return reply_result!(reply, r, |_v| reply.ok());
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
            let s = self.core.stat_ino_unlocked(ino.0)?;
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
