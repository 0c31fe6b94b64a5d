//! Sealing small payloads (snapshot headers) to the vault's member list with age.
//!
//! age gives us multi-recipient encryption with a well-reviewed format: one file key wrapped
//! once per member, so any single member identity can open it, and a removed member is
//! simply left out of the next seal.

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use age::secrecy::ExposeSecret;

use crate::CryptoError;

/// A device's age X25519 identity (private).
#[derive(Clone)]
pub struct AgeIdentity(age::x25519::Identity);

/// The public recipient for an [`AgeIdentity`], listed in the vault's member list.
#[derive(Clone)]
pub struct AgeRecipient(age::x25519::Recipient);

impl AgeIdentity {
    pub fn generate() -> Self {
        Self(age::x25519::Identity::generate())
    }

    /// The identity whose X25519 secret is `seed` (e.g. derived from a key epoch), so every
    /// holder of the seed holds the same identity.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let hrp = bech32::Hrp::parse("age-secret-key-").expect("a valid human-readable part");
        let text = bech32::encode::<bech32::Bech32>(hrp, &seed)
            .expect("32 bytes always fit a bech32 string")
            .to_uppercase();
        Self(age::x25519::Identity::from_str(&text).expect("age parses what bech32 spelled"))
    }

    pub fn recipient(&self) -> AgeRecipient {
        AgeRecipient(self.0.to_public())
    }

    /// Bech32 `AGE-SECRET-KEY-1…` form, for the key file.
    pub fn to_secret_string(&self) -> String {
        self.0.to_string().expose_secret().to_string()
    }
}

impl FromStr for AgeIdentity {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        age::x25519::Identity::from_str(s.trim())
            .map(Self)
            .map_err(|e| CryptoError::Parse {
                what: "age identity",
                reason: e.to_string(),
            })
    }
}

impl fmt::Debug for AgeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgeIdentity(<redacted>, {})", self.recipient())
    }
}

impl FromStr for AgeRecipient {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        age::x25519::Recipient::from_str(s.trim())
            .map(Self)
            .map_err(|e| CryptoError::Parse {
                what: "age recipient",
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for AgeRecipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for AgeRecipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgeRecipient({})", self.0)
    }
}

impl PartialEq for AgeRecipient {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}
impl Eq for AgeRecipient {}

/// Encrypt `plaintext` so that any one of `recipients` can open it.
pub fn seal_to(recipients: &[AgeRecipient], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if recipients.is_empty() {
        return Err(CryptoError::NoRecipients);
    }
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| &r.0 as &dyn age::Recipient))
            .map_err(|e| CryptoError::Seal(e.to_string()))?;
    let mut out = Vec::with_capacity(plaintext.len() + 200 * recipients.len());
    let mut writer = encryptor
        .wrap_output(&mut out)
        .map_err(|e| CryptoError::Seal(e.to_string()))?;
    writer
        .write_all(plaintext)
        .and_then(|_| writer.finish().map(|_| ()))
        .map_err(|e| CryptoError::Seal(e.to_string()))?;
    Ok(out)
}

/// Decrypt data produced by [`seal_to`]. Fails with [`CryptoError::Open`] if `identity` is not
/// among the recipients or any byte was altered (age authenticates header and payload).
pub fn open_sealed(identity: &AgeIdentity, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let decryptor =
        age::Decryptor::new_buffered(sealed).map_err(|e| CryptoError::Open(e.to_string()))?;
    let mut reader = decryptor
        .decrypt(std::iter::once(&identity.0 as &dyn age::Identity))
        .map_err(|e| CryptoError::Open(e.to_string()))?;
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .map_err(|e| CryptoError::Open(e.to_string()))?;
    Ok(out)
}

