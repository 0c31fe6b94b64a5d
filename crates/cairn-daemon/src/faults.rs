//! What members did wrong, as far as this device can tell, and where file content came from.
//!
//! Everything a member sends is untrusted even after it decrypts and verifies: a member
//! holds the vault key and its own device key, so it can sign well-formed nonsense. When
//! such content is found (a file whose size or chunks disagree with its manifest, a snapshot
//! header naming another device) the problem stays with that file or snapshot, and is
//! recorded here against the device responsible, so `cairn status` can name it.
//!
//! To name the responsible device for a file read through the mount, the sync worker notes
//! which member's signed snapshot each file version arrived in ([`PeerFaults::note_origin`]).
//! Merged entries keep their content but not their version vector, so the key is the
//! content: size plus where its bytes are. The table is a bounded LRU; a version too old to
//! be in it is attributed to the device that wrote it according to its version stamp, and
//! the report says so.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;

use cairn_crypto::DeviceId;
use cairn_vault::{Content, Entry};
use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::open_vault::now_ms;

/// Content origins remembered (~100 B each).
const ORIGINS: usize = 65_536;

/// What a device did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// A file whose size, manifest or chunks contradict each other.
    BadFile,
    /// A registry entry pointing at a snapshot whose header names another device.
    ForeignSnapshot,
    /// Two signed registry entries with one revision and different payloads.
    Equivocation,
}

impl FaultKind {
    pub fn describe(self) -> &'static str {
        match self {
            FaultKind::BadFile => "published file content that contradicts its own manifest",
            FaultKind::ForeignSnapshot => "announced a snapshot that names another device",
            FaultKind::Equivocation => "signed two different snapshots under one revision",
        }
    }
}

/// One kind of misbehaviour of one device, as shown by `cairn status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFault {
    /// The device id.
    pub device: String,
    pub kind: FaultKind,
    /// The latest case, for people.
    pub detail: String,
    /// How many times it was seen since the daemon started (evidence on disk counts once).
    pub count: u64,
    pub last_ms: u64,
}

#[derive(Default)]
struct Inner {
    faults: BTreeMap<(DeviceId, FaultKind), PeerFault>,
}

pub struct PeerFaults {
    inner: Mutex<Inner>,
    origins: Mutex<LruCache<[u8; 32], DeviceId>>,
}

impl Default for PeerFaults {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            origins: Mutex::new(LruCache::new(NonZeroUsize::new(ORIGINS).expect("nonzero"))),
        }
    }
}

/// Identifies a file version's content: its size and where its bytes are.
fn content_key(entry: &Entry) -> Option<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update(&entry.size.to_le_bytes());
    match &entry.content {
        Content::Inline(bytes) => {
            h.update(b"inline");
            h.update(bytes);
        }
        Content::Chunks(chunks) => {
            h.update(b"chunks");
            for c in chunks {
                h.update(c.id.as_bytes());
                h.update(&c.len.to_le_bytes());
            }
        }
        Content::ChunkList { blob, chunks, .. } => {
            h.update(b"list");
            h.update(blob.as_bytes());
            h.update(&chunks.to_le_bytes());
        }
        Content::None | Content::Target(_) => return None,
    }
    Some(*h.finalize().as_bytes())
}

impl PeerFaults {
    /// Records that `entry`'s content arrived in a snapshot signed by `signer`. The first
    /// device to deliver a content keeps it: a member that merged and republished it later
    /// is not the one who introduced it.
    pub fn note_origin(&self, entry: &Entry, signer: DeviceId) {
        if let Some(k) = content_key(entry) {
            let mut o = self.origins.lock().unwrap_or_else(|e| e.into_inner());
            if o.get(&k).is_none() {
                o.put(k, signer);
            }
        }
    }

    /// The device whose signed snapshot brought `entry`'s content, if remembered.
    pub fn origin(&self, entry: &Entry) -> Option<DeviceId> {
        let k = content_key(entry)?;
        self.origins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&k)
            .copied()
    }

    /// The device to blame for `entry` and how sure that is, for messages.
    pub fn blame(&self, entry: &Entry) -> (DeviceId, &'static str) {
        match self.origin(entry) {
            Some(d) => (d, "signed the snapshot it arrived in"),
            None => (
                entry.version.device,
                "wrote it according to its version stamp",
            ),
        }
    }

    /// Records (and logs) a misbehaviour of `device`.
    pub fn report(&self, device: DeviceId, kind: FaultKind, detail: String) {
        tracing::error!(device = %device, kind = kind.describe(), %detail, "misbehaving member; see `cairn status`, and consider `cairn remove-device`");
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let f = inner
            .faults
            .entry((device, kind))
            .or_insert_with(|| PeerFault {
                device: device.to_string(),
                kind,
                detail: String::new(),
                count: 0,
                last_ms: 0,
            });
        f.detail = detail;
        f.count += 1;
        f.last_ms = now_ms();
    }

    /// Everything recorded, by device then kind.
    pub fn list(&self) -> Vec<PeerFault> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .faults
            .values()
            .cloned()
            .collect()
    }

    pub fn has(&self, device: DeviceId, kind: FaultKind) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .faults
            .contains_key(&(device, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_crypto::DeviceKey;

    fn file(size: u64, bytes: &[u8], author: DeviceId) -> Entry {
        let vv = cairn_vault::VersionVector::new();
        Entry {
            kind: cairn_vault::EntryKind::File,
            mode: 0o644,
            mtime_ns: 0,
            size,
            xattrs: Default::default(),
            content: Content::Inline(bytes.to_vec()),
            version: cairn_vault::Version::write(&vv, author, cairn_vault::Hlc::ZERO),
        }
    }

    #[test]
    fn the_first_device_to_deliver_a_content_is_blamed_for_it() {
        let (m, a, writer) = (
            DeviceKey::generate().device_id(),
            DeviceKey::generate().device_id(),
            DeviceKey::generate().device_id(),
        );
        let f = PeerFaults::default();
        let lie = file(10_000, b"short", writer);
        assert_eq!(
            f.blame(&lie).0,
            writer,
            "unknown origin: the version's author"
        );
        f.note_origin(&lie, m);
        f.note_origin(&lie, a);
        assert_eq!(f.blame(&lie).0, m);
        // Another version with the same content (merged: other version vector) too.
        let mut merged = lie.clone();
        merged.mtime_ns = 5;
        assert_eq!(f.origin(&merged), Some(m));
        assert_eq!(f.origin(&file(5, b"short", writer)), None);
    }

    #[test]
    fn faults_are_counted_per_device_and_kind() {
        let (m, a) = (
            DeviceKey::generate().device_id(),
            DeviceKey::generate().device_id(),
        );
        let f = PeerFaults::default();
        f.report(m, FaultKind::BadFile, "x: short".into());
        f.report(m, FaultKind::BadFile, "y: long".into());
        f.report(a, FaultKind::ForeignSnapshot, "s".into());
        let list = f.list();
        assert_eq!(list.len(), 2);
        let bad = list.iter().find(|p| p.kind == FaultKind::BadFile).unwrap();
        assert_eq!((bad.device.clone(), bad.count), (m.to_string(), 2));
        assert_eq!(bad.detail, "y: long");
        assert!(f.has(a, FaultKind::ForeignSnapshot));
        assert!(!f.has(a, FaultKind::BadFile));
    }
}
