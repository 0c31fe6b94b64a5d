//! Content-addressed, verified blob store on local disk.
//!
//! Layout: `<root>/<first 2 hex chars of id>/<remaining 62 hex chars>`. The two-level
//! fan-out keeps directories small enough for fast lookups on every common filesystem
//! (256 dirs; one million blobs is ~4k entries per dir).
//!
//! Writes are atomic: bytes go to a uniquely named temp file beside the destination and
//! are renamed over it. Two writers of the same id race harmlessly because both rename
//! complete files with identical content. Readers therefore never see partial blobs, and
//! every read re-hashes the bytes so silent disk corruption surfaces as
//! [`StoreError::Corrupt`] instead of wrong data.
//!
//! Durability is chosen per write (see [`Durability`]).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use crate::error::{Result, StoreError};
use crate::id::ChunkId;

pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// When a write must be on stable storage.
///
/// `Immediate` costs two fsyncs per new blob (file + directory), which on ext4 is about
/// 2 ms each: a 1 GiB import of 64 KiB chunks would spend over a minute in fsync. `Batch`
/// skips them and relies on one [`BlobStore::sync`] at the end of a logical operation; a
/// crash before that sync may lose blobs written since the last sync (never corrupt or
/// partial ones: the rename is still atomic, and reads verify hashes). Nothing that
/// references a batched blob may be made durable before `sync` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    #[default]
    Immediate,
    Batch,
}

#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    /// Set when a batched write happened since the last `sync`, so `sync` is free otherwise.
    unsynced: AtomicBool,
    /// While a sweep runs (see [`crate::sweep`]): every id written or found present since it
    /// began, which the sweep must not remove. `None` otherwise, so writes cost nothing extra.
    pub(crate) touched: Mutex<Option<HashSet<ChunkId>>>,
}

