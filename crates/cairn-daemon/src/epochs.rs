//! Key epochs on this device: starting a new one (after a removal, or on `cairn rotate-keys`)
//! and taking up the ones other members started.
//!
//! A rotation makes a fresh epoch secret, seals one copy to each current member's age
//! recipient, signs the record and stores it in the registry, from where the next roster
//! exchange carries it to every member (the caller wakes the sessions). From then on this
//! device seals new chunks and tree nodes under the new epoch. A removed device has no copy
//! and so reads nothing written afterwards; what it already held stays readable to it.
//!
//! Which epoch to write under follows from signed data only, so every member reaches the same
//! answer: an epoch is *retired* once any device that ever held it is removed (epoch 0, the
//! vault secret, was held by every device ever added; a later epoch by the devices its
//! records carry a share for) or its creator is. When every epoch is retired (two members
//! removed each other, or a removal arrived before its rotation), each member that notices
//! rotates; concurrent rotations are all kept and the same one wins everywhere.

use anyhow::{Context, Result, bail};
use std::collections::{HashMap, HashSet};

use cairn_crypto::{AgeRecipient, DeviceId, Epoch, EpochId, EpochSecret, open_sealed, seal_to};
use cairn_registry::EpochRecord;

use crate::open_vault::{OpenVault, now_ms};
use crate::state::store_epochs;

/// What learning the registry's epoch records did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Learned {
    /// Epochs newly added to this device's keys.
    pub added: Vec<Epoch>,
}

impl OpenVault {
    /// Starts a new key epoch for the current members and uses it at once. Returns it (the
    /// caller prints its recovery phrase: the previous phrases admit nobody any more).
    pub fn rotate_keys(&self) -> Result<Epoch> {
        let members = self.member_recipients()?;
        if !members.iter().any(|(d, _)| *d == self.device_id) {
            bail!("this device is not in the member list, so it cannot rotate the vault's keys");
        }
        let number = self
            .keys
            .all()
            .iter()
            .map(|e| e.number)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .context("the vault has used every key epoch number")?;
        let epoch = Epoch {
            number,
            secret: EpochSecret::generate(),
        };
        let mut shares = Vec::with_capacity(members.len());
        for (device, recipient) in &members {
            let sealed = seal_to(std::slice::from_ref(recipient), epoch.secret.as_bytes())
                .with_context(|| format!("sealing the new epoch to {}", device.short()))?;
            shares.push((*device, sealed));
        }
        let record = EpochRecord::sign(
            &self.key,
            self.vault_id,
            number,
            epoch.id(),
            shares,
            now_ms(),
        )?;
        // Keys first: once the record is stored it may travel, and every member that opens
        // it starts writing under it; this device must not be the one that cannot.
        self.keys.add(epoch.clone());
        store_epochs(&self.dir, &self.keys).context("saving the new key epoch")?;
        let stored = self.registry.merge_epochs(&self.vault_id, &[record])?;
        if stored.is_empty() {
            bail!("the registry refused the new key epoch record (is this device still a member?)");
        }
        tracing::info!(epoch = number, id = %epoch.id(), members = members.len(), "started a new key epoch");
        Ok(epoch)
    }

    /// Opens this device's share of every epoch record it holds but whose secret it lacks.
    /// A share that does not open, or opens to a secret whose id is not the record's, is
    /// logged (naming the signer) and skipped: a hostile member cannot make us adopt a key
    /// other than the one it signed.
    pub fn learn_epochs(&self) -> Result<Learned> {
        let identity = self.engine().keys().identity.clone();
        let mut learned = Learned::default();
        for r in self.registry.epochs(&self.vault_id)? {
            if self.keys.contains(&r.epoch) {
                continue;
            }
            let Some(share) = r.share_for(&self.device_id) else {
                // Made without us: we joined later (a member hands us the secrets when we
                // pair) or were already removed.
                continue;
            };
            let secret = match open_sealed(&identity, share)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            {
                Some(b) => EpochSecret::from_bytes(b),
                None => {
                    tracing::warn!(signer = %r.signer.short(), epoch = r.number, "cannot open this device's copy of a key epoch");
                    continue;
                }
            };
            if secret.id() != r.epoch {
                tracing::warn!(signer = %r.signer.short(), epoch = r.number, "a key epoch's secret does not match its id; ignored");
                continue;
            }
            let epoch = Epoch {
                number: r.number,
                secret,
            };
            if self.keys.add(epoch.clone()) {
                learned.added.push(epoch);
            }
        }
        if !learned.added.is_empty() {
            store_epochs(&self.dir, &self.keys).context("saving received key epochs")?;
            let current = self.keys.current();
            tracing::info!(epoch = current.number, id = %current.id(), "now writing under key epoch");
        }
        Ok(learned)
    }

