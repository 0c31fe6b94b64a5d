//! Serving blobs out of pack files through iroh-blobs' stock provider (loopback only): a whole
//! blob, a byte range, and a missing blob that fails instead of hanging. This pins the use of
//! iroh-blobs' store protocol (`api::proto`), which its docs hide.

use std::sync::Arc;
use std::time::Duration;

use bao_tree::io::BaoContentItem;
use cairn_crypto::{DeviceId, DeviceKey};
use cairn_net::{BlobService, Members, NetConfig, Router, bind_endpoint};
use cairn_store::{BlobStore, ChunkId, Durability};
use iroh::Endpoint;
use iroh_blobs::Hash;
use iroh_blobs::get::fsm;
use iroh_blobs::protocol::{ChunkRanges, ChunkRangesExt, GetRequest};

const DEADLINE: Duration = Duration::from_secs(20);

struct Side {
    endpoint: Endpoint,
    _router: Router,
    blobs: BlobService,
    _dir: tempfile::TempDir,
}

async fn side(key: &DeviceKey, members: &[DeviceId]) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let members = Members::new(members.iter().copied());
    let endpoint = bind_endpoint(key, NetConfig::loopback(), members.clone(), None)
        .await
        .unwrap();
    for s in endpoint.bound_sockets() {
        assert!(s.ip().is_loopback(), "bound to {s}");
    }
    let store = Arc::new(BlobStore::open(dir.path().join("store")).unwrap());
    let blobs = BlobService::open(store, members);
    let router = Router::builder(endpoint.clone())
        .accept(iroh_blobs::ALPN, blobs.protocol())
        .spawn();
    Side {
        endpoint,
        _router: router,
        blobs,
        _dir: dir,
    }
}

/// Asks for `ranges` of `id`; returns the verified leaves as (offset, bytes), in order.
async fn get_ranges(
    conn: &iroh::endpoint::Connection,
    id: ChunkId,
    ranges: ChunkRanges,
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let hash = Hash::from_bytes(*id.as_bytes());
    let request = GetRequest::blob_ranges(hash, ranges);
    let connected = fsm::start(conn.clone(), request, Default::default())
        .next()
        .await
        .map_err(|e| e.to_string())?;
    let fsm::ConnectedNext::StartRoot(start) = connected.next().await.map_err(|e| e.to_string())?
    else {
        return Err("no root".into());
    };
    let (mut content, _size) = start.next().next().await.map_err(|e| e.to_string())?;
    let mut leaves = Vec::new();
    loop {
        match content.next().await {
            fsm::BlobContentNext::More((next, item)) => {
                if let BaoContentItem::Leaf(leaf) = item.map_err(|e| e.to_string())? {
                    leaves.push((leaf.offset, leaf.data.to_vec()));
                }
                content = next;
            }
            fsm::BlobContentNext::Done(_) => return Ok(leaves),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_blob_is_served_whole_and_in_ranges() {
    let (ka, kb) = (DeviceKey::generate(), DeviceKey::generate());
    let members = [ka.device_id(), kb.device_id()];
    let (a, b) = (side(&ka, &members).await, side(&kb, &members).await);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let store = a.blobs.blob_store();
    store
        .put(b"a neighbour in the same pack", Durability::Batch)
        .unwrap();
    let id = store.put(&data, Durability::Batch).unwrap();
    store.sync().unwrap();
    assert!(
        store
            .locate(&id)
            .unwrap()
            .unwrap()
            .path
            .ends_with("packs/00000001.pack")
    );

    // Whole, through the service's own fetch: lands in B's packs.
    tokio::time::timeout(
        DEADLINE,
        b.blobs.fetch_from(&b.endpoint, a.endpoint.addr(), id),
    )
    .await
    .expect("fetch timed out")
    .unwrap();
    assert!(b.blobs.blob_store().get(&id).unwrap() == data);

    // A byte range: iroh-blobs rounds it out to whole 1 KiB chunks, each verified.
    let conn = b
        .endpoint
        .connect(a.endpoint.addr(), iroh_blobs::ALPN)
        .await
        .unwrap();
    let leaves = tokio::time::timeout(
        DEADLINE,
        get_ranges(&conn, id, ChunkRanges::bytes(20_000..30_000)),
    )
    .await
    .expect("range request timed out")
    .unwrap();
    let start = leaves.first().unwrap().0 as usize;
    let got: Vec<u8> = leaves.into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(start, 19_456);
    assert!(got.len() >= 10_000 && start + got.len() >= 30_000);
    assert!(got == data[start..start + got.len()]);

    // A blob A does not have: an error, not a hang.
    let missing = ChunkId::of(b"nobody has this");
    let res = tokio::time::timeout(DEADLINE, get_ranges(&conn, missing, ChunkRanges::all()))
        .await
        .expect("a missing blob must fail, not hang");
    assert!(res.is_err() || res.is_ok_and(|l| l.is_empty()));
    let err = tokio::time::timeout(
        DEADLINE,
        b.blobs.fetch_from(&b.endpoint, a.endpoint.addr(), missing),
    )
    .await
    .expect("fetch of a missing blob timed out")
    .unwrap_err();
    assert!(err.to_string().contains(&missing.to_hex()), "{err}");
    assert!(!b.blobs.blob_store().has(&missing).unwrap());
}
