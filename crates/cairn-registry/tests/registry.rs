//! The SQLite registry: refusals leave state untouched, acceptance persists, handles agree.

mod common;

use std::sync::{Arc, Barrier};

use cairn_registry::{
    DeviceKey, Outcome, Payload, Registry, RegistryEntry, RegistryError, Revision, Signature,
    VaultId,
};
use common::{dump, entry, member, vault};

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    reg: Registry,
    vault: VaultId,
    a: DeviceKey,
    b: DeviceKey,
}

/// A registry holding a few revisions from two members, so refusals have state to damage.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let reg = Registry::open(&path).unwrap();
    let vault = vault();
    let a = member(&reg, &vault);
    let b = member(&reg, &vault);
    for rev in 1..=3 {
        reg.put(&vault, &entry(&a, vault, rev, rev as u8)).unwrap();
    }
    reg.put(&vault, &entry(&b, vault, 7, 70)).unwrap();
    Fixture {
        _dir: dir,
        path,
        reg,
        vault,
        a,
        b,
    }
}

fn logical_state(f: &Fixture) -> (Vec<RegistryEntry>, Vec<Vec<(Revision, Payload)>>) {
    let logs = [&f.a, &f.b]
        .iter()
        .map(|k| f.reg.log(&f.vault, &k.device_id()).unwrap())
        .collect();
    (f.reg.list(&f.vault).unwrap(), logs)
}

/// Offer `bytes`, expect the refusal `check` describes, and prove nothing changed.
fn refused(f: &Fixture, bytes: &[u8], check: impl Fn(&RegistryError) -> bool) {
    let before = (dump(&f.path), logical_state(f));
    let err = f.reg.put_bytes(&f.vault, bytes).unwrap_err();
    assert!(check(&err), "unexpected error: {err:?}");
    assert!(!err.to_string().is_empty());
    assert_eq!(
        before,
        (dump(&f.path), logical_state(f)),
        "refusal changed state: {err}"
    );
}

#[test]
fn every_bad_input_is_refused_with_a_typed_error_and_no_state_change() {
    let f = fixture();
    let v = f.vault;

    let mut forged = entry(&f.a, v, 4, 4);
    forged.signature = Signature([0x5a; 64]);
    refused(&f, &forged.to_vec(), |e| {
        matches!(e, RegistryError::BadSignature { .. })
    });

    // A valid signature by `b` presented as `a`'s entry.
    let mut impostor = entry(&f.b, v, 4, 4);
    impostor.device = f.a.device_id();
    refused(&f, &impostor.to_vec(), |e| {
        matches!(e, RegistryError::BadSignature { .. })
    });

    let other_vault = entry(&f.a, VaultId([0xee; 16]), 4, 4);
    refused(
        &f,
        &other_vault.to_vec(),
        |e| matches!(e, RegistryError::WrongVault { got, .. } if *got == VaultId([0xee; 16])),
    );

    let outsider = DeviceKey::generate();
    refused(
        &f,
        &entry(&outsider, v, 1, 1).to_vec(),
        |e| matches!(e, RegistryError::NotMember { device, .. } if *device == outsider.device_id()),
    );

    for rev in [1, 2] {
        // A replay of a genuinely old entry, and an old revision with a new payload.
        refused(&f, &entry(&f.a, v, rev, rev as u8).to_vec(), |e| {
            matches!(
                e,
                RegistryError::Stale {
                    held: Revision(3),
                    ..
                }
            )
        });
        refused(&f, &entry(&f.a, v, rev, 99).to_vec(), |e| {
            matches!(e, RegistryError::Stale { .. })
        });
    }

    refused(&f, &entry(&f.a, v, 3, 33).to_vec(), |e| {
        matches!(
            e,
            RegistryError::Conflict {
                revision: Revision(3),
                ..
            }
        )
    });

    let good = entry(&f.a, v, 4, 4).to_vec();
    for len in [0, 1, 50, 152] {
        refused(&f, &good[..len], |e| {
            matches!(e, RegistryError::Truncated { .. })
        });
    }
    let mut long = good.clone();
    long.extend_from_slice(b"tail");
    refused(&f, &long, |e| {
        matches!(e, RegistryError::TrailingBytes { .. })
    });
    refused(&f, &[0xff; 153], |e| {
        matches!(e, RegistryError::UnknownFormat { found: 0xff })
    });
    let mut garbage = vec![0x01];
    garbage.extend((0..152u32).map(|i| (i * 37 % 251) as u8));
    garbage[33..49].copy_from_slice(&v.0); // right vault, so the signature check is reached
    refused(&f, &garbage, |e| {
        matches!(e, RegistryError::BadSignature { .. })
    });
    for i in 0..good.len() {
        let mut flipped = good.clone();
        flipped[i] ^= 0x10;
        refused(&f, &flipped, |_| true);
    }

    // After all that, the good entry is still accepted on top of the untouched head.
    assert_eq!(
        f.reg.put_bytes(&v, &good).unwrap(),
        Outcome::Accepted {
            previous: Some(Revision(3))
        }
    );
}

