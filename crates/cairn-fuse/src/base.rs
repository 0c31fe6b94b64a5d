use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

use cairn_overlay::path::parent_of;
use cairn_overlay::{Data, Kind};

use crate::sink::{FlushBatch, FlushError, FlushSink};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// The base layer's handle on a file's content. Opaque to the FUSE layer: it is only handed
/// back to [`BaseLayer::read`], and stored in the overlay (as [`Data::Content`]) when a base
/// file is renamed, so it must stay meaningful for as long as the base may be asked to read
/// it — e.g. the engine's serialised chunk list, or an id into a content table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContentRef(Arc<[u8]>);

impl ContentRef {
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> ContentRef {
        ContentRef(bytes.into())
    }

    pub fn empty() -> ContentRef {
        ContentRef(Arc::from(&[][..]))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One entry of the merged, read-only view the daemon supplies (its snapshot plus peers').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseEntry {
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Symlink target; empty for other kinds.
    pub target: Vec<u8>,
    pub content: ContentRef,
}

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("base layer I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("content is not available (not stored locally and no peer could supply it): {0}")]
    Unavailable(String),
    #[error("base layer error: {0}")]
    Other(String),
}

impl BaseError {
    pub(crate) fn errno(&self) -> i32 {
        match self {
            BaseError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            BaseError::Unavailable(_) | BaseError::Other(_) => libc::EIO,
        }
    }
}

pub type BaseChildren<'a> =
    Box<dyn Iterator<Item = Result<(String, BaseEntry), BaseError>> + Send + 'a>;

/// The read-only merged view below the overlay. Paths are vault paths: relative,
/// '/'-separated, "" for the root.
pub trait BaseLayer: Send + Sync {
    fn get(&self, path: &str) -> Result<Option<BaseEntry>, BaseError>;
    /// Direct children of `dir`, sorted by name (bytewise), streamed.
    fn children(&self, dir: &str) -> Result<BaseChildren<'_>, BaseError>;
    /// Reads file content at `offset`; may be slow (fetching from peers). Returns the number
    /// of bytes read, 0 at or past the end.
    fn read(&self, entry: &BaseEntry, offset: u64, buf: &mut [u8]) -> Result<usize, BaseError>;
    /// Reads from `offset` until `buf` is full or the content ends (a layer may return short
    /// reads, at a chunk boundary for instance). Returns the number of bytes read.
    fn read_full(
        &self,
        entry: &BaseEntry,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, BaseError> {
        let mut filled = 0usize;
        while filled < buf.len() {
            let n = self.read(entry, offset + filled as u64, &mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        Ok(filled)
    }
    /// Whether reading `len` bytes at `offset` may wait on the network (content this device
    /// does not hold yet). Such reads are served off the kernel request threads, so a peer
    /// that stops answering cannot tie them all up. Must itself answer from local state.
    fn may_wait(&self, _entry: &BaseEntry, _offset: u64, _len: usize) -> bool {
        false
    }
    /// A number that moves whenever what [`Self::get`] and [`Self::children`] answer may
    /// have changed (it must move after the change is visible, never only before), or `None`
    /// for a layer that cannot tell: then nothing derived from a listing is cached (the
    /// subdirectory counts behind a directory's `st_nlink`).
    fn version(&self) -> Option<u64> {
        None
    }
    /// What the mount root's `user.cairn.status` says instead of `synced`, if anything (for
    /// instance, deletions held by the mass-delete guard).
    fn root_note(&self) -> Option<String> {
        None
    }
    /// How much of `content` is on this device (`user.cairn.local`: `full`, `partial` or
    /// `none`); `None` for a layer that holds everything it serves. Must not fetch.
    fn local_state(&self, _content: &ContentRef) -> Result<Option<&'static str>, BaseError> {
        Ok(None)
    }
    /// Whether `path` is pinned, itself or by an ancestor (`user.cairn.pin`); `None` for a
    /// layer without pins.
    fn pinned(&self, _path: &str) -> Option<bool> {
        None
    }
    /// Pins or unpins `path`; `Ok(false)` for a layer without pins.
    fn set_pin(&self, _path: &str, _on: bool) -> Result<bool, BaseError> {
        Ok(false)
    }
}

#[derive(Default)]
struct MemState {
    entries: BTreeMap<String, BaseEntry>,
    blobs: HashMap<u64, Arc<[u8]>>,
    next_blob: u64,
    flushes: u64,
    /// Moves with every write, in the same critical section (see [`BaseLayer::version`]).
    version: u64,
}

impl MemState {
    fn store(&mut self, bytes: Arc<[u8]>) -> ContentRef {
        self.next_blob += 1;
        let id = self.next_blob;
        self.blobs.insert(id, bytes);
        ContentRef::new(id.to_le_bytes().to_vec())
    }

    fn blob(&self, content: &ContentRef) -> Option<Arc<[u8]>> {
        let id = u64::from_le_bytes(content.as_bytes().try_into().ok()?);
        self.blobs.get(&id).cloned()
    }
}

/// An in-memory base layer and flush sink: the model the FUSE layer is tested against. It
/// holds whole file contents in memory, so it is for tests and small vaults only. Content
/// blobs are never freed, which keeps every [`ContentRef`] it ever handed out readable.
pub struct MemBase {
    state: RwLock<MemState>,
}

impl Default for MemBase {
    fn default() -> Self {
        MemBase::new()
    }
}

impl MemBase {
    pub fn new() -> MemBase {
        let base = MemBase {
            state: RwLock::new(MemState::default()),
        };
        base.insert_dir("", 0o755);
        base
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MemState> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        // Readers see the new number only together with whatever this writer changes.
        st.version += 1;
        st
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, MemState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ensure_parents(st: &mut MemState, path: &str) {
        let mut p = parent_of(path);
        while !p.is_empty() && !st.entries.contains_key(p) {
            st.entries.insert(p.to_string(), dir_entry(0o755, 0));
            p = parent_of(p);
        }
    }

    /// Inserts a file (creating missing parent directories).
    pub fn insert_file(&self, path: &str, content: &[u8], mode: u32) {
        let mut st = self.write();
        let content_ref = st.store(Arc::from(content));
        Self::ensure_parents(&mut st, path);
        st.entries.insert(
            path.to_string(),
            BaseEntry {
                kind: EntryKind::File,
                mode,
                mtime_ns: 1_600_000_000_000_000_000,
                size: content.len() as u64,
                xattrs: BTreeMap::new(),
                target: Vec::new(),
                content: content_ref,
            },
        );
    }

    pub fn insert_dir(&self, path: &str, mode: u32) {
        let mut st = self.write();
        Self::ensure_parents(&mut st, path);
        st.entries
            .insert(path.to_string(), dir_entry(mode, 1_600_000_000_000_000_000));
    }

    pub fn insert_symlink(&self, path: &str, target: &[u8]) {
        let mut st = self.write();
        Self::ensure_parents(&mut st, path);
        st.entries.insert(
            path.to_string(),
            BaseEntry {
                kind: EntryKind::Symlink,
                mode: 0o777,
                mtime_ns: 1_600_000_000_000_000_000,
                size: target.len() as u64,
                xattrs: BTreeMap::new(),
                target: target.to_vec(),
                content: ContentRef::empty(),
            },
        );
    }

    pub fn set_xattr(&self, path: &str, name: &[u8], value: &[u8]) {
        if let Some(e) = self.write().entries.get_mut(path) {
            e.xattrs.insert(name.to_vec(), value.to_vec());
        }
    }

    /// Removes an entry and its descendants (a change coming from elsewhere).
    pub fn remove(&self, path: &str) {
        let mut st = self.write();
        remove_subtree(&mut st.entries, path);
    }

    pub fn entry(&self, path: &str) -> Option<BaseEntry> {
        self.read_state().entries.get(path).cloned()
    }

    pub fn file_content(&self, path: &str) -> Option<Vec<u8>> {
        let st = self.read_state();
        let e = st.entries.get(path)?;
        if e.kind != EntryKind::File {
            return None;
        }
        Some(st.blob(&e.content)?.to_vec())
    }

    /// Every path, sorted (the root is "").
    pub fn paths(&self) -> Vec<String> {
        self.read_state().entries.keys().cloned().collect()
    }

    /// How many batches have been applied.
    pub fn flushes(&self) -> u64 {
        self.read_state().flushes
    }
}

fn dir_entry(mode: u32, mtime_ns: i64) -> BaseEntry {
    BaseEntry {
        kind: EntryKind::Dir,
        mode,
        mtime_ns,
        size: 0,
        xattrs: BTreeMap::new(),
        target: Vec::new(),
        content: ContentRef::empty(),
    }
}

fn remove_subtree(entries: &mut BTreeMap<String, BaseEntry>, path: &str) {
    entries.remove(path);
    let (lo, hi) = (format!("{path}/"), format!("{path}0"));
    let doomed: Vec<String> = entries.range(lo..hi).map(|(k, _)| k.clone()).collect();
    for k in doomed {
        entries.remove(&k);
    }
}

impl BaseLayer for MemBase {
    fn get(&self, path: &str) -> Result<Option<BaseEntry>, BaseError> {
        Ok(self.entry(path))
    }

    fn version(&self) -> Option<u64> {
        Some(self.read_state().version)
    }

    fn children(&self, dir: &str) -> Result<BaseChildren<'_>, BaseError> {
        // The state lock cannot travel inside a Send iterator, so the model collects one
        // directory; a real base streams from its tree.
        let st = self.read_state();
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let kids: Vec<Result<(String, BaseEntry), BaseError>> = st
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k.is_empty() && !k[prefix.len()..].contains('/'))
            .map(|(k, e)| Ok((k[prefix.len()..].to_string(), e.clone())))
            .collect();
        Ok(Box::new(kids.into_iter()))
    }

    fn read(&self, entry: &BaseEntry, offset: u64, buf: &mut [u8]) -> Result<usize, BaseError> {
        let blob = self
            .read_state()
            .blob(&entry.content)
            .ok_or_else(|| BaseError::Unavailable("unknown content reference".into()))?;
        let len = blob.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let n = ((len - offset) as usize).min(buf.len());
        buf[..n].copy_from_slice(&blob[offset as usize..offset as usize + n]);
        Ok(n)
    }
}

impl FlushSink for MemBase {
    fn flush(&self, batch: FlushBatch) -> Result<(), FlushError> {
        // Resolve every item's content against the state before the batch: a renamed file's
        // Data::Content and an unchanged Data::Base must not see deletions in the same batch.
        let mut resolved = Vec::with_capacity(batch.items.len());
        {
            let st = self.read_state();
            for item in &batch.items {
                let r = &item.record;
                let content = match (&r.kind, &r.data) {
                    (Kind::File, Data::Staged(_)) => {
                        let staged = item.staged.as_ref().ok_or_else(|| {
                            FlushError::Rejected(format!(
                                "{}: staged data without a file",
                                item.path
                            ))
                        })?;
                        let mut buf = vec![0u8; r.size as usize];
                        staged.file.read_exact_at(&mut buf, 0)?;
                        Some(Content::New(Arc::from(buf)))
                    }
                    (Kind::File, Data::Base) => {
                        let e = st.entries.get(&item.path).ok_or_else(|| {
                            FlushError::Rejected(format!(
                                "{}: unchanged content but the base has no such file",
                                item.path
                            ))
                        })?;
                        Some(Content::Existing(e.content.clone(), e.size))
                    }
                    (Kind::File, Data::Content(c)) => {
                        Some(Content::Existing(ContentRef::new(c.clone()), r.size))
                    }
                    (Kind::File, _) => Some(Content::New(Arc::from(&[][..]))),
                    _ => None,
                };
                resolved.push(content);
            }
        }
        let mut st = self.write();
        for (item, content) in batch.items.into_iter().zip(resolved) {
            let r = item.record;
            if r.kind == Kind::Whiteout {
                remove_subtree(&mut st.entries, &item.path);
                continue;
            }
            let (kind, size, target, content) = match (r.kind, content) {
                (Kind::File, Some(Content::New(bytes))) => {
                    let len = bytes.len() as u64;
                    (EntryKind::File, len, Vec::new(), st.store(bytes))
                }
                (Kind::File, Some(Content::Existing(c, size))) => {
                    (EntryKind::File, size, Vec::new(), c)
                }
                (Kind::Symlink, _) => {
                    let t = match r.data {
                        Data::Target(t) => t,
                        _ => Vec::new(),
                    };
                    (EntryKind::Symlink, t.len() as u64, t, ContentRef::empty())
                }
                _ => (EntryKind::Dir, 0, Vec::new(), ContentRef::empty()),
            };
            Self::ensure_parents(&mut st, &item.path);
            st.entries.insert(
                item.path,
                BaseEntry {
                    kind,
                    mode: r.mode,
                    mtime_ns: r.mtime_ns,
                    size,
                    xattrs: r.xattrs,
                    target,
                    content,
                },
            );
        }
        st.flushes += 1;
        Ok(())
    }
}

enum Content {
    New(Arc<[u8]>),
    Existing(ContentRef, u64),
}
