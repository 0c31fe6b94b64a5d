//! Snapshot history: `cairn log` and read-only time-travel mounts (`cairn mount --at TIME`).
//!
//! Every snapshot this device published stays loadable (the registry keeps the log of
//! accepted entries, the store keeps every blob), so a past state is just another base layer,
//! mounted read-only.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use cairn_fuse::{FlushBatch, FlushError, FlushSink, MountOptions};
use cairn_vault::Snapshot;

use super::base::VaultBase;
use super::sink::view_of;
use crate::open_vault::OpenVault;
use crate::state::VaultState;

/// One published snapshot, newest first.
pub struct LogEntry {
    pub revision: u64,
    pub snapshot: Snapshot,
}

pub fn log(device: &OpenVault) -> Result<Vec<LogEntry>> {
    let vault = device.engine();
    let mut out = Vec::new();
    for (rev, id) in vault.log(&device.registry)? {
        let snapshot = vault
            .load(id)
            .with_context(|| format!("loading snapshot of revision {}", rev.0))?;
        out.push(LogEntry {
            revision: rev.0,
            snapshot,
        })
    }
    Ok(out)
}

pub fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Parses `2026-11-23T10:00:00Z`, `2026-11-23 10:00:00` (UTC), `@1700000000` (Unix seconds),
/// or a relative `15m` / `2h` / `3days` meaning that long ago.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64> {
    if let Some(secs) = s.strip_prefix('@').and_then(|n| n.parse::<u64>().ok()) {
        return Ok(secs.saturating_mul(1000));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')) {
        return Ok(t.duration_since(UNIX_EPOCH)?.as_millis() as u64);
    }
    if let Ok(ago) = humantime::parse_duration(s.trim_start_matches('-')) {
        return Ok(now_ms.saturating_sub(ago.as_millis() as u64));
    }
    bail!(
        "cannot read time {s:?}: use 2026-11-23T10:00:00Z (UTC), \"2026-11-23 10:00:00\" or an age such as 90m or 2days"
    )
}

/// The newest snapshot created at or before `at_ms`.
pub fn snapshot_at(device: &OpenVault, at_ms: u64) -> Result<LogEntry> {
    let entries = log(device)?;
    let oldest = entries.last().map(|e| e.snapshot.header.created_ms);
    entries
        .into_iter()
        .find(|e| e.snapshot.header.created_ms <= at_ms)
        .with_context(|| match oldest {
            Some(o) => format!(
                "no snapshot at or before {}; the oldest is from {} (see `cairn log`)",
                format_time(at_ms),
                format_time(o)
            ),
            None => "this device has published no snapshot yet".to_string(),
        })
}

/// Refuses every flush: a history mount is read-only, the kernel already answers EROFS.
struct ReadOnly;

impl FlushSink for ReadOnly {
    fn flush(&self, batch: FlushBatch) -> Result<(), FlushError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        Err(FlushError::Rejected("history views are read-only".into()))
    }
}

/// Mounts the vault as it was at `at_ms`, read-only, until stopped.
pub fn mount_at(
    state: &VaultState,
    mountpoint: &Path,
    at_ms: u64,
    opts: MountOptions,
) -> Result<()> {
    // Before any thread exists, so every thread inherits the blocked stop signals.
    let sigset = super::mount::block_stop_signals();
    let abs = std::path::absolute(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let lock = crate::instance::lock_view(&state.dir, &std::fs::canonicalize(&abs).unwrap_or(abs))?;
    let device = OpenVault::open(state)?;
    let entry = snapshot_at(&device, at_ms)?;
    let base = Arc::new(VaultBase::new(
        device.stores.clone(),
        view_of(device.stores.source(entry.snapshot.header.root)),
    ));
    // A private, throwaway overlay: the writable mount's overlay stays untouched (and may be
    // in use by a running daemon).
    let scratch = tempfile::Builder::new()
        .prefix("overlay-history-")
        .tempdir_in(&state.dir)
        .context("creating a scratch overlay for the history view")?;
    let overlay = cairn_fuse::Overlay::open(scratch.path())?;
    eprintln!(
        "cairn: showing revision {} from {} (read-only)",
        entry.revision,
        format_time(entry.snapshot.header.created_ms)
    );
    let opts = MountOptions {
        read_only: true,
        ..opts
    };
    super::mount::serve(
        state,
        mountpoint,
        base,
        Arc::new(ReadOnly),
        overlay,
        opts,
        sigset,
        lock,
        None,
        None,
    )
}
