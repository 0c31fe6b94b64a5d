//! Recovery phrase: the vault secret as 24 BIP-39 English words.
//!
//! BIP-39 carries a checksum, so a mistyped word is caught instead of silently deriving a
//! different (empty) vault.

use crate::{CryptoError, VaultSecret};

impl VaultSecret {
    /// The 24-word phrase that reproduces this secret.
    pub fn to_phrase(&self) -> String {
        bip39::Mnemonic::from_entropy(self.as_bytes())
            .expect("32 bytes is a valid BIP-39 entropy length")
            .to_string()
    }

    /// Parse a phrase written by [`VaultSecret::to_phrase`]. Case and extra whitespace are
    /// forgiven because people copy phrases from paper.
    pub fn from_phrase(phrase: &str) -> Result<Self, CryptoError> {
        let normalized = phrase
            .split_whitespace()
            .map(str::to_lowercase)
            .collect::<Vec<_>>()
            .join(" ");
        let mnemonic = bip39::Mnemonic::parse_normalized(&normalized)
            .map_err(|e| CryptoError::BadPhrase(e.to_string()))?;
        let (entropy, len) = mnemonic.to_entropy_array();
        if len != 32 {
            return Err(CryptoError::PhraseLength(len));
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&entropy[..32]);
        Ok(VaultSecret::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn phrase_has_24_words_and_round_trips() {
        let s = VaultSecret::generate();
        let p = s.to_phrase();
        assert_eq!(p.split(' ').count(), 24);
        assert_eq!(VaultSecret::from_phrase(&p).unwrap(), s);
        let messy = format!("  {}\n", p.to_uppercase().replace(' ', "   "));
        assert_eq!(VaultSecret::from_phrase(&messy).unwrap(), s);
    }

    #[test]
    fn typo_and_wrong_length_rejected() {
        // Fixed input: a random word swap passes the 8-bit checksum 1 time in 256.
        let p = VaultSecret::from_bytes([42; 32]).to_phrase();
        let mut words: Vec<&str> = p.split(' ').collect();
        words[5] = if words[5] == "abandon" {
            "ability"
        } else {
            "abandon"
        };
        assert!(VaultSecret::from_phrase(&words.join(" ")).is_err());
        assert!(VaultSecret::from_phrase("hello world").is_err());
        // A valid 12-word phrase carries only 16 bytes.
        let twelve = bip39::Mnemonic::from_entropy(&[3u8; 16])
            .unwrap()
            .to_string();
        assert!(matches!(
            VaultSecret::from_phrase(&twelve),
            Err(CryptoError::PhraseLength(16))
        ));
    }

    proptest! {
        #[test]
        fn any_secret_round_trips(bytes in any::<[u8; 32]>()) {
            let s = VaultSecret::from_bytes(bytes);
            prop_assert_eq!(VaultSecret::from_phrase(&s.to_phrase()).unwrap(), s);
        }
    }
}
