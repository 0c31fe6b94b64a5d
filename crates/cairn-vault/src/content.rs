//! Turning a chunked file (a `cairn_store::FileManifest`) into entry content and back.
//!
//! Short chunk lists live in the entry; long ones are encoded as a manifest, encrypted as
//! one chunk with the vault's convergent chunk cipher and stored as a blob, so a 100 GiB
//! file costs its tree leaf 80 bytes, not 100 KiB.

use cairn_store::{ChunkSealer, FileManifest, StoreError, open_chunk};

use crate::entry::{Content, MAX_INLINE_CHUNKS};
use crate::error::{Result, VaultError};
use crate::stores::Blobs;

/// Content (and size) for a file whose chunks are already stored.
pub fn content_from_manifest(
    blobs: &dyn Blobs,
    sealer: &ChunkSealer,
    manifest: &FileManifest,
) -> Result<(Content, u64)> {
    let chunks = manifest.chunks();
    if chunks.is_empty() {
        return Ok((Content::Inline(Vec::new()), 0));
    }
    if chunks.len() <= MAX_INLINE_CHUNKS {
        return Ok((Content::Chunks(chunks.to_vec()), manifest.size()));
    }
    let sealed = sealer.seal(&manifest.encode());
    let stored = blobs.put(&sealed.bytes)?;
    debug_assert_eq!(stored, sealed.id);
    Ok((
        Content::ChunkList {
            blob: sealed.id,
            key: sealed.key,
            chunks: chunks.len() as u64,
        },
        manifest.size(),
    ))
}

/// The chunk list of a file entry's content; `None` for inline content and non-files.
pub fn manifest_of(blobs: &dyn Blobs, content: &Content) -> Result<Option<FileManifest>> {
    match content {
        Content::Chunks(c) => Ok(Some(FileManifest::new(c.clone())?)),
        Content::ChunkList { blob, key, chunks } => {
            let sealed = blobs
                .get(blob)?
                .ok_or(VaultError::Store(StoreError::NotFound { id: *blob }))?;
            let plain = open_chunk(*blob, key, &sealed)?;
            let m = FileManifest::decode(&plain)?;
            if m.chunks().len() as u64 != *chunks {
                return Err(VaultError::Store(StoreError::InvalidManifest {
                    reason: format!(
                        "chunk list {blob} holds {} chunks, its entry says {chunks}",
                        m.chunks().len()
                    ),
                }));
            }
            Ok(Some(m))
        }
        Content::None | Content::Inline(_) | Content::Target(_) => Ok(None),
    }
}
