//! File-level round trips, tamper detection, dedup and random access.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};

use cairn_crypto::ContentKey;
use cairn_store::{
    AVG_CHUNK_SIZE, BlobStore, CHUNK_OVERHEAD, ChunkRef, Durability, FileManifest, FileReader,
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, StoreError, WriteOptions, read_file, read_file_with,
    write_file, write_file_with,
};
use proptest::prelude::*;
use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};

fn key(seed: u8) -> ContentKey {
    ContentKey::from_bytes([seed; 32])
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn store() -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    (dir, store)
}

fn read_all(store: &BlobStore, manifest: &FileManifest) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    read_file(store, manifest, &mut out)?;
    Ok(out)
}

#[test]
fn round_trips_at_chunk_boundaries() {
    let (_dir, store) = store();
    let mut sizes = vec![0, 1, 2];
    for s in [
        MIN_CHUNK_SIZE,
        AVG_CHUNK_SIZE,
        MAX_CHUNK_SIZE,
        2 * MAX_CHUNK_SIZE,
    ] {
        sizes.extend([s - 1, s, s + 1]);
    }
    for (i, size) in sizes.into_iter().enumerate() {
        let data = random(size, i as u64);
        let manifest = write_file(&store, &key(1), &data[..]).unwrap();
        assert_eq!(manifest.size(), size as u64);
        assert_eq!(
            manifest
                .chunks()
                .iter()
                .map(|c| u64::from(c.len))
                .sum::<u64>(),
            size as u64
        );
        if size == 0 {
            assert!(manifest.chunks().is_empty());
        }
        for c in manifest.chunks() {
            assert_eq!(
                store.len_of(&c.id).unwrap().unwrap(),
                u64::from(c.len) + CHUNK_OVERHEAD as u64
            );
        }
        assert_eq!(read_all(&store, &manifest).unwrap(), data, "size {size}");
        // The sequential path must agree with the parallel one.
        let mut seq = Vec::new();
        read_file_with(&store, &manifest, &mut seq, 1).unwrap();
        assert_eq!(seq, data);
        let decoded = FileManifest::decode(&manifest.encode()).unwrap();
        assert_eq!(decoded, manifest);
    }
}

#[test]
fn zeros_are_deduplicated() {
    let (_dir, store) = store();
    let manifest = write_file(&store, &key(1), &vec![0u8; 10 * MAX_CHUNK_SIZE][..]).unwrap();
    assert_eq!(manifest.chunks().len(), 10);
    assert_eq!(
        store.list().unwrap().len(),
        1,
        "ten identical chunks, one blob"
    );
}

/// Deterministic incompressible data, generated on the fly so 100 MiB never sits in memory.
/// A blake3 XOF stream is position-deterministic whatever the read sizes, unlike a block
/// RNG's `fill_bytes`, which may drop partial words between calls.
fn generated(seed: u64, len: u64) -> impl Read {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().take(len)
}

struct HashingWriter(blake3::Hasher, u64);

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn hundred_mib_streams_through() {
    const SIZE: u64 = 100 << 20;
    let (_dir, store) = store();
    let mut expected = blake3::Hasher::new();
    expected.update_reader(generated(42, SIZE)).unwrap();

    let manifest = write_file(&store, &key(9), generated(42, SIZE)).unwrap();
    assert_eq!(manifest.size(), SIZE);
    assert!(manifest.chunks().len() > 800);

    let mut out = HashingWriter(blake3::Hasher::new(), 0);
    read_file(&store, &manifest, &mut out).unwrap();
    assert_eq!(out.1, SIZE);
    assert_eq!(out.0.finalize(), expected.finalize());
}

#[test]
fn convergence_and_vault_separation() {
    let (_dir, store) = store();
    let data = random(500_000, 3);
    let a = write_file(&store, &key(1), &data[..]).unwrap();
    let b = write_file(&store, &key(1), &data[..]).unwrap();
    let c = write_file(&store, &key(2), &data[..]).unwrap();
    assert_eq!(
        a, b,
        "same vault, same plaintext: same chunks, ids and keys"
    );
    let ids_a: HashSet<_> = a.chunks().iter().map(|r| r.id).collect();
    assert!(c.chunks().iter().all(|r| !ids_a.contains(&r.id)));
    // Boundaries depend only on the plaintext, so the shapes match.
    let lens = |m: &FileManifest| m.chunks().iter().map(|r| r.len).collect::<Vec<_>>();
    assert_eq!(lens(&a), lens(&c));
    assert_eq!(
        store.list().unwrap().len(),
        a.chunks().len() + c.chunks().len()
    );
}