    /// Brings this device's keys in line with the registry: takes up new epochs, retires
    /// those a removed device held, and rotates if nothing is left to write under. Returns
    /// the epoch it started, if it had to.
    pub fn settle_epochs(&self) -> Result<Option<Epoch>> {
        self.learn_epochs()?;
        let retired = self.retired_epochs()?;
        self.keys.set_retired(retired);
        if !self.keys.needs_rotation() {
            return Ok(None);
        }
        if !self
            .registry
            .members(&self.vault_id)?
            .contains(&self.device_id)
        {
            return Ok(None);
        }
        tracing::info!("every key epoch this device holds was held by a removed device: rotating");
        let epoch = self.rotate_keys()?;
        let retired = self.retired_epochs()?;
        self.keys.set_retired(retired);
        Ok(Some(epoch))
    }

    /// Epochs a removed device held or created (see the module docs).
    fn retired_epochs(&self) -> Result<HashSet<EpochId>> {
        let roster = self.registry.roster(&self.vault_id)?;
        let removed: HashSet<DeviceId> = roster
            .iter()
            .filter(|r| r.removed)
            .map(|r| r.device)
            .collect();
        let mut retired = HashSet::new();
        if removed.is_empty() {
            return Ok(retired);
        }
        retired.insert(self.keys.genesis_id());
        let mut holders: HashMap<EpochId, HashSet<DeviceId>> = HashMap::new();
        for r in self.registry.epochs(&self.vault_id)? {
            let h = holders.entry(r.epoch).or_default();
            h.insert(r.signer);
            h.extend(r.shares.iter().map(|(d, _)| *d));
        }
        for e in self.keys.all() {
            if e.number == 0 {
                continue;
            }
            // An epoch without any record here arrived through pairing only: its records
            // travel with the roster, and until they come it cannot be judged clean.
            let clean = holders
                .get(&e.id())
                .is_some_and(|h| h.is_disjoint(&removed));
            if !clean {
                retired.insert(e.id());
            }
        }
        Ok(retired)
    }

    /// Seals every later epoch this device holds to a device that just joined through it,
    /// and signs that: the records then say the joiner held them (so its removal retires
    /// them), and it can read the history sealed under them.
    pub fn share_epochs_with(&self, device: DeviceId, recipient: &AgeRecipient) -> Result<()> {
        let mut records = Vec::new();
        for e in self.keys.all().into_iter().filter(|e| e.number > 0) {
            let sealed = seal_to(std::slice::from_ref(recipient), e.secret.as_bytes())
                .with_context(|| format!("sealing key epoch {} to {}", e.number, device.short()))?;
            records.push(EpochRecord::sign(
                &self.key,
                self.vault_id,
                e.number,
                e.id(),
                vec![(device, sealed)],
                now_ms(),
            )?);
        }
        if !records.is_empty() {
            self.registry.merge_epochs(&self.vault_id, &records)?;
        }
        Ok(())
    }

    /// Adds epochs handed over while pairing (the joiner cannot open older records: they
    /// were sealed before it existed).
    pub fn adopt_epochs(&self, epochs: impl IntoIterator<Item = Epoch>) -> Result<usize> {
        let mut n = 0;
        for e in epochs {
            n += usize::from(self.keys.add(e));
        }
        if n > 0 {
            store_epochs(&self.dir, &self.keys).context("saving received key epochs")?;
        }
        Ok(n)
    }

    /// Current members (not removed) and their age recipients, this device included.
    fn member_recipients(&self) -> Result<Vec<(DeviceId, AgeRecipient)>> {
        let own = self.engine().keys().identity.recipient();
        let mut out = vec![(self.device_id, own)];
        let members = self.registry.members(&self.vault_id)?;
        for r in self.registry.roster(&self.vault_id)? {
            if r.removed || r.device == self.device_id || !members.contains(&r.device) {
                continue;
            }
            match r.recipient.parse::<AgeRecipient>() {
                Ok(rec) => out.push((r.device, rec)),
                Err(e) => {
                    tracing::warn!(device = %r.device.short(), error = %e, "member has no usable age recipient: it will not receive the new key epoch")
                }
            }
        }
        Ok(out)
    }
}
