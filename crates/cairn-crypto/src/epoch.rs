//! Key epochs: the vault's secrets as a sequence, so a removal can stop future content from
//! being readable by the removed device.
//!
//! Epoch 0's secret is the [`VaultSecret`] (the vault id derives from it forever). Each
//! rotation (a member removed, or `cairn rotate-keys`) makes a fresh random
//! [`EpochSecret`] with the next number. Everything new (chunks, tree nodes) is sealed under
//! the current epoch's content key; every older epoch is kept so history stays readable. A
//! device that never received an epoch's secret (it was removed before the rotation) cannot
//! read anything sealed under it, whatever else it holds.
//!
//! Sealed structural blobs name their epoch by an [`EpochId`], an 8-byte tag derived from
//! the epoch secret, rather than by number: two members may rotate concurrently while
//! partitioned and produce two different epochs with the same number. Both stay readable;
//! writers converge on one "current" epoch by a deterministic order (highest number, then
//! smallest id), so every member ends up writing under the same key.
//!
//! An epoch that a removed device ever held is *retired*: still readable, never written
//! under again. The caller decides which (it knows the member list and who held what) and
//! rotates when no epoch is left to write under.

use std::fmt;
use std::sync::RwLock;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::{ContentKey, VaultSecret};

const CTX_EPOCH_ID: &str = "cairn key epoch id v1";
/// The same context [`VaultSecret::content_key`] uses, so epoch 0's content key is exactly
/// the key every vault used before epochs existed.
const CTX_CONTENT_KEY: &str = "cairn content key v1";
const CTX_RECOVERY_TOKEN: &str = "cairn pairing recovery token v1";
const CTX_HISTORY_IDENTITY: &str = "cairn snapshot history identity v1";

/// Short public tag of one epoch's secret; safe to log and to put in frames.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EpochId(pub [u8; 8]);

impl fmt::Display for EpochId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EpochId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochId({self})")
    }
}

/// One epoch's 32-byte secret. Whoever holds it reads everything sealed in that epoch.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct EpochSecret([u8; 32]);

impl EpochSecret {
    pub fn generate() -> Self {
        Self(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Epoch 0: the vault secret itself.
    pub fn genesis(vault: &VaultSecret) -> Self {
        Self(*vault.as_bytes())
    }

    pub fn id(&self) -> EpochId {
        let full = blake3::derive_key(CTX_EPOCH_ID, &self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&full[..8]);
        EpochId(id)
    }

    pub fn content_key(&self) -> ContentKey {
        ContentKey::from_bytes(blake3::derive_key(CTX_CONTENT_KEY, &self.0))
    }

    /// The age identity every holder of this epoch shares. Snapshot headers are sealed to it
    /// besides the members' own recipients, so a device that joins or recovers later (and
    /// receives the epoch) can still read the history written under it; a device removed
    /// before the epoch began never holds it.
    pub fn history_identity(&self) -> crate::AgeIdentity {
        crate::AgeIdentity::from_seed(blake3::derive_key(CTX_HISTORY_IDENTITY, &self.0))
    }

    /// What a device proves knowledge of when it rejoins with this epoch's recovery phrase.
    /// Derived, so the token on the wire never reveals the secret.
    pub fn recovery_token(&self) -> [u8; 32] {
        blake3::derive_key(CTX_RECOVERY_TOKEN, &self.0)
    }

    /// The epoch's recovery phrase: its secret as 24 BIP-39 words (epoch 0's phrase is the
    /// vault secret's, as before epochs).
    pub fn to_phrase(&self) -> String {
        VaultSecret::from_bytes(self.0).to_phrase()
    }

    pub fn from_phrase(phrase: &str) -> Result<Self, crate::CryptoError> {
        Ok(Self(*VaultSecret::from_phrase(phrase)?.as_bytes()))
    }
}

impl fmt::Debug for EpochSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochSecret(<redacted>, id {})", self.id())
    }
}

/// One epoch: its number in the sequence and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Epoch {
    pub number: u32,
    pub secret: EpochSecret,
}

impl Epoch {
    pub fn id(&self) -> EpochId {
        self.secret.id()
    }

    /// The order writers agree on: a later number wins, then the smaller id.
    fn rank(&self) -> (u32, std::cmp::Reverse<EpochId>) {
        (self.number, std::cmp::Reverse(self.id()))
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({} {})", self.number, self.id())
    }
}

/// Every epoch this device holds, shared by everything that seals or opens (cheap reads,
/// rare writes). New epochs can arrive while the vault is served: sealers ask for the
/// current one each time, so they switch at once.
pub struct KeyEpochs {
    epochs: RwLock<Vec<(Epoch, ContentKey)>>,
    retired: RwLock<std::collections::HashSet<EpochId>>,
}

impl fmt::Debug for KeyEpochs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<_> = self.read().iter().map(|(e, _)| e.clone()).collect();
        f.debug_tuple("KeyEpochs").field(&list).finish()
    }
}

impl KeyEpochs {
    /// Epoch 0 only.
    pub fn new(vault: &VaultSecret) -> Self {
        let genesis = Epoch {
            number: 0,
            secret: EpochSecret::genesis(vault),
        };
        let key = genesis.secret.content_key();
        Self {
            epochs: RwLock::new(vec![(genesis, key)]),
            retired: RwLock::new(Default::default()),
        }
    }

    /// Replaces the set of retired epochs: readable, but never current again.
    pub fn set_retired(&self, ids: impl IntoIterator<Item = EpochId>) {
        *self.retired.write().unwrap_or_else(|p| p.into_inner()) = ids.into_iter().collect();
    }

