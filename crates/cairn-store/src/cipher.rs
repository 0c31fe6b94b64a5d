//! Per-chunk authenticated encryption, convergent inside one vault.
//!
//! Frame (format version 1):
//!
//! ```text
//! +---------+----------------+-------------------------+-----------+
//! | 0x01    | nonce (24 B)   | ciphertext (= plaintext | tag (16 B)|
//! | version |                |  length)                |           |
//! +---------+----------------+-------------------------+-----------+
//! ```
//!
//! The AEAD is XChaCha20-Poly1305 and the version byte plus nonce are its associated data,
//! so a changed version byte cannot re-route a frame to another decoder unnoticed.
//!
//! Key and nonce both come from one keyed blake3 pass over the plaintext, keyed with a
//! subkey of the vault's content key. Same plaintext in the same vault therefore gives the
//! same frame and the same [`ChunkId`] (dedup across files, devices and history), while
//! another vault's key gives unrelated bytes. Because the key is a function of the
//! plaintext, a (key, nonce) pair never encrypts two different plaintexts, which is the
//! property that deterministic encryption must not lose. The price, inherent in
//! convergent encryption, is that anyone holding the vault key can confirm whether a
//! guessed plaintext is stored; storage-only peers without the key learn nothing but sizes.
//!
//! The chunk key is not recoverable from the frame: readers get it from the file manifest
//! ([`crate::ChunkRef`]), which only ever travels inside encrypted tree entries.

use cairn_crypto::ContentKey;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Result, StoreError};
use crate::id::ChunkId;

pub const CHUNK_FORMAT_V1: u8 = 1;
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + NONCE_LEN;
/// Bytes a sealed chunk has on top of its plaintext.
pub const CHUNK_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Domain separation so the content key can safely feed other derivations too.
const CONVERGENCE_CONTEXT: &str = "cairn 2025 chunk convergence key v1";

/// The 32-byte key one chunk is encrypted under. Secret: store it only inside encrypted
/// structures.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ChunkKey([u8; 32]);

impl ChunkKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkKey(<redacted>)")
    }
}

/// A chunk ready for the store.
#[derive(Debug, Clone)]
pub struct SealedChunk {
    pub id: ChunkId,
    pub key: ChunkKey,
    pub bytes: Vec<u8>,
}

/// Seals chunks for one vault. Cheap to create; holds only a derived subkey.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ChunkSealer {
    convergence_key: [u8; 32],
}

impl fmt::Debug for ChunkSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkSealer(<redacted>)")
    }
}

impl ChunkSealer {
    pub fn new(content_key: &ContentKey) -> Self {
        Self {
            convergence_key: blake3::derive_key(CONVERGENCE_CONTEXT, content_key.as_bytes()),
        }
    }

    /// Encrypts `plaintext` deterministically and computes the id of the result.
    pub fn seal(&self, plaintext: &[u8]) -> SealedChunk {
        let mut hasher = blake3::Hasher::new_keyed(&self.convergence_key);
        hasher.update(plaintext);
        let mut derived = [0u8; 32 + NONCE_LEN];
        hasher.finalize_xof().fill(&mut derived);
        let mut key = [0u8; 32];
        key.copy_from_slice(&derived[..32]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&derived[32..]);
        derived.zeroize();
        let key = ChunkKey(key);

        let mut bytes = Vec::with_capacity(plaintext.len() + CHUNK_OVERHEAD);
        bytes.push(CHUNK_FORMAT_V1);
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(plaintext);
        let (header, body) = bytes.split_at_mut(HEADER_LEN);
        let tag = aead(&key)
            .encrypt_inout_detached(&XNonce::from(nonce), header, body.into())
            // XChaCha20-Poly1305 only refuses messages over 256 GiB; chunks are ≤ 256 KiB.
            .unwrap_or_else(|_| unreachable!("chunk too large for XChaCha20-Poly1305"));
        bytes.extend_from_slice(&tag);

        SealedChunk {
            id: ChunkId::of(&bytes),
            key,
            bytes,
        }
    }
}

fn aead(key: &ChunkKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(&Key::from(key.0))
}

