//! Engine benchmark: publish cost after one change, and merge cost, against vault size.
//!
//! `cargo run --release -p cairn-vault --example vault_bench [-- --quick]`
//!
//! Publish runs on a FileNodeStore (fsync on) + on-disk BlobStore + SQLite registry in a
//! temp dir, so it includes real durability costs; the baseline is one bare registry CAS
//! put on the same registry. Merge runs on a MemoryNodeStore (the cost measured is the
//! diff + resolution + tree rewrite, not disk).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_crypto::{AgeIdentity, DeviceId, DeviceKey, VaultSecret};
use cairn_registry::{Payload, Registry, RegistryEntry, Revision};
use cairn_store::BlobStore;
use cairn_tree::{FileNodeStore, FileStoreOptions, MemoryNodeStore, NodeId};
use cairn_vault::{
    Change, Content, Entry, EntryKind, Hlc, Keyring, SnapshotHeader, Vault, VaultPath, VaultStores,
    Version, VersionVector, write_snapshot,
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn file_entry(device: DeviceId, i: u64, tag: &str) -> Entry {
    let body = format!("{tag}-{i}").into_bytes();
    Entry {
        kind: EntryKind::File,
        mode: 0o644,
        mtime_ns: i as i64,
        size: body.len() as u64,
        xattrs: BTreeMap::new(),
        content: Content::Inline(body),
        version: Version::write(
            &VersionVector::new(),
            device,
            Hlc {
                wall_ms: 1_000 + i,
                counter: 0,
            },
        ),
    }
}

fn dir_entry(device: DeviceId) -> Entry {
    Entry {
        kind: EntryKind::Dir,
        mode: 0o755,
        mtime_ns: 0,
        size: 0,
        xattrs: BTreeMap::new(),
        content: Content::None,
        version: Version::write(&VersionVector::new(), device, Hlc::ZERO),
    }
}

/// `n` files spread over 1000 directories, as sorted (key, entry) pairs.
fn vault_entries(n: u64, device: DeviceId) -> impl Iterator<Item = (Vec<u8>, Entry)> {
    let per_dir = n.div_ceil(1000);
    (0..1000u64).flat_map(move |d| {
        let dir = format!("dir{d:04}/").into_bytes();
        let files = (0..per_dir)
            .map(move |f| d * per_dir + f)
            .filter(move |&i| i < n)
            .map(move |i| {
                (
                    format!("dir{d:04}/file{i:08}.txt").into_bytes(),
                    file_entry(device, i, "base"),
                )
            });
        std::iter::once((dir, dir_entry(device))).chain(files)
    })
}

fn keyring() -> (Keyring, DeviceKey) {
    let id = AgeIdentity::generate();
    (
        Keyring {
            vault: VaultSecret::generate().vault_id(),
            recipients: vec![id.recipient()],
            history: Vec::new(),
            identity: id,
        },
        DeviceKey::generate(),
    )
}

fn bench_publish(n: u64, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (keys, key) = keyring();
    let device = key.device_id();
    let build_nodes =
        FileNodeStore::open_with(dir.path().join("nodes"), FileStoreOptions { fsync: false })
            .expect("node store");
    let blobs = Arc::new(BlobStore::open(dir.path().join("blobs")).expect("blob store"));
    let t = Instant::now();
    let (root, _) = VaultStores::new(Arc::new(build_nodes), blobs.clone())
        .build(vault_entries(n, device))
        .expect("build");
    let build = t.elapsed();
    let nodes = FileNodeStore::open(dir.path().join("nodes")).expect("node store");
    let stores = VaultStores::new(Arc::new(nodes), blobs);
    let reg = Registry::open(dir.path().join("registry.sqlite")).expect("registry");
    reg.add_member(&keys.vault, &device).expect("member");
    let head = write_snapshot(
        &stores,
        &keys,
        &SnapshotHeader {
            vault: keys.vault,
            root,
            parents: vec![],
            device,
            clock: Hlc::ZERO,
            seq: 1,
            created_ms: 0,
        },
    )
    .expect("header");
    let mut v = Vault::open(stores, keys.clone(), key.clone(), head).expect("open");
    let mut times = Vec::new();
    let mut commit_nodes = Vec::new();
    for r in 0..runs as u64 {
        let path = VaultPath::new(&format!("dir0500/file{:08}.txt", r * 7919 % n)).expect("path");
        let t = Instant::now();
        let c = v
            .commit(
                [(
                    path,
                    Change::write_inline(format!("edit-{r}").into_bytes(), 0o644, 0),
                )],
                10_000 + r,
            )
            .expect("commit");
        v.publish(&reg, 10_000 + r).expect("publish");
        times.push(t.elapsed());
        commit_nodes.push(c.nodes_written);
    }
    // Baseline: one bare registry compare-and-swap put (sign + SQLite transaction + fsync).
    let mut base = Vec::new();
    let mut rev = reg
        .get(&keys.vault, &device)
        .expect("get")
        .map_or(0, |e| e.revision.0);
    for r in 0..runs as u64 {
        rev += 1;
        let e = RegistryEntry::sign(&key, keys.vault, Revision(rev), Payload([r as u8; 32]));
        let t = Instant::now();
        reg.put(&keys.vault, &e).expect("put");
        base.push(t.elapsed());
    }
    let (pm, bm) = (median(times), median(base));
    commit_nodes.sort();
    println!(
        "publish after 1 change | {n:>9} entries | median {:7.2} ms | tree nodes written {:>2} | bare registry CAS put {:5.2} ms | ratio {:4.1}x | (build {:.1} s)",
        ms(pm),
        commit_nodes[commit_nodes.len() / 2],
        ms(bm),
        pm.as_secs_f64() / bm.as_secs_f64(),
        build.as_secs_f64()
    );
}

fn bench_merge(n: u64, differing: u64, runs: usize) {
    let stores = VaultStores::new(
        Arc::new(MemoryNodeStore::new()),
        Arc::new(cairn_vault::MemoryBlobs::new()),
    );
    let a = DeviceId([1; 32]);
    let b = DeviceId([2; 32]);
    let (base, _) = stores.build(vault_entries(n, a)).expect("build");
    // Each side changes `differing / 2` paths; a tenth of them are the same paths on both
    // sides (concurrent edits -> conflict copies).
    let half = differing / 2;
    let overlap = half / 10;
    let pick = |i: u64| i * 104_729 % n;
    let edit = |root: NodeId, dev: DeviceId, idx: &mut dyn Iterator<Item = u64>, tag: &str| {
        let mut batch: Vec<(Vec<u8>, Entry)> = idx
            .map(|i| {
                let d = i / n.div_ceil(1000);
                let key = format!("dir{d:04}/file{i:08}.txt").into_bytes();
                let mut e = file_entry(dev, i, tag);
                e.version = Version::write(
                    &VersionVector::from_pairs([(a, 1)]),
                    dev,
                    Hlc {
                        wall_ms: 5_000_000 + i,
                        counter: 0,
                    },
                );
                (key, e)
            })
            .collect();
        batch.sort_by(|x, y| x.0.cmp(&y.0));
        batch.dedup_by(|x, y| x.0 == y.0);
        stores.apply(&root, &batch).expect("apply").0
    };
    let ours = edit(base, a, &mut (0..half).map(pick), "ours");
    let theirs = edit(
        base,
        b,
        &mut (half - overlap..2 * half - overlap).map(pick),
        "theirs",
    );
    let mut times = Vec::new();
    let mut warm = Vec::new();
    let mut diff_only = Vec::new();
    let mut report = None;
    for _ in 0..runs {
        stores.tree.clear_cache();
        let t = Instant::now();
        let out = stores.merge(&ours, &theirs).expect("merge");
        times.push(t.elapsed());
        // Warm: the merging device has its own tree's nodes cached.
        let t = Instant::now();
        stores.merge(&ours, &theirs).expect("merge");
        warm.push(t.elapsed());
        stores.tree.clear_cache();
        let t = Instant::now();
        let n = stores.tree.diff(&ours, &theirs).count();
        diff_only.push(t.elapsed());
        assert!(n > 0);
        report = Some(out);
    }
    let out = report.expect("at least one run");
    let back = stores.merge(&theirs, &ours).expect("merge");
    assert_eq!(back.root, out.root, "merge must be commutative");
    println!(
        "merge                  | {n:>9} entries | {:>6} differing keys | median {:8.2} ms cold cache, {:8.2} ms warm (bare tree diff {:7.2} ms) | {} conflicts | {} keys written, {} nodes",
        out.report.differing,
        ms(median(times)),
        ms(median(warm)),
        ms(median(diff_only)),
        out.report.conflicts.len(),
        out.report.written,
        out.stats.nodes_written
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[u64] = if quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    };
    for &n in sizes {
        bench_publish(n, 11);
    }
    let big = *sizes.last().unwrap_or(&10_000);
    for d in [100, 1_000, 10_000] {
        bench_merge(big, d, 5);
    }
    // The same change set on smaller vaults: the cost should follow the changes, not the size.
    bench_merge(100_000, 1_000, 5);
    bench_merge(10_000, 1_000, 5);
}
