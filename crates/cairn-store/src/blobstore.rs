//! Content-addressed, verified blob store on local disk, in pack files.
//!
//! Layout (format 2, named in `<root>/FORMAT`):
//! - `packs/NNNNNNNN.pack`: blobs appended one after the other (see [`crate::pack`] for the
//!   record format). A pack grows to about [`PACK_TARGET`] and is then sealed.
//! - `packs/NNNNNNNN.dead`: offsets of records in that pack that were removed.
//! - `<2 hex>/<62 hex>`: format 1, one file per blob. Found at open (an old store, or files
//!   put there by hand), they are moved into packs; until then they are read in place.
//!
//! The index (id → pack, offset, length) lives in memory and is rebuilt at open from the
//! record headers, which carry id, length and a checksum: there is no second structure that
//! could disagree with the packs.
//!
//! Writing appends to a pack that only this handle writes to (several handles, in one process
//! or several, each get their own), so appends never interleave. Crash safety: a pack left
//! unsealed by a writer that died has every record re-hashed at the next open, and the torn
//! tail is cut off; what a caller was told is durable was fsynced before, so it is before the
//! cut. Every read re-hashes the bytes, so silent disk corruption surfaces as
//! [`StoreError::Corrupt`] instead of wrong data.
//!
//! Durability is chosen per write (see [`Durability`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::error::{Result, StoreError};
use crate::id::ChunkId;
use crate::pack::{self, HEADER_LEN, Loc, MAX_RECORD, PACK_MAGIC};

pub(crate) const TEMP_PREFIX: &str = ".tmp-";
/// A pack is sealed and a new one started once it reaches this size: big enough that a GiB
/// is a few dozen files, small enough that repacking one moves little data.
pub const PACK_TARGET: u64 = 32 << 20;
const FORMAT_FILE: &str = "FORMAT";
const FORMAT_LINE: &str = "cairn-store 2 packs\n";
const FORMAT_VERSION: u8 = 2;
/// Loose blobs migrated per fsync'd batch; progress is logged after each.
const MIGRATE_BATCH: usize = 1024;

/// When a write must be on stable storage.
///
/// `Immediate` costs an fsync of the pack per new blob. `Batch` skips it and relies on one
/// [`BlobStore::sync`] at the end of a logical operation; a crash before that sync may lose
/// blobs written since the last sync (never corrupt or partial ones: a torn pack tail is cut
/// off at the next open, and reads verify hashes). Nothing that references a batched blob may
/// be made durable before `sync` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    #[default]
    Immediate,
    Batch,
}

#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    packs_dir: PathBuf,
    state: Mutex<State>,
    /// Set when a loose blob file appeared after open (someone wrote format 1 files), so
    /// lookups that miss the index also look for one; cheap to skip otherwise.
    loose_seen: AtomicBool,
    /// While a sweep runs (see [`crate::sweep`]): every id written or found present since it
    /// began, which the sweep must not remove. `None` otherwise, so writes cost nothing extra.
    pub(crate) touched: Mutex<Option<HashSet<ChunkId>>>,
}

#[derive(Debug, Default)]
struct State {
    index: HashMap<ChunkId, Loc>,
    packs: BTreeMap<u32, PackInfo>,
    writer: Option<Writer>,
    /// Appends since the writer's last fsync.
    unsynced: bool,
    /// A pack file was created or removed since the packs directory was last fsynced.
    dir_unsynced: bool,
    /// Packs whose `.dead` file got entries since the last sync.
    dead_unsynced: HashSet<u32>,
}

#[derive(Debug)]
struct PackInfo {
    file: Arc<File>,
    /// How far this pack is indexed (end of the last good record, or of the seal).
    len: u64,
    /// Bytes of records the index points to.
    live: u64,
    sealed: bool,
}

#[derive(Debug)]
struct Writer {
    n: u32,
    /// Holds the exclusive `flock` that tells other handles this pack is being written.
    file: Arc<File>,
    len: u64,
}

