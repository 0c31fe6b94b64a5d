//! Everything that runs while a vault is served on this device, as a library: opening a
//! vault's state on disk ([`VaultState`], [`OpenVault`]), the mount (the engine's merged view
//! as a FUSE base layer, the flush sink that turns dirty files into snapshots), the network
//! node (peer sessions, sync, replication, admission of new members), the status file and
//! control socket a running daemon publishes, history views, restore, and join/recover.
//!
//! It does not parse command lines or configuration files, print for people, or install
//! services: that is the `cairn` binary, which calls in here. Errors are `anyhow` with
//! context meant to be shown to the user as they are.

mod base;
mod conflicts;
mod control;
mod epochs;
mod faults;
mod guard;
mod history;
mod history_folder;
mod instance;
mod join;
mod mount;
mod names;
mod net;
mod ondemand;
mod open_vault;
mod prune;
mod publisher;
mod report;
mod restore;
mod sink;
mod state;
mod status;
mod stores;
mod timeline;

pub use cairn_net::{MAX_INVITATION_TTL, MAX_RECOVERY_WINDOW, PeerAddr, RelayUrl, Relays};
pub use cairn_vault::GuardPolicy;
pub use conflicts::{ConflictInfo, ConflictSide, Keep, Resolved, conflicts, resolve};
pub use control::PeersReply;
pub use control::request as control_request;
pub use faults::{FaultKind, PeerFault, PeerFaults};
pub use guard::{HeldSummary, held_summaries, load_held};
pub use history::{
    Changes, FileVersion, History, LogLine, LogQuery, diff_changes, format_time, history, mount_at,
    parse_time, timeline,
};
pub use instance::{DaemonInfo, running_daemon};
pub use join::{join_vault, recover_vault};
pub use mount::LiveMount;
pub use mount::{CacheBudget, mount, sync_only, unmount, writable_mount};
pub use names::{Labels, ensure_own_name, parse_name, set_own_name};
pub use net::{DEFAULT_FETCH_TIMEOUT, EvictReport, NetSettings};
pub use ondemand::{
    Local, OnDemand, PinOutcome, SyncMode, evict_paths, local_state, pin_paths, set_sync_mode,
    unpin_paths,
};
pub use open_vault::{OpenVault, now_ms};
pub use prune::{
    AutoPrune, PruneOptions, PruneReport, PrunedBy, Step as PruneStep, prune, prune_vault,
    record_prune,
};
pub use report::{CONFLICT_MARK, DiskInfo, LocalSummary, Report, ReportOptions, report};
pub use restore::restore;
pub use sink::view_of;
pub use state::{VaultState, default_data_dir, vault_dir};
pub use status::{DaemonStatus, Downloads, PeerStatus};
pub use timeline::{Query, SnapInfo, Timeline};
