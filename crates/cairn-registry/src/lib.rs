//! The cairn registry: one signed entry per device per vault saying "my newest snapshot is
//! this payload, at this revision". This crate owns those entries and their fixed binary
//! wire format, the strict compare-and-swap rule that decides whether an incoming entry
//! replaces the held one, their SQLite persistence (current heads, the log of every
//! accepted entry, and the member list that decides whose entries count), and the
//! verify-and-retry publish loop that lets several producers on one device converge
//! without a lock. It does not know what a snapshot is or how to merge two of them: the
//! payload is an opaque 32-byte id, and merging is the caller's `make_payload` callback.
//! It is synchronous on purpose; async callers wrap it in `spawn_blocking`.

mod accept;
mod db;
mod entry;
pub mod epoch;
mod error;
pub mod names;
mod publish;
pub mod roster;

pub use accept::{Outcome, accept, check_authentic, check_cas};
pub use db::{Equivocated, Equivocation, Offered, Registry};
pub use entry::{ENTRY_LEN, FORMAT_V1, Payload, RegistryEntry, Revision, SIGNING_DOMAIN};
pub use epoch::{EpochRecord, decode_epochs, encode_epochs};
pub use error::RegistryError;
pub use names::{DeviceName, NameRecord, decode_names, encode_names};
pub use publish::{PublishError, PublishPolicy, Published, publish};
pub use roster::{MemberRecord, RosterChange, decode_roster, encode_roster};

pub use cairn_crypto::{DeviceId, DeviceKey, Signature, VaultId};

/// Budget and helpers of the decoder fuzz tests (every test named `fuzz_*`).
#[cfg(test)]
pub(crate) mod fuzz {
    pub(crate) use cairn_fuzzkit::{config, mutate};
}