#[test]
fn one_byte_insertion_touches_at_most_three_chunks() {
    let (_dir, store) = store();
    let data = random(10 << 20, 5);
    let mut edited = data.clone();
    edited.insert(5 << 20, 0x42);
    let before = write_file(&store, &key(1), &data[..]).unwrap();
    let blobs_before = store.list().unwrap().len();
    let after = write_file(&store, &key(1), &edited[..]).unwrap();
    let old: HashSet<_> = before.chunks().iter().map(|c| c.id).collect();
    let new_chunks = after
        .chunks()
        .iter()
        .filter(|c| !old.contains(&c.id))
        .count();
    assert!((1..=3).contains(&new_chunks), "{new_chunks} chunks changed");
    assert_eq!(store.list().unwrap().len(), blobs_before + new_chunks);
    assert_eq!(read_all(&store, &after).unwrap(), edited);
}

#[test]
fn tampered_blob_fails_the_read() {
    let (_dir, store) = store();
    let data = random(300_000, 6);
    let manifest = write_file(&store, &key(1), &data[..]).unwrap();
    let victim = manifest.chunks()[1].id;
    {
        use std::os::unix::fs::FileExt;
        let loc = store.locate(&victim).unwrap().unwrap();
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&loc.path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, loc.offset + 40).unwrap();
        f.write_all_at(&[b[0] ^ 1], loc.offset + 40).unwrap();
    }

    let mut out = Vec::new();
    let err = read_file_with(&store, &manifest, &mut out, 1).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { id, .. } if id == victim));
    assert_eq!(
        out,
        &data[..manifest.chunks()[0].len as usize],
        "only verified bytes"
    );
    assert!(matches!(
        read_all(&store, &manifest),
        Err(StoreError::Corrupt { .. })
    ));
    let mut reader = FileReader::new(&store, manifest.clone());
    let start = u64::from(manifest.chunks()[0].len);
    assert!(matches!(
        reader.read_vec(start, 10),
        Err(StoreError::Corrupt { .. })
    ));
    // Chunk 0 is still readable.
    assert_eq!(reader.read_vec(0, 10).unwrap(), &data[..10]);
}

#[test]
fn missing_chunk_is_reported() {
    let (_dir, store) = store();
    let manifest = write_file(&store, &key(1), &random(100_000, 7)[..]).unwrap();
    let gone = manifest.chunks().last().unwrap().id;
    store.remove(&gone).unwrap();
    assert!(matches!(
        read_all(&store, &manifest),
        Err(StoreError::NotFound { id }) if id == gone
    ));
}

#[test]
fn wrong_chunk_key_fails() {
    let (_dir, store) = store();
    let data = random(200_000, 8);
    let manifest = write_file(&store, &key(1), &data[..]).unwrap();
    let other = write_file(&store, &key(2), &data[..]).unwrap();
    // Keys from another vault's manifest applied to this vault's chunks.
    let swapped: Vec<ChunkRef> = manifest
        .chunks()
        .iter()
        .zip(other.chunks())
        .map(|(mine, theirs)| ChunkRef {
            key: theirs.key.clone(),
            ..mine.clone()
        })
        .collect();
    let swapped = FileManifest::new(swapped).unwrap();
    assert!(matches!(
        read_all(&store, &swapped),
        Err(StoreError::Decrypt { .. })
    ));
}

#[test]
fn tampered_manifest_never_yields_wrong_bytes() {
    let (_dir, store) = store();
    let data = random(400_000, 10);
    let manifest = write_file(&store, &key(1), &data[..]).unwrap();
    let encoded = manifest.encode();
    for i in 0..encoded.len() {
        let mut bad = encoded.clone();
        bad[i] ^= 0x80;
        match FileManifest::decode(&bad) {
            Err(e) => assert!(
                matches!(
                    e,
                    StoreError::InvalidManifest { .. } | StoreError::UnsupportedFormat { .. }
                ),
                "byte {i}: {e}"
            ),
            Ok(m) => {
                // Every field is covered either by the size check, the blob hash, the AEAD
                // tag or the decrypted-length check.
                assert!(read_all(&store, &m).is_err(), "byte {i} went unnoticed");
            }
        }
    }
    for len in 0..encoded.len() {
        assert!(FileManifest::decode(&encoded[..len]).is_err(), "len {len}");
    }
    let mut longer = encoded.clone();
    longer.push(0);
    assert!(FileManifest::decode(&longer).is_err());
}

#[test]
fn length_field_is_checked_against_plaintext() {
    let (_dir, store) = store();
    let manifest = write_file(&store, &key(1), &random(200_000, 11)[..]).unwrap();
    let mut chunks = manifest.chunks().to_vec();
    chunks[0].len -= 1;
    let lying = FileManifest::new(chunks).unwrap();
    assert!(matches!(
        read_all(&store, &lying),
        Err(StoreError::LengthMismatch { .. })
    ));
    let mut chunks = manifest.chunks().to_vec();
    chunks[0].len = (MAX_CHUNK_SIZE + 1) as u32;
    assert!(matches!(
        FileManifest::new(chunks),
        Err(StoreError::InvalidManifest { .. })
    ));
}

