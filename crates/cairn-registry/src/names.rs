//! Human names of devices ("laptop", "desk"), shown wherever a device id is printed.
//!
//! A device names only itself: each [`NameRecord`] is signed by the device it names, so no
//! member can relabel another one (and make its snapshots look like someone else's). Records
//! travel with the roster; between two records of one device the later `at_ms` wins, then
//! the smaller signature bytes, so every member converges on the same name whatever the
//! arrival order. A record counts only while its device is a member.
//!
//! Record wire format, big-endian:
//!
//! ```text
//! format u8 = 0x01 | vault [16] | device [32] | at_ms u64 | name_len u8 | name (UTF-8) |
//! signature [64]
//! ```
//! The signature, by `device`, covers `"cairn device name v1\0"` followed by every byte
//! before it.

use std::fmt;

use cairn_crypto::{DeviceId, DeviceKey, Signature, VaultId};

use crate::RegistryError;

pub const NAME_FORMAT_V1: u8 = 0x01;
const NAME_DOMAIN: &[u8] = b"cairn device name v1\0";
/// Bytes of UTF-8: enough for any sensible label, short enough for a table column.
pub const MAX_NAME_LEN: usize = 64;
const FIXED_LEN: usize = 1 + 16 + 32 + 8 + 1 + 64;

/// A validated device name: 1 to [`MAX_NAME_LEN`] bytes of UTF-8, no control characters,
/// no leading or trailing white space.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(String);

impl DeviceName {
    pub fn new(name: &str) -> Result<Self, RegistryError> {
        let bad = |why: &str| RegistryError::BadName(why.to_string());
        if name.is_empty() {
            return Err(bad("a device name cannot be empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(RegistryError::BadName(format!(
                "a device name has at most {MAX_NAME_LEN} bytes"
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("a device name cannot contain control characters"));
        }
        if name.trim() != name {
            return Err(bad("a device name cannot start or end with white space"));
        }
        Ok(Self(name.to_string()))
    }

    /// A usable name made from any text (e.g. a hostname): control characters dropped,
    /// white space trimmed, cut to [`MAX_NAME_LEN`] bytes on a character boundary.
    pub fn sanitized(text: &str) -> Option<Self> {
        let clean: String = text.chars().filter(|c| !c.is_control()).collect();
        let mut s = clean.trim();
        while s.len() > MAX_NAME_LEN {
            let mut cut = MAX_NAME_LEN;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s = s[..cut].trim_end();
        }
        Self::new(s).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceName({:?})", self.0)
    }
}

/// A device's signed statement of its own name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRecord {
    pub vault: VaultId,
    pub device: DeviceId,
    pub name: DeviceName,
    pub at_ms: u64,
    pub signature: Signature,
}

impl NameRecord {
    /// `key`'s device names itself `name` in `vault`.
    pub fn sign(key: &DeviceKey, vault: VaultId, name: DeviceName, at_ms: u64) -> Self {
        let mut r = Self {
            vault,
            device: key.device_id(),
            name,
            at_ms,
            signature: Signature([0; 64]),
        };
        let mut msg = NAME_DOMAIN.to_vec();
        msg.extend_from_slice(&r.body());
        r.signature = key.sign(&msg);
        r
    }

    fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FIXED_LEN + self.name.0.len());
        v.push(NAME_FORMAT_V1);
        v.extend_from_slice(self.vault.as_bytes());
        v.extend_from_slice(self.device.as_bytes());
        v.extend_from_slice(&self.at_ms.to_be_bytes());
        // DeviceName guarantees at most 64 bytes.
        v.push(self.name.0.len() as u8);
        v.extend_from_slice(self.name.0.as_bytes());
        v
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.body();
        v.extend_from_slice(&self.signature.0);
        v
    }

    /// Decodes one record from the front of `b`; returns it and the bytes it used.
    pub fn decode_prefix(b: &[u8]) -> Result<(Self, usize), RegistryError> {
        let bad = |why: &str| RegistryError::BadName(why.to_string());
        if b.len() < FIXED_LEN {
            return Err(bad("device name record cut off"));
        }
        if b[0] != NAME_FORMAT_V1 {
            return Err(RegistryError::BadName(format!(
                "device name record format {:#04x} is not supported by this cairn (upgrade it)",
                b[0]
            )));
        }
        let vault = VaultId(b[1..17].try_into().expect("16"));
        let device = DeviceId(b[17..49].try_into().expect("32"));
        let at_ms = u64::from_be_bytes(b[49..57].try_into().expect("8"));
        let len = b[57] as usize;
        let end = 58 + len + 64;
        if b.len() < end {
            return Err(bad("device name record cut off"));
        }
        let text = std::str::from_utf8(&b[58..58 + len])
            .map_err(|_| bad("device name record: the name is not UTF-8"))?;
        let name = DeviceName::new(text)
            .map_err(|e| RegistryError::BadName(format!("device name record: {e}")))?;
        let signature = Signature(b[58 + len..end].try_into().expect("64"));
        Ok((
            Self {
                vault,
                device,
                name,
                at_ms,
                signature,
            },
            end,
        ))
    }

    /// Checks that the named device signed it.
    pub fn verify(&self) -> Result<(), RegistryError> {
        let mut msg = NAME_DOMAIN.to_vec();
        msg.extend_from_slice(&self.body());
        self.device
            .verify(&msg, &self.signature)
            .map_err(|_| RegistryError::BadSignature {
                device: self.device,
            })
    }

    /// Whether `self` should replace `held` for the same device.
    pub fn supersedes(&self, held: &NameRecord) -> bool {
        (self.at_ms, std::cmp::Reverse(self.signature.0))
            > (held.at_ms, std::cmp::Reverse(held.signature.0))
    }
}

/// Concatenated records, as exchanged between devices.
pub fn encode_names(records: &[NameRecord]) -> Vec<u8> {
    let mut v = Vec::new();
    for r in records {
        v.extend_from_slice(&r.encode());
    }
    v
}

pub fn decode_names(mut b: &[u8]) -> Result<Vec<NameRecord>, RegistryError> {
    // Every record takes at least FIXED_LEN bytes: the list cannot outgrow its input.
    let mut out = Vec::with_capacity(b.len() / FIXED_LEN);
    while !b.is_empty() {
        let (r, used) = NameRecord::decode_prefix(b)?;
        out.push(r);
        b = &b[used..];
    }
    Ok(out)
}

