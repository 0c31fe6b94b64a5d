use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the overlay; each message names the file involved and,
/// where there is one, what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(
        "cannot prepare overlay directory {path}: {source} (it must be a writable local directory)"
    )]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "overlay directory {path} is in use by another cairn process (lock file held); \
         stop the other mount of this vault first"
    )]
    Locked { path: PathBuf },
    #[error("overlay journal {path}: {source} (is the disk full or the directory read-only?)")]
    Journal {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("overlay staging file {path}: {source}")]
    Staging {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "overlay journal record for {path:?} is corrupt ({reason}); \
         move the overlay directory aside to recover the staging files by hand"
    )]
    Corrupt { path: String, reason: String },
    #[error("invalid vault path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error(
        "cannot move {path:?}: its content refers to the base layer at its current path; \
         pin it to a content reference (Data::Content) before moving it"
    )]
    UnpinnedBase { path: String },
    #[error("cannot move {from:?} into its own subtree {to:?}")]
    IntoOwnSubtree { from: String, to: String },
}
