//! The cairn sync engine, without any I/O surface of its own. This crate owns the data
//! model of a vault — paths, per-path versions (version vectors plus hybrid logical clocks),
//! entries and their encoding, tombstones — and everything computed from it: snapshots
//! (prolly trees of entries plus age-sealed headers), the deterministic merge with conflict
//! copies and directory repair, the publish step run inside the registry's verify-and-retry
//! loop, and the `MergedView` that resolves a path across an overlay, this device's snapshot
//! and peers' snapshots by streaming their sorted entries. It does **not** mount anything
//! (no FUSE), talk to the network, or touch the disk except through the node store, blob
//! store and registry it is handed; time comes in as a parameter, so every operation is
//! reproducible — which is what makes the seeded multi-device simulation (`sim` feature)
//! meaningful.

mod clock;
mod codec;
pub mod conflict;
mod content;
mod engine;
mod entry;
mod error;
pub mod guard;
pub mod merge;
mod path;
pub mod retention;
mod snapshot;
mod source;
mod stores;
mod version;
mod view;

#[cfg(feature = "sim")]
pub mod sim;

pub use clock::Hlc;
pub use conflict::{
    CopyName, conflict_path_for, is_conflict_name, kept_copy_name, parse_copy_name,
};
pub use content::{content_from_manifest, manifest_of};
pub use engine::{Attrs, Change, CommitReport, PublishReport, Vault};
pub use entry::{Content, ENTRY_FORMAT_V1, Entry, EntryKind, INLINE_MAX, MAX_INLINE_CHUNKS};
pub use error::{DecodeError, PathError, Result, VaultError};
pub use guard::{GuardPolicy, HeldEntry, HeldRecord, HeldSet, HeldSource};
pub use merge::{Conflict, MergeReport};
pub use path::{EntryKey, MAX_NAME_LEN, MAX_PATH_LEN, VaultPath};
pub use retention::{RetentionPolicy, SnapTime, retained};
pub use snapshot::{
    HEADER_FORMAT_V1, Keyring, Snapshot, SnapshotHeader, SnapshotId, load_announced, load_header,
    load_snapshot, verify_history, write_snapshot,
};
pub use source::{EntryIter, EntrySource, MemorySource, decode_value};
pub use stores::{Blobs, MemoryBlobs, MergeOutcome, NodeTree, TreeSource, VaultStores};
pub use version::{Causality, MERGE_DEVICE, Version, VersionVector};
pub use view::{DirEntry, MergedView};
