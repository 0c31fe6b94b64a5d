//! The mount's read side: the engine's merged view presented as a `cairn_fuse::BaseLayer`.
//!
//! File content is read chunk by chunk: a read decrypts only the chunks it touches, and a
//! small LRU of decrypted chunks serves the kernel's sequential 128 KiB requests from one
//! 64 KiB-average chunk without decrypting it again.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, RwLock};

use cairn_fuse::{BaseChildren, BaseEntry, BaseError, BaseLayer, ContentRef, EntryKind};
use cairn_store::{ChunkId, FileManifest, open_chunk};
use cairn_vault::{Content, Entry, MergedView, VaultPath, VaultStores, manifest_of};
use lru::LruCache;

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
        }
    }

    pub fn with_remote(mut self, remote: Arc<LocalOrRemote>) -> Self {
        self.remote = Some(remote);
        self
    }

    pub fn set_view(&self, view: MergedView) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view;
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

    fn chunk(&self, index: usize, layout: &Layout) -> Result<Arc<Vec<u8>>, BaseError> {
        let r = &layout.manifest.chunks()[index];
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
        let plain = Arc::new(
            open_chunk(r.id, &r.key, &sealed).map_err(|e| BaseError::Other(e.to_string()))?,
        );
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
        if let Content::Inline(bytes) = &e.content {
            let start = offset as usize;
            let n = buf.len().min(bytes.len().saturating_sub(start));
            buf[..n].copy_from_slice(&bytes[start..start + n]);
            return Ok(n);
        }
        let layout = self.layout(&entry.content, &e.content)?;
        let mut done = 0usize;
        let mut pos = offset;
        while done < buf.len() && pos < e.size {
            let idx = match layout.starts.binary_search(&pos) {
                Ok(i) => i,
                Err(i) => i - 1,
            };
            let chunk = self.chunk(idx, &layout)?;
            let within = (pos - layout.starts[idx]) as usize;
            let n = (buf.len() - done).min(chunk.len() - within);
            buf[done..done + n].copy_from_slice(&chunk[within..within + n]);
            done += n;
            pos += n as u64;
        }
        Ok(done)
    }
}
