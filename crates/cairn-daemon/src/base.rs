//! The mount's read side: the engine's merged view presented as a `cairn_fuse::BaseLayer`.
//!
//! File content is read chunk by chunk: a read decrypts only the chunks it touches, and a
//! small LRU of decrypted chunks serves the kernel's sequential 128 KiB requests from one
//! 64 KiB-average chunk without decrypting it again.
//!
//! Entries come from members' signed snapshots and are still untrusted: a member can sign an
//! entry whose size disagrees with its content, or a manifest whose chunk lengths disagree
//! with the chunks. Every such mismatch fails the read of that one file with EIO (never a
//! panic, never an out-of-bounds slice), is logged naming the device responsible (see
//! [`PeerFaults`]), and the mount keeps serving everything else.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, RwLock};

use cairn_fuse::{BaseChildren, BaseEntry, BaseError, BaseLayer, ContentRef, EntryKind};
use cairn_store::{ChunkId, FileManifest, open_chunk};
use cairn_vault::{Content, Entry, MergedView, VaultPath, VaultStores, manifest_of};
use lru::LruCache;

use super::faults::{FaultKind, PeerFaults};
use super::ondemand::{OnDemand, local_state};
use super::stores::LocalOrRemote;

/// Decrypted chunk budget when the configuration does not say (`[cache] chunk_cache_mib`).
const CHUNK_CACHE_BYTES: usize = 8 << 20;
/// Chunks fetched ahead of a read that missed locally (~512 KiB at the average chunk size):
/// sequential readers then find the next chunks already here.
const READ_AHEAD: usize = 8;
const MANIFEST_CACHE: usize = 64;

/// Chunk offsets of one file, for binary search.
struct Layout {
    manifest: FileManifest,
    starts: Vec<u64>,
}

pub struct VaultBase {
    stores: VaultStores,
    view: RwLock<MergedView>,
    chunks: Mutex<ChunkCache>,
    layouts: Mutex<LruCache<blake3::Hash, Arc<Layout>>>,
    /// For read-ahead of chunks that are not local yet.
    remote: Option<Arc<LocalOrRemote>>,
    /// Where content that contradicts itself is reported (the live mount's; history and
    /// restore views only fail the read).
    faults: Option<Arc<PeerFaults>>,
    /// What the vault root's `user.cairn.status` says beyond the usual (held deletions).
    note: RwLock<Option<String>>,
    /// Pins and mode, for `user.cairn.pin` (the live mount's only).
    ondemand: Option<Arc<OnDemand>>,
    /// Moves after every [`Self::set_view`] (see [`BaseLayer::version`]).
    version: std::sync::atomic::AtomicU64,
}

fn vault_err(e: cairn_vault::VaultError) -> BaseError {
    BaseError::Other(e.to_string())
}

fn path(p: &str) -> Result<VaultPath, BaseError> {
    VaultPath::new(p).map_err(|e| BaseError::Other(e.to_string()))
}

/// Decrypted chunks, bounded by bytes rather than count: chunk sizes vary 16x around the
/// 64 KiB average, so a count would not bound memory.
struct ChunkCache {
    lru: LruCache<ChunkId, Arc<Vec<u8>>>,
    bytes: usize,
    max_bytes: usize,
}

impl ChunkCache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.lru.get(id).cloned()
    }

    fn put(&mut self, id: ChunkId, chunk: Arc<Vec<u8>>) {
        if chunk.len() > self.max_bytes {
            return;
        }
        self.bytes += chunk.len();
        if let Some(old) = self.lru.put(id, chunk) {
            self.bytes -= old.len();
        }
        while self.bytes > self.max_bytes {
            match self.lru.pop_lru() {
                Some((_, c)) => self.bytes -= c.len(),
                None => break,
            }
        }
    }
}

impl VaultBase {
    pub fn new(stores: VaultStores, view: MergedView) -> Self {
        Self::with_chunk_cache(stores, view, CHUNK_CACHE_BYTES)
    }

