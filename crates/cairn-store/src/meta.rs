//! Deterministic sealing of structural blobs (tree nodes, chunk lists) under one vault key.
//!
//! Chunks get a key per plaintext (see [`crate::cipher`]) because their references carry the
//! key. Structural blobs are referenced only by id, so a reader needs a key it can derive
//! from the vault alone. Determinism still matters: equal trees must have equal node ids on
//! every device. The nonce is therefore synthetic (SIV-style): a keyed blake3 of the
//! plaintext, so one nonce only ever encrypts one plaintext, and the AEAD key is a separate
//! subkey.
//!
//! Frames:
//! - `0x02 | nonce (24) | ciphertext | tag (16)`: sealed under key epoch 0 (the vault
//!   secret), the only frame before key epochs existed, still written in epoch 0 so
//!   existing vaults keep their node ids;
//! - `0x03 | epoch id (8) | nonce (24) | ciphertext | tag (16)`: sealed under the named
//!   later epoch (see `cairn_crypto::KeyEpochs`).
//!
//! Everything before the ciphertext is associated data, so neither the version nor the
//! epoch tag can be changed to route a frame to another key unnoticed.

use std::fmt;
use std::sync::Arc;

use cairn_crypto::{ContentKey, EpochId, KeyEpochs};
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::cipher::{NONCE_LEN, TAG_LEN};

pub const META_FORMAT_V1: u8 = 2;
/// A frame naming its key epoch.
pub const META_FORMAT_EPOCH: u8 = 3;
const EPOCH_ID_LEN: usize = 8;
/// Bytes a sealed structural blob has on top of its plaintext (epoch 0 frame).
pub const META_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// The same for a frame of a later epoch.
pub const META_EPOCH_OVERHEAD: usize = META_OVERHEAD + EPOCH_ID_LEN;

/// Why a structural blob could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("sealed blob too short ({0} bytes)")]
    Truncated(usize),
    #[error("sealed blob has unknown format {0}; upgrade cairn")]
    UnknownFormat(u8),
    #[error("sealed blob failed authentication: altered, or sealed with another vault's key")]
    Authentication,
    #[error(
        "sealed under key epoch {0}, which this device does not hold: it was written after this device was removed from the vault, or the new epoch has not reached it yet"
    )]
    UnknownEpoch(EpochId),
}

/// Seals and opens structural blobs for one vault and one purpose.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MetaSealer {
    aead_key: [u8; 32],
    nonce_key: [u8; 32],
}

impl fmt::Debug for MetaSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MetaSealer(<redacted>)")
    }
}

impl MetaSealer {
    /// `purpose` separates key spaces (e.g. tree nodes vs chunk lists), so a blob of one kind
    /// can never be opened as the other.
    pub fn new(content_key: &ContentKey, purpose: &str) -> Self {
        let mut base = blake3::Hasher::new_derive_key("cairn 2025 structural blob key v1");
        base.update(content_key.as_bytes());
        base.update(purpose.as_bytes());
        let mut both = [0u8; 64];
        base.finalize_xof().fill(&mut both);
        let mut aead_key = [0u8; 32];
        let mut nonce_key = [0u8; 32];
        aead_key.copy_from_slice(&both[..32]);
        nonce_key.copy_from_slice(&both[32..]);
        both.zeroize();
        Self {
            aead_key,
            nonce_key,
        }
    }

