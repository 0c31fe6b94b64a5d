//! Storage of file content for cairn: content-defined chunking ([`chunk`]), per-chunk
//! convergent authenticated encryption ([`cipher`]), a local content-addressed blob store
//! that verifies every read ([`blobstore`]), and the file-level glue that turns a byte
//! stream into an ordered list of encrypted chunks and back ([`file`]). Chunk ids are
//! blake3 hashes of ciphertext, so peers without the vault key can hold and verify them.
//!
//! This crate does not know about directory trees, snapshots or the network, and it does
//! not create or manage keys: it is handed the vault's [`ContentKey`] by `cairn-crypto`'s
//! callers, and the manifests it returns (which contain chunk keys) must be encrypted by
//! whoever persists them.
//!
//! [`ContentKey`]: cairn_crypto::ContentKey

pub mod blobstore;
pub mod chunk;
pub mod cipher;
pub mod error;
pub mod file;
pub mod id;
pub mod meta;
mod pack;
pub mod sweep;

pub use blobstore::{BlobIter, BlobLocation, BlobReader, BlobStore, Durability, PACK_TARGET};
pub use chunk::{AVG_CHUNK_SIZE, Chunk, Chunker, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
pub use cipher::{CHUNK_OVERHEAD, ChunkKey, ChunkSealer, SealedChunk, open_chunk};
pub use error::{Result, StoreError};
pub use file::{
    ChunkRef, FileManifest, FileReader, WriteOptions, read_file, read_file_with, write_file,
    write_file_with,
};
pub use id::ChunkId;
pub use meta::{
    EpochMetaSealer, META_EPOCH_OVERHEAD, META_OVERHEAD, MetaError, MetaSealer, sealed_epoch,
};
pub use sweep::{Sweep, SweepProgress, SweepReport};
