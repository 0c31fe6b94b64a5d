//! Deterministic sealing of structural blobs (tree nodes, chunk lists) under one vault key.
//!
//! Chunks get a key per plaintext (see [`crate::cipher`]) because their references carry the
//! key. Structural blobs are referenced only by id, so a reader needs a key it can derive
//! from the vault alone. Determinism still matters: equal trees must have equal node ids on
//! every device. The nonce is therefore synthetic (SIV-style): a keyed blake3 of the
//! plaintext, so one nonce only ever encrypts one plaintext, and the AEAD key is a separate
//! subkey.
//!
//! Frame: `0x02 | nonce (24) | ciphertext | tag (16)`; version byte and nonce are
//! associated data.

use std::fmt;

use cairn_crypto::ContentKey;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::cipher::{NONCE_LEN, TAG_LEN};

pub const META_FORMAT_V1: u8 = 2;
const HEADER_LEN: usize = 1 + NONCE_LEN;
/// Bytes a sealed structural blob has on top of its plaintext.
pub const META_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Why a structural blob could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("sealed blob too short ({0} bytes)")]
    Truncated(usize),
    #[error("sealed blob has unknown format {0}; upgrade cairn")]
    UnknownFormat(u8),
    #[error("sealed blob failed authentication: altered, or sealed with another vault's key")]
    Authentication,
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

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        blake3::Hasher::new_keyed(&self.nonce_key)
            .update(plaintext)
            .finalize_xof()
            .fill(&mut nonce);
        let mut out = Vec::with_capacity(plaintext.len() + META_OVERHEAD);
        out.push(META_FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let (header, body) = out.split_at_mut(HEADER_LEN);
        let tag = XChaCha20Poly1305::new(&Key::from(self.aead_key))
            .encrypt_inout_detached(&XNonce::from(nonce), header, body.into())
            // Only messages over 256 GiB are refused; structural blobs are at most a few MiB.
            .unwrap_or_else(|_| unreachable!("structural blob too large for XChaCha20-Poly1305"));
        out.extend_from_slice(&tag);
        out
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, MetaError> {
        match sealed.first() {
            None => return Err(MetaError::Truncated(0)),
            Some(&v) if v != META_FORMAT_V1 => return Err(MetaError::UnknownFormat(v)),
            _ => {}
        }
        if sealed.len() < META_OVERHEAD {
            return Err(MetaError::Truncated(sealed.len()));
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[1..]);
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

    proptest! {
        #[test]
        fn fuzz_meta_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = sealer(4, "tree").open(&bytes);
        }
    }
}