/// Where a blob's bytes are, for diagnostics and tests (damaging a blob on purpose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl BlobStore {
    /// Opens (creating if needed) a store rooted at `root`: indexes the packs, repairs a pack
    /// whose writer died (cuts its torn tail, seals it), and moves loose format 1 blob files
    /// into packs, logging progress.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let packs_dir = root.join("packs");
        fs::create_dir_all(&packs_dir)
            .map_err(|e| StoreError::io("creating the blob store at", &root, e))?;
        check_format(&root)?;
        let store = Self {
            root,
            packs_dir,
            state: Mutex::new(State::default()),
            loose_seen: AtomicBool::new(false),
            touched: Mutex::new(None),
        };
        store.load()?;
        store.migrate_loose()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pack_path(&self, n: u32) -> PathBuf {
        self.packs_dir.join(pack::pack_name(n))
    }

    fn loose_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(&hex[2..])
    }

    /// Reads every pack's headers into the index.
    fn load(&self) -> Result<()> {
        let mut numbers = Vec::new();
        for entry in read_dir(&self.packs_dir)? {
            let entry = entry.map_err(|e| StoreError::io("listing", &self.packs_dir, e))?;
            if let Some(n) = pack::parse_pack_name(&entry.file_name().to_string_lossy()) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut st = self.state();
        for n in numbers {
            self.load_pack(&mut st, n)?;
        }
        Ok(())
    }

    fn load_pack(&self, st: &mut State, n: u32) -> Result<()> {
        let path = self.pack_path(n);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            // Repacked away by another handle since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("opening", &path, e)),
        };
        let len = file_len(&file, &path)?;
        let quick =
            pack::scan(&file, n, len, false).map_err(|e| StoreError::io("reading", &path, e))?;
        let scan = if quick.sealed && !quick.bad_tail {
            quick
        } else if ends_with_seal(&file, len) {
            // Sealed, so it was complete and fsynced: damage inside is bit rot, not a torn
            // write. Keep the bytes, index what checks out.
            tracing::warn!(pack = %path.display(), indexed = quick.valid_len, "pack damaged in the middle; later blobs in it are not indexed (they are refetched from peers when needed)");
            pack::Scan {
                sealed: true,
                ..quick
            }
        } else if try_lock(&file) {
            // Unsealed and nobody writes it: its writer died. Every record is checked, the
            // torn tail goes, and the seal spares the next open this pass.
            let mut full =
                pack::scan(&file, n, len, true).map_err(|e| StoreError::io("reading", &path, e))?;
            if full.valid_len < PACK_MAGIC.len() as u64 {
                // Created but its first write never reached the disk.
                file.write_all_at(&PACK_MAGIC, 0)
                    .map_err(|e| StoreError::io("repairing", &path, e))?;
                full.valid_len = PACK_MAGIC.len() as u64;
            }
            tracing::info!(pack = %path.display(), kept = full.valid_len, cut = len - full.valid_len, "repairing a pack left open by a crash");
            seal_at(&file, full.valid_len, &path)?;
            unlock(&file);
            st.dir_unsynced = true;
            pack::Scan {
                valid_len: full.valid_len + HEADER_LEN,
                sealed: true,
                bad_tail: false,
                records: full.records,
            }
        } else {
            // Another handle is appending: index what is complete, touch nothing.
            pack::scan(&file, n, len, true).map_err(|e| StoreError::io("reading", &path, e))?
        };
        let dead = self.read_dead(n)?;
        let info = PackInfo {
            file: Arc::new(file),
            len: scan.valid_len,
            live: 0,
            sealed: scan.sealed,
        };
        st.packs.insert(n, info);
        for (id, loc) in scan.records {
            if !dead.contains(&loc.offset) {
                index_record(st, id, loc);
            }
        }
        Ok(())
    }

    fn read_dead(&self, n: u32) -> Result<HashSet<u64>> {
        let path = self.packs_dir.join(pack::dead_name(n));
        match fs::read(&path) {
            Ok(bytes) => Ok(pack::parse_dead(&bytes).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(e) => Err(StoreError::io("reading", &path, e)),
        }
    }

    /// Indexes packs other handles created or grew since this one looked (on a lookup that
    /// missed: another process may have just written the blob).
    fn refresh(&self, st: &mut State) -> Result<()> {
        let own = st.writer.as_ref().map(|w| w.n);
        for entry in read_dir(&self.packs_dir)? {
            let entry = entry.map_err(|e| StoreError::io("listing", &self.packs_dir, e))?;
            let Some(n) = pack::parse_pack_name(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            if Some(n) == own {
                continue;
            }
            let Some(info) = st.packs.get(&n) else {
                self.load_pack(st, n)?;
                continue;
            };
            if info.sealed {
                continue;
            }
            let path = self.pack_path(n);
            let len = file_len(&info.file, &path)?;
            if len <= info.len {
                continue;
            }
            let scan = pack::scan_from(&info.file, n, info.len, len, true)
                .map_err(|e| StoreError::io("reading", &path, e))?;
            if let Some(info) = st.packs.get_mut(&n) {
                info.len = scan.valid_len;
                info.sealed = scan.sealed;
            }
            for (id, loc) in scan.records {
                index_record(st, id, loc);
            }
        }
        Ok(())
    }

    /// Stores `bytes` and returns their id. Idempotent: a blob already present is kept.
    pub fn put(&self, bytes: &[u8], durability: Durability) -> Result<ChunkId> {
        let id = ChunkId::of(bytes);
        self.put_with_id(id, bytes, durability)?;
        Ok(id)
    }

    /// Stores bytes whose id the caller has already verified, saving a hash pass: blobs
    /// fetched from peers, which iroh-blobs checks against the id while they stream in.
    /// Returns whether the blob was new. Not for unverified bytes: a wrong id would only be
    /// caught (as `Corrupt`) when the blob is read.
    pub fn put_verified(&self, id: ChunkId, bytes: &[u8], durability: Durability) -> Result<bool> {
        self.put_with_id(id, bytes, durability)
    }

    /// Like [`put`](Self::put) for callers that just computed the id, saving a hash pass.
    /// Returns whether the blob was new.
    pub(crate) fn put_with_id(
        &self,
        id: ChunkId,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<bool> {
        debug_assert_eq!(id, ChunkId::of(bytes));
        if bytes.len() as u64 > MAX_RECORD {
            return Err(StoreError::io(
                "storing a blob in",
                &self.packs_dir,
                io::Error::new(io::ErrorKind::InvalidInput, "blob larger than 1 GiB"),
            ));
        }
        // Before the presence check: a sweep that has not removed the blob yet will now keep
        // it, and one that already did makes the check below fail, so it is written again.
        self.note_written(id);
        let mut st = self.state();
        if let Some(loc) = st.index.get(&id).copied() {
            return self
                .settle_existing(&mut st, loc, durability)
                .map(|()| false);
        }
        self.append(&mut st, &id, bytes)?;
        if durability == Durability::Immediate {
            self.sync_locked(&mut st)?;
        }
        Ok(true)
    }

    /// Stores a blob from a stream. The blob is held in memory (blobs are chunks and nodes of
    /// at most a few MiB; more than 1 GiB is refused).
    pub fn put_reader(&self, reader: impl Read, durability: Durability) -> Result<ChunkId> {
        let mut bytes = Vec::new();
        reader
            .take(MAX_RECORD + 1)
            .read_to_end(&mut bytes)
            .map_err(StoreError::Input)?;
        self.put(&bytes, durability)
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

    /// An existing blob may sit in a pack written in batch mode, by this or another handle,
    /// that was not synced yet, so it gets the durability this caller asked for.
    fn settle_existing(&self, st: &mut State, loc: Loc, durability: Durability) -> Result<()> {
        if durability == Durability::Batch {
            return Ok(());
        }
        if st.writer.as_ref().is_some_and(|w| w.n == loc.pack) {
            return self.sync_locked(st);
        }
        match st.packs.get(&loc.pack) {
            Some(info) if !info.sealed => info
                .file
                .sync_data()
                .map_err(|e| StoreError::io("syncing", self.pack_path(loc.pack), e)),
            _ => Ok(()),
        }
    }

    /// Appends one record to this handle's pack, starting a new pack when there is none or
    /// the current one is full.
    fn append(&self, st: &mut State, id: &ChunkId, bytes: &[u8]) -> Result<Loc> {
        if st.writer.as_ref().is_none_or(|w| w.len >= PACK_TARGET) {
            self.roll(st)?;
        }
        let Some(w) = st.writer.as_mut() else {
            unreachable!("roll always leaves a writer")
        };
        let loc = Loc {
            pack: w.n,
            offset: w.len,
            len: bytes.len() as u32,
        };
        let path = self.packs_dir.join(pack::pack_name(w.n));
        w.file
            .write_all_at(&pack::header(id, loc.len), loc.offset)
            .and_then(|()| w.file.write_all_at(bytes, loc.data_offset()))
            .map_err(|e| StoreError::io("appending to", &path, e))?;
        // Only now: a failed append (disk full) leaves the length as it was, so the next
        // record overwrites the partial one and the seal cuts what is left.
        w.len = loc.offset + loc.record_len();
        let (n, len) = (w.n, w.len);
        st.unsynced = true;
        st.index.insert(*id, loc);
        if let Some(info) = st.packs.get_mut(&n) {
            info.len = len;
            info.live += loc.record_len();
        }
        Ok(loc)
    }

    /// Seals the current pack (if any) and starts a new one, locked for this handle.
    fn roll(&self, st: &mut State) -> Result<()> {
        self.seal_writer(st)?;
        let (n, file) = self.create_pack(st)?;
        st.packs.insert(
            n,
            PackInfo {
                file: file.clone(),
                len: PACK_MAGIC.len() as u64,
                live: 0,
                sealed: false,
            },
        );
        st.writer = Some(Writer {
            n,
            file,
            len: PACK_MAGIC.len() as u64,
        });
        st.dir_unsynced = true;
        Ok(())
    }

    /// Creates the next pack under a temp name, locks it, then links it into place, so no
    /// other handle ever sees it unlocked (and takes it for a crashed writer's pack).
    fn create_pack(&self, st: &State) -> Result<(u32, Arc<File>)> {
        let temp = self
            .packs_dir
            .join(format!("{TEMP_PREFIX}pack-{:016x}", rand::random::<u64>()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| StoreError::io("creating a pack in", &self.packs_dir, e))?;
        let result = (|| {
            if !try_lock(&file) {
                return Err(StoreError::io(
                    "locking",
                    &temp,
                    io::Error::other("a new pack file is locked by someone else"),
                ));
            }
            file.write_all_at(&PACK_MAGIC, 0)
                .map_err(|e| StoreError::io("writing", &temp, e))?;
            let mut n = st.packs.keys().next_back().map_or(1, |n| n + 1);
            loop {
                let dest = self.pack_path(n);
                if self.packs_dir.join(pack::dead_name(n)).exists() {
                    n += 1;
                    continue;
                }
                match fs::hard_link(&temp, &dest) {
                    Ok(()) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => n += 1,
                    Err(e) => return Err(StoreError::io("creating", dest, e)),
                }
            }
        })();
        let _ = fs::remove_file(&temp);
        result.map(|n| (n, Arc::new(file)))
    }

    /// Makes the current pack durable and closes it for good.
    fn seal_writer(&self, st: &mut State) -> Result<()> {
        let Some(w) = st.writer.as_ref() else {
            return Ok(());
        };
        let path = self.pack_path(w.n);
        w.file
            .sync_data()
            .map_err(|e| StoreError::io("syncing", &path, e))?;
        seal_at(&w.file, w.len, &path)?;
        let (n, len) = (w.n, w.len + HEADER_LEN);
        unlock(&w.file);
        st.writer = None;
        st.unsynced = false;
        if let Some(info) = st.packs.get_mut(&n) {
            info.len = len;
            info.sealed = true;
        }
        Ok(())
    }

    /// Makes every blob written with [`Durability::Batch`] so far durable: one fsync of the
    /// pack being written (plus the packs directory when packs came or went, and removal
    /// marks).
    pub fn sync(&self) -> Result<()> {
        let mut st = self.state();
        self.sync_locked(&mut st)
    }

    fn sync_locked(&self, st: &mut State) -> Result<()> {
        if st.unsynced
            && let Some(w) = st.writer.as_ref()
        {
            w.file
                .sync_data()
                .map_err(|e| StoreError::io("syncing", self.pack_path(w.n), e))?;
            st.unsynced = false;
        }
        if st.dir_unsynced {
            sync_dir(&self.packs_dir)?;
            st.dir_unsynced = false;
        }
        for n in std::mem::take(&mut st.dead_unsynced) {
            let path = self.packs_dir.join(pack::dead_name(n));
            match File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("syncing", path, e)),
            }
        }
        Ok(())
    }

    pub fn has(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.lookup(id)?.is_some() || self.loose_exists(id))
    }

    /// The blob's location, looking at packs other handles wrote since on a miss.
    fn lookup(&self, id: &ChunkId) -> Result<Option<(Loc, Arc<File>)>> {
        let mut st = self.state();
        if !st.index.contains_key(id) {
            self.refresh(&mut st)?;
        }
        Ok(st
            .index
            .get(id)
            .and_then(|loc| st.packs.get(&loc.pack).map(|p| (*loc, p.file.clone()))))
    }

    fn loose_exists(&self, id: &ChunkId) -> bool {
        let found = self.loose_path(id).is_file();
        if found {
            self.loose_seen.store(true, Ordering::Relaxed);
        }
        found
    }

    /// The size of a stored blob, without reading it.
    pub fn len_of(&self, id: &ChunkId) -> Result<Option<u64>> {
        if let Some((loc, _)) = self.lookup(id)? {
            return Ok(Some(u64::from(loc.len)));
        }
        Ok(fs::metadata(self.loose_path(id)).ok().map(|m| m.len()))
    }

    /// Where a blob's bytes are on disk (diagnostics; tests that damage a blob on purpose).
    pub fn locate(&self, id: &ChunkId) -> Result<Option<BlobLocation>> {
        if let Some((loc, _)) = self.lookup(id)? {
            return Ok(Some(BlobLocation {
                path: self.pack_path(loc.pack),
                offset: loc.data_offset(),
                len: u64::from(loc.len),
            }));
        }
        let path = self.loose_path(id);
        Ok(fs::metadata(&path).ok().map(|m| BlobLocation {
            path,
            offset: 0,
            len: m.len(),
        }))
    }

    /// Reads a whole blob into memory, refusing it unless it hashes to `id`.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let bytes = match self.lookup(id)? {
            Some((loc, file)) => {
                let mut buf = vec![0u8; loc.len as usize];
                file.read_exact_at(&mut buf, loc.data_offset())
                    .map_err(|e| StoreError::io("reading", self.pack_path(loc.pack), e))?;
                buf
            }
            None => {
                let path = self.loose_path(id);
                fs::read(&path).map_err(|e| not_found_or_io(id, &path, e))?
            }
        };
        let actual = ChunkId::of(&bytes);
        if actual != *id {
            return Err(corrupt(id, actual));
        }
        Ok(bytes)
    }

    /// Opens a verified blob for streaming reads (the blob is read and checked first).
    pub fn open_blob(&self, id: &ChunkId) -> Result<BlobReader> {
        Ok(BlobReader {
            inner: Cursor::new(self.get(id)?),
        })
    }

    /// Checks one blob against its id.
    pub fn verify(&self, id: &ChunkId) -> Result<()> {
        self.get(id).map(drop)
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

    /// Deletes a blob. Returns whether it existed. Its bytes stay in the pack, marked dead,
    /// until the pack is repacked (see [`crate::sweep`]).
    pub fn remove(&self, id: &ChunkId) -> Result<bool> {
        let mut st = self.state();
        let mut existed = false;
        if let Some(loc) = st.index.remove(id) {
            existed = true;
            if let Some(info) = st.packs.get_mut(&loc.pack) {
                info.live = info.live.saturating_sub(loc.record_len());
            }
            self.mark_dead(&mut st, loc)?;
        }
        drop(st);
        let path = self.loose_path(id);
        match fs::remove_file(&path) {
            Ok(()) => existed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("removing", &path, e)),
        }
        Ok(existed)
    }

    /// Records that a pack's record is garbage. Not fsynced here: a lost mark only brings a
    /// removed (unreferenced) blob back, for the next sweep to remove again.
    fn mark_dead(&self, st: &mut State, loc: Loc) -> Result<()> {
        let path = self.packs_dir.join(pack::dead_name(loc.pack));
        // At a multiple of 8, not O_APPEND: after a torn entry (a crash mid-write) the next
        // one overwrites it instead of shifting every later entry.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| {
                let end = f.metadata()?.len() / 8 * 8;
                f.write_all_at(&loc.offset.to_le_bytes(), end)
            })
            .map_err(|e| StoreError::io("marking a removed blob in", &path, e))?;
        st.dead_unsynced.insert(loc.pack);
        Ok(())
    }

    /// Deletes temp files left behind by writers that crashed, if they are older than
    /// `min_age` (younger ones may belong to a write in progress). Returns how many went.
    pub fn remove_stale_temps(&self, min_age: Duration) -> Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        let mut dirs = vec![self.root.clone(), self.packs_dir.clone()];
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

    /// Iterates over the ids of all stored blobs, in no particular order (a snapshot taken
    /// now).
    pub fn iter(&self) -> Result<BlobIter> {
        let mut ids: Vec<ChunkId> = self.state().index.keys().copied().collect();
        if self.loose_seen.load(Ordering::Relaxed) {
            let indexed: HashSet<ChunkId> = ids.iter().copied().collect();
            for id in self.loose_ids()? {
                if !indexed.contains(&id) {
                    ids.push(id);
                }
            }
        }
        Ok(BlobIter {
            inner: ids.into_iter(),
        })
    }

    /// All stored ids, sorted.
    pub fn list(&self) -> Result<Vec<ChunkId>> {
        let mut ids = self.iter()?.collect::<Result<Vec<_>>>()?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// How many blobs the store holds, and the bytes it takes on disk (packs, dead records
    /// included, plus loose files).
    pub fn usage(&self) -> Result<(u64, u64)> {
        let st = self.state();
        let n = st.index.len() as u64;
        let mut bytes: u64 = st.packs.values().map(|p| p.len).sum();
        drop(st);
        if self.loose_seen.load(Ordering::Relaxed) {
            for id in self.loose_ids()? {
                bytes += fs::metadata(self.loose_path(&id)).map_or(0, |m| m.len());
            }
        }
        Ok((n, bytes))
    }

    /// Ids of loose (format 1) blob files.
    fn loose_ids(&self) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for entry in read_dir(&self.root)? {
            let entry = entry.map_err(|e| StoreError::io("listing", &self.root, e))?;
            let prefix = entry.file_name().to_string_lossy().into_owned();
            if !is_fanout_name(&prefix) {
                continue;
            }
            let rd = match fs::read_dir(entry.path()) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(e) => return Err(StoreError::io("listing", entry.path(), e)),
            };
            for f in rd {
                let f = f.map_err(|e| StoreError::io("listing", entry.path(), e))?;
                let name = f.file_name();
                let name = name.to_string_lossy();
                if name.len() == 62
                    && let Ok(id) = format!("{prefix}{name}").parse::<ChunkId>()
                    // Only canonical lower-case names: an upper-case twin would otherwise be
                    // listed as an id whose path is elsewhere.
                    && id.to_hex()[2..] == *name
                {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    /// Moves loose (format 1) blob files into packs: a batch is appended and fsynced before
    /// its files are deleted, so a kill at any point loses nothing; files of a batch that was
    /// not synced are simply migrated again (blobs already in a pack are not copied twice).
    fn migrate_loose(&self) -> Result<()> {
        let ids = self.loose_ids()?;
        if ids.is_empty() {
            return Ok(());
        }
        let total = ids.len();
        tracing::info!(blobs = total, store = %self.root.display(), "moving blob files into packs");
        let mut done = 0usize;
        for batch in ids.chunks(MIGRATE_BATCH) {
            let mut moved = Vec::with_capacity(batch.len());
            for id in batch {
                let path = self.loose_path(id);
                let bytes = match fs::read(&path) {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io("reading", &path, e)),
                };
                if ChunkId::of(&bytes) != *id {
                    // Refetched from a peer when needed, as any corrupt blob.
                    tracing::warn!(blob = %id, "dropping a corrupt blob file while moving it into a pack");
                } else {
                    self.put_with_id(*id, &bytes, Durability::Batch)?;
                }
                moved.push(path);
            }
            self.sync()?;
            for path in moved {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io("removing", &path, e)),
                }
            }
            done += batch.len();
            tracing::info!(done, total, "moving blob files into packs");
        }
        for entry in read_dir(&self.root)? {
            let entry = entry.map_err(|e| StoreError::io("listing", &self.root, e))?;
            if is_fanout_name(&entry.file_name().to_string_lossy()) {
                // Fails while stale temp files remain; they go with `remove_stale_temps`.
                let _ = fs::remove_dir(entry.path());
            }
        }
        tracing::info!(blobs = total, "blob files moved into packs");
        Ok(())
    }

    /// Packs worth rewriting, least live first: every pack under half live, and then more
    /// until dead bytes are at most a sixth of the store (so it stays within 1.2× of its live
    /// data). Packs another handle is still writing are left alone.
    /// Rewrites every pack that holds removed blobs, so bytes removed outside a sweep
    /// (content evicted on demand, which the user asked to free now) leave the disk. Unlike
    /// the sweep's repack it does not wait for packs to be mostly garbage: it may copy up to
    /// a pack's size of live data per pack touched. See [`Self::repack`] for why this is
    /// crash-safe. Returns the bytes freed.
    pub fn compact(&self) -> Result<u64> {
        let with_dead: Vec<u32> = {
            let st = self.state();
            st.packs
                .iter()
                .filter(|(_, p)| {
                    let overhead = PACK_MAGIC.len() as u64 + if p.sealed { HEADER_LEN } else { 0 };
                    p.len > p.live + overhead
                })
                .map(|(n, _)| *n)
                .collect()
        };
        let mut freed = 0;
        for n in with_dead {
            freed += self.repack(n)?;
        }
        self.sync()?;
        Ok(freed)
    }

    pub(crate) fn repack_candidates(&self) -> Vec<u32> {
        let st = self.state();
        let total: u64 = st.packs.values().map(|p| p.len).sum();
        let mut dead: u64 = st
            .packs
            .values()
            .map(|p| p.len.saturating_sub(p.live))
            .sum();
        let own = st.writer.as_ref().map(|w| w.n);
        let mut packs: Vec<(u32, u64, u64)> = st
            .packs
            .iter()
            .filter(|(n, p)| p.sealed || Some(**n) == own)
            .map(|(n, p)| (*n, p.live, p.len))
            .collect();
        packs.sort_by(|a, b| {
            (a.1 as f64 / a.2.max(1) as f64).total_cmp(&(b.1 as f64 / b.2.max(1) as f64))
        });
        let mut out = Vec::new();
        for (n, live, len) in packs {
            let under_half = live * 2 < len;
            if under_half || dead * 6 > total {
                if len == live + PACK_MAGIC.len() as u64
                    || len <= PACK_MAGIC.len() as u64 + HEADER_LEN
                {
                    continue;
                }
                out.push(n);
                dead = dead.saturating_sub(len - live);
            }
        }
        out
    }

    /// Rewrites pack `n`: its live records are copied into this handle's pack and fsynced,
    /// the index is pointed at the copies, and only then is the old pack deleted. A kill
    /// before the delete leaves two good copies (the next open keeps one); nothing referenced
    /// is ever without a durable copy. Returns the bytes freed.
    pub(crate) fn repack(&self, n: u32) -> Result<u64> {
        let mut st = self.state();
        if st.writer.as_ref().is_some_and(|w| w.n == n) {
            self.seal_writer(&mut st)?;
        }
        let Some(info) = st.packs.get(&n) else {
            return Ok(0);
        };
        let (file, old_len) = (info.file.clone(), info.len);
        let moving: Vec<(ChunkId, Loc)> = st
            .index
            .iter()
            .filter(|(_, l)| l.pack == n)
            .map(|(id, l)| (*id, *l))
            .collect();
        let mut moved = Vec::with_capacity(moving.len());
        for (id, loc) in moving {
            let mut buf = vec![0u8; loc.len as usize];
            file.read_exact_at(&mut buf, loc.data_offset())
                .map_err(|e| StoreError::io("reading", self.pack_path(n), e))?;
            if ChunkId::of(&buf) != id {
                // Not copied: a corrupt blob is refetched when needed.
                tracing::warn!(blob = %id, "dropping a corrupt blob while repacking");
                st.index.remove(&id);
                continue;
            }
            st.index.remove(&id);
            let new = self.append(&mut st, &id, &buf)?;
            moved.push(new);
        }
        self.sync_locked(&mut st)?;
        st.packs.remove(&n);
        drop(st);
        // The marks first: marks left without their pack could otherwise apply to a new pack
        // that reuses the number, while a pack left without its marks only keeps garbage.
        let dead = self.packs_dir.join(pack::dead_name(n));
        match fs::remove_file(&dead) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("removing", dead, e)),
        }
        let path = self.pack_path(n);
        fs::remove_file(&path).map_err(|e| StoreError::io("removing", &path, e))?;
        sync_dir(&self.packs_dir)?;
        let copied: u64 = moved.iter().map(|l| l.record_len()).sum();
        Ok(old_len.saturating_sub(copied))
    }
}

