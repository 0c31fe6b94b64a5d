//! The on-disk format of pack files: many blobs appended to one file, each behind a small
//! self-checking header, so the index can always be rebuilt from the packs alone.
//!
//! ```text
//! pack   = PACK_MAGIC record* [seal]
//! record = REC_MAGIC len:u32le id:[u8;32] check:[u8;8] bytes[len]
//! seal   = a record header with len 0 and an all-zero id, and no bytes
//! ```
//! `check` is the first 8 bytes of blake3 over the 40 bytes before it: a torn or flipped header
//! is caught before its `len` is trusted. The bytes of a record are checked against `id`
//! (the blob's blake3) wherever they are not already known good.
//!
//! A pack is appended to by exactly one store handle, which holds an exclusive `flock` on it
//! while it does. The writer seals it (fsync, seal record, fsync) when it moves on to a new
//! pack or closes. A pack without a seal whose lock is free was left by a writer that died:
//! the next opener verifies every record, truncates the torn tail, and seals it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::id::ChunkId;

pub(crate) const PACK_MAGIC: [u8; 8] = *b"CAIRNPK\x01";
pub(crate) const REC_MAGIC: [u8; 4] = *b"CRB1";
pub(crate) const HEADER_LEN: u64 = 48;
/// The largest blob a record may hold. Legitimate blobs stay far below (64 MiB is the fetch
/// limit); anything larger in a header is damage, and is never allocated.
pub(crate) const MAX_RECORD: u64 = 1 << 30;
const SEAL_ID: [u8; 32] = [0; 32];

/// One blob's place in a pack: where its bytes start and how many there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub pack: u32,
    /// Offset of the record header; the bytes follow at `offset + HEADER_LEN`.
    pub offset: u64,
    pub len: u32,
}

impl Loc {
    pub fn data_offset(&self) -> u64 {
        self.offset + HEADER_LEN
    }

    pub fn record_len(&self) -> u64 {
        HEADER_LEN + u64::from(self.len)
    }
}

pub(crate) fn header(id: &ChunkId, len: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(&REC_MAGIC);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..40].copy_from_slice(id.as_bytes());
    let check = blake3::hash(&h[..40]);
    h[40..].copy_from_slice(&check.as_bytes()[..8]);
    h
}

pub(crate) fn seal_header() -> [u8; HEADER_LEN as usize] {
    header(&ChunkId(SEAL_ID), 0)
}

/// What a header says, if it is a well-formed header at all.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Header {
    Blob { id: ChunkId, len: u32 },
    Seal,
}

pub(crate) fn parse_header(h: &[u8; HEADER_LEN as usize]) -> Option<Header> {
    if h[..4] != REC_MAGIC || blake3::hash(&h[..40]).as_bytes()[..8] != h[40..] {
        return None;
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let mut id = [0u8; 32];
    id.copy_from_slice(&h[8..40]);
    if id == SEAL_ID {
        return (len == 0).then_some(Header::Seal);
    }
    if u64::from(len) > MAX_RECORD {
        return None;
    }
    Some(Header::Blob {
        id: ChunkId(id),
        len,
    })
}

/// The result of reading a pack from the start.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub records: Vec<(ChunkId, Loc)>,
    /// Where the valid content ends (after the last good record, or after the seal).
    pub valid_len: u64,
    pub sealed: bool,
    /// Whether bytes past `valid_len` (other than a seal) were found: a torn or damaged tail.
    pub bad_tail: bool,
}

/// Reads the headers of pack `pack` (whose file is `len` bytes long), and with `verify` also
/// hashes every record's bytes against its id. Stops at the first record that does not check
/// out; never allocates more than one record, and that only after its header checked out and
/// it fits in the file.
pub(crate) fn scan(file: &File, pack: u32, len: u64, verify: bool) -> io::Result<Scan> {
    scan_from(file, pack, 0, len, verify)
}

