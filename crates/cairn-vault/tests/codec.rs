//! Entry, version and header codecs: round trips, canonical form, and garbage that must
//! yield a typed error, never a panic. Version-vector laws.

use std::collections::BTreeMap;

use cairn_crypto::{DeviceId, VaultId};
use cairn_store::{ChunkId, ChunkKey, ChunkRef};
use cairn_tree::NodeId;
use cairn_vault::{
    Causality, Content, Entry, EntryKind, Hlc, SnapshotHeader, SnapshotId, Version, VersionVector,
};
use proptest::prelude::*;

fn device() -> impl Strategy<Value = DeviceId> {
    (0u8..6).prop_map(|b| DeviceId([b; 32]))
}

fn vv() -> impl Strategy<Value = VersionVector> {
    prop::collection::vec((device(), 0u64..5), 0..5).prop_map(VersionVector::from_pairs)
}

fn version() -> impl Strategy<Value = Version> {
    (vv(), device(), any::<u64>(), any::<u32>())
        .prop_map(|(vv, d, wall_ms, counter)| Version::write(&vv, d, Hlc { wall_ms, counter }))
}

fn chunk_ref() -> impl Strategy<Value = ChunkRef> {
    (any::<[u8; 32]>(), 1u32..300_000, any::<[u8; 32]>()).prop_map(|(id, len, key)| ChunkRef {
        id: ChunkId(id),
        len,
        key: ChunkKey::from_bytes(key),
    })
}

fn entry() -> impl Strategy<Value = Entry> {
    let xattrs = prop::collection::btree_map(
        prop::collection::vec(any::<u8>(), 1..8),
        prop::collection::vec(any::<u8>(), 0..8),
        0..3,
    );
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| (
            EntryKind::File,
            b.len() as u64,
            Content::Inline(b)
        )),
        prop::collection::vec(chunk_ref(), 1..4).prop_map(|c| {
            let size = c.iter().map(|c| u64::from(c.len)).sum();
            (EntryKind::File, size, Content::Chunks(c))
        }),
        (any::<[u8; 32]>(), any::<[u8; 32]>(), 49u64..1000).prop_map(|(b, k, n)| (
            EntryKind::File,
            n * 70_000,
            Content::ChunkList {
                blob: ChunkId(b),
                key: ChunkKey::from_bytes(k),
                chunks: n
            }
        )),
        Just((EntryKind::Dir, 0, Content::None)),
        prop::collection::vec(1u8..255, 1..40).prop_map(|t| (
            EntryKind::Symlink,
            t.len() as u64,
            Content::Target(t)
        )),
    ];
    (
        body,
        any::<u32>(),
        any::<i64>(),
        xattrs,
        version(),
        any::<bool>(),
    )
        .prop_map(
            |((kind, size, content), mode, mtime_ns, xattrs, version, tomb)| {
                if tomb {
                    Entry::tombstone(version)
                } else {
                    Entry {
                        kind,
                        mode,
                        mtime_ns,
                        size,
                        xattrs,
                        content,
                        version,
                    }
                }
            },
        )
}

fn header() -> impl Strategy<Value = SnapshotHeader> {
    (
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        prop::collection::vec(any::<[u8; 32]>(), 0..4),
        any::<[u8; 32]>(),
        any::<(u64, u32, u64, u64)>(),
    )
        .prop_map(|(v, r, ps, d, (w, c, seq, created))| SnapshotHeader {
            vault: VaultId(v),
            root: NodeId(r),
            parents: ps.into_iter().map(|p| SnapshotId(ChunkId(p))).collect(),
            device: DeviceId(d),
            clock: Hlc {
                wall_ms: w,
                counter: c,
            },
            seq,
            created_ms: created,
        })
}

proptest! {
    #[test]
    fn entry_round_trips_canonically(e in entry()) {
        e.validate().unwrap();
        let bytes = e.encode();
        let back = Entry::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn entry_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Entry::decode(&bytes);
        let mut framed = vec![1u8];
        framed.extend_from_slice(&bytes);
        if let Ok(e) = Entry::decode(&framed) {
            // Whatever decodes is canonical.
            prop_assert_eq!(e.encode(), framed);
        }
    }

    #[test]
    fn mutated_entries_error_or_stay_canonical(e in entry(), at in any::<prop::sample::Index>(), x in 1u8..=255, cut in any::<prop::sample::Index>()) {
        let mut bytes = e.encode();
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        if let Ok(d) = Entry::decode(&bytes) {
            prop_assert_eq!(d.encode(), bytes.clone());
        }
        let n = cut.index(bytes.len());
        prop_assert!(Entry::decode(&e.encode()[..n]).is_err());
    }

    #[test]
    fn header_round_trips_and_garbage_is_an_error(h in header(), junk in prop::collection::vec(any::<u8>(), 0..200), cut in any::<prop::sample::Index>()) {
        let bytes = h.encode();
        prop_assert_eq!(SnapshotHeader::decode(&bytes).unwrap(), h);
        let _ = SnapshotHeader::decode(&junk);
        prop_assert!(SnapshotHeader::decode(&bytes[..cut.index(bytes.len())]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        prop_assert!(SnapshotHeader::decode(&long).is_err());
    }

    #[test]
    fn version_vector_laws(a in vv(), b in vv(), c in vv(), d in device()) {
        let flip = |x: Causality| match x {
            Causality::Dominates => Causality::DominatedBy,
            Causality::DominatedBy => Causality::Dominates,
            other => other,
        };
        prop_assert_eq!(a.compare(&b), flip(b.compare(&a)));
        prop_assert_eq!(a.compare(&a), Causality::Equal);
        let j = a.join(&b);
        prop_assert_eq!(&j, &b.join(&a));
        prop_assert!(j.covers(&a) && j.covers(&b));
        prop_assert_eq!(a.join(&b).join(&c), a.join(&b.join(&c)));
        prop_assert_eq!(a.join(&a), a.clone());
        prop_assert_eq!(a.bumped(d).compare(&a), Causality::Dominates);
        // Transitivity of dominance.
        if a.compare(&b) == Causality::Dominates && b.compare(&c) == Causality::Dominates {
            prop_assert_eq!(a.compare(&c), Causality::Dominates);
        }
        // Equal iff maps equal.
        prop_assert_eq!(a.compare(&b) == Causality::Equal, a == b);
    }
}

#[test]
fn invalid_entries_are_refused() {
    let v = Version::write(&VersionVector::new(), DeviceId([1; 32]), Hlc::ZERO);
    let mut e = Entry {
        kind: EntryKind::File,
        mode: 0o644,
        mtime_ns: 0,
        size: 3,
        xattrs: BTreeMap::new(),
        content: Content::Inline(b"ab".to_vec()),
        version: v,
    };
    assert!(e.validate().is_err());
    assert!(Entry::decode(&e.encode()).is_err());
    e.size = 2;
    e.validate().unwrap();
    e.kind = EntryKind::Dir;
    assert!(Entry::decode(&e.encode()).is_err());
    assert!(matches!(
        Entry::decode(&[9]),
        Err(cairn_vault::DecodeError::UnknownFormat { .. })
    ));
}
