//! The mount daemon: the engine opened on local disk, exposed through FUSE, and synced with
//! the other members over the network.

mod base;
mod control;
mod device;
mod history;
mod hub;
mod join;
mod mount;
mod net;
mod restore;
mod sink;
mod status;
mod stores;

pub use control::request as control_request;
pub use device::{Device, now_ms};
pub use history::{format_time, log, mount_at, parse_time};
pub use join::{join_vault, recover_vault};
pub use mount::{mount, sync_only, unmount, writable_mount};
pub use net::NetSettings;
pub use restore::restore;
pub use sink::view_of;
pub use status::{DaemonStatus, Downloads, PeerStatus};
