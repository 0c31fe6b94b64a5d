//! The per-device engine: local commits, publishing through the registry, and merging
//! snapshots received from peers. Pure and deterministic given its inputs: time comes in as
//! `now_ms`, and every failure leaves the engine's state as it was.

use std::collections::BTreeMap;

use cairn_crypto::{DeviceId, DeviceKey};
use cairn_registry::{Payload, PublishError, PublishPolicy, Registry, Revision};
use cairn_tree::NodeId;

use crate::clock::Hlc;
use crate::entry::{Content, Entry, EntryKind};
use crate::error::{Result, VaultError};
use crate::merge::MergeReport;
use crate::path::{EntryKey, VaultPath, prefix_successor};
use crate::snapshot::{
    Keyring, Snapshot, SnapshotHeader, SnapshotId, load_announced, load_snapshot, verify_history,
    write_snapshot,
};
use crate::source::EntrySource;
use crate::stores::{TreeSource, VaultStores};
use crate::version::{Version, VersionVector};

/// Metadata a caller sets on files and directories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attrs {
    pub mode: u32,
    pub mtime_ns: i64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// One local change. Changes in a commit apply in order, like a journal replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create or replace the file at the path.
    Write {
        attrs: Attrs,
        size: u64,
        content: Content,
    },
    Symlink {
        target: Vec<u8>,
        mtime_ns: i64,
        /// Its link group when it has several names (a symlink's mode is always 0o777).
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    },
    Mkdir {
        attrs: Attrs,
    },
    /// Replace the attributes of the existing file, symlink or directory.
    SetAttrs {
        attrs: Attrs,
    },
    /// Delete a file or symlink.
    Remove,
    /// Delete an empty directory.
    Rmdir,
    /// Move a file, symlink or directory (with everything inside) to `to`, replacing a file
    /// or an empty directory there. Recorded as tombstones at the old paths and new entries
    /// at the new ones, so a concurrent edit at the old path survives beside the moved copy.
    Rename {
        to: VaultPath,
    },
    /// Deletes again what is already deleted: a new tombstone whose version dominates the
    /// one there, so every device that holds this deletion sees it confirmed (the mass-delete
    /// guard's approval, see [`crate::guard`]). `dir` selects the directory key.
    Redelete {
        dir: bool,
    },
}