/// [`scan`] from `from`, the end of a record already known (0: the start of the pack).
pub(crate) fn scan_from(
    file: &File,
    pack: u32,
    from: u64,
    len: u64,
    verify: bool,
) -> io::Result<Scan> {
    let mut s = Scan::default();
    let mut off = from;
    if from == 0 {
        if len < PACK_MAGIC.len() as u64 {
            s.bad_tail = len > 0;
            return Ok(s);
        }
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0)?;
        if magic != PACK_MAGIC {
            s.bad_tail = true;
            return Ok(s);
        }
        off = PACK_MAGIC.len() as u64;
    }
    let mut buf = Vec::new();
    loop {
        s.valid_len = off;
        if off == len {
            return Ok(s);
        }
        if len - off < HEADER_LEN {
            s.bad_tail = true;
            return Ok(s);
        }
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, off)?;
        let (id, rec_len) = match parse_header(&h) {
            Some(Header::Blob { id, len }) => (id, len),
            Some(Header::Seal) => {
                s.sealed = true;
                s.valid_len = off + HEADER_LEN;
                s.bad_tail = s.valid_len != len;
                return Ok(s);
            }
            None => {
                s.bad_tail = true;
                return Ok(s);
            }
        };
        let end = off + HEADER_LEN + u64::from(rec_len);
        if end > len {
            s.bad_tail = true;
            return Ok(s);
        }
        if verify {
            buf.resize(rec_len as usize, 0);
            file.read_exact_at(&mut buf, off + HEADER_LEN)?;
            if ChunkId::of(&buf) != id {
                s.bad_tail = true;
                return Ok(s);
            }
        }
        s.records.push((
            id,
            Loc {
                pack,
                offset: off,
                len: rec_len,
            },
        ));
        off = end;
    }
}

pub(crate) fn pack_name(n: u32) -> String {
    format!("{n:08}.pack")
}

pub(crate) fn dead_name(n: u32) -> String {
    format!("{n:08}.dead")
}

/// The pack number in a file name like `00000012.pack`, canonical spelling only.
pub(crate) fn parse_pack_name(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".pack")?;
    if stem.len() != 8 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Offsets of records marked dead in a `.dead` file: 8-byte little-endian offsets. A torn
/// last entry (a crash mid-append) is ignored.
pub(crate) fn parse_dead(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn pack_with(blobs: &[&[u8]], seal: bool) -> Vec<u8> {
        let mut out = PACK_MAGIC.to_vec();
        for b in blobs {
            out.extend_from_slice(&header(&ChunkId::of(b), b.len() as u32));
            out.extend_from_slice(b);
        }
        if seal {
            out.extend_from_slice(&seal_header());
        }
        out
    }

    fn scan_bytes(bytes: &[u8], verify: bool) -> Scan {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        scan(&f, 3, bytes.len() as u64, verify).unwrap()
    }

    #[test]
    fn a_sealed_pack_scans_back() {
        let bytes = pack_with(&[b"one", b"", b"three"], true);
        let s = scan_bytes(&bytes, true);
        assert!(s.sealed && !s.bad_tail);
        assert_eq!(s.valid_len, bytes.len() as u64);
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.records[2].0, ChunkId::of(b"three"));
        assert_eq!(s.records[2].1.len, 5);
    }

    #[test]
    fn every_torn_tail_is_cut_at_the_last_whole_record() {
        let bytes = pack_with(&[b"first record", b"second record"], false);
        let first_end = 8 + HEADER_LEN + 12;
        for cut in 0..bytes.len() {
            let s = scan_bytes(&bytes[..cut], true);
            let expect = if cut < 8 {
                0
            } else if (cut as u64) < first_end {
                8
            } else {
                first_end
            };
            assert_eq!(s.valid_len, expect, "cut at {cut}");
            assert_eq!(s.bad_tail, cut as u64 != expect, "cut at {cut}");
        }
    }

    #[test]
    fn damaged_bytes_are_caught_only_when_verifying() {
        let mut bytes = pack_with(&[b"first record", b"second record"], false);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let s = scan_bytes(&bytes, true);
        assert_eq!(s.records.len(), 1);
        assert!(s.bad_tail);
        assert_eq!(scan_bytes(&bytes, false).records.len(), 2);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let s = scan_bytes(&bytes, true);
            prop_assert!(s.valid_len <= bytes.len() as u64);
        }

        #[test]
        fn mutated_packs_never_panic_nor_yield_wrong_bytes(
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = pack_with(&[b"alpha", b"beta beta", &[7u8; 300]], true);
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            let end = cut.index(bytes.len() + 1);
            let bytes = &bytes[..end];
            let s = scan_bytes(bytes, true);
            prop_assert!(s.valid_len <= bytes.len() as u64);
            for (id, loc) in &s.records {
                let start = loc.data_offset() as usize;
                let data = &bytes[start..start + loc.len as usize];
                prop_assert_eq!(ChunkId::of(data), *id);
            }
        }

        #[test]
        fn arbitrary_dead_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(parse_dead(&bytes).count(), bytes.len() / 8);
        }
    }
}
