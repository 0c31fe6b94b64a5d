//! Snapshots: a tree root plus a header saying whose it is and what it was built from.
//!
//! Header encoding (format 1):
//! ```text
//! "cairnsnap" | 0x01 | vault 16 B | root 32 B | parent count | count × 32 B
//!            | device 32 B | clock (wall_ms, counter) | seq | created_ms
//! ```
//! The encoded header is age-sealed to the vault's member recipients and stored as a blob;
//! the blob's id is the [`SnapshotId`], which is exactly the registry payload. Only
//! members can open it, and age authenticates it, so a tampered blob fails to open (and
//! fails the blob store's hash check before that).

use std::collections::{BTreeSet, VecDeque};
use std::fmt;

use cairn_crypto::{
    AgeIdentity, AgeRecipient, DeviceId, VaultId, open_sealed, open_sealed_any, seal_to,
};
use cairn_registry::Payload;
use cairn_store::ChunkId;
use cairn_tree::NodeId;

use crate::clock::Hlc;
use crate::codec::{Reader, put_varint};
use crate::entry::{decode_hlc, encode_hlc};
use crate::error::{DecodeError, Result, VaultError};
use crate::stores::VaultStores;

const MAGIC: &[u8] = b"cairnsnap";
pub const HEADER_FORMAT_V1: u8 = 1;
/// More parents than this cannot come from an honest engine (own head plus the peers
/// merged since); the bound keeps a hostile header from costing much to walk.
pub const MAX_PARENTS: usize = 1024;

/// Id of a sealed snapshot header blob; the registry payload that announces it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub ChunkId);

impl From<Payload> for SnapshotId {
    fn from(p: Payload) -> Self {
        SnapshotId(ChunkId(p.0))
    }
}

impl From<SnapshotId> for Payload {
    fn from(s: SnapshotId) -> Self {
        Payload(s.0.0)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({}…)", &self.0.to_hex()[..12])
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub vault: VaultId,
    pub root: NodeId,
    /// Snapshots this one was built from: the device's previous head first, then peer
    /// snapshots merged since.
    pub parents: Vec<SnapshotId>,
    pub device: DeviceId,
    /// The author's clock when it wrote the header: at least every version stamp inside.
    pub clock: Hlc,
    /// 1 + the highest parent seq of this device's own chain.
    pub seq: u64,
    pub created_ms: u64,
}

impl SnapshotHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + 32 * self.parents.len());
        out.extend_from_slice(MAGIC);
        out.push(HEADER_FORMAT_V1);
        out.extend_from_slice(self.vault.as_bytes());
        out.extend_from_slice(self.root.as_bytes());
        put_varint(&mut out, self.parents.len() as u64);
        for p in &self.parents {
            out.extend_from_slice(p.0.as_bytes());
        }
        out.extend_from_slice(self.device.as_bytes());
        encode_hlc(&mut out, self.clock);
        put_varint(&mut out, self.seq);
        put_varint(&mut out, self.created_ms);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(DecodeError::Invalid("not a cairn snapshot header"));
        }
        let format = r.u8()?;
        if format != HEADER_FORMAT_V1 {
            return Err(DecodeError::UnknownFormat {
                what: "snapshot header",
                version: format,
            });
        }
        let vault = VaultId(r.take_array()?);
        let root = NodeId(r.take_array()?);
        let n = r.varint()?;
        if n > MAX_PARENTS as u64 || n * 32 > r.remaining() as u64 {
            return Err(DecodeError::Invalid("too many parents"));
        }
        let mut parents = Vec::with_capacity(n as usize);
        for _ in 0..n {
            parents.push(SnapshotId(ChunkId(r.take_array()?)));
        }
        let device = DeviceId(r.take_array()?);
        let clock = decode_hlc(&mut r)?;
        let seq = r.varint()?;
        let created_ms = r.varint()?;
        r.finish()?;
        Ok(Self {
            vault,
            root,
            parents,
            device,
            clock,
            seq,
            created_ms,
        })
    }
}

/// A loaded, verified snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub header: SnapshotHeader,
}

/// What a device needs to read and write snapshot headers of one vault.
#[derive(Clone)]
pub struct Keyring {
    pub vault: VaultId,
    pub identity: AgeIdentity,
    /// Every member's recipient, this device's included (and the current key epoch's
    /// shared history recipient, see `EpochSecret::history_identity`).
    pub recipients: Vec<AgeRecipient>,
    /// Shared identities of the key epochs this device holds: they open headers sealed
    /// before this device became a member.
    pub history: Vec<AgeIdentity>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("vault", &self.vault)
            .field("recipients", &self.recipients.len())
            .finish()
    }
}