#[test]
fn random_access_matches_slices() {
    let (_dir, store) = store();
    let data = random(3 << 20, 12);
    let manifest = write_file(&store, &key(1), &data[..]).unwrap();
    let mut reader = FileReader::new(&store, manifest.clone());
    assert_eq!(reader.size(), data.len() as u64);
    let mut rng = StdRng::seed_from_u64(13);
    for _ in 0..300 {
        let offset = rng.random_range(0..data.len() + 10);
        let len = rng.random_range(0..700_000);
        let got = reader.read_vec(offset as u64, len).unwrap();
        let end = (offset + len).min(data.len());
        let want = if offset >= data.len() {
            &[][..]
        } else {
            &data[offset..end]
        };
        assert_eq!(got, want, "offset {offset} len {len}");
    }
    // Exact chunk edges.
    let mut pos = 0u64;
    for c in manifest.chunks() {
        let got = reader.read_vec(pos.saturating_sub(1), 2).unwrap();
        let p = pos as usize;
        assert_eq!(got, &data[p.saturating_sub(1)..(p.saturating_sub(1) + 2)]);
        pos += u64::from(c.len);
    }
    // Read + Seek.
    reader.seek(SeekFrom::End(-1000)).unwrap();
    let mut tail = Vec::new();
    reader.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, &data[data.len() - 1000..]);
    assert!(
        reader
            .seek(SeekFrom::Current(-(data.len() as i64) - 1))
            .is_err()
    );
}

#[test]
fn immediate_durability_and_deferred_sync_both_work() {
    let (_dir, store) = store();
    let data = random(200_000, 14);
    for durability in [Durability::Immediate, Durability::Batch] {
        let options = WriteOptions {
            durability,
            workers: 3,
        };
        let m = write_file_with(&store, &key(1), &data[..], options).unwrap();
        store.sync().unwrap();
        assert_eq!(read_all(&store, &m).unwrap(), data);
    }
}

#[test]
fn input_errors_abort_the_write() {
    struct FailsLater(usize);
    impl Read for FailsLater {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("device vanished"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(1);
            self.0 -= n;
            Ok(n)
        }
    }
    let (_dir, store) = store();
    let err = write_file(&store, &key(1), FailsLater(2 << 20)).unwrap_err();
    assert!(matches!(err, StoreError::Input(_)), "{err}");
}

#[test]
fn store_errors_abort_the_write() {
    let (dir, store) = store();
    // Make the fan-out dirs uncreatable by putting a file where the root should be.
    let root = dir.path().join("gone");
    let broken = BlobStore::open(&root).unwrap();
    fs::remove_dir_all(&root).unwrap();
    fs::write(&root, b"in the way").unwrap();
    let err = write_file(&broken, &key(1), &random(300_000, 15)[..]).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    drop(store);
}

/// Shares one store across cases: creating a store (256 fan-out dirs) per case would
/// dominate the run time.
#[test]
fn random_files_round_trip() {
    let (_dir, store) = store();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(32));
    runner
        .run(
            &(0usize..400_000, any::<u64>(), 1usize..4),
            |(len, seed, workers)| {
                let data = random(len, seed);
                let options = WriteOptions {
                    durability: Durability::Batch,
                    workers,
                };
                let m = write_file_with(&store, &key(3), &data[..], options).unwrap();
                let mut out = Vec::new();
                read_file_with(&store, &m, &mut out, workers).unwrap();
                prop_assert_eq!(out, data);
                Ok(())
            },
        )
        .unwrap();
}

/// A store that fails every write (as a full disk makes it) must fail the file write with
/// that error on every worker count, never leave the reader blocked on a queue nobody drains.
#[test]
fn a_store_that_fails_every_write_fails_the_file_instead_of_hanging() {
    let (dir, store) = store();
    // A plain file where the store's directory was: every write fails.
    fs::remove_dir_all(dir.path()).unwrap();
    fs::write(dir.path(), b"not a directory").unwrap();
    let store = std::sync::Arc::new(store);
    // The hang needed the reader to be blocked on a full queue at the moment the last
    // worker quit: a race, so try it many times.
    for (round, workers) in [1, 2, 4].into_iter().cycle().take(90).enumerate() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let store = store.clone();
        std::thread::spawn(move || {
            let options = WriteOptions {
                workers,
                ..WriteOptions::default()
            };
            // Far more chunks than the queue holds, so the reader would block on it.
            let r = write_file_with(&store, &key(1), generated(round as u64, 64 << 20), options);
            let _ = done_tx.send(r.map(|_| ()));
        });
        let outcome = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("write_file_with hung with {workers} worker(s)"));
        assert!(
            outcome.is_err(),
            "writing into a broken store succeeded with {workers} worker(s)"
        );
    }
}