impl Change {
    /// A small file stored inline.
    pub fn write_inline(bytes: Vec<u8>, mode: u32, mtime_ns: i64) -> Self {
        Change::Write {
            attrs: Attrs {
                mode,
                mtime_ns,
                xattrs: BTreeMap::new(),
            },
            size: bytes.len() as u64,
            content: Content::Inline(bytes),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    pub entries_written: usize,
    pub nodes_written: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishReport {
    pub snapshot: Snapshot,
    pub revision: Revision,
    pub attempts: u32,
    /// Set when another producer on this device had published first and its head was
    /// merged in.
    pub merged: Option<MergeReport>,
}

/// One device's view of one vault.
pub struct Vault {
    stores: VaultStores,
    keys: Keyring,
    key: DeviceKey,
    device: DeviceId,
    clock: Hlc,
    /// Current local state: everything committed and merged so far.
    root: NodeId,
    /// This device's latest snapshot (published or written), the first parent of the next.
    head: Option<Snapshot>,
    /// Peer snapshots merged since `head`, the other parents of the next snapshot.
    merged_peers: Vec<SnapshotId>,
    policy: PublishPolicy,
}

impl Vault {
    /// An engine with an empty vault.
    pub fn new(stores: VaultStores, keys: Keyring, key: DeviceKey) -> Self {
        let device = key.device_id();
        Self {
            stores,
            keys,
            key,
            device,
            clock: Hlc::ZERO,
            root: VaultStores::empty_root(),
            head: None,
            merged_peers: Vec::new(),
            policy: PublishPolicy::default(),
        }
    }

    /// An engine resuming from one of this device's snapshots.
    pub fn open(
        stores: VaultStores,
        keys: Keyring,
        key: DeviceKey,
        head: SnapshotId,
    ) -> Result<Self> {
        let snap = load_snapshot(&stores, &keys, head)?;
        let mut v = Self::new(stores, keys, key);
        v.clock.observe(snap.header.clock);
        v.root = snap.header.root;
        v.head = Some(snap);
        Ok(v)
    }

    pub fn set_publish_policy(&mut self, policy: PublishPolicy) {
        self.policy = policy;
    }

    pub fn device(&self) -> DeviceId {
        self.device
    }

    pub fn root(&self) -> NodeId {
        self.root
    }

    pub fn head(&self) -> Option<&Snapshot> {
        self.head.as_ref()
    }

    pub fn clock(&self) -> Hlc {
        self.clock
    }

    pub fn stores(&self) -> &VaultStores {
        &self.stores
    }

    /// Seals the next snapshots to these members (after the member list changed).
    pub fn set_recipients(&mut self, recipients: Vec<cairn_crypto::AgeRecipient>) {
        self.keys.recipients = recipients;
    }

    /// Opens headers with these key-epoch identities too (after new epochs arrived).
    pub fn set_history_identities(&mut self, history: Vec<cairn_crypto::AgeIdentity>) {
        self.keys.history = history;
    }

    pub fn keys(&self) -> &Keyring {
        &self.keys
    }

    /// The current local state as an entry source (for a `MergedView` layer).
    pub fn source(&self) -> TreeSource {
        self.stores.source(self.root)
    }

    /// The entry stored under `key`, tombstones included.
    pub fn entry(&self, key: &EntryKey) -> Result<Option<Entry>> {
        self.source().get(&key.to_bytes())
    }

    /// The live entry at `path`: the directory if there is one, else the file or symlink.
    pub fn lookup(&self, path: &VaultPath) -> Result<Option<(EntryKey, Entry)>> {
        self.source().lookup(path)
    }

    /// Applies `changes` in order as one atomic step: either all are recorded (each with a
    /// new version authored by this device) or, on the first invalid one, none.
    pub fn commit(
        &mut self,
        changes: impl IntoIterator<Item = (VaultPath, Change)>,
        now_ms: u64,
    ) -> Result<CommitReport> {
        let base = self.source();
        let mut clock = self.clock;
        let mut tx = Tx {
            base: &base,
            pending: BTreeMap::new(),
            device: self.device,
        };
        for (path, change) in changes {
            tx.change(&path, change, &mut clock, now_ms)?;
        }
        let batch: Vec<(Vec<u8>, Entry)> = tx.pending.into_iter().collect();
        let (root, stats) = self.stores.apply(&self.root, &batch)?;
        self.root = root;
        self.clock = clock;
        Ok(CommitReport {
            entries_written: batch.len(),
            nodes_written: stats.nodes_written,
        })
    }

    fn next_parents(&self, first: Option<SnapshotId>) -> Vec<SnapshotId> {
        let mut parents: Vec<SnapshotId> = first.into_iter().collect();
        for p in self
            .head
            .iter()
            .map(|h| h.id)
            .chain(self.merged_peers.iter().copied())
        {
            if !parents.contains(&p) {
                parents.push(p);
            }
        }
        parents
    }

    /// Writes a snapshot of the current state without announcing it (history, tests, and
    /// simulations that carry announcements themselves).
    pub fn snapshot(&mut self, now_ms: u64) -> Result<Snapshot> {
        let mut clock = self.clock;
        let header = SnapshotHeader {
            vault: self.keys.vault,
            root: self.root,
            parents: self.next_parents(None),
            device: self.device,
            clock: clock.tick(now_ms),
            seq: self.head.as_ref().map_or(0, |h| h.header.seq) + 1,
            created_ms: now_ms,
        };
        let id = write_snapshot(&self.stores, &self.keys, &header)?;
        let snap = Snapshot { id, header };
        self.clock = clock;
        self.head = Some(snap.clone());
        self.merged_peers.clear();
        Ok(snap)
    }

    /// Publishes the current state as this device's head in `reg`, merging in whatever
    /// another producer on this device published meanwhile (verify-and-retry loop).
    pub fn publish(&mut self, reg: &Registry, now_ms: u64) -> Result<PublishReport> {
        let mut clock = self.clock;
        let mut last: Option<(Snapshot, Option<MergeReport>)> = None;
        let own_head = self.head.as_ref().map(|h| h.id);
        let own_seq = self.head.as_ref().map_or(0, |h| h.header.seq);
        let outcome = cairn_registry::publish(
            reg,
            &self.key,
            self.keys.vault,
            &self.policy,
            |head| -> Result<Payload> {
                let head_id = head.map(|h| SnapshotId::from(h.payload));
                let (root, seq, merged) = match head_id {
                    Some(hid) if Some(hid) != own_head => {
                        let hs = load_announced(&self.stores, &self.keys, hid, self.device)?;
                        clock.observe(hs.header.clock);
                        let out = self.stores.merge(&self.root, &hs.header.root)?;
                        (out.root, hs.header.seq.max(own_seq), Some(out.report))
                    }
                    _ => (self.root, own_seq, None),
                };
                let header = SnapshotHeader {
                    vault: self.keys.vault,
                    root,
                    parents: self.next_parents(head_id),
                    device: self.device,
                    clock: clock.tick(now_ms),
                    seq: seq + 1,
                    created_ms: now_ms,
                };
                let id = write_snapshot(&self.stores, &self.keys, &header)?;
                last = Some((Snapshot { id, header }, merged));
                Ok(Payload::from(id))
            },
        );
        let published = outcome.map_err(|e| match e {
            PublishError::Payload(e) => e,
            PublishError::Registry(e) => VaultError::Registry(e),
            other => VaultError::Publish(other.to_string()),
        })?;
        let Some((snapshot, merged)) =
            last.filter(|(s, _)| Payload::from(s.id) == published.entry.payload)
        else {
            return Err(VaultError::Publish(
                "the registry confirmed a payload this publish did not produce".into(),
            ));
        };
        self.root = snapshot.header.root;
        self.clock = clock;
        self.head = Some(snapshot.clone());
        self.merged_peers.clear();
        Ok(PublishReport {
            snapshot,
            revision: published.entry.revision,
            attempts: published.attempts,
            merged,
        })
    }

    /// Merges a peer's snapshot into the local state. The snapshot must load (see
    /// [`load_snapshot`]) and its direct parents must be present, so history stays
    /// walkable; otherwise nothing changes. For a snapshot a registry entry announced, use
    /// [`Vault::receive_from`], which also checks whose it is.
    pub fn receive(&mut self, id: SnapshotId) -> Result<MergeReport> {
        self.receive_checked(id, None)
    }

    /// [`Vault::receive`] for the snapshot a registry entry signed by `signer` points to:
    /// refused ([`VaultError::ForeignSnapshot`]) unless its header names `signer`.
    pub fn receive_from(&mut self, signer: DeviceId, id: SnapshotId) -> Result<MergeReport> {
        self.receive_checked(id, Some(signer))
    }

    fn receive_checked(&mut self, id: SnapshotId, signer: Option<DeviceId>) -> Result<MergeReport> {
        if self.head.as_ref().is_some_and(|h| h.id == id) || self.merged_peers.contains(&id) {
            return Ok(MergeReport::default());
        }
        let snap = match signer {
            Some(signer) => load_announced(&self.stores, &self.keys, id, signer)?,
            None => load_snapshot(&self.stores, &self.keys, id)?,
        };
        for p in &snap.header.parents {
            if !self.stores.blobs.has(&p.0)? {
                return Err(VaultError::MissingParent { id, parent: *p });
            }
        }
        let out = self.stores.merge(&self.root, &snap.header.root)?;
        self.clock.observe(snap.header.clock);
        self.root = out.root;
        self.merged_peers.push(id);
        Ok(out.report)
    }

    /// Snapshots this device published, newest first, as recorded by `reg`.
    pub fn log(&self, reg: &Registry) -> Result<Vec<(Revision, SnapshotId)>> {
        Ok(reg
            .log(&self.keys.vault, &self.device)?
            .into_iter()
            .map(|(r, p)| (r, SnapshotId::from(p)))
            .collect())
    }

    pub fn load(&self, id: SnapshotId) -> Result<Snapshot> {
        load_snapshot(&self.stores, &self.keys, id)
    }

    pub fn verify_history(&self, id: SnapshotId) -> Result<Vec<Snapshot>> {
        verify_history(&self.stores, &self.keys, id)
    }
}

/// A commit in progress: pending entries over the base tree.
struct Tx<'a> {
    base: &'a TreeSource,
    pending: BTreeMap<Vec<u8>, Entry>,
    device: DeviceId,
}

impl Tx<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        match self.pending.get(key) {
            Some(e) => Ok(Some(e.clone())),
            None => self.base.get(key),
        }
    }

