//! Signed key-epoch records: how a new epoch's secret reaches the members, and only them.
//!
//! A member that rotates the vault's keys (after a removal, or on `cairn rotate-keys`) makes
//! a fresh epoch secret, seals one copy to each remaining member's age recipient (a
//! "share"), and signs the whole record with its device key. Records spread with the roster
//! between members; each member opens its own share. A device that has no share (it was
//! removed before the rotation) learns the epoch's number and id, never its secret.
//!
//! A record is accepted only if its signature verifies and its signer is a current member on
//! this device, like member records (a removed device cannot push a key of its choosing).
//! Record wire format, big-endian:
//!
//! ```text
//! format u8 = 0x01 | vault [16] | number u32 | epoch id [8] | at_ms u64 | signer [32] |
//! shares u16 | shares × (device [32] | len u16 | sealed share) | signature [64]
//! ```
//! The signature covers `"cairn epoch v1\0"` followed by every byte before it. Sealing and
//! opening the shares is the caller's business (age, in `cairn-crypto`); this module only
//! carries them, bounded: at most [`MAX_SHARES`] shares of at most [`MAX_SHARE_LEN`] bytes.

use cairn_crypto::{DeviceId, DeviceKey, EpochId, Signature, VaultId};

use crate::RegistryError;

pub const EPOCH_FORMAT_V1: u8 = 0x01;
const EPOCH_DOMAIN: &[u8] = b"cairn epoch v1\0";
/// One share per member; a vault has far fewer members than this.
pub const MAX_SHARES: usize = 4096;
/// An age file sealing 32 bytes to one X25519 recipient is about 200 bytes.
pub const MAX_SHARE_LEN: usize = 1024;
const FIXED_LEN: usize = 1 + 16 + 4 + 8 + 8 + 32 + 2 + 64;

/// One signed key epoch, with the secret sealed to each member it was made for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochRecord {
    pub vault: VaultId,
    pub number: u32,
    pub epoch: EpochId,
    pub at_ms: u64,
    pub signer: DeviceId,
    /// `(member, the epoch secret sealed to that member's age recipient)`.
    pub shares: Vec<(DeviceId, Vec<u8>)>,
    pub signature: Signature,
}

impl EpochRecord {
    /// Signs a record of epoch `number` (id `epoch`) with `shares` already sealed.
    pub fn sign(
        signer: &DeviceKey,
        vault: VaultId,
        number: u32,
        epoch: EpochId,
        shares: Vec<(DeviceId, Vec<u8>)>,
        at_ms: u64,
    ) -> Result<Self, RegistryError> {
        if shares.is_empty() || shares.len() > MAX_SHARES {
            return Err(RegistryError::BadEpoch(format!(
                "{} shares (1 to {MAX_SHARES} members can receive an epoch)",
                shares.len()
            )));
        }
        if let Some((d, s)) = shares.iter().find(|(_, s)| s.len() > MAX_SHARE_LEN) {
            return Err(RegistryError::BadEpoch(format!(
                "the share for {} is {} bytes (at most {MAX_SHARE_LEN})",
                d.short(),
                s.len()
            )));
        }
        let mut r = Self {
            vault,
            number,
            epoch,
            at_ms,
            signer: signer.device_id(),
            shares,
            signature: Signature([0; 64]),
        };
        let mut msg = EPOCH_DOMAIN.to_vec();
        msg.extend_from_slice(&r.body());
        r.signature = signer.sign(&msg);
        Ok(r)
    }

    fn body(&self) -> Vec<u8> {
        let shares: usize = self.shares.iter().map(|(_, s)| 34 + s.len()).sum();
        let mut v = Vec::with_capacity(FIXED_LEN + shares);
        v.push(EPOCH_FORMAT_V1);
        v.extend_from_slice(self.vault.as_bytes());
        v.extend_from_slice(&self.number.to_be_bytes());
        v.extend_from_slice(&self.epoch.0);
        v.extend_from_slice(&self.at_ms.to_be_bytes());
        v.extend_from_slice(self.signer.as_bytes());
        v.extend_from_slice(&(self.shares.len() as u16).to_be_bytes());
        for (d, s) in &self.shares {
            v.extend_from_slice(d.as_bytes());
            v.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v.extend_from_slice(s);
        }
        v
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.body();
        v.extend_from_slice(&self.signature.0);
        v
    }

