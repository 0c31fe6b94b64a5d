//! The acceptance rule, as pure functions so it can be tested without a database and reused
//! by anything that holds entries (the SQLite registry, the network layer's caches).
//!
//! An entry replaces the held one for its (vault, device) only if nothing is held, or its
//! revision is higher. The same revision with the same payload is a harmless replay. The same
//! revision with a different payload means the device signed two different states under one
//! number: either two local producers raced (the loser retries) or the device equivocates;
//! either way the first one held stays, because letting the later one win would make peers
//! disagree about what revision N means.

use cairn_crypto::VaultId;

use crate::{RegistryEntry, RegistryError, Revision};

/// What accepting an entry did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// The entry is now the held one; `previous` is the revision it replaced.
    Accepted { previous: Option<Revision> },
    /// The same revision and payload were already held; nothing changed.
    Unchanged,
}

/// Checks that need no stored state: right vault, valid signature. Cheap enough to run
/// before taking any lock.
pub fn check_authentic(
    expected_vault: &VaultId,
    entry: &RegistryEntry,
) -> Result<(), RegistryError> {
    if entry.vault != *expected_vault {
        return Err(RegistryError::WrongVault {
            expected: *expected_vault,
            got: entry.vault,
        });
    }
    entry.verify()
}

/// Checks against stored state: membership of the signer and the compare-and-swap rule.
/// `held` must be the entry currently held for `(incoming.vault, incoming.device)`.
pub fn check_cas(
    is_member: bool,
    held: Option<&RegistryEntry>,
    incoming: &RegistryEntry,
) -> Result<Outcome, RegistryError> {
    if !is_member {
        return Err(RegistryError::NotMember {
            vault: incoming.vault,
            device: incoming.device,
        });
    }
    let Some(held) = held else {
        return Ok(Outcome::Accepted { previous: None });
    };
    debug_assert_eq!((held.vault, held.device), (incoming.vault, incoming.device));
    match incoming.revision.cmp(&held.revision) {
        std::cmp::Ordering::Greater => Ok(Outcome::Accepted {
            previous: Some(held.revision),
        }),
        // The signature is deliberately not compared: a signer may produce several valid
        // signatures over one message, and they all claim the same state.
        std::cmp::Ordering::Equal if incoming.payload == held.payload => Ok(Outcome::Unchanged),
        std::cmp::Ordering::Equal => Err(RegistryError::Conflict {
            device: incoming.device,
            revision: incoming.revision,
            held: held.payload,
            incoming: incoming.payload,
        }),
        std::cmp::Ordering::Less => Err(RegistryError::Stale {
            device: incoming.device,
            held: held.revision,
            incoming: incoming.revision,
        }),
    }
}

/// The whole rule in one call: vault, signature, membership, then compare-and-swap.
pub fn accept(
    expected_vault: &VaultId,
    is_member: bool,
    held: Option<&RegistryEntry>,
    incoming: &RegistryEntry,
) -> Result<Outcome, RegistryError> {
    check_authentic(expected_vault, incoming)?;
    check_cas(is_member, held, incoming)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Payload;
    use cairn_crypto::{DeviceKey, Signature};

    const V: VaultId = VaultId([1; 16]);

    fn e(key: &DeviceKey, rev: u64, payload: u8) -> RegistryEntry {
        RegistryEntry::sign(key, V, Revision(rev), Payload([payload; 32]))
    }

    #[test]
    fn first_entry_is_accepted() {
        let k = DeviceKey::generate();
        assert_eq!(
            accept(&V, true, None, &e(&k, 5, 1)).unwrap(),
            Outcome::Accepted { previous: None }
        );
    }

    #[test]
    fn higher_revision_replaces_regardless_of_gap() {
        let k = DeviceKey::generate();
        let held = e(&k, 5, 1);
        for rev in [6, 7, 1000, u64::MAX] {
            assert_eq!(
                accept(&V, true, Some(&held), &e(&k, rev, 2)).unwrap(),
                Outcome::Accepted {
                    previous: Some(Revision(5))
                }
            );
        }
    }

    #[test]
    fn same_revision_same_payload_is_unchanged() {
        let k = DeviceKey::generate();
        let held = e(&k, 5, 1);
        assert_eq!(
            accept(&V, true, Some(&held), &held).unwrap(),
            Outcome::Unchanged
        );
    }

    #[test]
    fn same_revision_other_payload_is_conflict() {
        let k = DeviceKey::generate();
        let held = e(&k, 5, 1);
        let err = accept(&V, true, Some(&held), &e(&k, 5, 2)).unwrap_err();
        assert!(matches!(
            err,
            RegistryError::Conflict { revision: Revision(5), held, incoming, .. }
                if held == Payload([1; 32]) && incoming == Payload([2; 32])
        ));
    }

    #[test]
    fn lower_revision_is_stale_even_with_same_payload() {
        let k = DeviceKey::generate();
        let held = e(&k, 5, 1);
        for (rev, p) in [(4, 1), (4, 9), (0, 1)] {
            assert!(matches!(
                accept(&V, true, Some(&held), &e(&k, rev, p)),
                Err(RegistryError::Stale {
                    held: Revision(5),
                    ..
                })
            ));
        }
    }

    #[test]
    fn wrong_vault_forgery_and_non_member_are_refused_before_cas() {
        let k = DeviceKey::generate();
        let other_vault = RegistryEntry::sign(&k, VaultId([2; 16]), Revision(1), Payload([0; 32]));
        assert!(matches!(
            accept(&V, true, None, &other_vault),
            Err(RegistryError::WrongVault { .. })
        ));
        let mut forged = e(&k, 1, 1);
        forged.signature = Signature([7; 64]);
        assert!(matches!(
            accept(&V, true, None, &forged),
            Err(RegistryError::BadSignature { .. })
        ));
        // Claiming another device's identity with our own signature.
        let mut stolen = e(&k, 1, 1);
        stolen.device = DeviceKey::generate().device_id();
        assert!(matches!(
            accept(&V, true, None, &stolen),
            Err(RegistryError::BadSignature { .. })
        ));
        assert!(matches!(
            accept(&V, false, None, &e(&k, 1, 1)),
            Err(RegistryError::NotMember { .. })
        ));
    }
}