    fn live(&self, key: &[u8]) -> Result<Option<Entry>> {
        Ok(self.get(key)?.filter(Entry::is_live))
    }

    /// The version a new write by this device at `key` gets: it dominates whatever is there.
    fn next_version(&self, key: &[u8], clock: &mut Hlc, now_ms: u64) -> Result<Version> {
        let vv = self
            .get(key)?
            .map_or_else(VersionVector::new, |e| e.version.vv);
        Ok(Version::write(&vv, self.device, clock.tick(now_ms)))
    }

    fn put(&mut self, key: Vec<u8>, entry: Entry) {
        self.pending.insert(key, entry);
    }

    fn require_parent(&self, path: &VaultPath) -> Result<()> {
        match path.parent() {
            None => Err(VaultError::rejected(
                path,
                "the vault root cannot be changed",
            )),
            Some(p) if p.is_root() => Ok(()),
            Some(p) => match self.live(&p.dir_key())? {
                Some(_) => Ok(()),
                None => Err(VaultError::rejected(
                    path,
                    "parent directory does not exist",
                )),
            },
        }
    }

    /// Live entries strictly inside directory `dir`, ascending.
    fn live_descendants(&self, dir: &VaultPath) -> Result<Vec<(Vec<u8>, Entry)>> {
        let prefix = dir.dir_key();
        let mut start = prefix.clone();
        start.push(0);
        let end = prefix_successor(&prefix);
        let mut found: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        for item in self.base.scan(&start, end.as_deref())? {
            let (k, e) = item?;
            found.insert(k, e);
        }
        for (k, e) in self.pending.range(start..) {
            if !k.starts_with(&prefix) {
                break;
            }
            found.insert(k.clone(), e.clone());
        }
        Ok(found.into_iter().filter(|(_, e)| e.is_live()).collect())
    }

