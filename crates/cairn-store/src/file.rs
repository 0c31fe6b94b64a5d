//! Files as ordered lists of encrypted chunks: the manifest, the streaming writer and
//! reader, and random access.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;

use cairn_crypto::ContentKey;

use crate::blobstore::{BlobStore, Durability};
use crate::chunk::{Chunker, MAX_CHUNK_SIZE};
use crate::cipher::{ChunkKey, ChunkSealer, open_chunk};
use crate::error::{Result, StoreError};
use crate::id::ChunkId;

/// Everything needed to fetch, verify and decrypt one chunk of a file.
///
/// Contains the chunk's secret key, so a `ChunkRef` (and any encoded manifest) must only be
/// persisted or sent inside encrypted structures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: ChunkId,
    /// Plaintext length; lets readers seek without fetching chunks.
    pub len: u32,
    pub key: ChunkKey,
}

/// The content of one file version: its chunks in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileManifest {
    chunks: Vec<ChunkRef>,
    size: u64,
}

pub const MANIFEST_FORMAT_V1: u8 = 1;
const MANIFEST_HEADER_LEN: usize = 1 + 8 + 8;
const MANIFEST_ENTRY_LEN: usize = 32 + 4 + 32;

impl FileManifest {
    /// Builds a manifest, rejecting chunk lengths the chunker can never produce (so a
    /// damaged manifest cannot make readers allocate arbitrary amounts).
    pub fn new(chunks: Vec<ChunkRef>) -> Result<Self> {
        let mut size = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            if c.len == 0 || c.len as usize > MAX_CHUNK_SIZE {
                return Err(invalid(format!(
                    "chunk {i} has impossible length {}",
                    c.len
                )));
            }
            size += u64::from(c.len);
        }
        Ok(Self { chunks, size })
    }

    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Plaintext size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Compact binary form (v1):
    /// `0x01 | size: u64 LE | count: u64 LE | count × (id: 32 B | len: u32 LE | key: 32 B)`.
    ///
    /// Fixed-width entries keep decode trivially bounds-checked and let a reader index
    /// entry *i* directly should large lists ever be read piecewise. The output contains
    /// chunk keys: encrypt it before it leaves memory.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(MANIFEST_HEADER_LEN + self.chunks.len() * MANIFEST_ENTRY_LEN);
        out.push(MANIFEST_FORMAT_V1);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(c.id.as_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(c.key.as_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let Some(&version) = bytes.first() else {
            return Err(StoreError::Truncated {
                what: "file manifest",
                len: 0,
            });
        };
        if version != MANIFEST_FORMAT_V1 {
            return Err(StoreError::UnsupportedFormat {
                what: "file manifest",
                version,
            });
        }
        if bytes.len() < MANIFEST_HEADER_LEN {
            return Err(StoreError::Truncated {
                what: "file manifest",
                len: bytes.len(),
            });
        }
        let size = u64::from_le_bytes(array(&bytes[1..9]));
        let count = u64::from_le_bytes(array(&bytes[9..17]));
        let body = &bytes[MANIFEST_HEADER_LEN..];
        // Compare before allocating: `count` is untrusted.
        let expected = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(MANIFEST_ENTRY_LEN));
        if expected != Some(body.len()) {
            return Err(invalid(format!(
                "header announces {count} chunks but {} bytes of entries follow",
                body.len()
            )));
        }
        let chunks = body
            .chunks_exact(MANIFEST_ENTRY_LEN)
            .map(|e| ChunkRef {
                id: ChunkId(array(&e[..32])),
                len: u32::from_le_bytes(array(&e[32..36])),
                key: ChunkKey::from_bytes(array(&e[36..68])),
            })
            .collect();
        let manifest = Self::new(chunks)?;
        if manifest.size != size {
            return Err(invalid(format!(
                "header says {size} bytes but the chunks add up to {}",
                manifest.size
            )));
        }
        Ok(manifest)
    }
}

fn array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    out
}

fn invalid(reason: String) -> StoreError {
    StoreError::InvalidManifest { reason }
}

