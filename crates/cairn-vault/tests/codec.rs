//! Entry, version and header codecs: round trips, canonical form, and garbage that must
//! yield a typed error, never a panic. Version-vector laws.

use std::collections::BTreeMap;

use cairn_crypto::{DeviceId, VaultId};
use cairn_store::{ChunkId, ChunkKey, ChunkRef};
use cairn_tree::NodeId;
use cairn_vault::{
    Causality, Content, Entry, EntryKey, EntryKind, Hlc, SnapshotHeader, SnapshotId, Version,
    VersionVector,
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
    fn fuzz_entry_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
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

// ---------------------------------------------------------------------------------------
// Fuzzing (tests named `fuzz_*`; `scripts/bench/fuzz.sh` runs them with a larger budget).

/// A decode error says what was wrong in words, not an empty or debug-only string.
fn assert_worded(e: &cairn_vault::DecodeError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        text.len() > 8 && text.chars().any(char::is_alphabetic),
        "{:?}",
        text
    );
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

proptest! {
    #![proptest_config(cairn_fuzzkit::config())]

    #[test]
    fn fuzz_entry_mutations(e in entry(), edits in cairn_fuzzkit::edits()) {
        let mut b = e.encode();
        for (op, at, x) in edits {
            cairn_fuzzkit::mutate(&mut b, op, at, x);
        }
        match Entry::decode(&b) {
            Ok(d) => {
                prop_assert_eq!(d.encode(), b);
                d.validate().unwrap();
            }
            Err(err) => assert_worded(&err)?,
        }
    }

    #[test]
    fn fuzz_header_mutations(h in header(), edits in cairn_fuzzkit::edits()) {
        let mut b = h.encode();
        for (op, at, x) in edits {
            cairn_fuzzkit::mutate(&mut b, op, at, x);
        }
        match SnapshotHeader::decode(&b) {
            Ok(d) => prop_assert_eq!(d.encode(), b),
            Err(err) => assert_worded(&err)?,
        }
    }

    #[test]
    fn fuzz_header_random_bytes(b in prop::collection::vec(any::<u8>(), 0..400), magic: bool) {
        let mut b = b;
        if magic {
            // Past the magic and format byte, where the parser has work to do.
            let mut framed = b"cairnsnap\x01".to_vec();
            framed.append(&mut b);
            b = framed;
        }
        match SnapshotHeader::decode(&b) {
            Ok(d) => prop_assert_eq!(d.encode(), b),
            Err(err) => assert_worded(&err)?,
        }
    }

    /// Tree keys come from peers' trees: any bytes parse to a valid key or a typed error,
    /// and a parsed key is the bytes it came from.
    #[test]
    fn fuzz_entry_key_random_bytes(b in prop::collection::vec(any::<u8>(), 0..80), texty in "[a-c/.\\x00]{0,12}") {
        for key in [&b[..], texty.as_bytes()] {
            match EntryKey::from_bytes(key) {
                Ok(k) => prop_assert_eq!(k.to_bytes(), key.to_vec()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    /// Every count in an entry or header, overwritten with a huge value, is refused at once
    /// (the decoder compares it with the bytes left before looping or reserving).
    #[test]
    fn fuzz_huge_counts_are_refused(e in entry(), h in header(), shift in 20u32..64) {
        let huge = 1u64 << shift;
        // Entry: rebuild the encoding with one count replaced, for each count it has.
        let b = e.encode();
        for count in huge_count_variants(&e, huge) {
            prop_assert!(Entry::decode(&count).is_err());
        }
        prop_assert!(Entry::decode(&b).is_ok());
        // Header: the parent count sits right after magic, format, vault and root.
        let mut hb = h.encode()[..9 + 1 + 16 + 32].to_vec();
        put_varint(&mut hb, huge);
        hb.extend_from_slice(&[0; 64]);
        let err = SnapshotHeader::decode(&hb).unwrap_err();
        prop_assert_eq!(err.to_string(), "invalid value: too many parents");
    }
}

/// Encodings of `e` with, in turn, its xattr count, chunk count, version-vector length and
/// dot count replaced by `huge` (those it has), built field by field as the format says.
fn huge_count_variants(e: &Entry, huge: u64) -> Vec<Vec<u8>> {
    let whole = e.encode();
    let mut out = Vec::new();
    // Header through size: format, kind, then three varints (mode, mtime, size).
    let mut at = 2;
    for _ in 0..3 {
        at += varint_at(&whole, at);
    }
    // xattr count.
    let mut v = whole[..at].to_vec();
    put_varint(&mut v, huge);
    v.extend_from_slice(&whole[at + varint_at(&whole, at)..]);
    out.push(v);
    if let Content::Chunks(c) = &e.content {
        // The chunk count follows the xattrs and the content tag.
        let tail_len = 1 + varint_at_len(c.len() as u64) + c.len() * 68;
        let tag_at = find_content_tag(&whole, e);
        let mut v = whole[..tag_at + 1].to_vec();
        put_varint(&mut v, huge);
        v.extend_from_slice(&whole[tag_at + tail_len..]);
        out.push(v);
    }
    // The version starts at the vv count, right after the content.
    let vv_at = whole.len() - version_len(e);
    let mut v = whole[..vv_at].to_vec();
    put_varint(&mut v, huge);
    v.extend_from_slice(&whole[vv_at + varint_at(&whole, vv_at)..]);
    out.push(v);
    // The dot count is the last count before the dots themselves.
    let dots_len: usize = e
        .version
        .dots
        .iter()
        .map(|(_, c)| 32 + varint_at_len(*c))
        .sum();
    let dots_at = whole.len() - dots_len - varint_at_len(e.version.dots.len() as u64);
    let mut v = whole[..dots_at].to_vec();
    put_varint(&mut v, huge);
    v.extend_from_slice(&whole[whole.len() - dots_len..]);
    out.push(v);
    out
}

/// Length of the varint starting at `at`.
fn varint_at(b: &[u8], at: usize) -> usize {
    b[at..].iter().position(|x| x & 0x80 == 0).unwrap() + 1
}

fn varint_at_len(v: u64) -> usize {
    let mut b = Vec::new();
    put_varint(&mut b, v);
    b.len()
}

/// Offset of the content tag: the encoding up to it is the entry with no content and no
/// version, which is what the encoder writes first.
fn find_content_tag(whole: &[u8], e: &Entry) -> usize {
    let content_and_version = match &e.content {
        Content::Chunks(c) => 1 + varint_at_len(c.len() as u64) + c.len() * 68,
        _ => unreachable!("only called for chunk lists"),
    } + version_len(e);
    whole.len() - content_and_version
}

/// Bytes the version takes at the end of an entry's encoding.
fn version_len(e: &Entry) -> usize {
    let v = &e.version;
    let vv: usize = v.vv.iter().map(|(_, c)| 32 + varint_at_len(*c)).sum();
    let dots: usize = v.dots.iter().map(|(_, c)| 32 + varint_at_len(*c)).sum();
    varint_at_len(v.vv.len() as u64)
        + vv
        + varint_at_len(v.hlc.wall_ms)
        + varint_at_len(u64::from(v.hlc.counter))
        + 32
        + varint_at_len(v.dots.len() as u64)
        + dots
}