impl BlobStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root)
            .map_err(|e| StoreError::io("creating the blob store at", &root, e))?;
        // Creating all fan-out dirs up front costs one root fsync per open that creates any,
        // instead of one per directory on the write path.
        let mut created = false;
        for prefix in 0..=255u8 {
            let dir = root.join(hex::encode([prefix]));
            match fs::create_dir(&dir) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("creating", dir, e)),
            }
        }
        if created {
            sync_dir(&root)?;
        }
        Ok(Self {
            root,
            unsynced: AtomicBool::new(false),
            touched: Mutex::new(None),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this id lives (whether or not it exists).
    pub fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(&hex[2..])
    }

    /// Stores `bytes` and returns their id. Idempotent: an existing blob with the same id
    /// and size is kept as is.
    pub fn put(&self, bytes: &[u8], durability: Durability) -> Result<ChunkId> {
        let id = ChunkId::of(bytes);
        self.put_with_id(id, bytes, durability)?;
        Ok(id)
    }

    /// Stores bytes whose id the caller has already verified, saving a hash pass: blobs
    /// fetched from peers, which iroh-blobs checks against the id while they stream in.
    /// Returns whether a new file was written. Not for unverified bytes: a wrong id would
    /// only be caught (as `Corrupt`) when the blob is read.
    pub fn put_verified(&self, id: ChunkId, bytes: &[u8], durability: Durability) -> Result<bool> {
        self.put_with_id(id, bytes, durability)
    }

    /// Like [`put`](Self::put) for callers that just computed the id, saving a hash pass.
    /// Returns whether a new file was written. The id is not re-checked here; a wrong one
    /// would be caught as `Corrupt` by every read.
    pub(crate) fn put_with_id(
        &self,
        id: ChunkId,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<bool> {
        debug_assert_eq!(id, ChunkId::of(bytes));
        // Before the presence check: a sweep that has not removed the blob yet will now keep
        // it, and one that already did makes the check below fail, so it is written again.
        self.note_written(id);
        let dest = self.path_of(&id);
        // The size check is a cheap guard against a truncated leftover being treated as
        // present; full verification is `verify`'s job.
        if let Ok(meta) = fs::metadata(&dest)
            && meta.len() == bytes.len() as u64
        {
            self.settle_existing(&dest, durability)?;
            return Ok(false);
        }
        let dir = dest.parent().unwrap_or(&self.root);
        let (mut file, temp) = self.create_temp(dir)?;
        let written = file
            .write_all(bytes)
            .map_err(|e| StoreError::io("writing", &temp, e))
            .and_then(|()| self.finish_temp(file, &temp, &dest, durability));
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written.map(|()| true)
    }

    /// Stores a blob of any size from a stream, holding only a small buffer in memory.
    pub fn put_reader(&self, mut reader: impl Read, durability: Durability) -> Result<ChunkId> {
        // The id is only known at the end, so stage in the root: same filesystem, so the
        // final rename is still atomic.
        let (mut file, temp) = self.create_temp(&self.root)?;
        let result = (|| {
            let mut hasher = blake3::Hasher::new();
            let mut len = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(StoreError::Input(e)),
                };
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])
                    .map_err(|e| StoreError::io("writing", &temp, e))?;
                len += n as u64;
            }
            let id = ChunkId::from(hasher.finalize());
            self.note_written(id);
            let dest = self.path_of(&id);
            if fs::metadata(&dest).is_ok_and(|m| m.len() == len) {
                let _ = fs::remove_file(&temp);
                self.settle_existing(&dest, durability)?;
                return Ok(id);
            }
            self.ensure_dir(dest.parent().unwrap_or(&self.root))?;
            self.finish_temp(file, &temp, &dest, durability)?;
            Ok(id)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    fn note_written(&self, id: ChunkId) {
        if let Some(set) = self
            .touched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            set.insert(id);
        }
    }

    /// An existing blob may have been written in batch mode by another handle or process
    /// that has not synced yet, so it gets the durability this caller asked for.
    fn settle_existing(&self, dest: &Path, durability: Durability) -> Result<()> {
        match durability {
            Durability::Immediate => {
                sync_path(dest)?;
                sync_parent(dest)
            }
            Durability::Batch => {
                self.unsynced.store(true, Ordering::Release);
                Ok(())
            }
        }
    }

    fn create_temp(&self, dir: &Path) -> Result<(File, PathBuf)> {
        loop {
            let temp = dir.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
            match OpenOptions::new().write(true).create_new(true).open(&temp) {
                Ok(f) => return Ok((f, temp)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                // Someone removed a fan-out dir after `open`; recreate it.
                Err(e) if e.kind() == io::ErrorKind::NotFound && dir != self.root => {
                    self.ensure_dir(dir)?;
                }
                Err(e) => return Err(StoreError::io("creating a temp file in", dir, e)),
            }
        }
    }

    fn ensure_dir(&self, dir: &Path) -> Result<()> {
        match fs::create_dir(dir) {
            // A new directory entry is only durable once its parent is synced. Rare (only
            // after fan-out dirs were removed), so do it regardless of durability mode.
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.root)
                    .map_err(|e| StoreError::io("creating", &self.root, e))?;
                self.ensure_dir(dir)
            }
            Err(e) => Err(StoreError::io("creating", dir, e)),
        }
    }

    fn finish_temp(
        &self,
        file: File,
        temp: &Path,
        dest: &Path,
        durability: Durability,
    ) -> Result<()> {
        let batch_here = durability == Durability::Batch && syncfs_available();
        if !batch_here {
            // Without syncfs a batch cannot be flushed later in one call, so each file
            // is synced now and only directories wait for `sync`.
            file.sync_all()
                .map_err(|e| StoreError::io("syncing", temp, e))?;
        }
        drop(file);
        fs::rename(temp, dest).map_err(|e| StoreError::io("renaming into place", dest, e))?;
        match durability {
            Durability::Immediate => sync_parent(dest),
            Durability::Batch => {
                self.unsynced.store(true, Ordering::Release);
                Ok(())
            }
        }
    }

    /// Makes every blob written with [`Durability::Batch`] so far durable.
    ///
    /// On Linux this is one `syncfs(2)` of the store's filesystem, which flushes all new
    /// files and directory entries together (and, as a side effect, other dirty data on that
    /// filesystem). Elsewhere files were already synced at write time and only the fan-out
    /// directories are synced here.
    pub fn sync(&self) -> Result<()> {
        if !self.unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let result = self.sync_all_now();
        if result.is_err() {
            self.unsynced.store(true, Ordering::Release);
        }
        result
    }

    #[cfg(target_os = "linux")]
    fn sync_all_now(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let dir = File::open(&self.root).map_err(|e| StoreError::io("opening", &self.root, e))?;
        // SAFETY: `dir` is an open descriptor that outlives the call; syncfs only reads it.
        let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(StoreError::io("syncing the filesystem of", &self.root, e));
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn sync_all_now(&self) -> Result<()> {
        for entry in read_dir(&self.root)? {
            let entry = entry.map_err(|e| StoreError::io("listing", &self.root, e))?;
            if is_fanout_name(&entry.file_name().to_string_lossy()) {
                sync_dir(&entry.path())?;
            }
        }
        sync_dir(&self.root)
    }

    pub fn has(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path_of(id);
        path.try_exists()
            .map_err(|e| StoreError::io("checking", &path, e))
    }

    /// Reads a whole blob into memory, refusing it unless it hashes to `id`.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let path = self.path_of(id);
        let bytes = fs::read(&path).map_err(|e| not_found_or_io(id, &path, e))?;
        let actual = ChunkId::of(&bytes);
        if actual != *id {
            return Err(corrupt(id, actual));
        }
        Ok(bytes)
    }

    /// Opens a blob for streaming. The whole blob is hashed before this returns, so the
    /// reader never hands out unverified bytes; the second pass is usually served from the
    /// page cache. (A process with write access to the store could still change the file
    /// afterwards; that is outside what a local store can defend against.)
    pub fn open_blob(&self, id: &ChunkId) -> Result<BlobReader> {
        let path = self.path_of(id);
        let mut file = File::open(&path).map_err(|e| not_found_or_io(id, &path, e))?;
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(&mut file)
            .map_err(|e| StoreError::io("reading", &path, e))?;
        let actual = ChunkId::from(hasher.finalize());
        if actual != *id {
            return Err(corrupt(id, actual));
        }
        let len = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.metadata())
            .map_err(|e| StoreError::io("reading", &path, e))?
            .len();
        Ok(BlobReader { file, len })
    }

    /// Checks one blob against its id.
    pub fn verify(&self, id: &ChunkId) -> Result<()> {
        self.open_blob(id).map(drop)
    }

    /// Checks every blob; returns the ids whose content no longer matches (for `cairn
    /// verify`, which then removes and refetches them).
    pub fn verify_all(&self) -> Result<Vec<ChunkId>> {
        let mut corrupt = Vec::new();
        for id in self.iter()? {
            let id = id?;
            match self.verify(&id) {
                Ok(()) => {}
                Err(StoreError::Corrupt { .. }) => corrupt.push(id),
                // Removed concurrently: nothing to verify.
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(corrupt)
    }

    /// Deletes a blob. Returns whether it existed.
    pub fn remove(&self, id: &ChunkId) -> Result<bool> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io("removing", &path, e)),
        }
    }

    /// Deletes temp files left behind by writers that crashed, if they are older than
    /// `min_age` (younger ones may belong to a write in progress). Returns how many went.
    pub fn remove_stale_temps(&self, min_age: Duration) -> Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        let mut dirs = vec![self.root.clone()];
        for entry in read_dir(&self.root)? {
            let entry = entry.map_err(|e| StoreError::io("listing", &self.root, e))?;
            if is_fanout_name(&entry.file_name().to_string_lossy()) {
                dirs.push(entry.path());
            }
        }
        for dir in dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(e) => return Err(StoreError::io("listing", dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io("listing", &dir, e))?;
                if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    continue;
                }
                let old_enough = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() >= min_age)
                    .unwrap_or(false);
                if old_enough && fs::remove_file(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Iterates over the ids of all stored blobs, in no particular order, without
    /// collecting them first.
    pub fn iter(&self) -> Result<BlobIter> {
        Ok(BlobIter {
            root: self.root.clone(),
            outer: read_dir(&self.root)?,
            inner: None,
        })
    }

    /// All stored ids, sorted.
    pub fn list(&self) -> Result<Vec<ChunkId>> {
        let mut ids = self.iter()?.collect::<Result<Vec<_>>>()?;
        ids.sort_unstable();
        Ok(ids)
    }
}