/// Decrypts and authenticates a frame produced by [`ChunkSealer::seal`]. `id` is only used
/// to make errors actionable; the caller (normally the blob store) has already checked it.
pub fn open_chunk(id: ChunkId, key: &ChunkKey, sealed: &[u8]) -> Result<Vec<u8>> {
    let Some(&version) = sealed.first() else {
        return Err(StoreError::Truncated {
            what: "encrypted chunk",
            len: 0,
        });
    };
    if version != CHUNK_FORMAT_V1 {
        return Err(StoreError::UnsupportedFormat {
            what: "encrypted chunk",
            version,
        });
    }
    if sealed.len() < CHUNK_OVERHEAD {
        return Err(StoreError::Truncated {
            what: "encrypted chunk",
            len: sealed.len(),
        });
    }
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&header[1..]);
    let tag = Tag::try_from(tag).map_err(|_| StoreError::Decrypt { id })?;

    let mut plaintext = ciphertext.to_vec();
    aead(key)
        .decrypt_inout_detached(
            &XNonce::from(nonce),
            header,
            plaintext.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| StoreError::Decrypt { id })?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sealer(seed: u8) -> ChunkSealer {
        ChunkSealer::new(&ContentKey::from_bytes([seed; 32]))
    }

    #[test]
    fn round_trip_including_empty() {
        for len in [0usize, 1, 1000, 300_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sealed = sealer(1).seal(&plain);
            assert_eq!(sealed.bytes.len(), len + CHUNK_OVERHEAD);
            assert_eq!(sealed.id, ChunkId::of(&sealed.bytes));
            assert_eq!(sealed.bytes[0], CHUNK_FORMAT_V1);
            if len > 64 {
                assert!(!sealed.bytes.windows(64).any(|w| w == &plain[..64]));
            }
            assert_eq!(
                open_chunk(sealed.id, &sealed.key, &sealed.bytes).unwrap(),
                plain
            );
        }
    }

    /// Chunk ids are shared across devices and kept forever, so sealing must give the same
    /// bytes on every machine and build: whichever SIMD backend the cipher picks at run time
    /// (AVX-512, AVX2, SSE2, portable) and whatever the block tail. The expected ids were
    /// recorded with the portable backend.
    #[test]
    fn sealing_is_the_same_on_every_backend() {
        let expected = [
            (
                0usize,
                "a34c5e4596b1205062cd14dbfa3df0e48bcc8d5f26a00e4f801a7f48b1d14c45",
            ),
            (
                1,
                "5d2de57901a45d254bda41f20b96cab45caad5cecc83aab326a0e6eb55edac2d",
            ),
            (
                63,
                "16f8fac6c4e1699e28f314778d1d0e2996073f1e5d4e193689ac2c8ca62083f4",
            ),
            (
                1023,
                "c411e9277b42deafabb0ba653236653f74c33d9234abc03608ea5a851de2b778",
            ),
            (
                4100,
                "040b70d1aba7474be6620b386602f53d071e05e73e97364a23d15dad781c37ca",
            ),
            (
                65_537,
                "9e835796f10dc5834fc1e720edef30f668818cb8d6058be49b71f6f85bbde465",
            ),
            (
                262_144,
                "5cc071aad959815f492507396bd0e3cb477402c99c9e4657cf2d3f851a7ad341",
            ),
        ];
        let actual: Vec<(usize, String)> = expected
            .iter()
            .map(|&(len, _)| {
                let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 256) as u8).collect();
                let sealed = sealer(9).seal(&plain);
                assert_eq!(
                    open_chunk(sealed.id, &sealed.key, &sealed.bytes).unwrap(),
                    plain
                );
                (len, sealed.id.to_hex())
            })
            .collect();
        let expected: Vec<(usize, String)> = expected
            .iter()
            .map(|&(l, id)| (l, id.to_string()))
            .collect();
        assert_eq!(actual, expected, "sealing changed");
    }

    #[test]
    fn convergent_within_a_vault_only() {
        let a1 = sealer(1).seal(b"same plaintext");
        let a2 = sealer(1).seal(b"same plaintext");
        let b = sealer(2).seal(b"same plaintext");
        let other = sealer(1).seal(b"other plaintext");
        assert_eq!(a1.id, a2.id);
        assert_eq!(a1.bytes, a2.bytes);
        assert_eq!(a1.key, a2.key);
        assert_ne!(a1.id, b.id);
        assert_ne!(a1.key, b.key);
        assert_ne!(
            a1.bytes[1..25],
            b.bytes[1..25],
            "nonces must differ across vaults"
        );
        assert_ne!(a1.key, other.key);
        assert_ne!(a1.bytes[1..25], other.bytes[1..25]);
    }

    #[test]
    fn wrong_key_fails() {
        let sealed = sealer(1).seal(b"secret");
        let wrong = sealer(2).seal(b"secret").key;
        assert!(matches!(
            open_chunk(sealed.id, &wrong, &sealed.bytes),
            Err(StoreError::Decrypt { .. })
        ));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let sealed = sealer(3).seal(b"a short chunk of plaintext");
        for i in 0..sealed.bytes.len() {
            let mut bad = sealed.bytes.clone();
            bad[i] ^= 0x01;
            let err = open_chunk(sealed.id, &sealed.key, &bad).unwrap_err();
            if i == 0 {
                // Version byte: an unknown version is refused before any crypto.
                assert!(matches!(
                    err,
                    StoreError::UnsupportedFormat { version: 0, .. }
                ));
            } else {
                // Nonce (1..25), ciphertext and tag all fail authentication.
                assert!(matches!(err, StoreError::Decrypt { .. }), "byte {i}: {err}");
            }
        }
    }

    #[test]
    fn truncation_is_detected() {
        let sealed = sealer(4).seal(b"plaintext");
        for len in 0..sealed.bytes.len() {
            let err = open_chunk(sealed.id, &sealed.key, &sealed.bytes[..len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Truncated { .. } | StoreError::Decrypt { .. }
                ),
                "len {len}: {err}"
            );
        }
        let mut longer = sealed.bytes.clone();
        longer.push(0);
        assert!(open_chunk(sealed.id, &sealed.key, &longer).is_err());
    }

    #[test]
    fn keys_are_not_printed() {
        let sealed = sealer(5).seal(b"x");
        assert_eq!(format!("{:?}", sealed.key), "ChunkKey(<redacted>)");
        assert_eq!(format!("{:?}", sealer(5)), "ChunkSealer(<redacted>)");
    }

    proptest! {
        #[test]
        fn fuzz_chunk_frame_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200), k: [u8; 32]) {
            let key = ChunkKey::from_bytes(k);
            prop_assert!(open_chunk(ChunkId::of(&bytes), &key, &bytes).is_err());
        }

        #[test]
        fn random_plaintexts_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let sealed = sealer(6).seal(&plain);
            prop_assert_eq!(open_chunk(sealed.id, &sealed.key, &sealed.bytes).unwrap(), plain);
        }
    }
}
