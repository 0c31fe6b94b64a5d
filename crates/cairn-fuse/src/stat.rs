//! Attributes in vault terms ([`Stat`]) and their conversions to what fuser replies with:
//! [`FileAttr`], [`FileType`] and [`SystemTime`] timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_overlay::Kind;
use fuser::{FileAttr, FileType, INodeNo};

use crate::base::EntryKind;

fn ns_to_time(ns: i64) -> SystemTime {
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
    /// 0 for an inode unlinked while the kernel still holds it (`fstat` after `unlink`).
    pub nlink: u32,
    /// The file type of a special file (FIFO, socket, device node), which `kind` calls a
    /// file; `None` for everything else.
    pub special: Option<FileType>,
    /// Device number of a device node.
    pub rdev: u32,
    /// The link group of a file or symlink with several names: every name with this id is
    /// one inode.
    pub link: Option<cairn_overlay::LinkId>,
}

impl Stat {
    /// Plain attributes: linked, not special.
    pub(crate) fn new(kind: EntryKind, perm: u32, uid: u32, gid: u32, size: u64) -> Stat {
        Stat {
            kind,
            perm,
            uid,
            gid,
            size,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            blocks: None,
            nlink: 1,
            special: None,
            rdev: 0,
            link: None,
        }
    }
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
            kind: self.special.unwrap_or(file_type(self.kind)),
            perm: (self.perm & 0o7777) as u16,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
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

/// The file type of a [`Kind::is_local`] special file.
pub(crate) fn special_type(k: Kind) -> Option<FileType> {
    match k {
        Kind::Fifo => Some(FileType::NamedPipe),
        Kind::Socket => Some(FileType::Socket),
        Kind::CharDev => Some(FileType::CharDevice),
        Kind::BlockDev => Some(FileType::BlockDevice),
        _ => None,
    }
}

pub(crate) fn entry_kind(k: Kind) -> EntryKind {
    match k {
        Kind::Dir => EntryKind::Dir,
        Kind::Symlink => EntryKind::Symlink,
        _ => EntryKind::File,
    }
}
