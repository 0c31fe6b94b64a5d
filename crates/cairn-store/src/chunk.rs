//! Content-defined chunking (FastCDC 2020).
//!
//! Cut points depend only on a rolling hash of nearby bytes, so an insertion or deletion
//! only moves the boundaries next to it and every other chunk keeps its id: edits to big
//! files re-upload a few chunks, not the whole file.
//!
//! Sizes: 16 KiB minimum, 64 KiB average, 256 KiB maximum. 64 KiB keeps the per-chunk
//! overhead (41 bytes of framing, one file in the store, 68 bytes in the manifest, one
//! iroh-blobs request) well below 0.1 % while still deduplicating at a useful granularity.
//! The min/max ratio of 1/4 and 4× around the average is FastCDC's recommended spread.
//! Changing any of these values changes every chunk boundary, and with it every chunk id,
//! so they are part of the on-disk format.

use std::io::{self, Read};

use fastcdc::v2020::{Normalization, StreamCDC};

use crate::error::{Result, StoreError};

pub const MIN_CHUNK_SIZE: usize = 16 * 1024;
pub const AVG_CHUNK_SIZE: usize = 64 * 1024;
pub const MAX_CHUNK_SIZE: usize = 256 * 1024;

/// One piece of the input, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the first byte of this chunk in the input.
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Streams an input into content-defined chunks, holding at most `MAX_CHUNK_SIZE` bytes of
/// it in memory at once.
pub struct Chunker<R: Read> {
    inner: StreamCDC<RetryInterrupted<R>>,
}

impl<R: Read> Chunker<R> {
    pub fn new(source: R) -> Self {
        Self {
            inner: StreamCDC::with_level(
                RetryInterrupted(source),
                MIN_CHUNK_SIZE,
                AVG_CHUNK_SIZE,
                MAX_CHUNK_SIZE,
                Normalization::Level1,
            ),
        }
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.inner.next()?;
        Some(match item {
            Ok(c) => Ok(Chunk {
                offset: c.offset,
                data: c.data,
            }),
            Err(e) => Err(StoreError::Input(e.into())),
        })
    }
}

/// fastcdc treats `Interrupted` as a fatal error; a signal arriving during a read must not
/// abort an import, so retry it here.
struct RetryInterrupted<R>(R);

impl<R: Read> Read for RetryInterrupted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn chunks_of(data: &[u8]) -> Vec<Chunk> {
        Chunker::new(data).collect::<Result<Vec<_>>>().unwrap()
    }

    fn assert_tiles(data: &[u8], chunks: &[Chunk]) {
        let mut pos = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.offset, pos);
            assert!(c.data.len() <= MAX_CHUNK_SIZE);
            // Only the last chunk may be shorter than the minimum.
            if i + 1 < chunks.len() {
                assert!(c.data.len() >= MIN_CHUNK_SIZE);
            }
            assert!(!c.data.is_empty());
            pos += c.data.len() as u64;
        }
        assert_eq!(pos, data.len() as u64);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(joined, data);
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(chunks_of(&[]).is_empty());
    }

    #[test]
    fn sizes_are_bounded_and_average_is_near_target() {
        let data = random(8 << 20, 1);
        let chunks = chunks_of(&data);
        assert_tiles(&data, &chunks);
        let avg = data.len() / chunks.len();
        assert!(
            (AVG_CHUNK_SIZE / 2..AVG_CHUNK_SIZE * 2).contains(&avg),
            "average chunk size {avg}"
        );
    }

    #[test]
    fn zeros_cut_at_max_size() {
        // A run with no entropy never triggers the rolling hash, so only the max bound cuts.
        let data = vec![0u8; 3 * MAX_CHUNK_SIZE + 5];
        let lens: Vec<usize> = chunks_of(&data).iter().map(|c| c.data.len()).collect();
        assert_eq!(lens, [MAX_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_CHUNK_SIZE, 5]);
    }

    #[test]
    fn one_byte_insertion_changes_at_most_three_chunks() {
        let data = random(10 << 20, 2);
        let mut edited = data.clone();
        edited.insert(data.len() / 2, 0xA5);
        let before: std::collections::HashSet<Vec<u8>> =
            chunks_of(&data).into_iter().map(|c| c.data).collect();
        let after = chunks_of(&edited);
        let changed = after.iter().filter(|c| !before.contains(&c.data)).count();
        assert!(changed >= 1, "the edit must show up somewhere");
        assert!(changed <= 3, "{changed} chunks changed");
        assert!(after.len() > 100);
    }

    /// Hands out the input in random-sized pieces, sometimes interrupted, the way pipes and
    /// network streams do.
    struct Jittery {
        data: Vec<u8>,
        pos: usize,
        rng: StdRng,
    }

    impl Read for Jittery {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.rng.random_ratio(1, 10) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let max = buf.len().min(self.data.len() - self.pos);
            let n = if max == 0 {
                0
            } else {
                self.rng.random_range(1..=max.min(70_000))
            };
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn short_reads_do_not_change_chunks(len in 0usize..700_000, seed: u64) {
            let data = random(len, seed);
            let reader = Jittery { data: data.clone(), pos: 0, rng: StdRng::seed_from_u64(seed ^ 7) };
            let chunks = Chunker::new(reader).collect::<Result<Vec<_>>>().unwrap();
            assert_tiles(&data, &chunks);
            prop_assert_eq!(chunks, chunks_of(&data));
        }
    }

    #[test]
    fn read_errors_are_reported() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let first = Chunker::new(Failing).next();
        assert!(matches!(first, Some(Err(StoreError::Input(_)))));
    }
}