/// [`open_sealed`] with whichever of `identities` the data was sealed to.
pub fn open_sealed_any(identities: &[AgeIdentity], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let decryptor =
        age::Decryptor::new_buffered(sealed).map_err(|e| CryptoError::Open(e.to_string()))?;
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| &i.0 as &dyn age::Identity))
        .map_err(|e| CryptoError::Open(e.to_string()))?;
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .map_err(|e| CryptoError::Open(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_identities_are_stable_and_open_what_was_sealed_to_them() {
        let a = AgeIdentity::from_seed([9; 32]);
        let b = AgeIdentity::from_seed([9; 32]);
        assert_eq!(a.recipient(), b.recipient());
        assert_ne!(a.recipient(), AgeIdentity::from_seed([8; 32]).recipient());
        let other = AgeIdentity::generate();
        let sealed = seal_to(&[other.recipient(), a.recipient()], b"h").unwrap();
        assert_eq!(open_sealed(&b, &sealed).unwrap(), b"h");
        let stranger = AgeIdentity::generate();
        assert_eq!(
            open_sealed_any(&[stranger.clone(), b], &sealed).unwrap(),
            b"h"
        );
        assert!(open_sealed_any(&[stranger], &sealed).is_err());
    }

    #[test]
    fn any_recipient_can_open() {
        let ids: Vec<_> = (0..3).map(|_| AgeIdentity::generate()).collect();
        let recips: Vec<_> = ids.iter().map(|i| i.recipient()).collect();
        let sealed = seal_to(&recips, b"header bytes").unwrap();
        for id in &ids {
            assert_eq!(open_sealed(id, &sealed).unwrap(), b"header bytes");
        }
    }

    #[test]
    fn outsider_cannot_open() {
        let member = AgeIdentity::generate();
        let outsider = AgeIdentity::generate();
        let sealed = seal_to(&[member.recipient()], b"secret").unwrap();
        assert!(matches!(
            open_sealed(&outsider, &sealed),
            Err(CryptoError::Open(_))
        ));
    }

    #[test]
    fn every_tampered_byte_is_detected() {
        let id = AgeIdentity::generate();
        let sealed = seal_to(&[id.recipient()], b"some header payload").unwrap();
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(
                open_sealed(&id, &t)
                    .map(|p| p != b"some header payload")
                    .unwrap_or(true),
                "flip at byte {i} went undetected"
            );
        }
        for cut in [0, 1, sealed.len() / 2, sealed.len() - 1] {
            assert!(open_sealed(&id, &sealed[..cut]).is_err());
        }
    }

    #[test]
    fn no_recipients_is_an_error() {
        assert!(matches!(seal_to(&[], b"x"), Err(CryptoError::NoRecipients)));
    }

    #[test]
    fn identity_and_recipient_strings_round_trip() {
        let id = AgeIdentity::generate();
        let id2: AgeIdentity = id.to_secret_string().parse().unwrap();
        assert_eq!(id.recipient(), id2.recipient());
        let r: AgeRecipient = id.recipient().to_string().parse().unwrap();
        assert_eq!(r, id.recipient());
        assert!("age1notakey".parse::<AgeRecipient>().is_err());
        assert!("garbage".parse::<AgeIdentity>().is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use std::sync::OnceLock;

        /// One identity for every case: generating one per case would dominate the run.
        fn identity() -> &'static AgeIdentity {
            static ID: OnceLock<AgeIdentity> = OnceLock::new();
            ID.get_or_init(AgeIdentity::generate)
        }

        fn assert_open_error(r: Result<Vec<u8>, CryptoError>) -> Result<(), TestCaseError> {
            match r {
                Ok(p) => prop_assert!(false, "damaged header opened to {} bytes", p.len()),
                Err(e) => prop_assert!(
                    matches!(e, CryptoError::Open(ref m) if !m.is_empty()),
                    "{e}"
                ),
            }
            Ok(())
        }

        proptest! {
            // Fewer cases than elsewhere: every case runs an X25519 unwrap.
            #![proptest_config(cairn_fuzzkit::config_with(256))]

            /// Snapshot headers arrive as age files from peers: random bytes, with or
            /// without the age magic line, are refused with a worded error.
            #[test]
            fn fuzz_sealed_header_random_bytes(b in prop::collection::vec(any::<u8>(), 0..300), magic: bool) {
                let mut b = b;
                if magic {
                    let mut framed = b"age-encryption.org/v1\n".to_vec();
                    framed.append(&mut b);
                    b = framed;
                }
                assert_open_error(open_sealed(identity(), &b))?;
            }

            #[test]
            fn fuzz_sealed_header_mutations(
                plain in prop::collection::vec(any::<u8>(), 0..200),
                edits in cairn_fuzzkit::edits(),
            ) {
                let sealed = seal_to(&[identity().recipient()], &plain).unwrap();
                let mut b = sealed.clone();
                for (op, at, x) in edits {
                    cairn_fuzzkit::mutate(&mut b, op, at, x);
                }
                if b != sealed {
                    assert_open_error(open_sealed(identity(), &b))?;
                }
            }
        }
    }
}
