//! Error types. Decoding problems, path problems and engine failures are separate enums so a
//! caller can tell "these bytes are garbage" from "this operation is not allowed" from "a
//! store failed".

use cairn_crypto::{CryptoError, DeviceId, VaultId};
use cairn_registry::RegistryError;
use cairn_store::StoreError;
use cairn_tree::TreeError;

use crate::snapshot::SnapshotId;

/// Why a string is not a valid vault path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is absolute; vault paths are relative to the vault root")]
    Absolute(String),
    #[error("path {0:?} has an empty component (doubled or trailing '/')")]
    EmptyComponent(String),
    #[error("path {0:?} has a '.' or '..' component; resolve it before handing it to the vault")]
    DotComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("name {0:?} contains '/'")]
    Slash(String),
    #[error("path is not valid UTF-8")]
    NotUtf8,
    #[error(
        "path of {len} bytes exceeds the limit of {}",
        crate::path::MAX_PATH_LEN
    )]
    TooLong { len: usize },
    #[error(
        "a name of {len} bytes exceeds the limit of {}",
        crate::path::MAX_NAME_LEN
    )]
    NameTooLong { len: usize },
}

/// Why bytes are not a valid encoded entry or snapshot header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("input ends early")]
    Truncated,
    #[error("unknown {what} format version {version}; upgrade cairn")]
    UnknownFormat { what: &'static str, version: u8 },
    #[error("{0} unexpected bytes after the end")]
    TrailingBytes(usize),
    #[error("varint does not fit")]
    VarintOverflow,
    #[error("non-canonical encoding: {0}")]
    NonCanonical(&'static str),
    #[error("invalid value: {0}")]
    Invalid(&'static str),
}

impl From<cairn_codec::Error> for DecodeError {
    fn from(e: cairn_codec::Error) -> Self {
        match e {
            cairn_codec::Error::Truncated => DecodeError::Truncated,
            cairn_codec::Error::VarintOverflow => DecodeError::VarintOverflow,
            cairn_codec::Error::NonCanonicalVarint => DecodeError::NonCanonical("overlong varint"),
            cairn_codec::Error::TrailingBytes(n) => DecodeError::TrailingBytes(n),
        }
    }
}

/// Everything the engine can fail with. Any error leaves the engine's state unchanged.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("invalid path: {0}")]
    Path(#[from] PathError),
    #[error("entry at {key} is malformed: {source}; the snapshot is damaged or from a newer cairn")]
    Entry {
        key: String,
        #[source]
        source: DecodeError,
    },
    #[error("snapshot {id} header is malformed: {source}")]
    Header {
        id: SnapshotId,
        #[source]
        source: DecodeError,
    },
    #[error(
        "snapshot {id} cannot be opened by this device: {source} (is this device still a member of the vault?)"
    )]
    Unreadable {
        id: SnapshotId,
        #[source]
        source: CryptoError,
    },
    #[error("snapshot {id} belongs to vault {found}, not to this vault {expected}; refusing it")]
    WrongVault {
        id: SnapshotId,
        expected: VaultId,
        found: VaultId,
    },
    #[error(
        "snapshot {id} was announced by device {signer} but its header says it is device {named}'s; refusing it (a member publishing other devices' snapshots as its own is misbehaving: check `cairn status` and consider `cairn remove-device`)"
    )]
    ForeignSnapshot {
        id: SnapshotId,
        signer: DeviceId,
        named: DeviceId,
    },
    #[error("snapshot {id} is not in the local store; fetch it from a peer first")]
    MissingSnapshot { id: SnapshotId },
    #[error(
        "snapshot {id} names parent {parent}, which is not in the local store; its history is incomplete (fetch it from a peer)"
    )]
    MissingParent { id: SnapshotId, parent: SnapshotId },
    #[error("snapshot {id}'s tree is incomplete: {source}; fetch its nodes from a peer first")]
    IncompleteTree {
        id: SnapshotId,
        #[source]
        source: TreeError,
    },
    #[error("{path}: {reason}")]
    Rejected { path: String, reason: &'static str },
    #[error("sealing the snapshot header failed: {0}")]
    Seal(#[source] CryptoError),
    #[error("tree operation failed: {0}")]
    Tree(#[from] TreeError),
    #[error("blob store failed: {0}")]
    Store(#[from] StoreError),
    #[error("registry failed: {0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Publish(String),
}

impl VaultError {
    pub(crate) fn rejected(path: &crate::VaultPath, reason: &'static str) -> Self {
        VaultError::Rejected {
            path: if path.is_root() {
                "/".into()
            } else {
                path.to_string()
            },
            reason,
        }
    }
}

pub type Result<T, E = VaultError> = std::result::Result<T, E>;
