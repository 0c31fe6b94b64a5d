//! Concurrent producers on one device: ten threads, each with its own registry handle on one
//! SQLite file and its own engine on one store directory, publish at once. The final head
//! must hold every writer's changes (and, for overlapping paths, every writer's content).

mod common;

use std::sync::Arc;
use std::time::Duration;

use cairn_crypto::{AgeIdentity, DeviceKey, VaultSecret};
use cairn_registry::{PublishPolicy, Registry};
use cairn_store::BlobStore;
use cairn_tree::{FileNodeStore, FileStoreOptions};
use cairn_vault::{Change, Keyring, SnapshotId, Vault, VaultStores, load_snapshot};
use common::*;

struct Setup {
    dir: tempfile::TempDir,
    key: DeviceKey,
    keys: Keyring,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let secret = VaultSecret::generate();
        let id = AgeIdentity::generate();
        let keys = Keyring {
            vault: secret.vault_id(),
            recipients: vec![id.recipient()],
            history: Vec::new(),
            identity: id,
        };
        let reg = Registry::open(dir.path().join("registry.sqlite")).unwrap();
        reg.add_member(&keys.vault, &key.device_id()).unwrap();
        Self { dir, key, keys }
    }

    fn stores(&self) -> VaultStores {
        let nodes = FileNodeStore::open_with(
            self.dir.path().join("nodes"),
            FileStoreOptions { fsync: false },
        )
        .unwrap();
        let blobs = BlobStore::open(self.dir.path().join("blobs")).unwrap();
        VaultStores::new(Arc::new(nodes), Arc::new(blobs))
    }

    fn registry(&self) -> Registry {
        Registry::open(self.dir.path().join("registry.sqlite")).unwrap()
    }

    /// Runs `writers` threads; writer `i` commits `paths(i)` (with content `writer-i`)
    /// and publishes. Returns the final head's live entries.
    fn race(
        &self,
        writers: usize,
        paths: impl Fn(usize) -> Vec<String> + Sync,
    ) -> Vec<(String, Option<String>)> {
        std::thread::scope(|s| {
            for i in 0..writers {
                let paths = &paths;
                s.spawn(move || {
                    let reg = self.registry();
                    let mut v = Vault::new(self.stores(), self.keys.clone(), self.key.clone());
                    v.set_publish_policy(PublishPolicy {
                        max_attempts: 200,
                        base_backoff: Duration::from_millis(1),
                        max_backoff: Duration::from_millis(20),
                        ..PublishPolicy::default()
                    });
                    let changes: Vec<_> = paths(i)
                        .into_iter()
                        .map(|path| {
                            (
                                p(&path),
                                Change::write_inline(format!("writer-{i}").into_bytes(), 0o644, 0),
                            )
                        })
                        .collect();
                    v.commit(changes, 1_000 + i as u64).unwrap();
                    v.publish(&reg, 2_000 + i as u64).unwrap();
                });
            }
        });
        let reg = self.registry();
        let head = reg
            .get(&self.keys.vault, &self.key.device_id())
            .unwrap()
            .unwrap();
        let stores = self.stores();
        let snap = load_snapshot(&stores, &self.keys, SnapshotId::from(head.payload)).unwrap();
        // Every published snapshot stays loadable.
        let log = reg.log(&self.keys.vault, &self.key.device_id()).unwrap();
        assert!(log.len() >= writers);
        for (_, payload) in log {
            load_snapshot(&stores, &self.keys, SnapshotId::from(payload)).unwrap();
        }
        live(&stores.source(snap.header.root))
    }
}

#[test]
fn parallel_publishers_with_distinct_paths_all_land() {
    let s = Setup::new();
    let files = s.race(10, |i| (0..5).map(|j| format!("w{i}-f{j}")).collect());
    assert_eq!(files.len(), 50);
    for i in 0..10 {
        for j in 0..5 {
            let want = (format!("w{i}-f{j}"), Some(format!("writer-{i}")));
            assert!(files.contains(&want), "missing {want:?}");
        }
    }
}

#[test]
fn parallel_publishers_on_the_same_paths_keep_every_version() {
    let s = Setup::new();
    let files = s.race(10, |_| (0..3).map(|j| format!("shared{j}.txt")).collect());
    for j in 0..3 {
        for i in 0..10 {
            let content = format!("writer-{i}");
            let found = files.iter().any(|(k, c)| {
                c.as_deref() == Some(content.as_str())
                    && (*k == format!("shared{j}.txt")
                        || k.starts_with(&format!("shared{j}.sync-conflict-")))
            });
            assert!(
                found,
                "writer {i}'s content for shared{j}.txt is lost: {files:#?}"
            );
        }
    }
}
