//! The writable overlay of a cairn mount. It owns the local, durable record of changes that
//! have not yet been folded into a snapshot: one staging file per dirty file holding that
//! file's full content, and a SQLite journal with one metadata record per changed vault path
//! (including whiteouts that hide deleted base entries). It does not know about snapshots,
//! encryption or the network: whoever flushes it reads [`Overlay::dirty`], commits those
//! records somewhere else, and hands back what it committed with [`Overlay::retire`].
//!
//! Durability model: mutations are grouped into one transaction per short window
//! ([`DEFAULT_GROUP_WINDOW`]), each atomic on its own through a savepoint, and committed with
//! `synchronous=NORMAL` in WAL mode. A killed process therefore loses at most the mutations of
//! the last open group, each one entirely or not at all and always a suffix of the history,
//! like a local filesystem between journal commits; committed groups survive (the WAL bytes
//! are already in the kernel's page cache). Staging files released by a mutation are deleted
//! only after its group commits. [`Overlay::durable_barrier`] is what `fsync` uses: it commits
//! the group and makes everything survive power loss as well.

mod error;
mod journal;
pub mod path;
mod pending;
mod record;

pub use cairn_link::{LINK_XATTR, LinkGroup, LinkId, MAX_LINK_NAMES};
pub use error::OverlayError;
pub use journal::{Change, DEFAULT_GROUP_WINDOW, Overlay};
pub use pending::{PendingPath, read_content_refs, read_pending};
pub use record::{Data, Kind, Record, StagingId};
