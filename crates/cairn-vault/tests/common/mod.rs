#![allow(dead_code)]

use std::sync::Arc;

use cairn_crypto::{AgeIdentity, AgeRecipient, DeviceKey, VaultSecret};
use cairn_tree::MemoryNodeStore;
use cairn_vault::{
    Change, Content, Entry, EntrySource, Keyring, MemoryBlobs, Vault, VaultPath, VaultStores,
};

pub fn p(s: &str) -> VaultPath {
    VaultPath::new(s).unwrap()
}

/// A vault with `n` member devices sharing in-memory stores.
pub struct Fixture {
    pub secret: VaultSecret,
    pub stores: VaultStores,
    pub blobs: Arc<MemoryBlobs>,
    pub keys: Vec<DeviceKey>,
    pub ids: Vec<AgeIdentity>,
    pub recipients: Vec<AgeRecipient>,
}

impl Fixture {
    pub fn new(n: usize) -> Self {
        let blobs = Arc::new(MemoryBlobs::new());
        let ids: Vec<_> = (0..n).map(|_| AgeIdentity::generate()).collect();
        Self {
            secret: VaultSecret::generate(),
            stores: VaultStores::new(Arc::new(MemoryNodeStore::new()), blobs.clone()),
            blobs,
            keys: (0..n).map(|_| DeviceKey::generate()).collect(),
            recipients: ids.iter().map(AgeIdentity::recipient).collect(),
            ids,
        }
    }

    pub fn keyring(&self, i: usize) -> Keyring {
        Keyring {
            vault: self.secret.vault_id(),
            identity: self.ids[i].clone(),
            recipients: self.recipients.clone(),
            history: Vec::new(),
        }
    }

    pub fn vault(&self, i: usize) -> Vault {
        Vault::new(self.stores.clone(), self.keyring(i), self.keys[i].clone())
    }
}

pub fn write(v: &mut Vault, path: &str, bytes: &str, now: u64) {
    v.commit(
        [(
            p(path),
            Change::write_inline(bytes.as_bytes().to_vec(), 0o644, 0),
        )],
        now,
    )
    .unwrap();
}

pub fn mkdir(v: &mut Vault, path: &str, now: u64) {
    v.commit(
        [(
            p(path),
            Change::Mkdir {
                attrs: cairn_vault::Attrs {
                    mode: 0o755,
                    ..Default::default()
                },
            },
        )],
        now,
    )
    .unwrap();
}

/// Every live entry: (key as string, inline content if any).
pub fn live(src: &dyn EntrySource) -> Vec<(String, Option<String>)> {
    src.scan(b"", None)
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|(_, e)| e.is_live())
        .map(|(k, e)| (String::from_utf8(k).unwrap(), inline(&e)))
        .collect()
}

pub fn inline(e: &Entry) -> Option<String> {
    match &e.content {
        Content::Inline(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}
