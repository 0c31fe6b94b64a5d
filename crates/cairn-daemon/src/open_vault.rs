//! One vault opened on this device: blob store, registry and engine, resumed from the
//! device's last published snapshot.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use cairn_crypto::{AgeRecipient, DeviceId, KeyEpochs, VaultId};
use cairn_registry::{MemberRecord, Registry};
use cairn_store::BlobStore;
use cairn_vault::{Keyring, SnapshotId, Vault, VaultStores};

use super::faults::PeerFaults;
use super::stores::LocalOrRemote;
use crate::state::VaultState;

/// Node cache budget (bytes) of short-lived commands; the daemon takes its budget from the
/// configuration. Bounded so a huge vault cannot grow the process.
pub const NODE_CACHE_BYTES: usize = 32 << 20;

pub struct OpenVault {
    pub blobs: Arc<BlobStore>,
    /// The same store, falling back to peers for missing blobs once the network is up.
    pub remote_blobs: Arc<LocalOrRemote>,
    pub registry: Arc<Registry>,
    pub vault_id: VaultId,
    pub device_id: DeviceId,
    /// Signs member records (invites, removals).
    pub key: cairn_crypto::DeviceKey,
    pub stores: VaultStores,
    /// Every key epoch this device holds; new content is sealed under the current one.
    pub keys: Arc<KeyEpochs>,
    /// The vault's state directory (key files, store, registry).
    pub dir: std::path::PathBuf,
    /// Misbehaviour of members seen while serving this vault, and where content came from.
    pub faults: Arc<PeerFaults>,
    /// Which content this device keeps (mode and pins).
    pub ondemand: Arc<crate::ondemand::OnDemand>,
    vault: Mutex<Vault>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl OpenVault {
    pub fn open(state: &VaultState) -> Result<Self> {
        Self::open_with(state, NODE_CACHE_BYTES)
    }

    /// [`OpenVault::open`] with a node cache of `node_cache_bytes`.
    pub fn open_with(state: &VaultState, node_cache_bytes: usize) -> Result<Self> {
        let blobs = Arc::new(
            BlobStore::open(state.dir.join("store"))
                .with_context(|| format!("opening the blob store in {}", state.dir.display()))?,
        );
        let registry = Arc::new(
            Registry::open(state.dir.join("registry.sqlite"))
                .with_context(|| format!("opening the registry in {}", state.dir.display()))?,
        );
        let vault_id = state.secret.vault_id();
        let device_id = state.device.device_id();
        if registry.is_removed(&vault_id, &device_id)? {
            anyhow::bail!(
                "this device was removed from vault {vault_id}; it can no longer sync. Join again with a new ticket (`cairn join`) into another --vault name"
            );
        }
        registry.add_member(&vault_id, &device_id)?;
        let roster = registry.roster(&vault_id)?;
        if roster.is_empty() && registry.members(&vault_id)? == vec![device_id] {
            // The founder signs itself in; joiners get their record from the inviter.
            let me = MemberRecord::add(
                &state.device,
                vault_id,
                device_id,
                state.age.recipient().to_string(),
                now_ms(),
            );
            registry.merge_roster(&vault_id, &[me])?;
        }
        let ondemand = Arc::new(crate::ondemand::OnDemand::load(&state.dir)?);
        let epochs = Arc::new(state.key_epochs());
        let remote_blobs = Arc::new(LocalOrRemote::new(blobs.clone()));
        let stores =
            super::stores::vault_stores(remote_blobs.clone(), epochs.clone(), node_cache_bytes)?;
        let keys = Keyring {
            vault: vault_id,
            identity: state.age.clone(),
            recipients: recipients(&registry, &vault_id, state.age.recipient(), &epochs)?,
            history: history_identities(&epochs),
        };
        let vault = match registry.get(&vault_id, &device_id)? {
            Some(head) => Vault::open(stores.clone(), keys, state.device.clone(), SnapshotId::from(head.payload))
                .context("loading this device's last snapshot (the store may be damaged; run `cairn verify`)")?,
            None => Vault::new(stores.clone(), keys, state.device.clone()),
        };
        let me = Self {
            blobs,
            remote_blobs,
            registry,
            vault_id,
            device_id,
            key: state.device.clone(),
            stores,
            keys: epochs,
            dir: state.dir.clone(),
            faults: Arc::default(),
            ondemand,
            vault: Mutex::new(vault),
        };
        // Names are cosmetic: a registry that cannot store one still opens.
        if let Err(e) = crate::names::ensure_own_name(&me) {
            tracing::warn!(error = %format!("{e:#}"), "cannot give this device its default name");
        }
        Ok(me)
    }

    /// The engine. One writer at a time: flushes are serialized through this lock, readers
    /// only take it to copy the current root.
    pub fn engine(&self) -> MutexGuard<'_, Vault> {
        self.vault.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The shared history identities of every key epoch this device holds.
pub fn history_identities(epochs: &KeyEpochs) -> Vec<cairn_crypto::AgeIdentity> {
    epochs
        .all()
        .iter()
        .map(|e| e.secret.history_identity())
        .collect()
}

/// Everyone a snapshot header must be readable by: the current members' recipients from the
/// signed roster, and this device's own (always, even before its record arrives).
pub fn recipients(
    registry: &Registry,
    vault: &VaultId,
    own: AgeRecipient,
    epochs: &KeyEpochs,
) -> Result<Vec<AgeRecipient>> {
    // The current epoch's shared history recipient: members who join later (or a device
    // recovered from the phrase) receive the epoch and can read this history too.
    let mut out = vec![own, epochs.current().secret.history_identity().recipient()];
    for r in registry.roster(vault)? {
        if r.removed {
            continue;
        }
        match r.recipient.parse::<AgeRecipient>() {
            Ok(rec) if !out.contains(&rec) => out.push(rec),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(device = %r.device.short(), error = %e, "member record has an unusable age recipient")
            }
        }
    }
    Ok(out)
}
