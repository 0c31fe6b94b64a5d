//! Key material for cairn: the vault secret, the key epochs that follow it, every key
//! derived from them, device signing keys, age identities used to seal snapshot headers
//! to the member list, recovery phrases, and key files on disk. It owns no storage format and performs no network I/O; other
//! crates receive typed keys from here instead of handling raw bytes.

mod derive;
mod device;
mod epoch;
mod error;
mod keyfile;
mod phrase;
mod seal;

pub use derive::{ContentKey, VaultId, VaultSecret};
pub use device::{DeviceId, DeviceKey, Signature};
pub use epoch::{Epoch, EpochId, EpochSecret, KeyEpochs};
pub use error::CryptoError;
pub use keyfile::{is_exposed, read_secret_file, write_secret_file};
pub use seal::{AgeIdentity, AgeRecipient, open_sealed, open_sealed_any, seal_to};
