//! The cairn FUSE filesystem. It owns the POSIX semantics of a mounted vault over two
//! layers — the local writable overlay (`cairn-overlay`) on top of a read-only base view —
//! together with the inode table, file and directory handles, errno mapping, copy-on-write
//! of base content into staging files, flush scheduling, and kernel cache invalidation. It
//! does not own snapshots, merging, encryption or networking: the daemon reaches in through
//! [`BaseLayer`] (the merged view to read from) and [`FlushSink`] (where dirty records go).
//!
//! Semantics worth knowing:
//! - Paths are the identity; a hard link is a set of paths that carry one link group (see
//!   [`cairn_overlay::LinkGroup`]) and show as one inode. Inode numbers are stable for as
//!   long as the kernel holds an inode, and follow renames.
//! - A directory's `st_nlink` is 2 + its subdirectories in `getattr` and `mkdir` replies;
//!   1 ("unknown" to `find`) where the count cannot be taken, and in `lookup`, `setattr`
//!   and `readdirplus` replies unless already counted, rather than list the directory (a
//!   lookup reply with 1 expires its attributes at once, so `stat` asks `getattr`).
//! - Names must be UTF-8 (`EILSEQ` otherwise) and at most 255 bytes (`ENAMETOOLONG`).
//! - An open file keeps the content it had when its data was last flushed or written, until
//!   every handle is closed; base changes reach it after that.

mod base;
mod core;
mod errno;
mod flusher;
mod fs;
mod history;
mod history_fs;
mod ignore;
mod links;
mod local_attrs;
mod mount;
mod namespace;
mod ops;
mod sink;
mod space;
mod stat;
mod status;

pub use base::{BaseChildren, BaseEntry, BaseError, BaseLayer, ContentRef, EntryKind, MemBase};
pub use fs::CairnFs;
pub use history::{HISTORY_ROOT, HistoryFolder, HistorySource, PastSnapshot};
pub use ignore::{IGNORE_FILE, IgnoreRules, MAX_RULES_BYTES, read_base_file};
pub use local_attrs::{LOCAL_XATTR, PIN_XATTR};
pub use mount::{
    Invalidator, MountError, MountHandle, MountOptionError, MountOptions, is_mounted, lazy_unmount,
    mount,
};
pub use sink::{FlushBatch, FlushError, FlushItem, FlushSink, StagedFile};
pub use space::{DEFAULT_MIN_FREE, DiskSpace, disk_space, reserve_for};

pub use cairn_overlay::{Data, Kind, Overlay, OverlayError, Record, StagingId};
