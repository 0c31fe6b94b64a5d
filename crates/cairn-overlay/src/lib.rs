//! The writable overlay of a cairn mount. It owns the local, durable record of changes that
//! have not yet been folded into a snapshot: one staging file per dirty file holding that
//! file's full content, and a SQLite journal with one metadata record per changed vault path
//! (including whiteouts that hide deleted base entries). It does not know about snapshots,
//! encryption or the network: whoever flushes it reads [`Overlay::dirty`], commits those
//! records somewhere else, and hands back what it committed with [`Overlay::retire`].
//!
//! Durability model: ordinary mutations commit with `synchronous=NORMAL` in WAL mode, so a
//! killed process loses nothing it committed (the WAL bytes are already in the kernel's page
//! cache); [`Overlay::durable_barrier`] is what `fsync` uses to survive power loss as well.

mod error;
mod journal;
mod pending;
mod record;

pub use error::OverlayError;
pub use journal::{Change, Overlay};
pub use pending::{PendingPath, read_pending};
pub use record::{Data, Kind, Record, StagingId};