    /// An epoch 0 frame.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        self.seal_frame(&[META_FORMAT_V1], plaintext)
    }

    /// Opens an epoch 0 frame.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, MetaError> {
        match sealed.first() {
            None => Err(MetaError::Truncated(0)),
            Some(&META_FORMAT_V1) => self.open_frame(1, sealed),
            Some(&v) => Err(MetaError::UnknownFormat(v)),
        }
    }

    /// `prefix | nonce | ciphertext | tag`, with `prefix | nonce` as associated data.
    fn seal_frame(&self, prefix: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        blake3::Hasher::new_keyed(&self.nonce_key)
            .update(plaintext)
            .finalize_xof()
            .fill(&mut nonce);
        let head = prefix.len() + NONCE_LEN;
        let mut out = Vec::with_capacity(head + plaintext.len() + TAG_LEN);
        out.extend_from_slice(prefix);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let (header, body) = out.split_at_mut(head);
        let tag = XChaCha20Poly1305::new(&Key::from(self.aead_key))
            .encrypt_inout_detached(&XNonce::from(nonce), header, body.into())
            // Only messages over 256 GiB are refused; structural blobs are at most a few MiB.
            .unwrap_or_else(|_| unreachable!("structural blob too large for XChaCha20-Poly1305"));
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a frame whose prefix (version byte, maybe an epoch id) is `prefix_len` bytes.
    fn open_frame(&self, prefix_len: usize, sealed: &[u8]) -> Result<Vec<u8>, MetaError> {
        let head = prefix_len + NONCE_LEN;
        if sealed.len() < head + TAG_LEN {
            return Err(MetaError::Truncated(sealed.len()));
        }
        let (header, rest) = sealed.split_at(head);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[prefix_len..]);
        let tag = Tag::try_from(tag).map_err(|_| MetaError::Authentication)?;
        let mut plain = ciphertext.to_vec();
        XChaCha20Poly1305::new(&Key::from(self.aead_key))
            .decrypt_inout_detached(
                &XNonce::from(nonce),
                header,
                plain.as_mut_slice().into(),
                &tag,
            )
            .map_err(|_| MetaError::Authentication)?;
        Ok(plain)
    }
}

/// Seals structural blobs under the vault's current key epoch and opens them under
/// whichever epoch they name. Shares the device's [`KeyEpochs`], so a rotation applies to
/// the next blob sealed.
#[derive(Clone)]
pub struct EpochMetaSealer {
    keys: Arc<KeyEpochs>,
    purpose: &'static str,
}

impl fmt::Debug for EpochMetaSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochMetaSealer({})", self.purpose)
    }
}

