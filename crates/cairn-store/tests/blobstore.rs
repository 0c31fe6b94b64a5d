//! Blob store behaviour: atomic, idempotent, concurrent-safe writes and verified reads.

use std::fs;
use std::io::Read;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use cairn_store::{BlobStore, ChunkId, Durability, StoreError};

fn store() -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("blobs")).unwrap();
    (dir, store)
}

/// Every file under the root, relative, excluding directories and the format marker.
fn all_files(store: &BlobStore) -> Vec<String> {
    let mut out = Vec::new();
    for dir in fs::read_dir(store.root()).unwrap() {
        let dir = dir.unwrap();
        if dir.file_type().unwrap().is_dir() {
            for f in fs::read_dir(dir.path()).unwrap() {
                out.push(format!(
                    "{}/{}",
                    dir.file_name().to_string_lossy(),
                    f.unwrap().file_name().to_string_lossy()
                ));
            }
        } else if dir.file_name() != "FORMAT" {
            out.push(dir.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Overwrites bytes of a stored blob where it lives on disk.
fn damage(store: &BlobStore, id: &ChunkId, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let loc = store.locate(id).unwrap().expect("stored");
    let f = fs::OpenOptions::new().write(true).open(&loc.path).unwrap();
    f.write_all_at(bytes, loc.offset + at).unwrap();
}

#[test]
fn put_get_has_remove_list() {
    let (_dir, store) = store();
    let a = store.put(b"alpha", Durability::Immediate).unwrap();
    let b = store.put(b"beta", Durability::Batch).unwrap();
    let empty = store.put(b"", Durability::Batch).unwrap();
    store.sync().unwrap();
    assert_eq!(a, ChunkId::of(b"alpha"));
    assert_eq!(store.get(&a).unwrap(), b"alpha");
    assert_eq!(store.get(&b).unwrap(), b"beta");
    assert_eq!(store.get(&empty).unwrap(), b"");
    assert_eq!(store.len_of(&a).unwrap(), Some(5));
    assert!(store.has(&a).unwrap());

    let mut expected = vec![a, b, empty];
    expected.sort();
    assert_eq!(store.list().unwrap(), expected);

    assert!(store.remove(&a).unwrap());
    assert!(!store.remove(&a).unwrap());
    assert!(!store.has(&a).unwrap());
    assert!(matches!(store.get(&a), Err(StoreError::NotFound { id }) if id == a));
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn put_is_idempotent_and_leaves_no_temp_files() {
    let (_dir, store) = store();
    let id = store.put(b"same", Durability::Batch).unwrap();
    let before = store.locate(&id).unwrap();
    for durability in [Durability::Batch, Durability::Immediate] {
        assert_eq!(store.put(b"same", durability).unwrap(), id);
    }
    assert_eq!(
        store.locate(&id).unwrap(),
        before,
        "an existing blob must not be rewritten"
    );
    assert_eq!(all_files(&store), vec!["packs/00000001.pack"]);
}

#[test]
fn flipped_byte_on_disk_is_refused_everywhere() {
    let (_dir, store) = store();
    let good = store.put(&[7u8; 1000], Durability::Batch).unwrap();
    let bad = store.put(&[9u8; 1000], Durability::Batch).unwrap();
    let mut bytes = vec![9u8; 1000];
    bytes[500] ^= 0x40;
    damage(&store, &bad, 500, &bytes[500..501]);

    assert!(
        matches!(store.get(&bad), Err(StoreError::Corrupt { id, actual })
        if id == bad && actual == ChunkId::of(&bytes))
    );
    assert!(matches!(
        store.open_blob(&bad),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        store.verify(&bad),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(store.verify_all().unwrap(), vec![bad]);
    let msg = store.get(&bad).unwrap_err().to_string();
    assert!(msg.contains("cairn verify"), "{msg}");

    store.verify(&good).unwrap();
}

#[test]
fn streaming_put_and_open() {
    let (_dir, store) = store();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let id = store.put_reader(&data[..], Durability::Immediate).unwrap();
    assert_eq!(id, ChunkId::of(&data));
    // Same content again: no duplicate, no temp left behind.
    let (_, bytes) = store.usage().unwrap();
    assert_eq!(store.put_reader(&data[..], Durability::Batch).unwrap(), id);
    assert_eq!(store.usage().unwrap(), (1, bytes));
    assert_eq!(all_files(&store), vec!["packs/00000001.pack"]);

    let mut reader = store.open_blob(&id).unwrap();
    assert_eq!(reader.len(), data.len() as u64);
    let mut back = Vec::new();
    reader.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn listing_ignores_temp_and_foreign_files() {
    let (_dir, store) = store();
    let id = store.put(b"x", Durability::Batch).unwrap();
    let fan = store.root().join("ab");
    fs::create_dir(&fan).unwrap();
    fs::write(fan.join(".tmp-0123456789abcdef"), b"partial").unwrap();
    fs::write(fan.join("README"), b"not a blob").unwrap();
    fs::write(store.root().join("zz"), b"not a dir").unwrap();
    fs::create_dir(store.root().join("not-hex")).unwrap();
    assert_eq!(store.list().unwrap(), vec![id]);
    assert!(store.verify_all().unwrap().is_empty());

    // A crashed writer's temp file goes once it is old enough; blobs and others stay.
    fs::write(store.root().join(".tmp-00000000000000ff"), b"partial").unwrap();
    assert_eq!(
        store.remove_stale_temps(Duration::from_secs(3600)).unwrap(),
        0
    );
    assert_eq!(store.remove_stale_temps(Duration::ZERO).unwrap(), 2);
    assert!(!fan.join(".tmp-0123456789abcdef").exists());
    assert!(fan.join("README").exists());
    assert_eq!(store.get(&id).unwrap(), b"x");
}

#[test]
fn concurrent_writers_of_one_id() {
    let (_dir, store) = store();
    let store = Arc::new(store);
    let data: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i * 31 % 256) as u8).collect());
    for round in 0..5 {
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (store, data, barrier) = (store.clone(), data.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let durability = if t % 2 == 0 {
                        Durability::Batch
                    } else {
                        Durability::Immediate
                    };
                    let id = store.put(&data, durability).unwrap();
                    // Whoever appends, a reader at any moment sees the whole blob.
                    assert_eq!(store.get(&id).unwrap().len(), data.len());
                    id
                })
            })
            .collect();
        let ids: Vec<ChunkId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ids.iter().all(|id| *id == ChunkId::of(&data)));
        store.sync().unwrap();
        assert_eq!(store.usage().unwrap().0, 1, "round {round}");
        assert_eq!(store.get(&ids[0]).unwrap(), *data);
        store.remove(&ids[0]).unwrap();
    }
}

#[test]
fn reopening_sees_existing_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = BlobStore::open(dir.path()).unwrap();
        let id = store.put(b"persist", Durability::Batch).unwrap();
        store.sync().unwrap();
        id
    };
    let store = BlobStore::open(dir.path()).unwrap();
    assert_eq!(store.get(&id).unwrap(), b"persist");
}

