//! The signed registry entry and its wire format.
//!
//! One entry says "device D's newest snapshot of vault V is payload P, revision R". It is
//! the only thing peers exchange about a device's state, so its bytes are fixed, versioned
//! and self-authenticating: a receiver needs nothing but the bytes to check who wrote them.
//!
//! # Wire format (format 0x01, 153 bytes, no padding, no length prefix)
//!
//! | offset | length | field      | encoding                                              |
//! |-------:|-------:|------------|-------------------------------------------------------|
//! |      0 |      1 | format     | `0x01`                                                |
//! |      1 |     32 | device     | ed25519 public key of the signing device               |
//! |     33 |     16 | vault_id   | [`VaultId`] bytes                                     |
//! |     49 |      8 | revision   | `u64`, big-endian                                     |
//! |     57 |     32 | payload    | id (blake3) of the encrypted snapshot header blob      |
//! |     89 |     64 | signature  | ed25519 (strict) over `"cairn registry entry v1"` ‖ bytes `0..89` |
//!
//! The signed message is the 23 ASCII bytes of the domain string followed by the first 89
//! bytes of the entry (format byte included, so a future format cannot be confused with
//! this one). The domain string keeps a registry signature from ever being valid for any
//! other message the same device key signs. Decoding accepts exactly 153 bytes; shorter,
//! longer, or another format byte is an error. Decoding does not verify: call
//! [`RegistryEntry::verify`] (the registry always does before storing).
//!
//! The same table lives in `crates/cairn-registry/WIRE.md`; keep both in sync.

use std::fmt;

use cairn_crypto::{DeviceId, DeviceKey, Signature, VaultId};

use crate::RegistryError;

/// Format byte of the only format this build reads and writes.
pub const FORMAT_V1: u8 = 0x01;
/// Length in bytes of an encoded format-1 entry.
pub const ENTRY_LEN: usize = 1 + 32 + 16 + 8 + 32 + 64;
/// Domain-separation prefix of the signed message.
pub const SIGNING_DOMAIN: &[u8] = b"cairn registry entry v1";

const DEVICE: usize = 1;
const VAULT: usize = DEVICE + 32;
const REVISION: usize = VAULT + 16;
const PAYLOAD: usize = REVISION + 8;
const SIGNATURE: usize = PAYLOAD + 32;
const _: () = assert!(SIGNATURE + 64 == ENTRY_LEN);

/// Monotonic per-(vault, device) counter. Publishing starts at 1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Revision(pub u64);

impl Revision {
    /// The revision a device publishes on top of `head`, or `None` if the counter is spent.
    pub fn next_after(head: Option<Revision>) -> Option<Revision> {
        match head {
            None => Some(Revision(1)),
            Some(Revision(r)) => r.checked_add(1).map(Revision),
        }
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Id of the encrypted snapshot header blob. Opaque to this crate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Payload(pub [u8; 32]);

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({}…)", hex::encode(&self.0[..6]))
    }
}

/// A device's signed claim about its newest snapshot of a vault.
///
/// Fields are public because an entry is plain data: nothing about a value of this type is
/// trusted until [`verify`](Self::verify) passes, and the registry verifies on every way in.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RegistryEntry {
    pub device: DeviceId,
    pub vault: VaultId,
    pub revision: Revision,
    pub payload: Payload,
    pub signature: Signature,
}

impl RegistryEntry {
    /// Build and sign an entry with `key`; the device id is the key's public half.
    pub fn sign(key: &DeviceKey, vault: VaultId, revision: Revision, payload: Payload) -> Self {
        let mut entry = Self {
            device: key.device_id(),
            vault,
            revision,
            payload,
            signature: Signature([0; 64]),
        };
        entry.signature = key.sign(&entry.signed_message());
        entry
    }

