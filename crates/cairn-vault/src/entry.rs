//! One tree value: the metadata, content reference and version of a path.
//!
//! Encoding (format 1), all integers canonical LEB128 varints unless noted:
//! ```text
//! 0x01 | kind u8 | mode | zigzag(mtime_ns) | size
//!      | xattr count | count × (name bytes, value bytes)   names strictly increasing
//!      | content tag u8 | content payload
//!      | vv count | count × (device 32 B, counter > 0)   devices strictly increasing
//!      | hlc wall_ms | hlc counter | author device 32 B
//!      | dot count | count × (device 32 B, counter)    strictly increasing
//! ```
//! Content payloads: 0 none; 1 inline bytes; 2 chunk count × (id 32 B, len u32 LE, key 32 B);
//! 3 chunk-list blob (id 32 B, key 32 B, chunk count); 4 symlink target bytes.
//! The decoder accepts exactly the encoder's output (canonical form), so two entries are
//! equal iff their bytes are, and the tree's content addressing sees equal entries as equal.

use std::collections::BTreeMap;

use cairn_crypto::DeviceId;
use cairn_store::{ChunkId, ChunkKey, ChunkRef};

use crate::clock::Hlc;
use crate::codec::{Reader, put_bytes, put_varint, unzigzag, varint_u32, zigzag};
use crate::error::DecodeError;
use crate::version::{Version, VersionVector};

pub const ENTRY_FORMAT_V1: u8 = 1;

/// Files up to this size are stored inside their entry: no chunk, no extra round-trip.
pub const INLINE_MAX: usize = 4096;

/// Chunk lists longer than this go to their own encrypted blob, so a huge file does not
/// make its tree leaf (and every sibling's rewrite) huge.
pub const MAX_INLINE_CHUNKS: usize = 48;

/// Largest target accepted for a symlink (Linux `PATH_MAX`).
pub const MAX_SYMLINK_TARGET: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Tombstone,
}

impl EntryKind {
    fn tag(self) -> u8 {
        match self {
            EntryKind::File => 0,
            EntryKind::Dir => 1,
            EntryKind::Symlink => 2,
            EntryKind::Tombstone => 3,
        }
    }

    fn from_tag(t: u8) -> Result<Self, DecodeError> {
        Ok(match t {
            0 => EntryKind::File,
            1 => EntryKind::Dir,
            2 => EntryKind::Symlink,
            3 => EntryKind::Tombstone,
            _ => return Err(DecodeError::Invalid("unknown entry kind")),
        })
    }
}

/// Where an entry's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    None,
    /// Small file content, stored in the (encrypted) tree node itself.
    Inline(Vec<u8>),
    /// The file's chunks in order.
    Chunks(Vec<ChunkRef>),
    /// A long chunk list, itself stored as one encrypted chunk (an encoded
    /// `cairn_store::FileManifest`) under `blob`, decryptable with `key`.
    ChunkList {
        blob: ChunkId,
        key: ChunkKey,
        chunks: u64,
    },
    /// A symlink's target, as given to `symlink(2)`.
    Target(Vec<u8>),
}

