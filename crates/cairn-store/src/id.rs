use std::fmt;
use std::str::FromStr;

use crate::error::StoreError;

/// Address of a blob: the blake3 hash of its stored bytes (for a chunk, its *ciphertext*).
///
/// Hashing ciphertext rather than plaintext is what lets a peer without the vault key store,
/// serve and verify chunks: it is exactly the hash iroh-blobs checks on transfer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub const LEN: usize = 32;

    /// The id a blob with these bytes gets.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for ChunkId {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        // Encoding 32 bytes into a 64-byte buffer cannot fail.
        if hex::encode_to_slice(self.0, &mut buf).is_err() {
            return Err(fmt::Error);
        }
        // Hex output is ASCII, hence valid UTF-8.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl FromStr for ChunkId {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(StoreError::InvalidId {
                input: s.chars().take(80).collect(),
            });
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"hello");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        assert_eq!(format!("{id:?}"), format!("ChunkId({s})"));
        // Upper-case hex is accepted too, since users may paste ids from other tools.
        assert_eq!(s.to_uppercase().parse::<ChunkId>().unwrap(), id);
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in [
            "",
            "abc",
            &"z".repeat(64),
            &"a".repeat(63),
            &"a".repeat(65),
            "é",
        ] {
            assert!(matches!(
                bad.parse::<ChunkId>(),
                Err(StoreError::InvalidId { .. })
            ));
        }
    }
}
