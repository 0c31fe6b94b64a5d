//! Errno mapping: the [`FsResult`] every filesystem operation returns, and how overlay,
//! base-layer and I/O errors become the errno the kernel sees.

use cairn_overlay::OverlayError;
use fuser::Errno;

pub(crate) type FsResult<T> = Result<T, Errno>;

pub(crate) fn overlay_errno(e: OverlayError) -> Errno {
    let code = match &e {
        OverlayError::Staging { source, .. } | OverlayError::Dir { source, .. } => {
            source.raw_os_error().unwrap_or(libc::EIO)
        }
        OverlayError::Journal {
            source: rusqlite_err,
            ..
        } => {
            if rusqlite_err.to_string().contains("full") {
                libc::ENOSPC
            } else {
                libc::EIO
            }
        }
        OverlayError::InvalidPath { .. } => libc::EINVAL,
        _ => libc::EIO,
    };
    tracing::error!(error = %e, "overlay operation failed");
    Errno::from_i32(code)
}

pub(crate) fn base_errno(e: crate::base::BaseError) -> Errno {
    tracing::warn!(error = %e, "base layer operation failed");
    Errno::from_i32(e.errno())
}

pub(crate) fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}