/// A pack left by a writer that died mid-append: the complete records are kept, the torn one
/// is cut off, the pack is sealed, and new blobs go to a new pack.
#[test]
fn a_torn_pack_tail_is_cut_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (vec![1u8; 5000], vec![2u8; 7000]);
    let (id_a, id_b) = {
        let store = BlobStore::open(dir.path()).unwrap();
        let ids = (
            store.put(&a, Durability::Batch).unwrap(),
            store.put(&b, Durability::Batch).unwrap(),
        );
        store.sync().unwrap();
        ids
    };
    // Drop sealed the pack: replace the seal by half of a third record, as a crash would.
    let pack = dir.path().join("packs").join("00000001.pack");
    let mut bytes = fs::read(&pack).unwrap();
    bytes.truncate(bytes.len() - 48);
    let good_len = bytes.len();
    let mut torn = bytes.clone();
    torn.extend_from_slice(b"CRB1");
    torn.extend_from_slice(&9000u32.to_le_bytes());
    torn.extend_from_slice(&[0xAB; 500]);
    fs::write(&pack, &torn).unwrap();

    let store = BlobStore::open(dir.path()).unwrap();
    assert_eq!(store.get(&id_a).unwrap(), a);
    assert_eq!(store.get(&id_b).unwrap(), b);
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(fs::metadata(&pack).unwrap().len(), good_len as u64 + 48);
    let c = store
        .put(b"after the repair", Durability::Immediate)
        .unwrap();
    drop(store);
    let store = BlobStore::open(dir.path()).unwrap();
    assert_eq!(store.get(&c).unwrap(), b"after the repair");
    assert_eq!(store.list().unwrap().len(), 3);
}

