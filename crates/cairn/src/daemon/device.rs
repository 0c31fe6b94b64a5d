//! One vault opened on this device: blob store, registry and engine, resumed from the
//! device's last published snapshot.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use cairn_crypto::ContentKey;
use cairn_registry::Registry;
use cairn_store::BlobStore;
use cairn_vault::{Keyring, SnapshotId, Vault, VaultStores};

use crate::state::VaultState;

/// Node cache budget of the daemon (bytes). Bounded so a huge vault cannot grow the daemon.
pub const NODE_CACHE_BYTES: usize = 32 << 20;

pub struct Device {
    pub blobs: Arc<BlobStore>,
    pub registry: Registry,
    pub stores: VaultStores,
    pub content_key: ContentKey,
    vault: Mutex<Vault>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Device {
    pub fn open(state: &VaultState) -> Result<Self> {
        let blobs = Arc::new(
            BlobStore::open(state.dir.join("store"))
                .with_context(|| format!("opening the blob store in {}", state.dir.display()))?,
        );
        let registry = Registry::open(state.dir.join("registry.sqlite"))
            .with_context(|| format!("opening the registry in {}", state.dir.display()))?;
        let vault_id = state.secret.vault_id();
        let device_id = state.device.device_id();
        registry.add_member(&vault_id, &device_id)?;
        let content_key = state.secret.content_key();
        let stores = super::stores::vault_stores(blobs.clone(), &content_key, NODE_CACHE_BYTES)?;
        let keys = Keyring {
            vault: vault_id,
            identity: state.age.clone(),
            recipients: vec![state.age.recipient()],
        };
        let vault = match registry.get(&vault_id, &device_id)? {
            Some(head) => Vault::open(stores.clone(), keys, state.device.clone(), SnapshotId::from(head.payload))
                .context("loading this device's last snapshot (the store may be damaged; run `cairn verify`)")?,
            None => Vault::new(stores.clone(), keys, state.device.clone()),
        };
        Ok(Self {
            blobs,
            registry,
            stores,
            content_key,
            vault: Mutex::new(vault),
        })
    }

    /// The engine. One writer at a time: flushes are serialized through this lock, readers
    /// only take it to copy the current root.
    pub fn vault(&self) -> MutexGuard<'_, Vault> {
        self.vault.lock().unwrap_or_else(|e| e.into_inner())
    }
}