    /// Decodes one record from the front of `b`; returns it and the bytes it used. Counts
    /// and lengths are checked against the bounds and against the input before anything is
    /// allocated for them.
    pub fn decode_prefix(b: &[u8]) -> Result<(Self, usize), RegistryError> {
        let bad = |why: &str| RegistryError::BadEpoch(why.to_string());
        let mut r = cairn_codec::Reader::new(b);
        let cut = |_| bad("epoch record cut off");
        let format = r.u8().map_err(cut)?;
        if format != EPOCH_FORMAT_V1 {
            return Err(RegistryError::BadEpoch(format!(
                "epoch record format {format:#04x} is not supported by this cairn (upgrade it)"
            )));
        }
        let vault = VaultId(r.take_array().map_err(cut)?);
        let number = r.u32_be().map_err(cut)?;
        let epoch = EpochId(r.take_array().map_err(cut)?);
        let at_ms = r.u64_be().map_err(cut)?;
        let signer = DeviceId(r.take_array().map_err(cut)?);
        let n = r.u16_be().map_err(cut)? as usize;
        if n == 0 || n > MAX_SHARES {
            return Err(bad("epoch record has no shares or too many"));
        }
        // Each share takes at least 34 bytes: a count the input cannot hold is a lie.
        if n.saturating_mul(34) > r.remaining() {
            return Err(bad("epoch record cut off"));
        }
        let mut shares = Vec::with_capacity(n);
        for _ in 0..n {
            let d = DeviceId(r.take_array().map_err(cut)?);
            let len = r.u16_be().map_err(cut)? as usize;
            if len > MAX_SHARE_LEN {
                return Err(bad("epoch record share is too long"));
            }
            shares.push((d, r.take(len).map_err(cut)?.to_vec()));
        }
        let signature = Signature(r.take_array().map_err(cut)?);
        let used = b.len() - r.remaining();
        Ok((
            Self {
                vault,
                number,
                epoch,
                at_ms,
                signer,
                shares,
                signature,
            },
            used,
        ))
    }

    /// Checks the signature (not whether the signer may sign: that needs the roster).
    pub fn verify(&self) -> Result<(), RegistryError> {
        let mut msg = EPOCH_DOMAIN.to_vec();
        msg.extend_from_slice(&self.body());
        self.signer
            .verify(&msg, &self.signature)
            .map_err(|_| RegistryError::BadSignature {
                device: self.signer,
            })
    }

    /// The share sealed to `device`, if the epoch was made for it.
    pub fn share_for(&self, device: &DeviceId) -> Option<&[u8]> {
        self.shares
            .iter()
            .find(|(d, _)| d == device)
            .map(|(_, s)| s.as_slice())
    }
}

/// Concatenated records, as exchanged between devices.
pub fn encode_epochs(records: &[EpochRecord]) -> Vec<u8> {
    records.iter().flat_map(|r| r.encode()).collect()
}

pub fn decode_epochs(mut b: &[u8]) -> Result<Vec<EpochRecord>, RegistryError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (r, used) = EpochRecord::decode_prefix(b)?;
        out.push(r);
        b = &b[used..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(shares: usize) -> (DeviceKey, EpochRecord) {
        let k = DeviceKey::generate();
        let shares = (0..shares)
            .map(|i| (DeviceKey::generate().device_id(), vec![i as u8; 200]))
            .collect();
        let r = EpochRecord::sign(&k, VaultId([3; 16]), 2, EpochId([9; 8]), shares, 77).unwrap();
        (k, r)
    }

    #[test]
    fn round_trip_verify_and_shares() {
        let (_, a) = record(3);
        let (_, b) = record(1);
        let bytes = encode_epochs(&[a.clone(), b.clone()]);
        assert_eq!(decode_epochs(&bytes).unwrap(), vec![a.clone(), b]);
        a.verify().unwrap();
        let (d, s) = &a.shares[1];
        assert_eq!(a.share_for(d), Some(s.as_slice()));
        assert_eq!(a.share_for(&DeviceKey::generate().device_id()), None);
    }

    #[test]
    fn every_flip_breaks_the_signature_and_every_cut_is_an_error() {
        let (_, a) = record(2);
        let bytes = a.encode();
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 1;
            if let Ok((r, _)) = EpochRecord::decode_prefix(&t) {
                assert!(r.verify().is_err(), "flip at {i} still verifies");
            }
        }
        for n in 1..bytes.len() {
            assert!(decode_epochs(&bytes[..n]).is_err(), "cut at {n} accepted");
        }
    }

    #[test]
    fn bounds_are_checked_before_allocating() {
        assert!(
            EpochRecord::sign(
                &DeviceKey::generate(),
                VaultId([0; 16]),
                1,
                EpochId([0; 8]),
                vec![],
                0
            )
            .is_err()
        );
        let (_, a) = record(1);
        let mut bytes = a.encode();
        // Claim 4096 shares with one present: refused for length, not allocated.
        let at = 1 + 16 + 4 + 8 + 8 + 32;
        bytes[at..at + 2].copy_from_slice(&4096u16.to_be_bytes());
        let err = EpochRecord::decode_prefix(&bytes).unwrap_err();
        assert!(err.to_string().contains("cut off"), "{err}");
        bytes[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(EpochRecord::decode_prefix(&bytes).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(list) = decode_epochs(&bytes) {
                prop_assert_eq!(encode_epochs(&list), bytes);
            }
        }

        #[test]
        fn mutated_records_never_verify(pos in any::<prop::sample::Index>(), val in any::<u8>()) {
            let (_, a) = record(2);
            let mut bytes = a.encode();
            let i = pos.index(bytes.len());
            prop_assume!(bytes[i] != val);
            bytes[i] = val;
            if let Ok((r, _)) = EpochRecord::decode_prefix(&bytes) {
                prop_assert!(r.verify().is_err());
            }
        }
    }
}
