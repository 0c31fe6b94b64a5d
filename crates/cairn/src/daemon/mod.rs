//! The mount daemon: the engine opened on local disk, exposed through FUSE.

mod base;
mod device;
mod history;
mod mount;
mod sink;
mod stores;

pub use device::{Device, now_ms};
pub use history::{format_time, log, mount_at, parse_time};
pub use mount::{mount, unmount};
