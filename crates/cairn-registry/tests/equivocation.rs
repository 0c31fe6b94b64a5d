//! Equivocation: one device signing two payloads under one revision. Detected, kept as
//! evidence, and resolved the same way on every member whatever the arrival order.

mod common;

use cairn_registry::{
    Offered, Outcome, Payload, Registry, RegistryEntry, RegistryError, Revision, VaultId,
};
use common::{entry, member, vault};

fn head(reg: &Registry, vault: &VaultId, e: &RegistryEntry) -> RegistryEntry {
    reg.get(vault, &e.device).unwrap().unwrap()
}

#[test]
fn put_stays_strict_compare_and_swap() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let m = member(&reg, &v);
    reg.put(&v, &entry(&m, v, 5, 9)).unwrap();
    assert!(matches!(
        reg.put(&v, &entry(&m, v, 5, 1)),
        Err(RegistryError::Conflict { .. })
    ));
    // The local publish loop's lost race is not evidence of anything.
    assert!(reg.equivocations(&v).unwrap().is_empty());
    assert_eq!(
        head(&reg, &v, &entry(&m, v, 5, 9)).payload,
        Payload([9; 32])
    );
}

#[test]
fn members_converge_on_the_lower_payload_whatever_the_arrival_order() {
    let v = vault();
    let key = cairn_registry::DeviceKey::generate();
    let high = entry(&key, v, 5, 0xee);
    let low = entry(&key, v, 5, 0x11);
    let mut heads = Vec::new();
    for order in [[&high, &low], [&low, &high]] {
        let reg = Registry::open_in_memory().unwrap();
        reg.add_member(&v, &key.device_id()).unwrap();
        assert_eq!(
            reg.offer(&v, order[0]).unwrap(),
            Offered::Stored(Outcome::Accepted { previous: None })
        );
        let Offered::Equivocation(seen) = reg.offer(&v, order[1]).unwrap() else {
            panic!("the second payload at revision 5 must be seen as equivocation");
        };
        assert_eq!(seen.device, key.device_id());
        assert_eq!(seen.revision, Revision(5));
        assert!(seen.new_evidence);
        assert_eq!(seen.other, *order[0]);
        assert_eq!(seen.head_replaced, order[1] == &low);
        heads.push(head(&reg, &v, &low));
        assert_eq!(
            reg.log(&v, &key.device_id()).unwrap(),
            vec![(Revision(5), low.payload)],
            "the log agrees with the head"
        );

        let ev = reg.equivocations(&v).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].low.clone(), ev[0].high.clone()),
            (low.clone(), high.clone())
        );
        assert_eq!(ev[0].device(), key.device_id());
        assert_eq!(ev[0].revision(), Revision(5));

        // Offering either again changes nothing and is not new evidence.
        for e in [&low, &high] {
            match reg.offer(&v, e).unwrap() {
                Offered::Stored(Outcome::Unchanged) => assert_eq!(e, &low),
                Offered::Equivocation(s) => {
                    assert!(!s.new_evidence && !s.head_replaced);
                    assert_eq!(e, &high);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(reg.equivocations(&v).unwrap().len(), 1);
    }
    assert_eq!(heads[0], heads[1]);
    assert_eq!(heads[0], low);
}

#[test]
fn equivocation_below_the_head_is_found_in_the_log() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let m = member(&reg, &v);
    reg.offer(&v, &entry(&m, v, 3, 30)).unwrap();
    reg.offer(&v, &entry(&m, v, 4, 40)).unwrap();
    let Offered::Equivocation(seen) = reg.offer(&v, &entry(&m, v, 3, 31)).unwrap() else {
        panic!("a second payload at a logged revision is equivocation");
    };
    assert!(seen.new_evidence);
    assert!(!seen.head_replaced, "the head is at revision 4");
    assert_eq!(head(&reg, &v, &entry(&m, v, 4, 40)).revision, Revision(4));
    let rev3 = |reg: &Registry| {
        reg.log(&v, &m.device_id())
            .unwrap()
            .into_iter()
            .find(|(r, _)| *r == Revision(3))
            .unwrap()
            .1
    };
    assert_eq!(
        rev3(&reg),
        Payload([30; 32]),
        "the higher one does not replace"
    );
    // A still lower payload for revision 3 becomes the log's record of it.
    let Offered::Equivocation(seen) = reg.offer(&v, &entry(&m, v, 3, 29)).unwrap() else {
        panic!("a third payload at revision 3 is equivocation too");
    };
    assert!(seen.new_evidence, "a lower payload updates the evidence");
    assert_eq!(rev3(&reg), Payload([29; 32]));
    assert_eq!(head(&reg, &v, &entry(&m, v, 4, 40)).revision, Revision(4));
    // A stale entry at a revision never seen proves nothing.
    assert!(matches!(
        reg.offer(&v, &entry(&m, v, 1, 1)),
        Err(RegistryError::Stale { .. })
    ));
    assert_eq!(reg.equivocations(&v).unwrap().len(), 1);
}

#[test]
fn evidence_passed_on_by_a_peer_is_checked_and_applies_the_same_rule() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let m = member(&reg, &v);
    let other = member(&reg, &v);
    let (high, low) = (entry(&m, v, 2, 0xaa), entry(&m, v, 2, 0x0a));
    reg.offer(&v, &high).unwrap();
    // Not evidence: other devices, other revisions, same payloads, bad signatures.
    for (a, b) in [
        (&high, &entry(&other, v, 2, 0x0a)),
        (&high, &entry(&m, v, 3, 0x0a)),
        (&high, &high),
    ] {
        assert!(matches!(
            reg.record_equivocation(&v, a, b),
            Err(RegistryError::NotEvidence)
        ));
    }
    let mut forged = low.clone();
    forged.payload = Payload([0; 32]);
    assert!(matches!(
        reg.record_equivocation(&v, &high, &forged),
        Err(RegistryError::BadSignature { .. })
    ));
    assert!(reg.equivocations(&v).unwrap().is_empty());

    assert!(reg.record_equivocation(&v, &high, &low).unwrap());
    assert_eq!(
        head(&reg, &v, &low),
        low,
        "the lower payload wins the revision"
    );
    assert!(!reg.record_equivocation(&v, &low, &high).unwrap());
    assert_eq!(reg.equivocations(&v).unwrap().len(), 1);
}

#[test]
fn evidence_per_device_is_bounded() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let m = member(&reg, &v);
    for rev in 1..=40u64 {
        let a = entry(&m, v, rev, 1);
        let b = entry(&m, v, rev, 2);
        reg.offer(&v, &a).unwrap();
        reg.offer(&v, &b).unwrap();
    }
    let n = reg.equivocations(&v).unwrap().len();
    assert!((1..=16).contains(&n), "{n} revisions kept");
}

#[test]
fn non_members_cannot_leave_evidence() {
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let stranger = cairn_registry::DeviceKey::generate();
    assert!(matches!(
        reg.offer(&v, &entry(&stranger, v, 1, 1)),
        Err(RegistryError::NotMember { .. })
    ));
    assert!(matches!(
        reg.record_equivocation(&v, &entry(&stranger, v, 1, 1), &entry(&stranger, v, 1, 2)),
        Err(RegistryError::NotMember { .. })
    ));
    assert!(reg.equivocations(&v).unwrap().is_empty());
}