/// A damaged byte in the middle of a sealed pack costs that blob (reads refuse it), not the
/// blobs after it, and nothing is cut off.
#[test]
fn damage_inside_a_sealed_pack_is_contained() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 3000]).collect();
    let ids: Vec<ChunkId> = {
        let store = BlobStore::open(dir.path()).unwrap();
        blobs
            .iter()
            .map(|b| store.put(b, Durability::Batch).unwrap())
            .collect()
    };
    let store = BlobStore::open(dir.path()).unwrap();
    damage(&store, &ids[1], 10, b"X");
    let len = fs::metadata(store.locate(&ids[1]).unwrap().unwrap().path)
        .unwrap()
        .len();
    drop(store);
    let store = BlobStore::open(dir.path()).unwrap();
    assert!(matches!(
        store.get(&ids[1]),
        Err(StoreError::Corrupt { .. })
    ));
    for i in [0, 2, 3, 4] {
        assert_eq!(store.get(&ids[i]).unwrap(), blobs[i]);
    }
    let path = store.locate(&ids[0]).unwrap().unwrap().path;
    assert_eq!(fs::metadata(path).unwrap().len(), len);
}

/// Two handles on one store (the daemon and a CLI command): each appends to its own pack and
/// sees what the other wrote.
#[test]
fn two_handles_share_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let one = BlobStore::open(dir.path()).unwrap();
    let two = BlobStore::open(dir.path()).unwrap();
    let a = one.put(b"from one", Durability::Immediate).unwrap();
    let b = two.put(b"from two", Durability::Immediate).unwrap();
    assert_eq!(two.get(&a).unwrap(), b"from one");
    assert_eq!(one.get(&b).unwrap(), b"from two");
    // A third opens while both still hold their packs open: nothing is cut or sealed.
    let three = BlobStore::open(dir.path()).unwrap();
    assert_eq!(three.list().unwrap().len(), 2);
    let c = one.put(b"more from one", Durability::Batch).unwrap();
    one.sync().unwrap();
    assert!(three.has(&c).unwrap());
    drop((one, two, three));
    let store = BlobStore::open(dir.path()).unwrap();
    assert_eq!(store.list().unwrap().len(), 3);
}

/// Format 1 stores (one file per blob) move into packs at open; corrupt files are dropped.
#[test]
fn loose_blob_files_are_migrated_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for i in 0..300u32 {
        let bytes = i.to_le_bytes().repeat(100 + i as usize);
        let id = ChunkId::of(&bytes);
        let hex = id.to_hex();
        fs::create_dir_all(dir.path().join(&hex[..2])).unwrap();
        fs::write(dir.path().join(&hex[..2]).join(&hex[2..]), &bytes).unwrap();
        ids.push((id, bytes));
    }
    let bad = ChunkId::of(b"original");
    let hex = bad.to_hex();
    fs::create_dir_all(dir.path().join(&hex[..2])).unwrap();
    fs::write(dir.path().join(&hex[..2]).join(&hex[2..]), b"flipped!").unwrap();

    let store = BlobStore::open(dir.path()).unwrap();
    for (id, bytes) in &ids {
        assert_eq!(&store.get(id).unwrap(), bytes);
    }
    assert!(!store.has(&bad).unwrap());
    assert_eq!(store.list().unwrap().len(), ids.len());
    let left: Vec<String> = all_files(&store)
        .into_iter()
        .filter(|f| !f.starts_with("packs/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A blob file that shows up later is read in place, and moved at the next open.
    let late = b"dropped in by hand".to_vec();
    let id = ChunkId::of(&late);
    let hex = id.to_hex();
    fs::create_dir_all(dir.path().join(&hex[..2])).unwrap();
    fs::write(dir.path().join(&hex[..2]).join(&hex[2..]), &late).unwrap();
    assert_eq!(store.get(&id).unwrap(), late);
    drop(store);
    let store = BlobStore::open(dir.path()).unwrap();
    assert_eq!(store.get(&id).unwrap(), late);
    assert!(!dir.path().join(&hex[..2]).exists());
}

/// A store written by a future format is refused, with a message naming it.
#[test]
fn an_unknown_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("FORMAT"), "cairn-store 9 something\n").unwrap();
    let err = BlobStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedFormat { version: 9, .. }),
        "{err}"
    );
}

/// Pack debris a crash can leave: an empty pack file (created, nothing written) and a torn
/// removal mark. The store opens, stays usable, and later marks still count.
#[test]
fn crash_debris_in_packs_is_tolerated() {
    let dir = tempfile::tempdir().unwrap();
    let (keep, gone) = {
        let store = BlobStore::open(dir.path()).unwrap();
        let keep = store.put(&[1u8; 4000], Durability::Batch).unwrap();
        let gone = store.put(&[2u8; 4000], Durability::Batch).unwrap();
        (keep, gone)
    };
    fs::write(dir.path().join("packs/00000001.dead"), [0xEEu8; 5]).unwrap();
    fs::write(dir.path().join("packs/00000007.pack"), b"").unwrap();
    for _ in 0..2 {
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
    }
    let store = BlobStore::open(dir.path()).unwrap();
    assert!(store.remove(&gone).unwrap());
    let new = store.put(b"new", Durability::Immediate).unwrap();
    store.sync().unwrap();
    drop(store);
    let store = BlobStore::open(dir.path()).unwrap();
    assert!(!store.has(&gone).unwrap());
    assert_eq!(store.get(&keep).unwrap(), [1u8; 4000]);
    assert_eq!(store.get(&new).unwrap(), b"new");
}