    /// Whether every epoch held is retired: someone must rotate before new content is safe
    /// from a removed device (until then the newest epoch is used, as the least bad).
    pub fn needs_rotation(&self) -> bool {
        let retired = self.retired.read().unwrap_or_else(|p| p.into_inner());
        self.read().iter().all(|(e, _)| retired.contains(&e.id()))
    }

    /// The newest epoch that is not retired (else the newest), with its key.
    fn current_entry(&self) -> (Epoch, ContentKey) {
        let retired = self.retired.read().unwrap_or_else(|p| p.into_inner());
        let list = self.read();
        let (e, k) = list
            .iter()
            .rev()
            .find(|(e, _)| !retired.contains(&e.id()))
            .or_else(|| list.last())
            .expect("epoch 0 is always present");
        (e.clone(), k.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<(Epoch, ContentKey)>> {
        self.epochs.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an epoch; returns whether it was new. Epoch 0 is fixed by the vault secret, so
    /// another "epoch 0" is refused (returns false) rather than stored.
    pub fn add(&self, epoch: Epoch) -> bool {
        if epoch.number == 0 {
            return false;
        }
        let mut list = self.epochs.write().unwrap_or_else(|p| p.into_inner());
        let id = epoch.id();
        if list.iter().any(|(e, _)| e.id() == id) {
            return false;
        }
        let key = epoch.secret.content_key();
        list.push((epoch, key));
        list.sort_by_key(|(e, _)| e.rank());
        true
    }

    /// The epoch new content is sealed under.
    pub fn current(&self) -> Epoch {
        self.current_entry().0
    }

    /// The current epoch's id and content key.
    pub fn current_key(&self) -> (EpochId, ContentKey) {
        let (e, k) = self.current_entry();
        (e.id(), k)
    }

    /// The content key of epoch `id`, if this device holds it.
    pub fn key(&self, id: &EpochId) -> Option<ContentKey> {
        self.read()
            .iter()
            .find(|(e, _)| e.id() == *id)
            .map(|(_, k)| k.clone())
    }

    /// Epoch 0's content key (blobs sealed before epochs carry no epoch tag).
    pub fn genesis_key(&self) -> ContentKey {
        self.read()
            .iter()
            .find(|(e, _)| e.number == 0)
            .map(|(_, k)| k.clone())
            .expect("epoch 0 is always present")
    }

    pub fn genesis_id(&self) -> EpochId {
        self.read()
            .iter()
            .find(|(e, _)| e.number == 0)
            .map(|(e, _)| e.id())
            .expect("epoch 0 is always present")
    }

    /// Every epoch, oldest first.
    pub fn all(&self) -> Vec<Epoch> {
        self.read().iter().map(|(e, _)| e.clone()).collect()
    }

    pub fn contains(&self, id: &EpochId) -> bool {
        self.read().iter().any(|(e, _)| e.id() == *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_is_the_vault_secret_with_its_old_content_key() {
        let v = VaultSecret::from_bytes([5; 32]);
        let keys = KeyEpochs::new(&v);
        assert_eq!(keys.current().number, 0);
        assert_eq!(keys.current_key().1, v.content_key());
        assert_eq!(keys.genesis_key(), v.content_key());
        assert_eq!(
            EpochSecret::genesis(&v).recovery_token(),
            blake3::derive_key("cairn pairing recovery token v1", &[5; 32])
        );
    }

    #[test]
    fn the_current_epoch_is_the_highest_then_the_smallest_id() {
        let keys = KeyEpochs::new(&VaultSecret::generate());
        let one = Epoch {
            number: 1,
            secret: EpochSecret::generate(),
        };
        assert!(keys.add(one.clone()));
        assert!(!keys.add(one.clone()), "an epoch is added once");
        assert_eq!(keys.current(), one);
        // A concurrent rotation produced another epoch 1: both kept, one current everywhere.
        let other = Epoch {
            number: 1,
            secret: EpochSecret::generate(),
        };
        assert!(keys.add(other.clone()));
        let want = if one.id() < other.id() { &one } else { &other };
        assert_eq!(keys.current(), *want);
        assert!(keys.key(&one.id()).is_some() && keys.key(&other.id()).is_some());
        // Order of arrival does not matter.
        let again = KeyEpochs::new(&VaultSecret::generate());
        again.add(other.clone());
        again.add(one.clone());
        assert_eq!(again.current(), *want);
        assert!(!keys.add(Epoch {
            number: 0,
            secret: EpochSecret::generate()
        }));
    }

    #[test]
    fn retired_epochs_stay_readable_but_are_never_current() {
        let keys = KeyEpochs::new(&VaultSecret::generate());
        let g = keys.current().id();
        assert!(!keys.needs_rotation());
        keys.set_retired([g]);
        assert!(keys.needs_rotation());
        assert_eq!(keys.current().id(), g, "nothing better to write under yet");
        let one = Epoch {
            number: 1,
            secret: EpochSecret::generate(),
        };
        keys.add(one.clone());
        assert!(!keys.needs_rotation());
        assert_eq!(keys.current(), one);
        // A later epoch a removed device held is skipped for an older clean one.
        let two = Epoch {
            number: 2,
            secret: EpochSecret::generate(),
        };
        keys.add(two.clone());
        keys.set_retired([g, two.id()]);
        assert_eq!(keys.current(), one);
        assert!(keys.key(&two.id()).is_some() && keys.key(&g).is_some());
    }

    #[test]
    fn epochs_have_independent_keys_and_phrases() {
        let a = EpochSecret::generate();
        let b = EpochSecret::generate();
        assert_ne!(a.content_key(), b.content_key());
        assert_ne!(a.recovery_token(), b.recovery_token());
        assert_ne!(a.id(), b.id());
        assert_eq!(EpochSecret::from_phrase(&a.to_phrase()).unwrap(), a);
        assert!(!format!("{a:?}").contains(&hex::encode(a.as_bytes())));
    }
}