    /// A base whose decrypted chunk cache holds at most `chunk_cache_bytes`.
    pub fn with_chunk_cache(
        stores: VaultStores,
        view: MergedView,
        chunk_cache_bytes: usize,
    ) -> Self {
        Self {
            stores,
            view: RwLock::new(view),
            chunks: Mutex::new(ChunkCache {
                lru: LruCache::unbounded(),
                bytes: 0,
                max_bytes: chunk_cache_bytes,
            }),
            layouts: Mutex::new(LruCache::new(
                NonZeroUsize::new(MANIFEST_CACHE).expect("nonzero"),
            )),
            remote: None,
            faults: None,
            note: RwLock::new(None),
            ondemand: None,
            version: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn with_faults(mut self, faults: Arc<PeerFaults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Fails a read of `entry` whose content contradicts itself: EIO for this file only,
    /// and the device responsible is named in the log and in `cairn status`.
    fn bad_content(&self, entry: &Entry, what: String) -> BaseError {
        match &self.faults {
            Some(f) => {
                let (device, why) = f.blame(entry);
                f.report(
                    device,
                    FaultKind::BadFile,
                    format!("{what} (device {} {why})", device.short()),
                );
            }
            None => tracing::error!(%what, "file content contradicts its manifest"),
        }
        BaseError::Other(format!(
            "{what}; the file cannot be read. Restore an older version with `cairn restore`"
        ))
    }

    pub fn with_ondemand(mut self, ondemand: Arc<OnDemand>) -> Self {
        self.ondemand = Some(ondemand);
        self
    }

    pub fn with_remote(mut self, remote: Arc<LocalOrRemote>) -> Self {
        self.remote = Some(remote);
        self
    }

    pub fn set_view(&self, view: MergedView) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view;
        // After the swap: a reader that saw the old number may have listed either view, and
        // is told to list again; one that sees the new number lists the new view.
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn set_note(&self, note: Option<String>) {
        *self.note.write().unwrap_or_else(|e| e.into_inner()) = note;
    }

    fn current(&self) -> MergedView {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn layout(
        &self,
        content_ref: &ContentRef,
        content: &Content,
    ) -> Result<Arc<Layout>, BaseError> {
        let key = blake3::hash(content_ref.as_bytes());
        if let Some(l) = self
            .layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(l.clone());
        }
        let manifest = manifest_of(self.stores.blobs.as_ref(), content)
            .map_err(vault_err)?
            .ok_or_else(|| BaseError::Other("file has no chunk list".into()))?;
        // FileManifest sums its chunk lengths in u64 from u32 lengths of at most 256 KiB,
        // so `starts` cannot overflow; the sum is checked against the entry's size by the
        // caller.
        let mut starts = Vec::with_capacity(manifest.chunks().len());
        let mut at = 0u64;
        for c in manifest.chunks() {
            starts.push(at);
            at += u64::from(c.len);
        }
        let layout = Arc::new(Layout { manifest, starts });
        self.layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(key, layout.clone());
        Ok(layout)
    }

    /// Chunk `index` of the file, decrypted and checked against its manifest length.
    fn chunk(
        &self,
        entry: &Entry,
        index: usize,
        layout: &Layout,
    ) -> Result<Arc<Vec<u8>>, BaseError> {
        let Some(r) = layout.manifest.chunks().get(index) else {
            return Err(self.bad_content(
                entry,
                format!(
                    "chunk {index} is past the end of a {}-chunk manifest",
                    layout.manifest.chunks().len()
                ),
            ));
        };
        if let Some(c) = self
            .chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&r.id)
        {
            return Ok(c);
        }
        if let Some(remote) = &self.remote
            && !remote.local.has(&r.id).unwrap_or(true)
            && let Some(fetcher) = remote.remote()
        {
            let ahead: Vec<ChunkId> = layout.manifest.chunks()[index + 1..]
                .iter()
                .take(READ_AHEAD)
                .map(|c| c.id)
                .filter(|id| !remote.local.has(id).unwrap_or(true))
                .collect();
            if !ahead.is_empty() {
                fetcher.prefetch(ahead);
            }
        }
        let sealed = self
            .stores
            .blobs
            .get(&r.id)
            .map_err(vault_err)?
            .ok_or_else(|| {
                BaseError::Unavailable(format!("chunk {} is not stored on this device", r.id))
            })?;
        let plain =
            open_chunk(r.id, &r.key, &sealed).map_err(|e| BaseError::Other(e.to_string()))?;
        // The chunk verified against its id and decrypted, but its length is the signer's
        // claim in the manifest: a short or long chunk would shift or overrun every offset.
        if plain.len() != r.len as usize {
            return Err(self.bad_content(
                entry,
                format!(
                    "chunk {} decrypted to {} bytes but the manifest says {}",
                    r.id,
                    plain.len(),
                    r.len
                ),
            ));
        }
        let plain = Arc::new(plain);
        self.chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(r.id, plain.clone());
        Ok(plain)
    }
}

/// The FUSE layer's picture of an engine entry. Files carry their whole encoded entry as the
/// opaque content reference, so a renamed file keeps pointing at the same chunks.
pub fn to_base(entry: &Entry) -> Option<BaseEntry> {
    let kind = match entry.kind {
        cairn_vault::EntryKind::File => EntryKind::File,
        cairn_vault::EntryKind::Dir => EntryKind::Dir,
        cairn_vault::EntryKind::Symlink => EntryKind::Symlink,
        cairn_vault::EntryKind::Tombstone => return None,
    };
    let target = match &entry.content {
        Content::Target(t) => t.clone(),
        _ => Vec::new(),
    };
    let content = if kind == EntryKind::File {
        ContentRef::new(entry.encode())
    } else {
        ContentRef::empty()
    };
    Some(BaseEntry {
        kind,
        mode: entry.mode & 0o7777,
        mtime_ns: entry.mtime_ns,
        size: entry.size,
        xattrs: entry.xattrs.clone(),
        target,
        content,
    })
}

/// Decodes a content reference made by [`to_base`].
pub fn entry_of(content: &ContentRef) -> Result<Entry, BaseError> {
    Entry::decode(content.as_bytes())
        .map_err(|e| BaseError::Other(format!("bad content reference: {e}")))
}

impl BaseLayer for VaultBase {
    fn version(&self) -> Option<u64> {
        Some(self.version.load(std::sync::atomic::Ordering::Acquire))
    }

    fn root_note(&self) -> Option<String> {
        self.note.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn may_wait(&self, entry: &BaseEntry, offset: u64, len: usize) -> bool {
        // Without a network (offline, history views) nothing waits on a peer.
        let Some(remote) = &self.remote else {
            return false;
        };
        if remote.remote().is_none() || offset >= entry.size || len == 0 {
            return false;
        }
        let Ok(e) = entry_of(&entry.content) else {
            return false; // fails at once
        };
        let not_local = |id: &ChunkId| !remote.local.has(id).unwrap_or(true);
        let layout = match &e.content {
            Content::Chunks(_) => self.layout(&entry.content, &e.content),
            Content::ChunkList { blob, .. } => {
                let cached = self
                    .layouts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .peek(&blake3::hash(entry.content.as_bytes()))
                    .cloned();
                match cached {
                    Some(l) => Ok(l),
                    None if not_local(blob) => return true,
                    None => self.layout(&entry.content, &e.content),
                }
            }
            _ => return false,
        };
        let Ok(layout) = layout else {
            return false;
        };
        let end = offset.saturating_add(len as u64).min(e.size);
        let first = layout
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        let cache = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        layout
            .manifest
            .chunks()
            .iter()
            .zip(&layout.starts)
            .skip(first)
            .take_while(|&(_, &start)| start < end)
            .any(|(c, _)| cache.lru.peek(&c.id).is_none() && not_local(&c.id))
    }

    fn local_state(&self, content: &ContentRef) -> Result<Option<&'static str>, BaseError> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let e = entry_of(content)?;
        Ok(Some(local_state(&remote.local, &e).0.as_str()))
    }

    fn pinned(&self, p: &str) -> Option<bool> {
        let od = self.ondemand.as_ref()?;
        Some(od.pinned_by(p).is_some())
    }

    fn set_pin(&self, p: &str, on: bool) -> Result<bool, BaseError> {
        let Some(od) = &self.ondemand else {
            return Ok(false);
        };
        let vp = path(p)?;
        let r = if on {
            od.pin(&vp).map(|_| ())
        } else {
            match od.unpin(&vp) {
                Ok(false) if od.pinned_by(p).is_some() => {
                    // Inside a pinned tree: only that pin can be removed.
                    return Err(BaseError::Io(std::io::Error::from_raw_os_error(
                        libc::EPERM,
                    )));
                }
                r => r.map(|_| ()),
            }
        };
        r.map_err(|e| BaseError::Other(format!("{e:#}")))?;
        Ok(true)
    }

    fn get(&self, p: &str) -> Result<Option<BaseEntry>, BaseError> {
        let view = self.current();
        Ok(view
            .get(&path(p)?)
            .map_err(vault_err)?
            .and_then(|(_, e)| to_base(&e)))
    }

    fn children(&self, dir: &str) -> Result<BaseChildren<'_>, BaseError> {
        // Collected per call: the FUSE layer snapshots a directory's names at opendir anyway,
        // so this is O(directory), never O(vault).
        let view = self.current();
        let mut out = Vec::new();
        for item in view.list_dir(&path(dir)?).map_err(vault_err)? {
            let d = item.map_err(vault_err)?;
            if let Some(b) = to_base(&d.entry) {
                out.push(Ok((d.name, b)));
            }
        }
        Ok(Box::new(out.into_iter()))
    }

    fn read(&self, entry: &BaseEntry, offset: u64, buf: &mut [u8]) -> Result<usize, BaseError> {
        if offset >= entry.size || buf.is_empty() {
            return Ok(0);
        }
        let e = entry_of(&entry.content)?;
        if offset >= e.size {
            return Ok(0);
        }
        if let Content::Inline(bytes) = &e.content {
            if bytes.len() as u64 != e.size {
                return Err(self.bad_content(
                    &e,
                    format!(
                        "entry says {} bytes but holds {} inline",
                        e.size,
                        bytes.len()
                    ),
                ));
            }
            // offset < size == bytes.len(), so it fits in usize.
            let start = offset as usize;
            let n = buf.len().min(bytes.len() - start);
            buf[..n].copy_from_slice(&bytes[start..start + n]);
            return Ok(n);
        }
        if let Some(od) = &self.ondemand {
            od.touch(entry.content.as_bytes(), &e);
        }
        let layout = self.layout(&entry.content, &e.content)?;
        if layout.manifest.size() != e.size {
            return Err(self.bad_content(
                &e,
                format!(
                    "entry says {} bytes but its chunks add up to {}",
                    e.size,
                    layout.manifest.size()
                ),
            ));
        }
        let mut done = 0usize;
        let mut pos = offset;
        while done < buf.len() && pos < e.size {
            // The last chunk starting at or before `pos`; there is one, since pos < size
            // means at least one chunk and starts[0] == 0.
            let idx = layout
                .starts
                .partition_point(|&s| s <= pos)
                .saturating_sub(1);
            let chunk = self.chunk(&e, idx, &layout)?;
            // Both hold after the checks above (chunk length == manifest length, manifest
            // sum == size); checked anyway so a logic slip is an error, not a panic.
            let within = usize::try_from(pos - layout.starts[idx])
                .ok()
                .filter(|&w| w < chunk.len())
                .ok_or_else(|| {
                    self.bad_content(&e, format!("offset {pos} is outside chunk {idx}"))
                })?;
            let n = (buf.len() - done).min(chunk.len() - within);
            buf[done..done + n].copy_from_slice(&chunk[within..within + n]);
            done += n;
            pos += n as u64;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_crypto::{AgeIdentity, ContentKey, DeviceKey, VaultSecret};
    use cairn_store::{ChunkRef, ChunkSealer, FileManifest};
    use cairn_tree::MemoryNodeStore;
    use cairn_vault::{Attrs, Blobs, Change, Keyring, MemoryBlobs, Vault, content_from_manifest};

    use crate::faults::FaultKind;
    use crate::sink::view_of;

    struct Fixture {
        vault: Vault,
        blobs: Arc<MemoryBlobs>,
        sealer: ChunkSealer,
        writer: DeviceKey,
    }

    fn fixture() -> Fixture {
        let identity = AgeIdentity::generate();
        let secret = VaultSecret::from_bytes([5; 32]);
        let keys = Keyring {
            vault: secret.vault_id(),
            recipients: vec![identity.recipient()],
            history: Vec::new(),
            identity,
        };
        let blobs = Arc::new(MemoryBlobs::new());
        let stores = VaultStores::new(Arc::new(MemoryNodeStore::new()), blobs.clone());
        let writer = DeviceKey::from_bytes([6; 32]);
        let content_key: ContentKey = secret.content_key();
        Fixture {
            vault: Vault::new(stores, keys, writer.clone()),
            blobs,
            sealer: ChunkSealer::new(&content_key),
            writer,
        }
    }

    fn attrs() -> Attrs {
        Attrs {
            mode: 0o644,
            mtime_ns: 1,
            xattrs: Default::default(),
        }
    }

    impl Fixture {
        /// A chunk holding `plain`, whose manifest entry claims `claimed` bytes.
        fn chunk(&self, plain: &[u8], claimed: u32) -> ChunkRef {
            let sealed = self.sealer.seal(plain);
            self.blobs.put(&sealed.bytes).unwrap();
            ChunkRef {
                id: sealed.id,
                len: claimed,
                key: sealed.key,
            }
        }

        fn write(&mut self, path: &str, size: u64, content: Content) {
            self.vault
                .commit(
                    [(
                        VaultPath::new(path).unwrap(),
                        Change::Write {
                            attrs: attrs(),
                            size,
                            content,
                        },
                    )],
                    1_000,
                )
                .unwrap();
        }

        fn base(&self, faults: &Arc<PeerFaults>) -> VaultBase {
            VaultBase::new(self.vault.stores().clone(), view_of(self.vault.source()))
                .with_faults(faults.clone())
        }
    }

    /// Reads the whole file the way the FUSE layer does, in 4 KiB pieces.
    fn read_all(base: &VaultBase, path: &str) -> Result<Vec<u8>, BaseError> {
        let e = base.get(path)?.expect("listed");
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = base.read(&e, out.len() as u64, &mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    fn noise(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn files_that_contradict_their_manifest_fail_alone_and_name_the_sender() {
        let mut f = fixture();
        let good = noise(3_000, 1);
        let r = f.chunk(&good, 3_000);
        f.write("good.bin", 3_000, Content::Chunks(vec![r]));
        f.write("small.txt", 5, Content::Inline(b"hello".to_vec()));
        // A short chunk: the manifest (and the entry) claim 3000 bytes, it holds 1000.
        let r = f.chunk(&noise(1_000, 2), 3_000);
        f.write("short.bin", 3_000, Content::Chunks(vec![r]));
        // A long chunk: claims 500, holds 1000; a second chunk follows it.
        let a = f.chunk(&noise(1_000, 3), 500);
        let b = f.chunk(&noise(700, 4), 700);
        f.write("long.bin", 1_200, Content::Chunks(vec![a, b]));
        // A size that lies: a 49-chunk list of 4900 bytes under an entry of 10000 bytes.
        let refs: Vec<ChunkRef> = (0..49)
            .map(|i| f.chunk(&noise(100, 10 + i as u8), 100))
            .collect();
        let manifest = FileManifest::new(refs).unwrap();
        let (content, real) =
            content_from_manifest(f.blobs.as_ref(), &f.sealer, &manifest).unwrap();
        assert!(matches!(content, Content::ChunkList { .. }));
        assert_eq!(real, 4_900);
        f.write("lying.bin", 10_000, content.clone());
        // And one that claims less than it has: reads must not run past the entry either.
        f.write("under.bin", 1_000, content);

        let sender = DeviceKey::generate().device_id();
        let faults = Arc::new(PeerFaults::default());
        for p in ["short.bin", "long.bin", "lying.bin", "under.bin"] {
            let view = view_of(f.vault.source());
            let (_, e) = view.get(&VaultPath::new(p).unwrap()).unwrap().unwrap();
            faults.note_origin(&e, sender);
        }
        let base = f.base(&faults);

        for p in ["short.bin", "long.bin", "lying.bin", "under.bin"] {
            let err = read_all(&base, p).expect_err(p);
            // `Other` is what the FUSE layer answers with EIO.
            assert!(matches!(err, BaseError::Other(_)), "{p}: {err:?}");
            // Reading again fails the same way (no poisoned caches, no panic).
            assert!(read_all(&base, p).is_err(), "{p}");
        }
        // A read from the middle of the short chunk's claimed range, past its real end.
        let e = base.get("short.bin").unwrap().unwrap();
        assert!(base.read(&e, 2_000, &mut [0u8; 100]).is_err());

        // Everything else keeps being served, byte-identical.
        assert_eq!(read_all(&base, "good.bin").unwrap(), good);
        assert_eq!(read_all(&base, "small.txt").unwrap(), b"hello");

        let list = faults.list();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].device, sender.to_string());
        assert_eq!(list[0].kind, FaultKind::BadFile);
        assert!(list[0].count >= 4);
        assert!(list[0].detail.contains(&sender.short()));
    }

    #[test]
    fn without_a_known_origin_the_version_author_is_named() {
        let mut f = fixture();
        let r = f.chunk(&noise(10, 1), 20);
        f.write("short.bin", 20, Content::Chunks(vec![r]));
        let faults = Arc::new(PeerFaults::default());
        let base = f.base(&faults);
        assert!(read_all(&base, "short.bin").is_err());
        let list = faults.list();
        assert_eq!(list[0].device, f.writer.device_id().to_string());
        assert!(
            list[0].detail.contains("version stamp"),
            "{}",
            list[0].detail
        );
    }
}