/// A sweep that removed most of a pack rewrites it: the space comes back, the live blobs stay
/// readable, now and after reopening.
#[test]
fn a_sweep_repacks_mostly_dead_packs() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let ids: Vec<ChunkId> = (0..200u32)
        .map(|i| {
            store
                .put(&i.to_le_bytes().repeat(2000), Durability::Batch)
                .unwrap()
        })
        .collect();
    store.sync().unwrap();
    let live: std::collections::HashSet<ChunkId> = ids.iter().step_by(5).copied().collect();
    let (_, before) = store.usage().unwrap();
    let sweep = store.begin_sweep().unwrap();
    let r = sweep
        .sweep(
            |id| live.contains(id),
            false,
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
    drop(sweep);
    assert_eq!(r.removed, 160);
    assert!(r.repacked >= 1 && r.repacked_bytes > 0, "{r:?}");
    let (n, after) = store.usage().unwrap();
    assert_eq!(n, 40);
    assert!(after * 3 < before, "{after} of {before} bytes left");
    let on_disk: u64 = fs::read_dir(dir.path().join("packs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk * 3 < before, "{on_disk} bytes in packs/");
    drop(store);
    let store = BlobStore::open(dir.path()).unwrap();
    assert_eq!(store.list().unwrap().len(), 40);
    for (i, id) in ids.iter().enumerate() {
        if live.contains(id) {
            assert_eq!(
                store.get(id).unwrap(),
                (i as u32).to_le_bytes().repeat(2000)
            );
        } else {
            assert!(!store.has(id).unwrap());
        }
    }
}

/// Handles opening a new store at the same moment all succeed (each writes the format marker).
#[test]
fn concurrent_opens_of_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("new");
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i: u32| {
            let (root, barrier) = (root.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let store = BlobStore::open(&root).unwrap();
                store.put(&i.to_le_bytes(), Durability::Immediate).unwrap()
            })
        })
        .collect();
    let ids: Vec<ChunkId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let store = BlobStore::open(&root).unwrap();
    for id in ids {
        assert!(store.has(&id).unwrap());
    }
}

/// Removing blobs only marks them; `compact` gives their bytes back to the disk at once,
/// keeps every other blob readable, and rewrites nothing when nothing was removed.
#[test]
fn compact_frees_removed_bytes_and_keeps_the_rest() {
    let (_dir, store) = store();
    let blobs: Vec<Vec<u8>> = (0..40u32)
        .map(|i| {
            let mut b = vec![0u8; 100_000];
            for (j, x) in b.iter_mut().enumerate() {
                *x = (i as usize * 31 + j * 7) as u8;
            }
            b
        })
        .collect();
    let ids: Vec<ChunkId> = blobs
        .iter()
        .map(|b| store.put(b, Durability::Batch).unwrap())
        .collect();
    store.sync().unwrap();
    assert_eq!(
        store.compact().unwrap(),
        0,
        "nothing removed, nothing freed"
    );
    let (_, full) = store.usage().unwrap();

    // A tenth removed: far below any repack threshold, yet freed by compact.
    for id in &ids[..4] {
        assert!(store.remove(id).unwrap());
    }
    let (_, marked) = store.usage().unwrap();
    assert!(marked >= full, "a removal alone frees nothing on disk");
    let freed = store.compact().unwrap();
    let (_, after) = store.usage().unwrap();
    assert!(freed >= 4 * 100_000, "compact freed only {freed} bytes");
    assert!(after + 4 * 100_000 <= full, "usage {full} -> {after}");
    for (id, b) in ids.iter().zip(&blobs).skip(4) {
        assert_eq!(&store.get(id).unwrap(), b);
    }
    for id in &ids[..4] {
        assert!(!store.has(id).unwrap());
    }
    // The same after a reopen: the rewritten packs are what is on disk.
    let root = store.root().to_path_buf();
    drop(store);
    let store = BlobStore::open(&root).unwrap();
    for (id, b) in ids.iter().zip(&blobs).skip(4) {
        assert_eq!(&store.get(id).unwrap(), b);
    }
    assert!(!store.has(&ids[0]).unwrap());
}
