//! Decoder fuzzing for what the store reads from peers and disk: file manifests (chunk
//! lists), sealed chunk frames and sealed structural blobs. Arbitrary bytes and damaged
//! valid encodings must give a typed, worded error or (manifests) a value that re-encodes to
//! the same bytes; a damaged sealed frame never opens. Tests are named `fuzz_*`;
//! `scripts/bench/fuzz.sh` runs them with a larger budget.

use cairn_crypto::ContentKey;
use cairn_store::{
    ChunkId, ChunkKey, ChunkRef, ChunkSealer, FileManifest, MAX_CHUNK_SIZE, MetaSealer, StoreError,
    open_chunk,
};
use proptest::prelude::*;

fn manifest() -> impl Strategy<Value = FileManifest> {
    prop::collection::vec(
        (
            any::<[u8; 32]>(),
            1u32..=MAX_CHUNK_SIZE as u32,
            any::<[u8; 32]>(),
        ),
        0..6,
    )
    .prop_map(|refs| {
        FileManifest::new(
            refs.into_iter()
                .map(|(id, len, key)| ChunkRef {
                    id: ChunkId(id),
                    len,
                    key: ChunkKey::from_bytes(key),
                })
                .collect(),
        )
        .unwrap()
    })
}

fn check_manifest(b: &[u8]) -> Result<(), TestCaseError> {
    match FileManifest::decode(b) {
        Ok(m) => prop_assert_eq!(m.encode(), b.to_vec()),
        Err(e) => {
            prop_assert!(
                matches!(
                    e,
                    StoreError::Truncated { .. }
                        | StoreError::UnsupportedFormat { .. }
                        | StoreError::InvalidManifest { .. }
                ),
                "{:?}",
                e
            );
            prop_assert!(e.to_string().contains("manifest"), "{}", e);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cairn_fuzzkit::config())]

    #[test]
    fn fuzz_manifest_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_manifest(&bytes)?;
        let mut with_header = vec![1u8];
        with_header.extend_from_slice(&bytes);
        check_manifest(&with_header)?;
    }

    #[test]
    fn fuzz_manifest_mutations(m in manifest(), edits in cairn_fuzzkit::edits()) {
        let mut b = m.encode();
        prop_assert_eq!(FileManifest::decode(&b).unwrap(), m);
        for (op, at, x) in edits {
            cairn_fuzzkit::mutate(&mut b, op, at, x);
        }
        check_manifest(&b)?;
    }

    #[test]
    fn fuzz_manifest_random_entries(body in prop::collection::vec(any::<u8>(), 0..400), count in any::<u64>()) {
        // A well-formed header over random entries reaches the per-chunk checks.
        let mut b = vec![1u8];
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&body);
        check_manifest(&b)?;
    }

    /// Any edit of a sealed chunk or structural blob is refused with a worded error.
    #[test]
    fn fuzz_sealed_frame_mutations(plain in prop::collection::vec(any::<u8>(), 0..300), edits in cairn_fuzzkit::edits()) {
        let key = ContentKey::from_bytes([7; 32]);
        let chunk = ChunkSealer::new(&key).seal(&plain);
        let mut b = chunk.bytes.clone();
        for (op, at, x) in &edits {
            cairn_fuzzkit::mutate(&mut b, *op, *at, *x);
        }
        if b != chunk.bytes {
            let e = open_chunk(chunk.id, &chunk.key, &b).unwrap_err();
            prop_assert!(e.to_string().contains("chunk"), "{}", e);
        }
        let meta = MetaSealer::new(&key, "tree");
        let sealed = meta.seal(&plain);
        let mut b = sealed.clone();
        for (op, at, x) in &edits {
            cairn_fuzzkit::mutate(&mut b, *op, *at, *x);
        }
        if b != sealed {
            let e = meta.open(&b).unwrap_err();
            prop_assert!(e.to_string().starts_with("sealed blob "), "{}", e);
        }
    }
}

/// A manifest claiming 2^40 chunks in a 17-byte header is refused by comparing the count
/// with the bytes present, before any entry is read or reserved.
#[test]
fn a_huge_chunk_count_is_refused_at_once() {
    for count in [1u64 << 40, u64::MAX, (u64::MAX / 68) + 1] {
        let mut b = vec![1u8];
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        let e = FileManifest::decode(&b).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "file manifest is invalid: header announces {count} chunks but 0 bytes of \
                 entries follow; restore the file from an older snapshot"
            )
        );
    }
}