    fn change(
        &mut self,
        path: &VaultPath,
        change: Change,
        clock: &mut Hlc,
        now: u64,
    ) -> Result<()> {
        let (fk, dk) = (path.file_key(), path.dir_key());
        match change {
            Change::Write {
                attrs,
                size,
                content,
            } => {
                self.require_parent(path)?;
                if self.live(&dk)?.is_some() {
                    return Err(VaultError::rejected(path, "is a directory"));
                }
                let entry = Entry {
                    kind: EntryKind::File,
                    mode: attrs.mode,
                    mtime_ns: attrs.mtime_ns,
                    size,
                    xattrs: attrs.xattrs,
                    content,
                    version: self.next_version(&fk, clock, now)?,
                };
                self.put_checked(path, fk, entry)
            }
            Change::Symlink {
                target,
                mtime_ns,
                xattrs,
            } => {
                self.require_parent(path)?;
                if self.live(&dk)?.is_some() || self.live(&fk)?.is_some() {
                    return Err(VaultError::rejected(path, "already exists"));
                }
                let entry = Entry {
                    kind: EntryKind::Symlink,
                    mode: 0o777,
                    mtime_ns,
                    size: target.len() as u64,
                    xattrs,
                    content: Content::Target(target),
                    version: self.next_version(&fk, clock, now)?,
                };
                self.put_checked(path, fk, entry)
            }
            Change::Mkdir { attrs } => {
                self.require_parent(path)?;
                if self.live(&dk)?.is_some() || self.live(&fk)?.is_some() {
                    return Err(VaultError::rejected(path, "already exists"));
                }
                let entry = Entry {
                    kind: EntryKind::Dir,
                    mode: attrs.mode,
                    mtime_ns: attrs.mtime_ns,
                    size: 0,
                    xattrs: attrs.xattrs,
                    content: Content::None,
                    version: self.next_version(&dk, clock, now)?,
                };
                self.put_checked(path, dk, entry)
            }
            Change::SetAttrs { attrs } => {
                let (key, old) = match (self.live(&dk)?, self.live(&fk)?) {
                    (Some(d), _) => (dk, d),
                    (None, Some(f)) => (fk, f),
                    (None, None) => return Err(VaultError::rejected(path, "does not exist")),
                };
                let entry = Entry {
                    mode: attrs.mode,
                    mtime_ns: attrs.mtime_ns,
                    xattrs: attrs.xattrs,
                    version: self.next_version(&key, clock, now)?,
                    ..old
                };
                self.put_checked(path, key, entry)
            }
            Change::Remove => {
                if self.live(&fk)?.is_none() {
                    return Err(VaultError::rejected(path, "no such file"));
                }
                let v = self.next_version(&fk, clock, now)?;
                self.put(fk, Entry::tombstone(v));
                Ok(())
            }
            Change::Rmdir => {
                if self.live(&dk)?.is_none() {
                    return Err(VaultError::rejected(path, "no such directory"));
                }
                if !self.live_descendants(path)?.is_empty() {
                    return Err(VaultError::rejected(path, "directory not empty"));
                }
                let v = self.next_version(&dk, clock, now)?;
                self.put(dk, Entry::tombstone(v));
                Ok(())
            }
            Change::Rename { to } => self.rename(path, &to, clock, now),
            Change::Redelete { dir } => {
                let key = if dir { dk } else { fk };
                if !self.get(&key)?.is_some_and(|e| e.is_tombstone()) {
                    return Err(VaultError::rejected(path, "is not deleted"));
                }
                if dir && !self.live_descendants(path)?.is_empty() {
                    return Err(VaultError::rejected(path, "directory not empty"));
                }
                let v = self.next_version(&key, clock, now)?;
                self.put(key, Entry::tombstone(v));
                Ok(())
            }
        }
    }

