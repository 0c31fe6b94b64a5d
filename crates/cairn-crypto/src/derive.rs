//! The vault secret and the keys derived from it.
//!
//! Every derived key uses its own blake3 `derive_key` context string. Distinct contexts make
//! the derived keys independent: learning the vault id (which is public on the wire) reveals
//! nothing about the content key.

use std::fmt;
use std::str::FromStr;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::CryptoError;

const CTX_VAULT_ID: &str = "cairn vault id v1";
const CTX_CONTENT_KEY: &str = "cairn content key v1";

/// The 32-byte secret shared by all member devices of one vault. Whoever holds it can read
/// everything in the vault, so it only ever leaves a device over an authenticated, encrypted
/// channel (pairing) or as a recovery phrase the user writes down.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct VaultSecret([u8; 32]);

impl VaultSecret {
    /// A fresh secret from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Derive an independent 32-byte key for `context`. Contexts must be globally unique,
    /// hard-coded strings (blake3's rule for `derive_key`).
    pub fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }

    /// The public identifier of the vault: first 16 bytes of the derived id key.
    pub fn vault_id(&self) -> VaultId {
        let full = self.derive(CTX_VAULT_ID);
        let mut id = [0u8; 16];
        id.copy_from_slice(&full[..16]);
        VaultId(id)
    }

    /// Key from which per-chunk encryption keys are derived.
    pub fn content_key(&self) -> ContentKey {
        ContentKey(self.derive(CTX_CONTENT_KEY))
    }
}

impl fmt::Debug for VaultSecret {
    // Never print the secret, even in debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VaultSecret(<redacted>, id {})", self.vault_id())
    }
}

/// Public 16-byte vault identifier; safe to log and to send.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VaultId(pub [u8; 16]);

impl VaultId {
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for VaultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for VaultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VaultId({self})")
    }
}

impl FromStr for VaultId {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|e| CryptoError::Parse {
            what: "vault id",
            reason: e.to_string(),
        })?;
        let arr: [u8; 16] = bytes.try_into().map_err(|_| CryptoError::Parse {
            what: "vault id",
            reason: "expected 32 hex characters".into(),
        })?;
        Ok(Self(arr))
    }
}

/// The vault-wide key that chunk keys are derived from (see `cairn-store`).
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ContentKey([u8; 32]);

impl ContentKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_distinct_and_stable() {
        let s = VaultSecret::from_bytes([7; 32]);
        assert_eq!(s.vault_id(), VaultSecret::from_bytes([7; 32]).vault_id());
        assert_ne!(&s.vault_id().0[..], &s.content_key().as_bytes()[..16]);
        assert_ne!(s.derive("a"), s.derive("b"));
        let other = VaultSecret::from_bytes([8; 32]);
        assert_ne!(s.vault_id(), other.vault_id());
        assert_ne!(s.content_key(), other.content_key());
    }

    #[test]
    fn vault_id_matches_design_definition() {
        let s = VaultSecret::from_bytes([1; 32]);
        let expected = blake3::derive_key("cairn vault id v1", &[1; 32]);
        assert_eq!(&s.vault_id().0[..], &expected[..16]);
    }

    #[test]
    fn generated_secrets_differ() {
        assert_ne!(VaultSecret::generate(), VaultSecret::generate());
    }

    #[test]
    fn vault_id_hex_round_trip_and_errors() {
        let id = VaultSecret::generate().vault_id();
        assert_eq!(id.to_string().parse::<VaultId>().unwrap(), id);
        assert!("zz".parse::<VaultId>().is_err());
        assert!("abcd".parse::<VaultId>().is_err());
    }

    #[test]
    fn debug_never_prints_secret() {
        let s = VaultSecret::from_bytes([0xab; 32]);
        assert!(!format!("{s:?}").contains("abab"));
        assert!(!format!("{:?}", s.content_key()).contains("abab"));
    }
}
