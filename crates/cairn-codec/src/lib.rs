//! The byte-level primitives every cairn encoding is built from: unsigned LEB128 varints
//! (written in their shortest form, and read back only in that form) and a bounds-checked
//! [`Reader`] over a byte slice. This crate owns no format: node, entry, header, ticket and
//! protocol layouts, their version bytes, limits and error messages belong to the crates that
//! define them, which map [`Error`] into their own error types.
//!
//! Decoding is strict because cairn hashes and compares encodings: a value must have exactly
//! one byte string, or equal things would get different ids. Every read is checked against
//! the bytes that remain, so hostile input can neither panic nor make a caller allocate by a
//! forged length it has not seen the bytes for.

/// Why a [`Reader`] refused its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("input ends early")]
    Truncated,
    #[error("varint does not fit in 64 bits")]
    VarintOverflow,
    #[error("varint is not in its shortest form")]
    NonCanonicalVarint,
    #[error("{0} unexpected bytes after the end")]
    TrailingBytes(usize),
}

/// Appends `v` as an unsigned LEB128 varint in its shortest form.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Number of bytes [`put_varint`] writes for `v` (1 to 10).
pub fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `bytes` preceded by their length as a varint (read back by [`Reader::bytes`]).
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads a byte slice front to back. A failed read leaves the reader somewhere inside the
/// input; callers abandon the whole decode on the first error.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next `n` bytes, borrowed from the input.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.rest.len() {
            return Err(Error::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub fn take_array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Error> {
        let (&b, rest) = self.rest.split_first().ok_or(Error::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    pub fn u16_be(&mut self) -> Result<u16, Error> {
        self.take_array().map(u16::from_be_bytes)
    }

    pub fn u32_be(&mut self) -> Result<u32, Error> {
        self.take_array().map(u32::from_be_bytes)
    }

    pub fn u32_le(&mut self) -> Result<u32, Error> {
        self.take_array().map(u32::from_le_bytes)
    }

    pub fn u64_be(&mut self) -> Result<u64, Error> {
        self.take_array().map(u64::from_be_bytes)
    }

    /// An unsigned LEB128 varint in its shortest form. A final byte of zero after the first
    /// (padding that adds nothing) is [`Error::NonCanonicalVarint`]; a tenth byte carrying more
    /// than the 64th bit, or announcing an eleventh, is [`Error::VarintOverflow`].
    pub fn varint(&mut self) -> Result<u64, Error> {
        let mut value = 0u64;
        let mut shift = 0u32;
        loop {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(Error::VarintOverflow);
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if b == 0 && shift > 0 {
                    return Err(Error::NonCanonicalVarint);
                }
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// Bytes written by [`put_bytes`]: the length is checked against the input before
    /// anything is returned, so a forged length is [`Error::Truncated`], never an allocation.
    pub fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| Error::Truncated)?)
    }

    /// Ends the decode: refuses unread input, so one value has one encoding.
    pub fn finish(self) -> Result<(), Error> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(Error::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, v);
        out
    }

    /// Values right at and around every 7-bit boundary, where length changes.
    #[test]
    fn varint_boundaries() {
        for k in 0..64 {
            for v in [(1u64 << k) - 1, 1u64 << k, (1u64 << k) + 1] {
                let e = encode(v);
                assert_eq!(e.len(), varint_len(v), "{v}");
                let mut r = Reader::new(&e);
                assert_eq!(r.varint(), Ok(v));
                r.finish().unwrap();
            }
        }
        assert_eq!(encode(0), [0]);
        assert_eq!(encode(300), [0xac, 0x02]);
        assert_eq!(varint_len(u64::MAX), 10);
    }

    #[test]
    fn varint_refusals() {
        let r = |b: &[u8]| Reader::new(b).varint();
        assert_eq!(r(&[0x80, 0x00]), Err(Error::NonCanonicalVarint));
        assert_eq!(r(&[0xff, 0x80, 0x00]), Err(Error::NonCanonicalVarint));
        assert_eq!(r(&[0xff; 11]), Err(Error::VarintOverflow));
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert_eq!(r(&over), Err(Error::VarintOverflow));
        // Ten bytes whose last carries only bit 63 is u64::MAX territory, not an overflow.
        over[9] = 0x01;
        assert_eq!(r(&over), Ok(u64::MAX));
        // A zero tenth byte is padding, not a value bit.
        over[8] = 0x80;
        over[9] = 0x00;
        assert_eq!(r(&over), Err(Error::NonCanonicalVarint));
        assert_eq!(r(&[]), Err(Error::Truncated));
        assert_eq!(r(&[0x80]), Err(Error::Truncated));
    }

    proptest! {
        #[test]
        fn varint_round_trip(v in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..4)) {
            let mut e = encode(v);
            prop_assert_eq!(e.len(), varint_len(v));
            e.extend_from_slice(&tail);
            let mut r = Reader::new(&e);
            prop_assert_eq!(r.varint(), Ok(v));
            prop_assert_eq!(r.remaining(), tail.len());
        }

        #[test]
        fn varint_overlong_refused(v in any::<u64>(), pad in 1usize..10) {
            let mut e = encode(v);
            *e.last_mut().unwrap() |= 0x80;
            e.extend(std::iter::repeat_n(0x80, pad - 1));
            e.push(0);
            let got = Reader::new(&e).varint();
            if e.len() <= 10 {
                prop_assert_eq!(got, Err(Error::NonCanonicalVarint));
            } else {
                prop_assert_eq!(got, Err(Error::VarintOverflow));
            }
        }

        #[test]
        fn varint_truncated_refused(v in any::<u64>(), cut in any::<prop::sample::Index>()) {
            let e = encode(v);
            let prefix = &e[..cut.index(e.len())];
            prop_assert_eq!(Reader::new(prefix).varint(), Err(Error::Truncated));
        }

        #[test]
        fn bytes_round_trip(a in proptest::collection::vec(any::<u8>(), 0..300), b in proptest::collection::vec(any::<u8>(), 0..3)) {
            let mut e = Vec::new();
            put_bytes(&mut e, &a);
            put_bytes(&mut e, &b);
            let mut r = Reader::new(&e);
            prop_assert_eq!(r.bytes(), Ok(&a[..]));
            prop_assert_eq!(r.bytes(), Ok(&b[..]));
            prop_assert_eq!(r.finish(), Ok(()));
        }

        /// Any sequence of reads over any input: no panic, and every successful read returns
        /// exactly the bytes it consumed from the front of what remained (for varints: the
        /// bytes re-encode to what was consumed, which is what canonical means).
        #[test]
        fn reads_stay_in_bounds(
            input in proptest::collection::vec(any::<u8>(), 0..64),
            ops in proptest::collection::vec((0u8..9, 0usize..80), 0..24),
        ) {
            let mut r = Reader::new(&input);
            for (op, n) in ops {
                let at = input.len() - r.remaining();
                let read: Option<Vec<u8>> = match op {
                    0 => r.take(n).ok().map(<[u8]>::to_vec),
                    1 => r.take_array::<3>().ok().map(Vec::from),
                    2 => r.u8().ok().map(|b| vec![b]),
                    3 => r.u16_be().ok().map(|v| v.to_be_bytes().to_vec()),
                    4 => r.u32_be().ok().map(|v| v.to_be_bytes().to_vec()),
                    5 => r.u32_le().ok().map(|v| v.to_le_bytes().to_vec()),
                    6 => r.u64_be().ok().map(|v| v.to_be_bytes().to_vec()),
                    7 => r.varint().ok().map(encode),
                    _ => r.bytes().ok().map(|s| {
                        let mut e = Vec::new();
                        put_bytes(&mut e, s);
                        e
                    }),
                };
                let now = input.len() - r.remaining();
                prop_assert!(now >= at);
                if let Some(read) = read {
                    prop_assert_eq!(&read[..], &input[at..now]);
                }
            }
            let left = r.remaining();
            match r.finish() {
                Ok(()) => prop_assert_eq!(left, 0),
                Err(e) => prop_assert_eq!(e, Error::TrailingBytes(left)),
            }
        }
    }
}