    fn put_checked(&mut self, path: &VaultPath, key: Vec<u8>, entry: Entry) -> Result<()> {
        entry.validate().map_err(|_| {
            VaultError::rejected(
                path,
                "size and content do not match (or content is invalid for the kind)",
            )
        })?;
        self.put(key, entry);
        Ok(())
    }

    fn rename(
        &mut self,
        from: &VaultPath,
        to: &VaultPath,
        clock: &mut Hlc,
        now: u64,
    ) -> Result<()> {
        if from == to {
            return Ok(());
        }
        self.require_parent(to)?;
        if let Some(src) = self.live(&from.file_key())? {
            if self.live(&to.dir_key())?.is_some() {
                return Err(VaultError::rejected(to, "is a directory"));
            }
            self.move_entry(from.file_key(), to.file_key(), src, clock, now)?;
            return Ok(());
        }
        let Some(src_dir) = self.live(&from.dir_key())? else {
            return Err(VaultError::rejected(from, "no such file or directory"));
        };
        if to.as_str().starts_with(&format!("{}/", from.as_str())) {
            return Err(VaultError::rejected(
                to,
                "cannot move a directory into itself",
            ));
        }
        if self.live(&to.file_key())?.is_some() {
            return Err(VaultError::rejected(to, "not a directory"));
        }
        if self.live(&to.dir_key())?.is_some() && !self.live_descendants(to)?.is_empty() {
            return Err(VaultError::rejected(to, "directory not empty"));
        }
        let inside = self.live_descendants(from)?;
        let from_prefix = from.dir_key();
        let to_prefix = to.dir_key();
        self.move_entry(from_prefix.clone(), to_prefix.clone(), src_dir, clock, now)?;
        for (k, e) in inside {
            let mut nk = to_prefix.clone();
            nk.extend_from_slice(&k[from_prefix.len()..]);
            self.move_entry(k, nk, e, clock, now)?;
        }
        Ok(())
    }

    fn move_entry(
        &mut self,
        old: Vec<u8>,
        new: Vec<u8>,
        src: Entry,
        clock: &mut Hlc,
        now: u64,
    ) -> Result<()> {
        let moved = Entry {
            version: self.next_version(&new, clock, now)?,
            ..src
        };
        let tomb = Entry::tombstone(self.next_version(&old, clock, now)?);
        self.put(new, moved);
        self.put(old, tomb);
        Ok(())
    }
}