impl Drop for BlobStore {
    fn drop(&mut self) {
        let mut st = self.state();
        if let Err(e) = self.seal_writer(&mut st) {
            tracing::warn!("closing the blob store: {e}");
        }
    }
}

/// Points the index at a record read from a pack. Of two copies of a blob (a repack killed
/// before it removed the old pack, or two handles that wrote the same blob), the one read
/// last, in the newer pack, wins; the other counts as dead space for repacking.
fn index_record(st: &mut State, id: ChunkId, loc: Loc) {
    if let Some(old) = st.index.insert(id, loc)
        && let Some(p) = st.packs.get_mut(&old.pack)
    {
        p.live = p.live.saturating_sub(old.record_len());
    }
    if let Some(p) = st.packs.get_mut(&loc.pack) {
        p.live += loc.record_len();
    }
}

/// Creates the format marker of a new store, or checks an existing one.
fn check_format(root: &Path) -> Result<()> {
    let path = root.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(s) if s == FORMAT_LINE => Ok(()),
        Ok(s) => {
            let version = s
                .strip_prefix("cairn-store ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<u8>().ok())
                .unwrap_or(u8::MAX);
            Err(StoreError::UnsupportedFormat {
                what: "the blob store",
                version,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Unique: handles opening a new store at once each write theirs, and the last
            // rename wins with the same content.
            let temp = root.join(format!(
                "{TEMP_PREFIX}format-{:016x}",
                rand::random::<u64>()
            ));
            fs::write(&temp, FORMAT_LINE)
                .and_then(|()| File::open(&temp)?.sync_all())
                .and_then(|()| fs::rename(&temp, &path))
                .map_err(|e| StoreError::io("writing", &path, e))?;
            debug_assert_eq!(FORMAT_VERSION, 2);
            sync_dir(root)
        }
        Err(e) => Err(StoreError::io("reading", &path, e)),
    }
}

/// Whether the last bytes of a pack are a seal record.
fn ends_with_seal(file: &File, len: u64) -> bool {
    let mut h = [0u8; HEADER_LEN as usize];
    len >= PACK_MAGIC.len() as u64 + HEADER_LEN
        && file.read_exact_at(&mut h, len - HEADER_LEN).is_ok()
        && pack::parse_header(&h) == Some(pack::Header::Seal)
}

/// Cuts a pack at `len` and seals it there, durably.
fn seal_at(file: &File, len: u64, path: &Path) -> Result<()> {
    file.set_len(len)
        .and_then(|()| file.write_all_at(&pack::seal_header(), len))
        .and_then(|()| file.sync_data())
        .map_err(|e| StoreError::io("sealing", path, e))
}

fn file_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| StoreError::io("reading the size of", path, e))
}

#[cfg(unix)]
fn try_lock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; flock does not touch memory.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(unix)]
fn unlock(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: as in `try_lock`.
    unsafe {
        libc::flock(file.as_raw_fd(), libc::LOCK_UN);
    }
}

/// A verified blob opened for streaming reads.
#[derive(Debug)]
pub struct BlobReader {
    inner: Cursor<Vec<u8>>,
}

impl BlobReader {
    pub fn len(&self) -> u64 {
        self.inner.get_ref().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.inner.get_ref().is_empty()
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Iterator over stored ids (a snapshot taken by [`BlobStore::iter`]).
pub struct BlobIter {
    inner: std::vec::IntoIter<ChunkId>,
}

impl Iterator for BlobIter {
    type Item = Result<ChunkId>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(Ok)
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

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("syncing", dir, e))
}
