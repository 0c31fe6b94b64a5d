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

/// Every file under the root, relative, excluding fan-out directories.
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
        } else {
            out.push(dir.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
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
    let hex = a.to_hex();
    assert!(
        store
            .path_of(&a)
            .ends_with(format!("{}/{}", &hex[..2], &hex[2..]))
    );
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
    let before = fs::metadata(store.path_of(&id))
        .unwrap()
        .modified()
        .unwrap();
    for durability in [Durability::Batch, Durability::Immediate] {
        assert_eq!(store.put(b"same", durability).unwrap(), id);
    }
    let after = fs::metadata(store.path_of(&id))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "an existing blob must not be rewritten");
    assert_eq!(all_files(&store).len(), 1);
}

#[test]
fn put_repairs_a_truncated_blob() {
    let (_dir, store) = store();
    let id = store
        .put(b"some longer content", Durability::Batch)
        .unwrap();
    fs::write(store.path_of(&id), b"some").unwrap();
    store
        .put(b"some longer content", Durability::Batch)
        .unwrap();
    assert_eq!(store.get(&id).unwrap(), b"some longer content");
}

#[test]
fn flipped_byte_on_disk_is_refused_everywhere() {
    let (_dir, store) = store();
    let good = store.put(&[7u8; 1000], Durability::Batch).unwrap();
    let bad = store.put(&[9u8; 1000], Durability::Batch).unwrap();
    let path = store.path_of(&bad);
    let mut bytes = fs::read(&path).unwrap();
    bytes[500] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

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
    // Truncation and extension are corruption too.
    fs::write(&path, &bytes[..10]).unwrap();
    assert!(matches!(store.get(&bad), Err(StoreError::Corrupt { .. })));
}

#[test]
fn streaming_put_and_open() {
    let (_dir, store) = store();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let id = store.put_reader(&data[..], Durability::Immediate).unwrap();
    assert_eq!(id, ChunkId::of(&data));
    // Same content again: no duplicate, no temp left behind.
    assert_eq!(store.put_reader(&data[..], Durability::Batch).unwrap(), id);
    assert_eq!(all_files(&store).len(), 1);

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
    let fan = store.path_of(&id).parent().unwrap().to_path_buf();
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
                    // Whoever renames last, a reader at any moment sees the whole blob.
                    assert_eq!(store.get(&id).unwrap().len(), data.len());
                    id
                })
            })
            .collect();
        let ids: Vec<ChunkId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(ids.iter().all(|id| *id == ChunkId::of(&data)));
        store.sync().unwrap();
        assert_eq!(
            all_files(&store).len(),
            1,
            "round {round}: {:?}",
            all_files(&store)
        );
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