impl Content {
    fn tag(&self) -> u8 {
        match self {
            Content::None => 0,
            Content::Inline(_) => 1,
            Content::Chunks(_) => 2,
            Content::ChunkList { .. } => 3,
            Content::Target(_) => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub content: Content,
    pub version: Version,
}

impl Entry {
    pub fn is_live(&self) -> bool {
        self.kind != EntryKind::Tombstone
    }

    pub fn is_tombstone(&self) -> bool {
        self.kind == EntryKind::Tombstone
    }

    /// A deletion marker that supersedes every version covered by `version.vv`.
    pub fn tombstone(version: Version) -> Self {
        Self {
            kind: EntryKind::Tombstone,
            mode: 0,
            mtime_ns: 0,
            size: 0,
            xattrs: BTreeMap::new(),
            content: Content::None,
            version,
        }
    }

    /// True if both entries have the same kind, metadata and content: they differ at most
    /// in version, so keeping one of them loses nothing.
    pub fn same_payload(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.mode == other.mode
            && self.mtime_ns == other.mtime_ns
            && self.size == other.size
            && self.xattrs == other.xattrs
            && self.content == other.content
    }

    /// Checks the invariants that tie kind, size and content together.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let ok = match (&self.kind, &self.content) {
            (EntryKind::File, Content::Inline(b)) => {
                b.len() <= INLINE_MAX && self.size == b.len() as u64
            }
            (EntryKind::File, Content::Chunks(c)) => {
                !c.is_empty()
                    && c.len() <= MAX_INLINE_CHUNKS
                    && c.iter().all(|c| c.len > 0)
                    && self.size == c.iter().map(|c| u64::from(c.len)).sum::<u64>()
            }
            (EntryKind::File, Content::ChunkList { chunks, .. }) => {
                *chunks > MAX_INLINE_CHUNKS as u64 && self.size >= *chunks
            }
            (EntryKind::Dir, Content::None) => self.size == 0,
            (EntryKind::Symlink, Content::Target(t)) => {
                !t.is_empty() && t.len() <= MAX_SYMLINK_TARGET && self.size == t.len() as u64
            }
            (EntryKind::Tombstone, Content::None) => {
                self.size == 0 && self.mode == 0 && self.mtime_ns == 0 && self.xattrs.is_empty()
            }
            _ => false,
        };
        if !ok {
            return Err(DecodeError::Invalid(
                "kind, size and content do not fit together",
            ));
        }
        let v = &self.version;
        if v.dots.is_empty() || v.dots.iter().any(|(d, c)| *c == 0 || v.vv.get(d) < *c) {
            return Err(DecodeError::Invalid(
                "content writes not covered by the version vector",
            ));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.version.vv.len() * 34);
        out.push(ENTRY_FORMAT_V1);
        out.push(self.kind.tag());
        put_varint(&mut out, u64::from(self.mode));
        put_varint(&mut out, zigzag(self.mtime_ns));
        put_varint(&mut out, self.size);
        put_varint(&mut out, self.xattrs.len() as u64);
        for (k, v) in &self.xattrs {
            put_bytes(&mut out, k);
            put_bytes(&mut out, v);
        }
        out.push(self.content.tag());
        match &self.content {
            Content::None => {}
            Content::Inline(b) | Content::Target(b) => put_bytes(&mut out, b),
            Content::Chunks(chunks) => {
                put_varint(&mut out, chunks.len() as u64);
                for c in chunks {
                    out.extend_from_slice(c.id.as_bytes());
                    out.extend_from_slice(&c.len.to_le_bytes());
                    out.extend_from_slice(c.key.as_bytes());
                }
            }
            Content::ChunkList { blob, key, chunks } => {
                out.extend_from_slice(blob.as_bytes());
                out.extend_from_slice(key.as_bytes());
                put_varint(&mut out, *chunks);
            }
        }
        encode_version(&mut out, &self.version);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8()?;
        if format != ENTRY_FORMAT_V1 {
            return Err(DecodeError::UnknownFormat {
                what: "entry",
                version: format,
            });
        }
        let kind = EntryKind::from_tag(r.u8()?)?;
        let mode = varint_u32(&mut r)?;
        let mtime_ns = unzigzag(r.varint()?);
        let size = r.varint()?;
        let n = r.varint()?;
        let mut xattrs = BTreeMap::new();
        let mut prev: Option<&[u8]> = None;
        for _ in 0..n {
            let k = r.bytes()?;
            let v = r.bytes()?;
            if prev.is_some_and(|p| p >= k) {
                return Err(DecodeError::NonCanonical("xattr names not increasing"));
            }
            prev = Some(k);
            xattrs.insert(k.to_vec(), v.to_vec());
        }
        let content = match r.u8()? {
            0 => Content::None,
            1 => Content::Inline(r.bytes()?.to_vec()),
            2 => {
                let n = r.varint()?;
                const REF_LEN: u64 = 32 + 4 + 32;
                if n.saturating_mul(REF_LEN) > r.remaining() as u64 {
                    return Err(DecodeError::Truncated);
                }
                let mut chunks = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    chunks.push(ChunkRef {
                        id: ChunkId(r.take_array()?),
                        len: u32::from_le_bytes(r.take_array()?),
                        key: ChunkKey::from_bytes(r.take_array()?),
                    });
                }
                Content::Chunks(chunks)
            }
            3 => Content::ChunkList {
                blob: ChunkId(r.take_array()?),
                key: ChunkKey::from_bytes(r.take_array()?),
                chunks: r.varint()?,
            },
            4 => Content::Target(r.bytes()?.to_vec()),
            _ => return Err(DecodeError::Invalid("unknown content tag")),
        };
        let version = decode_version(&mut r)?;
        r.finish()?;
        let entry = Entry {
            kind,
            mode,
            mtime_ns,
            size,
            xattrs,
            content,
            version,
        };
        entry.validate()?;
        Ok(entry)
    }
}

pub(crate) fn encode_version(out: &mut Vec<u8>, v: &Version) {
    put_varint(out, v.vv.len() as u64);
    for (d, c) in v.vv.iter() {
        out.extend_from_slice(d.as_bytes());
        put_varint(out, *c);
    }
    encode_hlc(out, v.hlc);
    out.extend_from_slice(v.device.as_bytes());
    put_varint(out, v.dots.len() as u64);
    for (d, c) in &v.dots {
        out.extend_from_slice(d.as_bytes());
        put_varint(out, *c);
    }
}

pub(crate) fn decode_version(r: &mut Reader<'_>) -> Result<Version, DecodeError> {
    let n = r.varint()?;
    // Each pair takes at least 33 bytes; check before looping on an untrusted count.
    if n.saturating_mul(33) > r.remaining() as u64 {
        return Err(DecodeError::Truncated);
    }
    let mut pairs = Vec::with_capacity(n as usize);
    let mut prev: Option<DeviceId> = None;
    for _ in 0..n {
        let d = DeviceId(r.take_array()?);
        let c = r.varint()?;
        if c == 0 {
            return Err(DecodeError::NonCanonical("zero version counter"));
        }
        if prev.is_some_and(|p| p >= d) {
            return Err(DecodeError::NonCanonical("version devices not increasing"));
        }
        prev = Some(d);
        pairs.push((d, c));
    }
    let hlc = decode_hlc(r)?;
    let device = DeviceId(r.take_array()?);
    let vv = VersionVector::from_pairs(pairs);
    let n = r.varint()?;
    if n.saturating_mul(33) > r.remaining() as u64 {
        return Err(DecodeError::Truncated);
    }
    let mut dots: Vec<(DeviceId, u64)> = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let dot = (DeviceId(r.take_array()?), r.varint()?);
        if dots.last().is_some_and(|p| *p >= dot) {
            return Err(DecodeError::NonCanonical("dots not increasing"));
        }
        dots.push(dot);
    }
    Ok(Version {
        vv,
        hlc,
        device,
        dots,
    })
}

pub(crate) fn encode_hlc(out: &mut Vec<u8>, h: Hlc) {
    put_varint(out, h.wall_ms);
    put_varint(out, u64::from(h.counter));
}

pub(crate) fn decode_hlc(r: &mut Reader<'_>) -> Result<Hlc, DecodeError> {
    Ok(Hlc {
        wall_ms: r.varint()?,
        counter: varint_u32(r)?,
    })
}
