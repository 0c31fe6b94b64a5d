//! Keeping room on the state directory's filesystem. The overlay acknowledges a change
//! before its group commit reaches the journal (like a page cache), so a disk filled to the
//! last byte would make that commit fail and lose changes a program was told had worked.
//! Instead, operations that add data are refused with `ENOSPC` while free space is below a
//! reserve: the writing program sees the error at once, and the journal, the flusher and
//! the daemon's databases keep the reserve to finish what was already acknowledged.
//! Deleting, truncating, renaming and fsync stay allowed, so a user can always make room;
//! once there is room again, writes work again with nothing to restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::Errno;

/// The reserve when none is configured: 64 MiB, but at most a twentieth of a small
/// filesystem (a 100 MiB test filesystem keeps 5 MiB).
pub const DEFAULT_MIN_FREE: u64 = 64 << 20;

pub(crate) struct SpaceGuard {
    dir: PathBuf,
    /// Configured reserve in bytes; `None` picks [`DEFAULT_MIN_FREE`] scaled to the disk.
    configured: Option<u64>,
    /// Whether the last check found the disk full, so the warning is logged once per episode.
    full: AtomicBool,
}

impl SpaceGuard {
    pub(crate) fn new(dir: &Path, configured: Option<u64>) -> SpaceGuard {
        SpaceGuard {
            dir: dir.to_path_buf(),
            configured,
            full: AtomicBool::new(false),
        }
    }

    /// `Ok` if `bytes` more may be written; `ENOSPC` while free space is below the reserve.
    /// Measured every time (one `statvfs`, a microsecond against a FUSE round trip of tens):
    /// another program may fill the disk at any moment. A failing measurement lets the
    /// operation through, and its own write reports the error.
    pub(crate) fn admit(&self, bytes: u64) -> Result<(), Errno> {
        let Ok(d) = disk_space(&self.dir) else {
            return Ok(());
        };
        let reserve = reserve_for(self.configured, d.total);
        let full = d.free.saturating_sub(bytes) < reserve;
        if self.full.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::warn!(
                    dir = %self.dir.display(),
                    free = d.free,
                    reserve,
                    "the state directory's disk is full; writes into the mount fail with ENOSPC until space is freed"
                );
            } else {
                tracing::info!(dir = %self.dir.display(), free = d.free, "disk space is back; writes work again");
            }
        }
        if full {
            return Err(Errno::from_i32(libc::ENOSPC));
        }
        Ok(())
    }
}

/// Space on the filesystem holding a path, as an unprivileged user may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    pub free: u64,
    pub total: u64,
}

pub fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    let s = crate::mount::statvfs(path)?;
    // fsblkcnt_t and friends are u64 here but narrower on some targets.
    #[allow(clippy::unnecessary_cast)]
    let (frsize, avail, blocks) = (s.f_frsize as u64, s.f_bavail as u64, s.f_blocks as u64);
    Ok(DiskSpace {
        free: avail.saturating_mul(frsize),
        total: blocks.saturating_mul(frsize),
    })
}

/// The reserve for a filesystem of `size` bytes.
pub fn reserve_for(configured: Option<u64>, size: u64) -> u64 {
    configured.unwrap_or(DEFAULT_MIN_FREE.min(size / 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_reserve_shrinks_on_small_disks_only() {
        assert_eq!(reserve_for(None, 100 << 20), 5 << 20);
        assert_eq!(reserve_for(None, 1 << 40), DEFAULT_MIN_FREE);
        assert_eq!(reserve_for(Some(0), 1 << 40), 0);
        assert_eq!(reserve_for(Some(1 << 30), 100 << 20), 1 << 30);
    }

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_and_zero_admits() {
        let dir = tempfile::tempdir().unwrap();
        let never = SpaceGuard::new(dir.path(), Some(u64::MAX / 2));
        assert_eq!(never.admit(1), Err(Errno::from_i32(libc::ENOSPC)));
        let always = SpaceGuard::new(dir.path(), Some(0));
        assert_eq!(always.admit(4096), Ok(()));
    }
}
