//! Device identity: one ed25519 key pair per device.
//!
//! The same key is the device's network endpoint id and the key that signs its registry
//! entries, so "who is connecting" and "who signed this" are one identity.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::CryptoError;

/// The public half of a device key; identifies a device everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 32]);

/// A detached ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl DeviceId {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// First 8 hex characters: enough to tell devices apart in file names and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// Strict verification (rejects malleable and small-order encodings), because a
    /// registry must never accept two different byte strings as "the same" signature.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), CryptoError> {
        let bad = || CryptoError::BadSignature {
            device: self.to_string(),
        };
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| bad())?;
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &sig).map_err(|_| bad())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.short())
    }
}

impl FromStr for DeviceId {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|e| CryptoError::Parse {
            what: "device id",
            reason: e.to_string(),
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::Parse {
            what: "device id",
            reason: "expected 64 hex characters".into(),
        })?;
        Ok(Self(arr))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

/// A device's private signing key.
#[derive(Clone)]
pub struct DeviceKey(SigningKey);

impl DeviceKey {
    pub fn generate() -> Self {
        Self(SigningKey::from_bytes(&rand::random()))
    }

    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }

    /// The 32 secret bytes, for writing the key file (see [`crate::write_secret_file`]).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey(<redacted>, id {})", self.device_id().short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let k = DeviceKey::generate();
        let id = k.device_id();
        let sig = k.sign(b"hello");
        id.verify(b"hello", &sig).unwrap();
        assert!(matches!(
            id.verify(b"hellp", &sig),
            Err(CryptoError::BadSignature { .. })
        ));
        let mut bad = sig;
        bad.0[10] ^= 1;
        assert!(id.verify(b"hello", &bad).is_err());
        let other = DeviceKey::generate().device_id();
        assert!(other.verify(b"hello", &sig).is_err());
    }

    #[test]
    fn key_bytes_round_trip() {
        let k = DeviceKey::generate();
        let k2 = DeviceKey::from_bytes(k.to_bytes());
        assert_eq!(k.device_id(), k2.device_id());
        assert_eq!(
            k.device_id().to_string().parse::<DeviceId>().unwrap(),
            k.device_id()
        );
    }

    #[test]
    fn garbage_public_key_does_not_panic() {
        let id = DeviceId([0xff; 32]);
        assert!(id.verify(b"x", &Signature([0; 64])).is_err());
    }
}
