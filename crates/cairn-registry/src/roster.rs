//! The signed member list ("roster"): who belongs to a vault, with the age recipient their
//! snapshot headers are sealed to, and who was removed.
//!
//! Each member is described by one [`MemberRecord`], signed by the member that added (or
//! removed) it. Records travel between devices as a set; merging two sets is a per-device
//! choice that does not depend on arrival order, so every device converges on the same
//! roster:
//! - a removal beats an addition (a removed device stays removed, whoever re-adds it);
//! - between two records of the same kind, the later `at_ms` wins, then the smaller
//!   signature bytes (any total order will do, it only has to be the same everywhere).
//!
//! A record is accepted only if its signature verifies and its signer is a current member
//! of the vault on this device (the founder's first record signs itself while it is the
//! only member). Any member may remove any other member, never itself. One exception to
//! "the signer is a member": two members that removed each other while partitioned. Each
//! side has already dropped the other, so each would refuse the other's removal and the
//! lists would stay split; instead a removal of the device that removed its signer is
//! accepted, and **both** devices end up removed everywhere, whatever the arrival order. A
//! removed device can therefore take down at most the member that removed it, and only by
//! reaching a member that has not heard of its removal yet; it can never come back. Record wire format, big-endian:
//!
//! ```text
//! format u8 = 0x01 | vault [16] | device [32] | removed u8 (0|1) | at_ms u64 |
//! signer [32] | recipient_len u16 | recipient (UTF-8, age1…) | signature [64]
//! ```
//! The signature covers `"cairn roster v1\0"` followed by every byte before it.

use cairn_crypto::{DeviceId, DeviceKey, Signature, VaultId};

use crate::RegistryError;

pub const ROSTER_FORMAT_V1: u8 = 0x01;
const ROSTER_DOMAIN: &[u8] = b"cairn roster v1\0";
/// An age X25519 recipient is 62 characters; leave room for other recipient types.
pub const MAX_RECIPIENT_LEN: usize = 1024;
const FIXED_LEN: usize = 1 + 16 + 32 + 1 + 8 + 32 + 2 + 64;

/// One signed statement about one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    pub vault: VaultId,
    pub device: DeviceId,
    /// The member's age recipient (`age1…`); empty on removal records.
    pub recipient: String,
    pub removed: bool,
    pub at_ms: u64,
    pub signer: DeviceId,
    pub signature: Signature,
}

impl MemberRecord {
    /// A record added by `signer` (a member) saying `device` belongs to `vault`.
    pub fn add(
        signer: &DeviceKey,
        vault: VaultId,
        device: DeviceId,
        recipient: String,
        at_ms: u64,
    ) -> Self {
        Self::signed(signer, vault, device, recipient, false, at_ms)
    }

    /// A record by `signer` saying `device` no longer belongs to `vault`.
    pub fn remove(signer: &DeviceKey, vault: VaultId, device: DeviceId, at_ms: u64) -> Self {
        Self::signed(signer, vault, device, String::new(), true, at_ms)
    }

    fn signed(
        signer: &DeviceKey,
        vault: VaultId,
        device: DeviceId,
        recipient: String,
        removed: bool,
        at_ms: u64,
    ) -> Self {
        let mut r = Self {
            vault,
            device,
            recipient,
            removed,
            at_ms,
            signer: signer.device_id(),
            signature: Signature([0; 64]),
        };
        let mut msg = ROSTER_DOMAIN.to_vec();
        msg.extend_from_slice(&r.body());
        r.signature = signer.sign(&msg);
        r
    }

    fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FIXED_LEN + self.recipient.len());
        v.push(ROSTER_FORMAT_V1);
        v.extend_from_slice(self.vault.as_bytes());
        v.extend_from_slice(self.device.as_bytes());
        v.push(u8::from(self.removed));
        v.extend_from_slice(&self.at_ms.to_be_bytes());
        v.extend_from_slice(self.signer.as_bytes());
        v.extend_from_slice(&(self.recipient.len() as u16).to_be_bytes());
        v.extend_from_slice(self.recipient.as_bytes());
        v
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.body();
        v.extend_from_slice(&self.signature.0);
        v
    }

    /// Decodes one record from the front of `b`; returns it and the bytes it used.
    pub fn decode_prefix(b: &[u8]) -> Result<(Self, usize), RegistryError> {
        let bad = |why: &str| RegistryError::BadRoster(why.to_string());
        if b.len() < FIXED_LEN {
            return Err(bad("member record cut off"));
        }
        if b[0] != ROSTER_FORMAT_V1 {
            return Err(RegistryError::BadRoster(format!(
                "member record format {:#04x} is not supported by this cairn (upgrade it)",
                b[0]
            )));
        }
        let vault = VaultId(b[1..17].try_into().expect("16"));
        let device = DeviceId(b[17..49].try_into().expect("32"));
        let removed = match b[49] {
            0 => false,
            1 => true,
            _ => return Err(bad("member record has an invalid removed flag")),
        };
        let at_ms = u64::from_be_bytes(b[50..58].try_into().expect("8"));
        let signer = DeviceId(b[58..90].try_into().expect("32"));
        let rlen = u16::from_be_bytes([b[90], b[91]]) as usize;
        if rlen > MAX_RECIPIENT_LEN {
            return Err(bad("member record recipient is too long"));
        }
        let end = 92 + rlen + 64;
        if b.len() < end {
            return Err(bad("member record cut off"));
        }
        let recipient = std::str::from_utf8(&b[92..92 + rlen])
            .map_err(|_| bad("member record recipient is not UTF-8"))?
            .to_string();
        let signature = Signature(b[92 + rlen..end].try_into().expect("64"));
        Ok((
            Self {
                vault,
                device,
                recipient,
                removed,
                at_ms,
                signer,
                signature,
            },
            end,
        ))
    }

    /// Checks the signature (not whether the signer may sign: that needs the roster).
    pub fn verify(&self) -> Result<(), RegistryError> {
        let mut msg = ROSTER_DOMAIN.to_vec();
        msg.extend_from_slice(&self.body());
        self.signer
            .verify(&msg, &self.signature)
            .map_err(|_| RegistryError::BadSignature {
                device: self.signer,
            })
    }

    /// Whether `self` should replace `held` for the same device (see the module docs).
    pub fn supersedes(&self, held: &MemberRecord) -> bool {
        (
            self.removed,
            self.at_ms,
            std::cmp::Reverse(self.signature.0),
        ) > (
            held.removed,
            held.at_ms,
            std::cmp::Reverse(held.signature.0),
        )
    }
}

/// Concatenated records, as exchanged between devices.
pub fn encode_roster(records: &[MemberRecord]) -> Vec<u8> {
    let mut v = Vec::new();
    for r in records {
        v.extend_from_slice(&r.encode());
    }
    v
}

pub fn decode_roster(mut b: &[u8]) -> Result<Vec<MemberRecord>, RegistryError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (r, used) = MemberRecord::decode_prefix(b)?;
        out.push(r);
        b = &b[used..];
    }
    Ok(out)
}

/// What merging incoming records changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RosterChange {
    pub added: Vec<DeviceId>,
    pub removed: Vec<DeviceId>,
    /// Records refused, with the reason (nothing was stored for them).
    pub refused: Vec<(DeviceId, String)>,
    /// Key-epoch records newly stored (see [`crate::epoch`]).
    pub epochs: Vec<crate::EpochRecord>,
    /// Devices whose name changed (see [`crate::names`]).
    pub renamed: Vec<DeviceId>,
}