    /// The exact bytes the signature covers: domain string ‖ encoded fields before the signature.
    pub fn signed_message(&self) -> Vec<u8> {
        let encoded = self.encode();
        let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + SIGNATURE);
        msg.extend_from_slice(SIGNING_DOMAIN);
        msg.extend_from_slice(&encoded[..SIGNATURE]);
        msg
    }

    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        out[0] = FORMAT_V1;
        out[DEVICE..VAULT].copy_from_slice(&self.device.0);
        out[VAULT..REVISION].copy_from_slice(&self.vault.0);
        out[REVISION..PAYLOAD].copy_from_slice(&self.revision.0.to_be_bytes());
        out[PAYLOAD..SIGNATURE].copy_from_slice(&self.payload.0);
        out[SIGNATURE..].copy_from_slice(&self.signature.0);
        out
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.encode().to_vec()
    }

    /// Parse untrusted bytes. Checks shape only; the signature is checked by [`verify`](Self::verify).
    pub fn decode(bytes: &[u8]) -> Result<Self, RegistryError> {
        // Look at the format byte before the length so a peer on a newer format gets told
        // "unknown format" rather than a misleading "truncated".
        match bytes.first() {
            None => return Err(RegistryError::Truncated { len: 0 }),
            Some(&FORMAT_V1) => {}
            Some(&found) => return Err(RegistryError::UnknownFormat { found }),
        }
        let bytes: &[u8; ENTRY_LEN] = match bytes.len() {
            ENTRY_LEN => bytes
                .try_into()
                .map_err(|_| RegistryError::Truncated { len: bytes.len() })?,
            len if len < ENTRY_LEN => return Err(RegistryError::Truncated { len }),
            len => return Err(RegistryError::TrailingBytes { len }),
        };
        Ok(Self {
            device: DeviceId(field(bytes, DEVICE)),
            vault: VaultId(field(bytes, VAULT)),
            revision: Revision(u64::from_be_bytes(field(bytes, REVISION))),
            payload: Payload(field(bytes, PAYLOAD)),
            signature: Signature(field(bytes, SIGNATURE)),
        })
    }

    /// Strict ed25519 check of the signature against the entry's own device key.
    pub fn verify(&self) -> Result<(), RegistryError> {
        self.device
            .verify(&self.signed_message(), &self.signature)
            .map_err(|_| RegistryError::BadSignature {
                device: self.device,
            })
    }
}

