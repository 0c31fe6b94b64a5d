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
    /// Special files: local to this device, never flushed (a FIFO, socket or device node
    /// means nothing on another machine). They stay in the overlay until deleted.
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    /// Local ownership of the base entry at this path: the vault stores no owners, so a
    /// `chown` outlives its flush as this record (uid and gid only; everything else is the
    /// base's). Never flushed; meaningless, and ignored, where the base has no entry.
    Owner,
}

impl Kind {
    /// Kinds kept on this device only: never dirty, never handed to a flush.
    pub fn is_local(self) -> bool {
        matches!(
            self,
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev | Kind::Owner
        )
    }
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
    /// Device number of a character or block device node.
    Device(u64),
    /// Directories, whiteouts, FIFOs, sockets and ownership records.
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xattrs() -> impl Strategy<Value = BTreeMap<Vec<u8>, Vec<u8>>> {
        prop::collection::btree_map(
            prop::collection::vec(any::<u8>(), 0..12),
            prop::collection::vec(any::<u8>(), 0..24),
            0..5,
        )
    }

    /// What decodes from a journal column is a map that round-trips; the input, being
    /// whole length-prefixed pairs, is at least as long as the map's own encoding (a repeated
    /// name keeps its last value).
    fn check(b: &[u8]) -> Result<(), TestCaseError> {
        if let Some(m) = decode_xattrs(b) {
            let again = encode_xattrs(&m);
            prop_assert!(again.len() <= b.len());
            prop_assert_eq!(decode_xattrs(&again), Some(m));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cairn_fuzzkit::config())]

        #[test]
        fn fuzz_xattrs_round_trip(m in xattrs()) {
            prop_assert_eq!(decode_xattrs(&encode_xattrs(&m)), Some(m));
        }

        #[test]
        fn fuzz_xattrs_random_bytes(b in prop::collection::vec(any::<u8>(), 0..200)) {
            check(&b)?;
        }

        #[test]
        fn fuzz_xattrs_mutations(
            m in xattrs(),
            edits in cairn_fuzzkit::edits(),
        ) {
            let mut b = encode_xattrs(&m);
            for (op, at, x) in edits {
                cairn_fuzzkit::mutate(&mut b, op, at, x);
            }
            check(&b)?;
        }
    }

    /// A length of 4 GiB in an 8-byte column is refused, not reserved.
    #[test]
    fn a_huge_xattr_length_is_refused() {
        let mut b = u32::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(b"name");
        assert_eq!(decode_xattrs(&b), None);
        let mut b = 1u32.to_le_bytes().to_vec();
        b.push(b'k');
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_xattrs(&b), None);
    }
}