impl EpochMetaSealer {
    pub fn new(keys: Arc<KeyEpochs>, purpose: &'static str) -> Self {
        Self { keys, purpose }
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let (id, key) = self.keys.current_key();
        let sealer = MetaSealer::new(&key, self.purpose);
        if id == self.keys.genesis_id() {
            return sealer.seal(plaintext);
        }
        let mut prefix = [0u8; 1 + EPOCH_ID_LEN];
        prefix[0] = META_FORMAT_EPOCH;
        prefix[1..].copy_from_slice(&id.0);
        sealer.seal_frame(&prefix, plaintext)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, MetaError> {
        match sealed.first() {
            None => Err(MetaError::Truncated(0)),
            Some(&META_FORMAT_V1) => {
                MetaSealer::new(&self.keys.genesis_key(), self.purpose).open(sealed)
            }
            Some(&META_FORMAT_EPOCH) => {
                let id: [u8; EPOCH_ID_LEN] = sealed
                    .get(1..1 + EPOCH_ID_LEN)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(MetaError::Truncated(sealed.len()))?;
                let id = EpochId(id);
                let key = self.keys.key(&id).ok_or(MetaError::UnknownEpoch(id))?;
                MetaSealer::new(&key, self.purpose).open_frame(1 + EPOCH_ID_LEN, sealed)
            }
            Some(&v) => Err(MetaError::UnknownFormat(v)),
        }
    }
}

/// The epoch a sealed structural blob names (epoch 0 frames name none), without opening it.
pub fn sealed_epoch(sealed: &[u8]) -> Option<EpochId> {
    match sealed {
        [META_FORMAT_EPOCH, rest @ ..] => rest
            .get(..EPOCH_ID_LEN)
            .and_then(|b| b.try_into().ok())
            .map(EpochId),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sealer(k: u8, purpose: &str) -> MetaSealer {
        MetaSealer::new(&ContentKey::from_bytes([k; 32]), purpose)
    }

    #[test]
    fn deterministic_round_trip_and_hides_plaintext() {
        let s = sealer(1, "tree");
        let plain = b"dir/secret-file-name.txt and more".repeat(4);
        let a = s.seal(&plain);
        assert_eq!(a, s.seal(&plain), "same plaintext must give the same frame");
        assert_ne!(a, s.seal(b"other"));
        assert!(!a.windows(10).any(|w| w == b"secret-fil"));
        assert_eq!(s.open(&a).unwrap(), plain);
        assert_eq!(s.open(&s.seal(b"")).unwrap(), b"");
    }

    #[test]
    fn other_vault_or_purpose_cannot_open() {
        let a = sealer(1, "tree").seal(b"node");
        assert_eq!(sealer(2, "tree").open(&a), Err(MetaError::Authentication));
        assert_eq!(
            sealer(1, "chunk list").open(&a),
            Err(MetaError::Authentication)
        );
        assert_ne!(a, sealer(2, "tree").seal(b"node"));
    }

    #[test]
    fn every_flip_and_truncation_is_refused() {
        let s = sealer(3, "tree");
        let a = s.seal(b"some node bytes");
        for i in 0..a.len() {
            let mut t = a.clone();
            t[i] ^= 0x40;
            assert!(s.open(&t).is_err(), "flip at {i} accepted");
        }
        for n in 0..a.len() {
            assert!(s.open(&a[..n]).is_err(), "truncation to {n} accepted");
        }
    }

    #[test]
    fn epoch_frames_open_under_their_epoch_only() {
        use cairn_crypto::{Epoch, EpochSecret, VaultSecret};
        let vault = VaultSecret::generate();
        let keys = Arc::new(KeyEpochs::new(&vault));
        let s = EpochMetaSealer::new(keys.clone(), "tree node");
        // Epoch 0 writes exactly the frame a plain sealer of the vault's content key does.
        let old = s.seal(b"before");
        assert_eq!(
            old,
            MetaSealer::new(&vault.content_key(), "tree node").seal(b"before")
        );
        assert_eq!(sealed_epoch(&old), None);

        let one = Epoch {
            number: 1,
            secret: EpochSecret::generate(),
        };
        keys.add(one.clone());
        let new = s.seal(b"after");
        assert_eq!(new[0], META_FORMAT_EPOCH);
        assert_eq!(sealed_epoch(&new), Some(one.id()));
        assert_eq!(new.len(), b"after".len() + META_EPOCH_OVERHEAD);
        assert_eq!(s.open(&new).unwrap(), b"after");
        assert_eq!(s.open(&old).unwrap(), b"before", "history stays readable");

        // A device that holds only epoch 0 (removed before the rotation) cannot open it, and
        // the vault key alone does not either.
        let removed = EpochMetaSealer::new(Arc::new(KeyEpochs::new(&vault)), "tree node");
        assert_eq!(removed.open(&new), Err(MetaError::UnknownEpoch(one.id())));
        assert_eq!(removed.open(&old).unwrap(), b"before");
        let mut relabelled = new.clone();
        relabelled[0] = META_FORMAT_V1;
        relabelled.drain(1..9);
        assert!(removed.open(&relabelled).is_err());
        // The epoch tag is authenticated: naming another held epoch fails.
        let two = Epoch {
            number: 2,
            secret: EpochSecret::generate(),
        };
        keys.add(two.clone());
        let mut moved = new.clone();
        moved[1..9].copy_from_slice(&two.id().0);
        assert_eq!(s.open(&moved), Err(MetaError::Authentication));
        for n in 0..new.len() {
            assert!(s.open(&new[..n]).is_err(), "truncation to {n} accepted");
        }
    }

    proptest! {
        #[test]
        fn fuzz_meta_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = sealer(4, "tree").open(&bytes);
            let keys = Arc::new(KeyEpochs::new(&cairn_crypto::VaultSecret::from_bytes([4; 32])));
            let _ = EpochMetaSealer::new(keys, "tree").open(&bytes);
            let _ = sealed_epoch(&bytes);
        }
    }
}