#[test]
fn replaying_the_held_entry_is_unchanged_and_writes_nothing() {
    let f = fixture();
    let held = f.reg.get(&f.vault, &f.a.device_id()).unwrap().unwrap();
    let before = dump(&f.path);
    for _ in 0..3 {
        assert_eq!(f.reg.put(&f.vault, &held).unwrap(), Outcome::Unchanged);
    }
    assert_eq!(before, dump(&f.path));
}

#[test]
fn accepted_entries_are_held_logged_and_survive_reopen() {
    let f = fixture();
    let a = f.a.device_id();
    assert_eq!(
        f.reg.get(&f.vault, &a).unwrap(),
        Some(entry(&f.a, f.vault, 3, 3))
    );
    let log: Vec<(Revision, Payload)> = (1..=3)
        .rev()
        .map(|r| (Revision(r), Payload([r as u8; 32])))
        .collect();
    assert_eq!(f.reg.log(&f.vault, &a).unwrap(), log);
    assert_eq!(
        f.reg.put(&f.vault, &entry(&f.a, f.vault, 10, 10)).unwrap(),
        Outcome::Accepted {
            previous: Some(Revision(3))
        }
    );
    let list = f.reg.list(&f.vault).unwrap();
    let members = f.reg.members(&f.vault).unwrap();
    let path = f.path.clone();
    drop(f.reg);

    let reopened = Registry::open(&path).unwrap();
    assert_eq!(reopened.list(&f.vault).unwrap(), list);
    assert_eq!(reopened.members(&f.vault).unwrap(), members);
    assert_eq!(
        reopened.log(&f.vault, &a).unwrap()[0],
        (Revision(10), Payload([10; 32]))
    );
    assert_eq!(reopened.log(&f.vault, &a).unwrap().len(), 4);
    for e in reopened.list(&f.vault).unwrap() {
        e.verify().unwrap();
    }
    // The CAS state survived too, not just the rows.
    assert!(matches!(
        reopened.put(&f.vault, &entry(&f.a, f.vault, 9, 9)),
        Err(RegistryError::Stale { .. })
    ));
}

#[test]
fn list_is_ordered_by_device_bytes_whatever_the_insertion_order() {
    let keys: Vec<DeviceKey> = (0..12).map(|_| DeviceKey::generate()).collect();
    let v = vault();
    let mut lists = Vec::new();
    for order in [
        (0..12).collect::<Vec<_>>(),
        (0..12).rev().collect(),
        vec![5, 0, 11, 3, 8, 1, 10, 2, 9, 4, 7, 6],
    ] {
        let reg = Registry::open_in_memory().unwrap();
        for &i in &order {
            reg.add_member(&v, &keys[i].device_id()).unwrap();
            reg.put(&v, &entry(&keys[i], v, 1, i as u8)).unwrap();
        }
        let list = reg.list(&v).unwrap();
        let ids: Vec<_> = list.iter().map(|e| e.device).collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|d| d.0);
        assert_eq!(ids, sorted);
        lists.push(list);
    }
    assert!(lists.windows(2).all(|w| w[0] == w[1]));
    // Other vaults are not mixed in.
    let reg = Registry::open_in_memory().unwrap();
    assert!(reg.list(&v).unwrap().is_empty());
}

