use std::collections::BTreeMap;
use std::fmt;

use cairn_codec::Reader;

/// Names one staging file (`<overlay>/staging/<id>`); ids are never reused within an overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StagingId(pub u64);

impl fmt::Display for StagingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl StagingId {
    pub(crate) fn parse(name: &str) -> Option<StagingId> {
        if name.len() != 16 {
            return None;
        }
        u64::from_str_radix(name, 16).ok().map(StagingId)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Hides the base layer's entry at this path: a local deletion not yet flushed.
    Whiteout,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// Content unchanged from the base layer's entry at this same path (a metadata-only change).
    Base,
    /// A local staging file holds the full content.
    Staged(StagingId),
    /// Symlink target.
    Target(Vec<u8>),
    /// Content of a base entry identified by the base layer's own opaque reference. A renamed
    /// base file uses this so that moving it never copies (or fetches) its bytes, and so that
    /// it keeps meaning the same bytes whatever happens to the base at its old path.
    Content(Vec<u8>),
    /// Directories and whiteouts.
    None,
}

/// The overlay's view of one vault path. `generation` is assigned by the overlay on every mutation
/// (the value passed in is ignored) and is what [`crate::Overlay::retire`] compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    /// Permission bits (`0o7777`), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub atime_ns: Option<i64>,
    pub size: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub data: Data,
    pub generation: u64,
}

impl Record {
    pub fn whiteout(now_ns: i64) -> Record {
        Record {
            kind: Kind::Whiteout,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: now_ns,
            ctime_ns: now_ns,
            atime_ns: None,
            size: 0,
            xattrs: BTreeMap::new(),
            data: Data::None,
            generation: 0,
        }
    }

    pub fn staging(&self) -> Option<StagingId> {
        match self.data {
            Data::Staged(id) => Some(id),
            _ => None,
        }
    }
}

pub(crate) fn encode_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in x {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// `None` for anything but whole `u32`-length-prefixed pairs; not otherwise checked (the
/// journal only reads back what it wrote).
pub(crate) fn decode_xattrs(b: &[u8]) -> Option<BTreeMap<Vec<u8>, Vec<u8>>> {
    fn take<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], cairn_codec::Error> {
        let len = r.u32_le()?;
        r.take(len as usize)
    }
    let mut r = Reader::new(b);
    let mut out = BTreeMap::new();
    while !r.is_empty() {
        let k = take(&mut r).ok()?.to_vec();
        let v = take(&mut r).ok()?.to_vec();
        out.insert(k, v);
    }
    Some(out)
}