impl RosterChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.epochs.is_empty()
            && self.renamed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(removed: bool, at: u64) -> MemberRecord {
        let k = DeviceKey::generate();
        let v = VaultId([1; 16]);
        let d = DeviceKey::generate().device_id();
        if removed {
            MemberRecord::remove(&k, v, d, at)
        } else {
            MemberRecord::add(&k, v, d, "age1xyz".into(), at)
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let a = rec(false, 5);
        let b = rec(true, 7);
        let bytes = encode_roster(&[a.clone(), b.clone()]);
        let back = decode_roster(&bytes).unwrap();
        assert_eq!(back, vec![a.clone(), b]);
        a.verify().unwrap();
        back[1].verify().unwrap();
    }

    #[test]
    fn tampering_is_detected_and_truncation_is_an_error() {
        let a = rec(false, 5);
        let mut bytes = a.encode();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            if let Ok((r, _)) = MemberRecord::decode_prefix(&bytes) {
                assert!(r.verify().is_err(), "flipped byte {i} still verifies");
            }
            bytes[i] ^= 1;
        }
        for n in 0..bytes.len() {
            assert!(decode_roster(&bytes[..n]).is_err() || n == 0);
        }
    }

    #[test]
    fn removal_wins_and_order_is_total() {
        let k = DeviceKey::generate();
        let v = VaultId([1; 16]);
        let d = DeviceKey::generate().device_id();
        let add_late = MemberRecord::add(&k, v, d, "age1".into(), 100);
        let rm_early = MemberRecord::remove(&k, v, d, 1);
        assert!(rm_early.supersedes(&add_late));
        assert!(!add_late.supersedes(&rm_early));
        let add_early = MemberRecord::add(&k, v, d, "age1".into(), 1);
        assert!(add_late.supersedes(&add_early));
        assert!(!add_late.supersedes(&add_late));
    }

    use crate::Registry;

    struct Dev {
        key: DeviceKey,
        id: DeviceId,
    }

    fn dev() -> Dev {
        let key = DeviceKey::generate();
        let id = key.device_id();
        Dev { key, id }
    }

    #[test]
    fn registry_merges_by_the_rules_in_any_order() {
        let v = VaultId([9; 16]);
        let (a, b, c, stranger) = (dev(), dev(), dev(), dev());
        let founder = MemberRecord::add(&a.key, v, a.id, "age1a".into(), 1);
        let add_b = MemberRecord::add(&a.key, v, b.id, "age1b".into(), 2);
        let add_c = MemberRecord::add(&b.key, v, c.id, "age1c".into(), 3);
        let rm_c = MemberRecord::remove(&a.key, v, c.id, 4);
        let readd_c = MemberRecord::add(&b.key, v, c.id, "age1c".into(), 9);
        let forged = MemberRecord::add(&stranger.key, v, stranger.id, "age1s".into(), 5);
        let all = [founder, add_b, add_c, rm_c, readd_c, forged];

        let mut rosters = Vec::new();
        for order in [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 4, 0, 5, 3, 1]] {
            let reg = Registry::open_in_memory().unwrap();
            reg.add_member(&v, &a.id).unwrap();
            let batch: Vec<_> = order.iter().map(|&i| all[i].clone()).collect();
            // One record at a time, as they might trickle in from different peers.
            let mut refused = Vec::new();
            for r in &batch {
                refused.extend(
                    reg.merge_roster(&v, std::slice::from_ref(r))
                        .unwrap()
                        .refused,
                );
            }
            // Whatever was refused for lack of a signer gets a second chance once the
            // rest arrived (peers resend their whole roster on every exchange).
            reg.merge_roster(&v, &batch).unwrap();
            let mut members = reg.members(&v).unwrap();
            members.sort();
            let mut want = vec![a.id, b.id];
            want.sort();
            assert_eq!(members, want, "order {order:?}");
            assert!(reg.is_removed(&v, &c.id).unwrap());
            assert!(!reg.is_member(&v, &stranger.id).unwrap());
            rosters.push(reg.roster(&v).unwrap());
        }
        assert_eq!(rosters[0], rosters[1]);
        assert_eq!(rosters[0], rosters[2]);
    }

    #[test]
    fn members_that_removed_each_other_are_both_removed_in_any_order() {
        let v = VaultId([9; 16]);
        let (a, b, c) = (dev(), dev(), dev());
        let base = [
            MemberRecord::add(&a.key, v, a.id, "age1a".into(), 1),
            MemberRecord::add(&a.key, v, b.id, "age1b".into(), 2),
            MemberRecord::add(&a.key, v, c.id, "age1c".into(), 3),
        ];
        let a_drops_b = MemberRecord::remove(&a.key, v, b.id, 10);
        let b_drops_a = MemberRecord::remove(&b.key, v, a.id, 11);
        let mut views = Vec::new();
        for (who, first, second) in [
            ("A", &a_drops_b, &b_drops_a),
            ("B", &b_drops_a, &a_drops_b),
            ("C", &a_drops_b, &b_drops_a),
            ("C'", &b_drops_a, &a_drops_b),
        ] {
            let reg = Registry::open_in_memory().unwrap();
            reg.add_member(&v, &a.id).unwrap();
            reg.merge_roster(&v, &base).unwrap();
            // Partitioned: each side applies its own removal first, then heals.
            reg.merge_roster(&v, std::slice::from_ref(first)).unwrap();
            let ch = reg.merge_roster(&v, std::slice::from_ref(second)).unwrap();
            assert!(ch.refused.is_empty(), "{who}: {:?}", ch.refused);
            let members = reg.members(&v).unwrap();
            assert_eq!(members, vec![c.id], "{who}");
            views.push(reg.roster(&v).unwrap());
        }
        assert!(views.windows(2).all(|w| w[0] == w[1]));
        // A removed device cannot remove anyone else.
        let reg = Registry::open_in_memory().unwrap();
        reg.add_member(&v, &a.id).unwrap();
        reg.merge_roster(&v, &base).unwrap();
        reg.merge_roster(&v, std::slice::from_ref(&a_drops_b))
            .unwrap();
        let revenge = MemberRecord::remove(&b.key, v, c.id, 12);
        let ch = reg.merge_roster(&v, &[revenge]).unwrap();
        assert_eq!(ch.refused.len(), 1);
        let mut members = reg.members(&v).unwrap();
        members.sort();
        let mut want = vec![a.id, c.id];
        want.sort();
        assert_eq!(members, want);
    }

    #[test]
    fn bad_records_change_nothing() {
        let v = VaultId([9; 16]);
        let a = dev();
        let reg = Registry::open_in_memory().unwrap();
        reg.add_member(&v, &a.id).unwrap();
        let mut bad = MemberRecord::add(&a.key, v, dev().id, "age1".into(), 1);
        bad.at_ms = 2;
        let other_vault = MemberRecord::add(&a.key, VaultId([1; 16]), dev().id, "age1".into(), 1);
        let ch = reg.merge_roster(&v, &[bad, other_vault]).unwrap();
        assert_eq!(ch.refused.len(), 2);
        assert!(ch.is_empty());
        assert!(reg.roster(&v).unwrap().is_empty());
        assert_eq!(reg.members(&v).unwrap(), vec![a.id]);
    }

    #[test]
    fn addresses_round_trip() {
        let v = VaultId([9; 16]);
        let a = dev();
        let reg = Registry::open_in_memory().unwrap();
        reg.add_member(&v, &a.id).unwrap();
        assert!(
            reg.set_addrs(&v, &a.id, &["127.0.0.1:5".into(), "[::1]:6".into()])
                .unwrap()
        );
        assert_eq!(
            reg.addrs(&v).unwrap(),
            vec![(a.id, vec!["127.0.0.1:5".to_string(), "[::1]:6".to_string()])]
        );
    }

    #[test]
    fn addresses_are_kept_only_for_members() {
        let v = VaultId([9; 16]);
        let (a, b, stranger) = (dev(), dev(), dev());
        let reg = Registry::open_in_memory().unwrap();
        reg.add_member(&v, &a.id).unwrap();
        let founder = MemberRecord::add(&a.key, v, a.id, "age1a".into(), 1);
        let add_b = MemberRecord::add(&a.key, v, b.id, "age1b".into(), 2);
        reg.merge_roster(&v, &[founder, add_b]).unwrap();
        assert!(
            !reg.set_addrs(&v, &stranger.id, &["10.0.0.1:1".into()])
                .unwrap(),
            "a stranger's addresses are not stored"
        );
        assert!(reg.set_addrs(&v, &b.id, &["10.0.0.2:2".into()]).unwrap());
        assert_eq!(reg.addrs(&v).unwrap().len(), 1);

        // Once removed, its addresses are forgotten, not passed on.
        let rm = MemberRecord::remove(&a.key, v, b.id, 3);
        reg.merge_roster(&v, &[rm]).unwrap();
        assert!(reg.addrs(&v).unwrap().is_empty());
        assert!(!reg.set_addrs(&v, &b.id, &["10.0.0.2:2".into()]).unwrap());
        assert!(reg.addrs(&v).unwrap().is_empty());
    }

    mod fuzz {
        use super::*;
        use crate::fuzz::{config, mutate};
        use proptest::prelude::*;

        fn record() -> impl Strategy<Value = MemberRecord> {
            (
                any::<[u8; 32]>(),
                any::<[u8; 16]>(),
                any::<[u8; 32]>(),
                "age1[a-z0-9]{0,70}",
                any::<bool>(),
                any::<u64>(),
            )
                .prop_map(|(seed, vault, device, recipient, removed, at)| {
                    let k = DeviceKey::from_bytes(seed);
                    let (v, d) = (VaultId(vault), DeviceId(device));
                    if removed {
                        MemberRecord::remove(&k, v, d, at)
                    } else {
                        MemberRecord::add(&k, v, d, recipient, at)
                    }
                })
        }

        /// Whatever decodes is canonical (re-encodes to the same bytes), and a record that
        /// verifies is one that was signed: damage never makes a valid forgery.
        fn check(b: &[u8], signed: &[MemberRecord]) -> Result<(), TestCaseError> {
            match decode_roster(b) {
                Ok(records) => {
                    prop_assert_eq!(encode_roster(&records), b.to_vec());
                    for r in &records {
                        if r.verify().is_ok() {
                            prop_assert!(signed.contains(r), "a damaged record verifies");
                        }
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    prop_assert!(
                        text.starts_with("malformed member record: member record "),
                        "{}",
                        text
                    );
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn fuzz_roster_random_bytes(b in prop::collection::vec(any::<u8>(), 0..600), format: bool) {
                let mut b = b;
                if format && !b.is_empty() {
                    b[0] = ROSTER_FORMAT_V1;
                }
                check(&b, &[])?;
            }

            #[test]
            fn fuzz_roster_mutations(
                records in prop::collection::vec(record(), 1..4),
                edits in prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4),
            ) {
                let good = encode_roster(&records);
                prop_assert_eq!(decode_roster(&good).unwrap(), records.clone());
                let mut b = good;
                for (op, at, x) in edits {
                    mutate(&mut b, op, at, x);
                }
                check(&b, &records)?;
            }

            #[test]
            fn fuzz_roster_huge_recipient_length(r in record(), len in (MAX_RECIPIENT_LEN as u16 + 1)..=u16::MAX) {
                let mut b = r.encode();
                b[90..92].copy_from_slice(&len.to_be_bytes());
                let e = decode_roster(&b).unwrap_err();
                prop_assert_eq!(e.to_string(), "malformed member record: member record recipient is too long");
            }
        }
    }
}