#[test]
fn vaults_are_isolated() {
    let reg = Registry::open_in_memory().unwrap();
    let (v1, v2) = (vault(), vault());
    let k = member(&reg, &v1);
    reg.put(&v1, &entry(&k, v1, 1, 1)).unwrap();
    // Member of v1 only: its entries for v2 are refused.
    assert!(matches!(
        reg.put(&v2, &entry(&k, v2, 1, 1)),
        Err(RegistryError::NotMember { .. })
    ));
    reg.add_member(&v2, &k.device_id()).unwrap();
    assert_eq!(
        reg.put(&v2, &entry(&k, v2, 1, 2)).unwrap(),
        Outcome::Accepted { previous: None }
    );
    assert_eq!(
        reg.get(&v1, &k.device_id()).unwrap().unwrap().payload,
        Payload([1; 32])
    );
    assert_eq!(
        reg.get(&v2, &k.device_id()).unwrap().unwrap().payload,
        Payload([2; 32])
    );
}

#[test]
fn racing_handles_on_one_file_agree_on_a_single_winner_per_revision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let setup = Registry::open(&path).unwrap();
    let v = vault();
    let key = member(&setup, &v);
    const THREADS: usize = 8;
    const ROUNDS: u64 = 10;

    for round in 1..=ROUNDS {
        let barrier = Arc::new(Barrier::new(THREADS));
        let outcomes: Vec<(u8, Result<Outcome, RegistryError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (path, key, barrier) = (&path, &key, barrier.clone());
                    s.spawn(move || {
                        let reg = Registry::open(path).unwrap();
                        // Two threads offer the same payload, so Unchanged is exercised too.
                        let payload = (t / 2) as u8;
                        let e = entry(key, v, round, payload);
                        barrier.wait();
                        (payload, reg.put(&v, &e))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<u8> = outcomes
            .iter()
            .filter(|(_, r)| matches!(r, Ok(Outcome::Accepted { .. })))
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let winner = winners[0];
        for (p, r) in &outcomes {
            match r {
                Ok(Outcome::Accepted { previous }) => {
                    assert_eq!(*previous, (round > 1).then(|| Revision(round - 1)))
                }
                Ok(Outcome::Unchanged) => assert_eq!(*p, winner),
                Err(RegistryError::Conflict { held, .. }) => {
                    assert_ne!(*p, winner);
                    assert_eq!(*held, Payload([winner; 32]));
                }
                Err(e) => panic!("round {round}: unexpected {e:?}"),
            }
        }
        let held = setup.get(&v, &key.device_id()).unwrap().unwrap();
        assert_eq!(
            (held.revision, held.payload),
            (Revision(round), Payload([winner; 32]))
        );
    }
    let log = setup.log(&v, &key.device_id()).unwrap();
    assert_eq!(
        log.iter().map(|(r, _)| r.0).collect::<Vec<_>>(),
        (1..=ROUNDS).rev().collect::<Vec<_>>()
    );
}

#[test]
fn one_handle_is_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Registry>();
    let reg = Registry::open_in_memory().unwrap();
    let v = vault();
    let keys: Vec<DeviceKey> = (0..4).map(|_| member(&reg, &v)).collect();
    std::thread::scope(|s| {
        for k in &keys {
            let reg = &reg;
            s.spawn(move || {
                for rev in 1..=25 {
                    reg.put(&v, &entry(k, v, rev, rev as u8)).unwrap();
                }
            });
        }
    });
    for k in &keys {
        assert_eq!(reg.log(&v, &k.device_id()).unwrap().len(), 25);
    }
}
