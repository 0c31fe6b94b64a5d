use std::io;
use std::path::PathBuf;

use crate::id::ChunkId;

/// Everything that can go wrong in chunking, chunk encryption and the blob store.
///
/// The messages are meant to be shown to a user, so each one says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error while {action} {}: {source}; check permissions and free space", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("reading the input failed: {0}; make sure the source file is readable and retry")]
    Input(#[source] io::Error),

    #[error("writing the output failed: {0}; make sure the destination is writable and retry")]
    Output(#[source] io::Error),

    #[error("a garbage collection of this store is already running; wait for it to finish")]
    SweepRunning,

    #[error("blob {id} is not in the local store; fetch it from a peer")]
    NotFound { id: ChunkId },

    #[error(
        "blob {id} is corrupt on disk (its content hashes to {actual}); \
         run `cairn verify` and refetch it from a peer"
    )]
    Corrupt { id: ChunkId, actual: ChunkId },

    #[error("{what} uses format version {version}, which this cairn does not know; upgrade cairn")]
    UnsupportedFormat { what: &'static str, version: u8 },

    #[error("{what} is truncated ({len} bytes); refetch it from a peer")]
    Truncated { what: &'static str, len: usize },

    #[error(
        "chunk {id} failed authentication: it was tampered with or belongs to another vault; \
         refetch it from a peer and check that this device uses the right vault key"
    )]
    Decrypt { id: ChunkId },

    #[error(
        "chunk {id} decrypted to {actual} bytes but the file manifest says {expected}; \
         the manifest is damaged, restore the file from an older snapshot"
    )]
    LengthMismatch {
        id: ChunkId,
        expected: u32,
        actual: usize,
    },

    #[error("file manifest is invalid: {reason}; restore the file from an older snapshot")]
    InvalidManifest { reason: String },

    #[error("`{input}` is not a chunk id (expected 64 hex characters)")]
    InvalidId { input: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