/// A verified blob opened for streaming reads.
#[derive(Debug)]
pub struct BlobReader {
    file: File,
    len: u64,
}

impl BlobReader {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Iterator over stored ids; temp files and foreign files are skipped.
pub struct BlobIter {
    root: PathBuf,
    outer: fs::ReadDir,
    inner: Option<(String, PathBuf, fs::ReadDir)>,
}

impl Iterator for BlobIter {
    type Item = Result<ChunkId>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((prefix, dir, inner)) = &mut self.inner {
                match inner.next() {
                    Some(Ok(entry)) => {
                        let name = entry.file_name();
                        let name = name.to_string_lossy();
                        if name.len() == 62
                            && let Ok(id) = format!("{prefix}{name}").parse::<ChunkId>()
                            // Only canonical lower-case names: an upper-case twin would
                            // otherwise be listed as an id whose path is elsewhere.
                            && id.to_hex()[2..] == *name
                        {
                            return Some(Ok(id));
                        }
                        continue;
                    }
                    Some(Err(e)) => return Some(Err(StoreError::io("listing", dir.clone(), e))),
                    None => self.inner = None,
                }
            }
            match self.outer.next()? {
                Ok(entry) => {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !is_fanout_name(&name) {
                        continue;
                    }
                    let path = entry.path();
                    match fs::read_dir(&path) {
                        Ok(rd) => self.inner = Some((name, path, rd)),
                        // Raced with removal, or not a directory: nothing to list.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {}
                        Err(e) => return Some(Err(StoreError::io("listing", path, e))),
                    }
                }
                Err(e) => return Some(Err(StoreError::io("listing", self.root.clone(), e))),
            }
        }
    }
}

pub(crate) fn is_fanout_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn read_dir(dir: &Path) -> Result<fs::ReadDir> {
    fs::read_dir(dir).map_err(|e| StoreError::io("listing", dir, e))
}

fn not_found_or_io(id: &ChunkId, path: &Path, e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound { id: *id }
    } else {
        StoreError::io("reading", path, e)
    }
}

fn corrupt(id: &ChunkId, actual: ChunkId) -> StoreError {
    tracing::warn!(%id, %actual, "refusing corrupt blob");
    StoreError::Corrupt { id: *id, actual }
}

fn syncfs_available() -> bool {
    cfg!(target_os = "linux")
}

fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("syncing", path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    sync_path(dir)
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}
