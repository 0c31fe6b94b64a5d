use std::path::PathBuf;

use cairn_crypto::{DeviceId, VaultId};

use crate::entry::{ENTRY_LEN, FORMAT_V1};
use crate::{Payload, Revision};

/// Every reason an entry can be refused or the registry can fail.
///
/// Refusals (everything but `Db`, `Open`, `Corrupt` and `UnsupportedSchema`) never change
/// stored state, so a caller can always drop the entry and carry on.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "registry entry is {len} bytes, expected {ENTRY_LEN}: it was cut off in transit or is not a registry entry"
    )]
    Truncated { len: usize },
    #[error(
        "registry entry is {len} bytes, expected {ENTRY_LEN}: extra bytes after the signature are not allowed"
    )]
    TrailingBytes { len: usize },
    #[error(
        "registry entry has format byte {found:#04x}, this build understands only {FORMAT_V1:#04x} (the sender may run a newer cairn)"
    )]
    UnknownFormat { found: u8 },
    #[error(
        "registry entry for device {device} has a signature that does not verify: forged or corrupted, refused"
    )]
    BadSignature { device: DeviceId },
    #[error("registry entry is for vault {got}, but it was offered to vault {expected}: refused")]
    WrongVault { expected: VaultId, got: VaultId },
    #[error(
        "device {device} is not a member of vault {vault}: its entries are refused (invite it with `cairn invite` if it should be)"
    )]
    NotMember { vault: VaultId, device: DeviceId },
    #[error(
        "stale registry entry from device {device}: revision {incoming} is not newer than the held revision {held}"
    )]
    Stale {
        device: DeviceId,
        held: Revision,
        incoming: Revision,
    },
    #[error(
        "conflicting registry entry from device {device}: revision {revision} is already held with payload {held}, refusing payload {incoming}"
    )]
    Conflict {
        device: DeviceId,
        revision: Revision,
        held: Payload,
        incoming: Payload,
    },
    #[error(
        "not equivocation evidence: the two entries must be of one device and one revision with different payloads"
    )]
    NotEvidence,
    #[error("malformed member record: {0}")]
    BadRoster(String),
    /// A device name that breaks the rules, or a malformed name record.
    #[error("{0}")]
    BadName(String),
    #[error("malformed key epoch record: {0}")]
    BadEpoch(String),
    #[error(
        "the registry database is locked by another writer for too long; retry later (is another cairn process stuck?)"
    )]
    Busy,
    #[error("cannot open the registry database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the registry database was written by a newer cairn (schema version {found}, this build knows {supported}); upgrade cairn"
    )]
    UnsupportedSchema { found: i64, supported: i64 },
    #[error(
        "the registry database is corrupt: {0} (restore it from a backup or delete it; peers will resend their entries)"
    )]
    Corrupt(String),
    #[error("registry database error: {0}")]
    Db(rusqlite::Error),
}

impl RegistryError {
    /// Another writer got there first; re-reading the head and trying again can succeed.
    pub fn is_lost_race(&self) -> bool {
        matches!(
            self,
            Self::Stale { .. } | Self::Conflict { .. } | Self::Busy
        )
    }
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        // Busy/locked survive the busy_timeout only under heavy contention; give them their
        // own variant so callers can retry instead of treating them as a broken database.
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Self::Busy
            }
            _ => Self::Db(e),
        }
    }
}