/// Tuning for [`write_file_with`].
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// `Batch` leaves the final [`BlobStore::sync`] to the caller, so many files can share
    /// one sync; `Immediate` fsyncs every chunk (slow, see [`Durability`]).
    pub durability: Durability,
    /// Threads that encrypt and store chunks while the calling thread reads and chunks.
    pub workers: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Batch,
            workers: default_workers(),
        }
    }
}

fn default_workers() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

/// Chunks, encrypts and stores everything `reader` yields; returns once all chunks are
/// durable. Memory use is bounded by a few chunks per worker, whatever the input size.
pub fn write_file(store: &BlobStore, key: &ContentKey, reader: impl Read) -> Result<FileManifest> {
    let manifest = write_file_with(store, key, reader, WriteOptions::default())?;
    store.sync()?;
    Ok(manifest)
}

/// [`write_file`] with explicit durability and parallelism. With `Durability::Batch` the
/// chunks are not durable until the caller runs [`BlobStore::sync`].
pub fn write_file_with(
    store: &BlobStore,
    key: &ContentKey,
    reader: impl Read,
    options: WriteOptions,
) -> Result<FileManifest> {
    let sealer = ChunkSealer::new(key);
    let workers = options.workers.max(1);
    let failed = AtomicBool::new(false);
    // Two queued chunks per worker keep them busy while the reader blocks on I/O, and cap
    // memory at ~(3 × workers) × 256 KiB.
    let (tx, rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(workers * 2);
    // Only the workers own the receiver: once every one of them has quit (each after an
    // error, e.g. a full disk), it is dropped and a blocked `send` fails instead of waiting
    // forever on a full queue.
    let rx = Arc::new(Mutex::new(rx));

    let (input_error, results) = thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let (sealer, failed) = (&sealer, &failed);
                scope.spawn(move || -> Result<Vec<(usize, ChunkRef)>> {
                    let mut done = Vec::new();
                    loop {
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok((index, plaintext)) = job else {
                            return Ok(done);
                        };
                        let sealed = sealer.seal(&plaintext);
                        if let Err(e) =
                            store.put_with_id(sealed.id, &sealed.bytes, options.durability)
                        {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        done.push((
                            index,
                            ChunkRef {
                                id: sealed.id,
                                // Chunks are at most MAX_CHUNK_SIZE (256 KiB).
                                len: plaintext.len() as u32,
                                key: sealed.key,
                            },
                        ));
                    }
                })
            })
            .collect();
        drop(rx);

        let mut input_error = None;
        for (index, chunk) in Chunker::new(reader).enumerate() {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            match chunk {
                // A send only fails once every worker has quit, i.e. after an error.
                Ok(chunk) => {
                    if tx.send((index, chunk.data)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    input_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect();
        (input_error, results)
    });

    // The input error is the root cause if both happened.
    if let Some(e) = input_error {
        return Err(e);
    }
    let mut refs = Vec::new();
    for r in results {
        refs.extend(r?);
    }
    refs.sort_unstable_by_key(|(index, _)| *index);
    FileManifest::new(refs.into_iter().map(|(_, r)| r).collect())
}

/// Fetches, verifies and decrypts one chunk.
fn load_chunk(store: &BlobStore, chunk: &ChunkRef) -> Result<Vec<u8>> {
    let sealed = store.get(&chunk.id)?;
    let plaintext = open_chunk(chunk.id, &chunk.key, &sealed)?;
    if plaintext.len() != chunk.len as usize {
        return Err(StoreError::LengthMismatch {
            id: chunk.id,
            expected: chunk.len,
            actual: plaintext.len(),
        });
    }
    Ok(plaintext)
}

/// Writes the file's plaintext to `out`, in order, decrypting on `workers` threads.
/// Nothing unverified is ever written: each chunk is checked against its id and its AEAD
/// tag before its bytes reach `out`. On error, `out` holds a verified prefix.
pub fn read_file(store: &BlobStore, manifest: &FileManifest, out: impl Write) -> Result<()> {
    read_file_with(store, manifest, out, default_workers())
}

pub fn read_file_with(
    store: &BlobStore,
    manifest: &FileManifest,
    mut out: impl Write,
    workers: usize,
) -> Result<()> {
    let chunks = manifest.chunks();
    let workers = workers.max(1);
    if workers == 1 || chunks.len() < 2 {
        for c in chunks {
            out.write_all(&load_chunk(store, c)?)
                .map_err(StoreError::Output)?;
        }
        return out.flush().map_err(StoreError::Output);
    }
    // Bounded read-ahead: at most `window` decrypted chunks wait for their turn.
    let window = workers * 2;
    let (job_tx, job_rx) = mpsc::channel::<usize>();
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Result<Vec<u8>>)>();

    thread::scope(|scope| {
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            scope.spawn(move || {
                loop {
                    let job = job_rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(index) = job else { return };
                    if done_tx
                        .send((index, load_chunk(store, &chunks[index])))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(done_tx);

        let mut sent = 0;
        let mut written = 0;
        let mut ready = BTreeMap::new();
        let result = (|| {
            while written < chunks.len() {
                while sent < chunks.len() && sent - written < window {
                    // Receivers live until this scope ends, so the send cannot fail.
                    let _ = job_tx.send(sent);
                    sent += 1;
                }
                let Ok((index, data)) = done_rx.recv() else {
                    // Only possible if a worker panicked; the scope re-raises the panic.
                    return Ok(());
                };
                ready.insert(index, data?);
                while let Some(data) = ready.remove(&written) {
                    out.write_all(&data).map_err(StoreError::Output)?;
                    written += 1;
                }
            }
            out.flush().map_err(StoreError::Output)
        })();
        // Stop the workers before the scope joins them.
        drop(job_tx);
        result
    })
}

/// Random access to a file's plaintext, decrypting only the chunks a read touches.
///
/// Keeps the last few decrypted chunks, since reads through FUSE come in 128 KiB pieces
/// that mostly land in the chunk the previous read touched.
pub struct FileReader<'a> {
    store: &'a BlobStore,
    manifest: FileManifest,
    /// `starts[i]` is the file offset of chunk `i`.
    starts: Vec<u64>,
    cache: VecDeque<(usize, Vec<u8>)>,
    pos: u64,
}

const READER_CACHE_CHUNKS: usize = 4;

impl<'a> FileReader<'a> {
    pub fn new(store: &'a BlobStore, manifest: FileManifest) -> Self {
        let mut starts = Vec::with_capacity(manifest.chunks.len());
        let mut offset = 0u64;
        for c in &manifest.chunks {
            starts.push(offset);
            offset += u64::from(c.len);
        }
        Self {
            store,
            manifest,
            starts,
            cache: VecDeque::with_capacity(READER_CACHE_CHUNKS),
            pos: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.manifest.size
    }

    pub fn manifest(&self) -> &FileManifest {
        &self.manifest
    }

    /// Fills `buf` from `offset` like `pread(2)`: returns the number of bytes read, which is
    /// short only at end of file (0 at or past it).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            let at = offset + filled as u64;
            if at >= self.manifest.size {
                break;
            }
            // The last chunk starting at or before `at`.
            let index = self.starts.partition_point(|&s| s <= at) - 1;
            let within = (at - self.starts[index]) as usize;
            let chunk = self.chunk(index)?;
            let n = (chunk.len() - within).min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&chunk[within..within + n]);
            filled += n;
        }
        Ok(filled)
    }

    /// Up to `len` bytes from `offset` (fewer at end of file).
    pub fn read_vec(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let available = self.manifest.size.saturating_sub(offset);
        let mut buf = vec![0u8; len.min(usize::try_from(available).unwrap_or(usize::MAX))];
        let n = self.read_at(offset, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn chunk(&mut self, index: usize) -> Result<&[u8]> {
        if let Some(hit) = self.cache.iter().position(|(i, _)| *i == index) {
            // Move to the back: most recently used.
            if let Some(entry) = self.cache.remove(hit) {
                self.cache.push_back(entry);
            }
        } else {
            let data = load_chunk(self.store, &self.manifest.chunks[index])?;
            if self.cache.len() == READER_CACHE_CHUNKS {
                self.cache.pop_front();
            }
            self.cache.push_back((index, data));
        }
        Ok(self.cache.back().map_or(&[][..], |(_, d)| d.as_slice()))
    }
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_at(self.pos, buf).map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for FileReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.manifest.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before start of file")
        })?;
        self.pos = target;
        Ok(target)
    }
}