/// Copy a fixed-size field out of a buffer whose length is already known to be `ENTRY_LEN`.
fn field<const N: usize>(bytes: &[u8; ENTRY_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> DeviceKey {
        DeviceKey::from_bytes([seed; 32])
    }

    fn sample() -> RegistryEntry {
        RegistryEntry::sign(
            &key(7),
            VaultId([3; 16]),
            Revision(0x0102_0304_0506_0708),
            Payload([9; 32]),
        )
    }

    #[test]
    fn layout_matches_documented_offsets() {
        let e = sample();
        let b = e.encode();
        assert_eq!(b.len(), 153);
        assert_eq!(b[0], 0x01);
        assert_eq!(&b[1..33], key(7).device_id().as_bytes());
        assert_eq!(&b[33..49], &[3; 16]);
        assert_eq!(&b[49..57], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[57..89], &[9; 32]);
        assert_eq!(&b[89..153], &e.signature.0);
        // ed25519 signatures are deterministic, so the documented message reproduces the
        // signature exactly: this pins the domain string and the covered range.
        let mut msg = b"cairn registry entry v1".to_vec();
        msg.extend_from_slice(&b[..89]);
        assert_eq!(key(7).sign(&msg), e.signature);
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let good = sample().encode();
        for i in 0..ENTRY_LEN {
            for bit in 0..8 {
                let mut b = good;
                b[i] ^= 1 << bit;
                let caught = match RegistryEntry::decode(&b) {
                    Err(_) => true,
                    Ok(e) => e.verify().is_err(),
                };
                assert!(caught, "flip of bit {bit} in byte {i} went unnoticed");
            }
        }
    }

    #[test]
    fn wrong_lengths_and_formats_are_typed_errors() {
        let good = sample().encode();
        assert!(matches!(
            RegistryEntry::decode(&[]),
            Err(RegistryError::Truncated { len: 0 })
        ));
        for len in 1..ENTRY_LEN {
            assert!(matches!(
                RegistryEntry::decode(&good[..len]),
                Err(RegistryError::Truncated { len: l }) if l == len
            ));
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(matches!(
            RegistryEntry::decode(&long),
            Err(RegistryError::TrailingBytes { len: 154 })
        ));
        let mut v2 = good;
        v2[0] = 0x02;
        assert!(matches!(
            RegistryEntry::decode(&v2),
            Err(RegistryError::UnknownFormat { found: 0x02 })
        ));
    }

    #[test]
    fn signature_from_another_key_is_refused() {
        let mut e = sample();
        e.signature = RegistryEntry::sign(&key(8), e.vault, e.revision, e.payload).signature;
        assert!(matches!(
            e.verify(),
            Err(RegistryError::BadSignature { .. })
        ));
    }

    #[test]
    fn revision_counter_does_not_wrap() {
        assert_eq!(Revision::next_after(None), Some(Revision(1)));
        assert_eq!(Revision::next_after(Some(Revision(41))), Some(Revision(42)));
        assert_eq!(Revision::next_after(Some(Revision(u64::MAX))), None);
    }

    proptest! {
        #[test]
        fn round_trip(seed in any::<[u8; 32]>(), vault in any::<[u8; 16]>(), rev in any::<u64>(), payload in any::<[u8; 32]>()) {
            let k = DeviceKey::from_bytes(seed);
            let e = RegistryEntry::sign(&k, VaultId(vault), Revision(rev), Payload(payload));
            let bytes = e.encode();
            prop_assert_eq!(bytes.to_vec(), e.to_vec());
            let back = RegistryEntry::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &e);
            prop_assert!(back.verify().is_ok());
            prop_assert_eq!(back.device, k.device_id());
        }

        #[test]
        fn fuzz_registry_entry_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(e) = RegistryEntry::decode(&bytes) {
                prop_assert_eq!(bytes.len(), ENTRY_LEN);
                prop_assert_eq!(e.to_vec(), bytes);
                // Random bytes essentially never carry a valid signature; the point is
                // that checking one does not panic.
                let _ = e.verify();
            }
        }

        #[test]
        fn random_valid_length_bytes_decode_and_fail_verify(mut bytes in proptest::collection::vec(any::<u8>(), ENTRY_LEN)) {
            bytes[0] = FORMAT_V1;
            let e = RegistryEntry::decode(&bytes).unwrap();
            prop_assert_eq!(e.to_vec(), bytes);
            prop_assert!(e.verify().is_err());
        }

        #[test]
        fn random_byte_change_is_caught(pos in 0..ENTRY_LEN, delta in 1u8..=255, rev in any::<u64>(), payload in any::<[u8; 32]>()) {
            let e = RegistryEntry::sign(&key(1), VaultId([5; 16]), Revision(rev), Payload(payload));
            let mut b = e.encode();
            b[pos] = b[pos].wrapping_add(delta);
            let caught = RegistryEntry::decode(&b).map(|d| d.verify().is_err()).unwrap_or(true);
            prop_assert!(caught);
        }
    }

    proptest! {
        #![proptest_config(crate::fuzz::config())]

        #[test]
        fn fuzz_registry_entry_mutations(
            seed in any::<[u8; 32]>(),
            rev in any::<u64>(),
            edits in prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let e = RegistryEntry::sign(&DeviceKey::from_bytes(seed), VaultId([4; 16]), Revision(rev), Payload([6; 32]));
            let good = e.to_vec();
            let mut b = good.clone();
            for (op, at, x) in edits {
                crate::fuzz::mutate(&mut b, op, at, x);
            }
            match RegistryEntry::decode(&b) {
                Ok(d) => {
                    prop_assert_eq!(d.to_vec(), b.clone());
                    if b != good {
                        prop_assert!(d.verify().is_err(), "a damaged entry verifies");
                    }
                }
                Err(err) => {
                    let text = err.to_string();
                    prop_assert!(text.starts_with("registry entry "), "{}", text);
                    prop_assert!(b.len() != ENTRY_LEN || b[0] != FORMAT_V1);
                }
            }
        }
    }
}