/// `name (8be8d81b)`, or the short id alone for a device without a name.
pub fn label(device: &DeviceId, name: Option<&DeviceName>) -> String {
    match name {
        Some(n) => format!("{n} ({})", device.short()),
        None => device.short(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;
    use crate::roster::MemberRecord;

    fn key(n: u8) -> DeviceKey {
        DeviceKey::from_bytes([n; 32])
    }

    #[test]
    fn names_are_validated() {
        assert!(DeviceName::new("laptop").is_ok());
        assert!(DeviceName::new("Büro-PC 2").is_ok());
        assert!(DeviceName::new("").is_err());
        assert!(DeviceName::new(" x").is_err());
        assert!(DeviceName::new("a\nb").is_err());
        assert!(DeviceName::new("a\u{7f}").is_err());
        assert!(DeviceName::new(&"x".repeat(65)).is_err());
        assert!(DeviceName::new(&"x".repeat(64)).is_ok());
        let long = DeviceName::sanitized(&"é".repeat(40)).unwrap();
        assert!(long.as_str().len() <= MAX_NAME_LEN);
        assert_eq!(DeviceName::sanitized(" host\n").unwrap().as_str(), "host");
        assert!(DeviceName::sanitized("\n\t").is_none());
    }

    #[test]
    fn round_trip_verify_and_tamper() {
        let r = NameRecord::sign(
            &key(1),
            VaultId([7; 16]),
            DeviceName::new("laptop").unwrap(),
            5,
        );
        let b = r.encode();
        let (d, used) = NameRecord::decode_prefix(&b).unwrap();
        assert_eq!((d.clone(), used), (r.clone(), b.len()));
        d.verify().unwrap();
        let mut t = b.clone();
        t[60] ^= 1;
        let (d, _) = NameRecord::decode_prefix(&t).unwrap();
        assert!(d.verify().is_err());
        assert_eq!(
            label(&r.device, Some(&r.name)),
            format!("laptop ({})", r.device.short())
        );
    }

    #[test]
    fn registry_keeps_the_newest_name_of_members_only() {
        let reg = Registry::open_in_memory().unwrap();
        let v = VaultId([3; 16]);
        let (a, b) = (key(1), key(2));
        reg.add_member(&v, &a.device_id()).unwrap();
        let n =
            |k: &DeviceKey, s: &str, at| NameRecord::sign(k, v, DeviceName::new(s).unwrap(), at);
        // Not a member: ignored.
        assert!(
            reg.merge_names(&v, &[n(&b, "intruder", 1)])
                .unwrap()
                .is_empty()
        );
        reg.merge_roster(
            &v,
            &[MemberRecord::add(&a, v, a.device_id(), "age1x".into(), 1)],
        )
        .unwrap();
        let later = n(&a, "desk", 9);
        let earlier = n(&a, "laptop", 2);
        assert_eq!(
            reg.merge_names(&v, std::slice::from_ref(&later)).unwrap(),
            vec![a.device_id()]
        );
        assert!(reg.merge_names(&v, &[earlier]).unwrap().is_empty());
        assert!(
            reg.merge_names(&v, std::slice::from_ref(&later))
                .unwrap()
                .is_empty()
        );
        assert_eq!(reg.names(&v).unwrap(), vec![later]);
        // A record signed by someone else than the named device never counts.
        let mut forged = n(&b, "evil", 20);
        forged.device = a.device_id();
        assert!(reg.merge_names(&v, &[forged]).unwrap().is_empty());
        // Another vault's record neither.
        let other = NameRecord::sign(&a, VaultId([4; 16]), DeviceName::new("x").unwrap(), 30);
        assert!(reg.merge_names(&v, &[other]).unwrap().is_empty());
        assert_eq!(reg.name_map(&v).unwrap()[&a.device_id()].as_str(), "desk");
    }

    mod fuzz {
        use super::*;
        use crate::fuzz::{config, mutate};
        use proptest::prelude::*;

        fn record() -> impl Strategy<Value = NameRecord> {
            (
                any::<[u8; 32]>(),
                any::<[u8; 16]>(),
                "[a-zA-Z0-9äé _-]{0,40}",
                any::<u64>(),
            )
                .prop_filter_map("valid name", |(seed, vault, name, at)| {
                    let name = DeviceName::new(&name).ok()?;
                    Some(NameRecord::sign(
                        &DeviceKey::from_bytes(seed),
                        VaultId(vault),
                        name,
                        at,
                    ))
                })
        }

        /// Whatever decodes is canonical and valid, and a record that verifies was signed.
        fn check(b: &[u8], signed: &[NameRecord]) -> Result<(), TestCaseError> {
            match decode_names(b) {
                Ok(records) => {
                    prop_assert_eq!(encode_names(&records), b.to_vec());
                    for r in &records {
                        prop_assert!(DeviceName::new(r.name.as_str()).is_ok());
                        if r.verify().is_ok() {
                            prop_assert!(signed.contains(r), "a damaged record verifies");
                        }
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    prop_assert!(text.starts_with("device name record"), "{}", text);
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn fuzz_names_random_bytes(b in prop::collection::vec(any::<u8>(), 0..400), format: bool) {
                let mut b = b;
                if format && !b.is_empty() {
                    b[0] = NAME_FORMAT_V1;
                }
                check(&b, &[])?;
            }

            #[test]
            fn fuzz_names_mutations(
                records in prop::collection::vec(record(), 1..4),
                edits in prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4),
            ) {
                let good = encode_names(&records);
                prop_assert_eq!(decode_names(&good).unwrap(), records.clone());
                let mut b = good;
                for (op, at, x) in edits {
                    mutate(&mut b, op, at, x);
                }
                check(&b, &records)?;
            }

            #[test]
            fn fuzz_any_text_sanitizes_to_a_valid_name(s in ".{0,200}") {
                if let Some(n) = DeviceName::sanitized(&s) {
                    prop_assert!(DeviceName::new(n.as_str()).is_ok());
                }
            }
        }
    }
}
