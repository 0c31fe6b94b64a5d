//! The mount daemon: the engine opened on local disk, exposed through FUSE.

mod base;
mod device;
mod mount;
mod sink;
mod stores;

pub use mount::{mount, unmount};