/// Seals and stores a header; returns its id.
pub fn write_snapshot(
    stores: &VaultStores,
    keys: &Keyring,
    header: &SnapshotHeader,
) -> Result<SnapshotId> {
    let sealed = seal_to(&keys.recipients, &header.encode()).map_err(VaultError::Seal)?;
    Ok(SnapshotId(stores.blobs.put(&sealed)?))
}

/// Loads and checks a snapshot: the blob is present and intact, this device can open it,
/// it decodes, it belongs to this vault, and its root node is available. Parents are not
/// followed (see [`verify_history`]).
pub fn load_snapshot(stores: &VaultStores, keys: &Keyring, id: SnapshotId) -> Result<Snapshot> {
    let header = open_header(stores, keys, id)?;
    check_root(stores, id, header)
}

/// The header of snapshot `id` (present, intact, openable by this device, of this vault),
/// without requiring its tree: what a history listing needs.
pub fn load_header(stores: &VaultStores, keys: &Keyring, id: SnapshotId) -> Result<SnapshotHeader> {
    open_header(stores, keys, id)
}

/// The header of snapshot `id`: present, intact, openable by this device, of this vault.
fn open_header(stores: &VaultStores, keys: &Keyring, id: SnapshotId) -> Result<SnapshotHeader> {
    let sealed = stores
        .blobs
        .get(&id.0)?
        .ok_or(VaultError::MissingSnapshot { id })?;
    let plain = match open_sealed(&keys.identity, &sealed) {
        Ok(p) => p,
        Err(_) if !keys.history.is_empty() => open_sealed_any(&keys.history, &sealed)
            .map_err(|source| VaultError::Unreadable { id, source })?,
        Err(source) => return Err(VaultError::Unreadable { id, source }),
    };
    let header =
        SnapshotHeader::decode(&plain).map_err(|source| VaultError::Header { id, source })?;
    if header.vault != keys.vault {
        return Err(VaultError::WrongVault {
            id,
            expected: keys.vault,
            found: header.vault,
        });
    }
    Ok(header)
}

/// The snapshot, once its root node is available.
fn check_root(stores: &VaultStores, id: SnapshotId, header: SnapshotHeader) -> Result<Snapshot> {
    stores
        .tree
        .read_node(&header.root)
        .map_err(|source| VaultError::IncompleteTree { id, source })?;
    Ok(Snapshot { id, header })
}

/// [`load_snapshot`] for a snapshot a registry entry signed by `signer` points to: the
/// header must name `signer` as its device. Otherwise a member could announce a snapshot
/// (say, an old one another device wrote) as its own state, and others would merge and
/// attribute it to the wrong device.
pub fn load_announced(
    stores: &VaultStores,
    keys: &Keyring,
    id: SnapshotId,
    signer: DeviceId,
) -> Result<Snapshot> {
    // Whose it is is settled before its tree is fetched: a foreign snapshot is refused
    // even when its nodes are not to be had.
    let header = open_header(stores, keys, id)?;
    if header.device != signer {
        return Err(VaultError::ForeignSnapshot {
            id,
            signer,
            named: header.device,
        });
    }
    check_root(stores, id, header)
}

/// Walks every ancestor of `id`, loading each; fails on the first one that is missing or
/// invalid. Returns the snapshots visited (breadth-first, `id` first).
pub fn verify_history(
    stores: &VaultStores,
    keys: &Keyring,
    id: SnapshotId,
) -> Result<Vec<Snapshot>> {
    let mut seen = BTreeSet::from([id]);
    let mut queue = VecDeque::from([load_snapshot(stores, keys, id)?]);
    let mut out = Vec::new();
    while let Some(s) = queue.pop_front() {
        for p in &s.header.parents {
            if !seen.insert(*p) {
                continue;
            }
            let parent = load_snapshot(stores, keys, *p).map_err(|e| match e {
                VaultError::MissingSnapshot { .. } => VaultError::MissingParent {
                    id: s.id,
                    parent: *p,
                },
                other => other,
            })?;
            queue.push_back(parent);
        }
        out.push(s);
    }
    Ok(out)
}
