use std::path::PathBuf;

/// Everything that can go wrong with key material. Messages name the file or the input so
/// the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("recovery phrase is not valid: {0} (check the spelling and the word count: 24 words)")]
    BadPhrase(String),
    #[error("recovery phrase encodes {0} bytes, a vault secret needs 32")]
    PhraseLength(usize),
    #[error("invalid {what}: {reason}")]
    Parse { what: &'static str, reason: String },
    #[error("signature does not verify for device {device}")]
    BadSignature { device: String },
    #[error("sealing to recipients failed: {0}")]
    Seal(String),
    #[error(
        "cannot open sealed data: {0} (this device is probably not among the recipients; was it removed from the vault?)"
    )]
    Open(String),
    #[error("no recipients given: sealing to nobody would make the data unreadable")]
    NoRecipients,
    #[error("key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} has {len} bytes, expected {expected}; it is damaged or not a cairn key"
    )]
    KeyFileLength {
        path: PathBuf,
        len: usize,
        expected: usize,
    },
}
