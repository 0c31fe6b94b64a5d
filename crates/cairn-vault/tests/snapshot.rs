//! Snapshot headers: sealing, loading, history, and bad input that must be refused with a
//! typed error and change nothing.

mod common;

use cairn_crypto::{AgeIdentity, VaultSecret, seal_to};
use cairn_store::ChunkId;
use cairn_vault::{
    Blobs, Keyring, SnapshotHeader, SnapshotId, VaultError, load_snapshot, verify_history,
};
use common::*;

#[test]
fn history_stays_loadable_and_verifiable() {
    let f = Fixture::new(2);
    let mut a = f.vault(0);
    let mut ids = Vec::new();
    for i in 0..5 {
        write(&mut a, &format!("f{i}"), "x", 10 + i);
        ids.push(a.snapshot(10 + i).unwrap().id);
    }
    let chain = a.verify_history(ids[4]).unwrap();
    assert_eq!(chain.len(), 5);
    assert_eq!(chain[4].id, ids[0]);
    for (i, id) in ids.iter().enumerate() {
        let s = a.load(*id).unwrap();
        assert_eq!(s.header.seq, i as u64 + 1);
        assert_eq!(live(&f.stores.source(s.header.root)).len(), i + 1);
    }
    // Another member can open them; parents name the previous snapshot.
    let b = f.vault(1);
    assert_eq!(b.load(ids[3]).unwrap().header.parents, vec![ids[2]]);
}

#[test]
fn bad_snapshots_are_refused_and_change_nothing() {
    let f = Fixture::new(2);
    let mut a = f.vault(0);
    let mut b = f.vault(1);
    write(&mut a, "f", "x", 1);
    let good = a.snapshot(1).unwrap();
    write(&mut b, "mine", "y", 2);
    let root = b.root();

    // Sealed only to an outsider: this device cannot open it.
    let outsider = AgeIdentity::generate();
    let header = good.header.clone();
    let sealed = seal_to(&[outsider.recipient()], &header.encode()).unwrap();
    let id = SnapshotId(f.blobs.put(&sealed).unwrap());
    assert!(matches!(b.receive(id), Err(VaultError::Unreadable { .. })));

    // A header for another vault.
    let mut other = header.clone();
    other.vault = VaultSecret::generate().vault_id();
    let id = SnapshotId(
        f.blobs
            .put(&seal_to(&f.recipients, &other.encode()).unwrap())
            .unwrap(),
    );
    assert!(matches!(b.receive(id), Err(VaultError::WrongVault { .. })));

    // Garbage and truncated plaintext, properly sealed.
    let enc = header.encode();
    for plain in [
        b"garbage".to_vec(),
        enc[..enc.len() - 3].to_vec(),
        Vec::new(),
    ] {
        let id = SnapshotId(
            f.blobs
                .put(&seal_to(&f.recipients, &plain).unwrap())
                .unwrap(),
        );
        assert!(matches!(b.receive(id), Err(VaultError::Header { .. })));
    }

    // Truncated sealed bytes (stored under their own id): age refuses them.
    let sealed = f.blobs.get(&good.id.0).unwrap().unwrap();
    let id = SnapshotId(f.blobs.put(&sealed[..sealed.len() / 2]).unwrap());
    assert!(matches!(b.receive(id), Err(VaultError::Unreadable { .. })));

    // A blob tampered with in the store: the hash check catches it.
    let victim = a.snapshot(2).unwrap();
    let mut bytes = f.blobs.get(&victim.id.0).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    f.blobs.corrupt(&victim.id.0, &bytes);
    assert!(matches!(b.receive(victim.id), Err(VaultError::Store(_))));

    // Missing snapshot and missing parent.
    let absent = SnapshotId(ChunkId([7; 32]));
    assert!(matches!(
        b.receive(absent),
        Err(VaultError::MissingSnapshot { .. })
    ));
    let mut orphan = header.clone();
    orphan.parents = vec![absent];
    let id = SnapshotId(
        f.blobs
            .put(&seal_to(&f.recipients, &orphan.encode()).unwrap())
            .unwrap(),
    );
    assert!(matches!(
        b.receive(id),
        Err(VaultError::MissingParent { .. })
    ));
    assert!(matches!(
        verify_history(&f.stores, &f.keyring(1), id),
        Err(VaultError::MissingParent { .. })
    ));

    // A header whose tree is not in the node store.
    let mut rootless = header.clone();
    rootless.root = cairn_tree::NodeId([9; 32]);
    let id = SnapshotId(
        f.blobs
            .put(&seal_to(&f.recipients, &rootless.encode()).unwrap())
            .unwrap(),
    );
    assert!(matches!(
        b.receive(id),
        Err(VaultError::IncompleteTree { .. })
    ));

    assert_eq!(b.root(), root, "a refused snapshot must not change state");
    b.receive(good.id).unwrap();
    assert_eq!(live(&b.source()).len(), 2);
}

#[test]
fn a_snapshot_announced_by_one_device_but_naming_another_is_refused() {
    let f = Fixture::new(3);
    let mut a = f.vault(0);
    let mut c = f.vault(2);
    write(&mut a, "from-a", "x", 1);
    let a_snap = a.snapshot(1).unwrap();
    let (a_id, m_id) = (f.keys[0].device_id(), f.keys[1].device_id());
    let root = c.root();

    // Device 1 (M) announces A's snapshot under its own signature.
    match c.receive_from(m_id, a_snap.id) {
        Err(VaultError::ForeignSnapshot { id, signer, named }) => {
            assert_eq!((id, signer, named), (a_snap.id, m_id, a_id));
        }
        other => panic!("expected ForeignSnapshot, got {other:?}"),
    }
    let err = c.receive_from(m_id, a_snap.id).unwrap_err().to_string();
    assert!(err.contains(&m_id.to_string()), "names the signer: {err}");
    assert_eq!(c.root(), root, "a refused snapshot changes nothing");
    assert!(matches!(
        cairn_vault::load_announced(&f.stores, &f.keyring(2), a_snap.id, m_id),
        Err(VaultError::ForeignSnapshot { .. })
    ));

    // Whose it is is checked before its tree is needed: a foreign header with a tree
    // nobody has is still refused as foreign, not left to retry as incomplete.
    let mut rootless = a_snap.header.clone();
    rootless.root = cairn_tree::NodeId([9; 32]);
    let id = SnapshotId(
        f.blobs
            .put(&seal_to(&f.recipients, &rootless.encode()).unwrap())
            .unwrap(),
    );
    assert!(matches!(
        c.receive_from(m_id, id),
        Err(VaultError::ForeignSnapshot { .. })
    ));

    // Announced by its own device, it merges.
    c.receive_from(a_id, a_snap.id).unwrap();
    assert_eq!(live(&c.source()).len(), 1);
}

#[test]
fn non_member_identity_cannot_load() {
    let f = Fixture::new(1);
    let mut a = f.vault(0);
    write(&mut a, "f", "x", 1);
    let s = a.snapshot(1).unwrap();
    let keys = Keyring {
        identity: AgeIdentity::generate(),
        ..f.keyring(0)
    };
    assert!(matches!(
        load_snapshot(&f.stores, &keys, s.id),
        Err(VaultError::Unreadable { .. })
    ));
    let _ = SnapshotHeader::decode(b"");
}
