//! History benchmark: builds a vault with N snapshots written by 3 devices (each commits a
//! small change and snapshots in turn, merging the others' heads every 10 rounds), then
//! measures what `cairn log` does: indexing the headers (cold), a refresh with nothing new
//! (what every `cairn log` pays), and the first page (20 snapshots with their changes).
//!
//! `cargo run --release -p cairn-daemon --example history_bench -- [SNAPSHOTS]`
//!
//! It drives the libraries directly (no daemons, no network), on disk stores in a temp dir.

use std::sync::Arc;
use std::time::Instant;

use cairn_crypto::{AgeIdentity, DeviceKey, VaultSecret};
use cairn_daemon::{Query, Timeline, diff_changes};
use cairn_store::BlobStore;
use cairn_tree::FileNodeStore;
use cairn_vault::{Attrs, Change, Keyring, Vault, VaultPath, VaultStores};

fn main() {
    let total: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = FileNodeStore::open(dir.path().join("nodes")).expect("node store");
    let blobs = Arc::new(BlobStore::open(dir.path().join("blobs")).expect("blob store"));
    let stores = VaultStores::new(Arc::new(nodes), blobs);
    let vault = VaultSecret::generate().vault_id();
    let ids: Vec<AgeIdentity> = (0..3).map(|_| AgeIdentity::generate()).collect();
    let recipients: Vec<_> = ids.iter().map(|i| i.recipient()).collect();
    let mut devices: Vec<Vault> = ids
        .iter()
        .map(|id| {
            Vault::new(
                stores.clone(),
                Keyring {
                    vault,
                    identity: id.clone(),
                    recipients: recipients.clone(),
                    history: Vec::new(),
                },
                DeviceKey::generate(),
            )
        })
        .collect();
    let t = Instant::now();
    let mut now = 1_700_000_000_000u64;
    let mut made = 0;
    let mut round = 0u64;
    while made < total {
        for (d, v) in devices.iter_mut().enumerate() {
            if made >= total {
                break;
            }
            now += 1000;
            let path = VaultPath::new(&format!("dev{d}/file{:04}.txt", round % 500)).unwrap();
            let parent = VaultPath::new(&format!("dev{d}")).unwrap();
            let mut changes = Vec::new();
            if round == 0 {
                changes.push((
                    parent,
                    Change::Mkdir {
                        attrs: Attrs {
                            mode: 0o755,
                            mtime_ns: 0,
                            xattrs: Default::default(),
                        },
                    },
                ));
            }
            changes.push((
                path,
                Change::write_inline(format!("round {round}").into_bytes(), 0o644, 0),
            ));
            v.commit(changes, now).expect("commit");
            v.snapshot(now).expect("snapshot");
            made += 1;
        }
        if round % 10 == 9 {
            let heads: Vec<_> = devices.iter().map(|v| v.head().unwrap().id).collect();
            for v in devices.iter_mut() {
                for h in &heads {
                    if Some(*h) != v.head().map(|s| s.id) {
                        v.receive(*h).expect("merge");
                    }
                }
            }
        }
        round += 1;
    }
    println!(
        "built {made} snapshots from 3 devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let heads: Vec<_> = devices.iter().map(|v| v.head().unwrap().id).collect();
    let keys = devices[0].keys().clone();

    let timeline = Timeline::open(dir.path()).expect("index");
    let t = Instant::now();
    let r = timeline
        .refresh(&stores, &keys, heads.clone())
        .expect("refresh");
    println!(
        "index (cold, opens every header): {} snapshots in {:.1} ms",
        r.added,
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let timeline = Timeline::open(dir.path()).expect("index");
    timeline.refresh(&stores, &keys, heads).expect("refresh");
    println!(
        "open + refresh (warm, nothing new): {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let page = timeline
        .page(&Query {
            before_ms: None,
            device: None,
            limit: 20,
        })
        .expect("page");
    let mut paths = 0;
    for s in &page {
        paths += diff_changes(&stores, &timeline, s, None)
            .expect("changes")
            .own
            .len();
    }
    println!(
        "first page: {} snapshots, {paths} changed paths, in {:.2} ms",
        page.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let deep = timeline
        .page(&Query {
            before_ms: Some(now - 1000 * (total as u64 / 2)),
            device: None,
            limit: 20,
        })
        .expect("page");
    for s in &deep {
        diff_changes(&stores, &timeline, s, None).expect("changes");
    }
    println!(
        "a page in the middle (--before): {} snapshots in {:.2} ms",
        deep.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
}
