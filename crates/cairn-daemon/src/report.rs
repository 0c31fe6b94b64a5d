//! The status report behind `cairn status [--json]`: what a user needs to know to trust the folder. Facts on disk
//! (identity, the overlay's pending changes, the last published snapshot, conflict copies)
//! are read directly, so they are right whether or not a daemon runs; what only a running
//! daemon knows (peers, downloads, its last flush and error) comes from its status file, and
//! only while that daemon still holds the vault's lock.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::faults::{FaultKind, PeerFault};
use crate::ondemand::{Local, SyncMode, local_state};
use crate::open_vault::OpenVault;
use crate::state::VaultState;
use crate::status::{DaemonStatus, Downloads, PeerStatus};
use crate::{format_time, view_of, writable_mount};

/// Marks a conflict copy made by the merge (`name.sync-conflict-YYYYMMDD-HHMMSS-<device>.ext`).
pub const CONFLICT_MARK: &str = ".sync-conflict-";

#[derive(Serialize)]
pub struct Report {
    pub vault: String,
    pub vault_id: String,
    pub device_id: String,
    /// The key epoch new content is sealed under (0 until the first rotation).
    pub key_epoch: u32,
    /// Its public tag, as named in sealed blobs.
    pub key_epoch_id: String,
    pub state_dir: PathBuf,
    /// `synced`: mounted with nothing pending; `pending`: mounted with local changes not yet
    /// in a snapshot; `not mounted`: no live daemon serves this vault.
    pub state: &'static str,
    pub mount: Option<MountInfo>,
    pub pending_uploads: Pending,
    /// Local changes the ignore rules (`.cairnignore`) keep on this device.
    pub ignored: Ignored,
    pub last_snapshot: Option<SnapshotInfo>,
    pub conflicts: Vec<String>,
    /// Mass deletions held by the guard, waiting for `cairn approve` / `cairn reject`.
    pub held: Vec<crate::HeldSummary>,
    pub peers: Vec<PeerStatus>,
    pub downloads: Downloads,
    pub last_flush_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Members caught misbehaving: equivocation (evidence kept on disk, so shown whether or
    /// not a daemon runs), and what the running daemon saw (bad file content, snapshots
    /// naming another device).
    pub peer_faults: Vec<PeerFault>,
    /// Space on the disk that holds the state directory; `None` if it could not be read.
    pub disk: Option<DiskInfo>,
    /// What of the vault's content is on this device (files on demand).
    pub local: LocalSummary,
}

#[derive(Serialize)]
pub struct DiskInfo {
    pub free_bytes: u64,
    pub total_bytes: u64,
    /// Below this much free space the mount refuses writes with ENOSPC.
    pub reserve_bytes: u64,
    /// Free space is below the reserve: writes fail until space is freed.
    pub full: bool,
}

impl DiskInfo {
    /// The state directory's disk, with the mount's reserve (`min_free`, as configured).
    pub fn of(state_dir: &std::path::Path, min_free: Option<u64>) -> Option<DiskInfo> {
        let d = cairn_fuse::disk_space(state_dir).ok()?;
        let reserve = cairn_fuse::reserve_for(min_free, d.total);
        Some(DiskInfo {
            free_bytes: d.free,
            total_bytes: d.total,
            reserve_bytes: reserve,
            full: d.free < reserve,
        })
    }
}

/// Content on this device against the current state of the vault (plaintext bytes).
#[derive(Serialize, Default)]
pub struct LocalSummary {
    pub mode: SyncMode,
    pub pins: Vec<String>,
    pub files: u64,
    /// Files whose every chunk is here.
    pub files_local: u64,
    pub bytes: u64,
    pub bytes_local: u64,
    /// Bytes of the files pinned paths cover.
    pub bytes_pinned: u64,
}

#[derive(Serialize)]
pub struct MountInfo {
    pub pid: i32,
    pub mountpoint: PathBuf,
    pub started_ms: Option<u64>,
}

#[derive(Serialize)]
pub struct Pending {
    pub files: u64,
    pub bytes: u64,
    pub paths: Vec<String>,
}

#[derive(Serialize)]
pub struct Ignored {
    pub files: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct SnapshotInfo {
    pub revision: u64,
    pub id: String,
    pub created_ms: u64,
    pub created: String,
    pub entries: u64,
}

/// What `cairn status` needs from the configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReportOptions {
    /// The mount's configured disk reserve (`[mount] min_free_mib`).
    pub min_free: Option<u64>,
    /// The configuration's `[sync] mode`, for a vault that chose no mode of its own.
    pub default_mode: SyncMode,
}

/// The report for `state`.
pub fn report(state: &VaultState, opts: &ReportOptions) -> Result<Report> {
    let disk = DiskInfo::of(&state.dir, opts.min_free);
    let live = writable_mount(&state.dir);
    let daemon_status = live.as_ref().and_then(|m| {
        DaemonStatus::read(&state.dir).filter(|s| i64::from(s.pid) == i64::from(m.pid))
    });
    let pending_paths = cairn_overlay::read_pending(&state.dir.join("overlay"))?;
    // On a full disk the databases may not even open (SQLite needs room to start a
    // transaction); the report then says what it can without them instead of failing.
    let device = match OpenVault::open(state) {
        Ok(d) => d,
        Err(e) if disk.as_ref().is_some_and(|d| d.full) => {
            tracing::debug!(error = %format!("{e:#}"), "status without the vault's databases");
            return Ok(disk_full_report(
                state,
                disk,
                live,
                daemon_status,
                pending_paths,
                opts.default_mode,
            ));
        }
        Err(e) => return Err(e),
    };
    device.ondemand.set_default_mode(opts.default_mode);
    let vault_id = state.secret.vault_id();
    // Paths the ignore rules keep on this device are not pending: they never leave it.
    let (pending_paths, ignored_paths): (Vec<_>, Vec<_>) = {
        let vault = device.engine();
        let base = crate::base::VaultBase::new(device.stores.clone(), view_of(vault.source()));
        let mut rules = cairn_fuse::IgnoreRules::new(|p: &str| {
            let e = cairn_fuse::BaseLayer::get(&base, p).ok()??;
            cairn_fuse::read_base_file(&base, &e)
        });
        pending_paths
            .into_iter()
            .partition(|p| !(rules.is_ignored(&p.path, false) || rules.is_ignored(&p.path, true)))
    };
    let ignored = Ignored {
        files: ignored_paths.len() as u64,
        bytes: ignored_paths.iter().map(|p| p.bytes).sum(),
    };
    let pending = Pending {
        files: pending_paths.len() as u64,
        bytes: pending_paths.iter().map(|p| p.bytes).sum(),
        paths: pending_paths.iter().map(pending_label).collect(),
    };

    let head = device.registry.get(&vault_id, &state.device.device_id())?;
    let mut local = LocalSummary {
        mode: device.ondemand.mode(),
        pins: device.ondemand.pins(),
        ..LocalSummary::default()
    };
    let (last_snapshot, conflicts) = {
        let vault = device.engine();
        let view = view_of(vault.source());
        let mut conflicts = Vec::new();
        let mut entries = 0u64;
        for item in view.scan(&[], None)? {
            let (key, e) = item?;
            entries += 1;
            if e.kind == cairn_vault::EntryKind::File {
                let (l, have, total) = local_state(&device.blobs, &e);
                local.files += 1;
                local.files_local += u64::from(l == Local::Full);
                local.bytes += total;
                local.bytes_local += have;
                if device
                    .ondemand
                    .pinned_by(&String::from_utf8_lossy(&key))
                    .is_some()
                {
                    local.bytes_pinned += total;
                }
            }
            if let Ok(k) = cairn_vault::EntryKey::from_bytes(&key)
                && k.path.name().contains(CONFLICT_MARK)
            {
                conflicts.push(k.path.as_str().to_string());
            }
        }
        let last = match (head, vault.head()) {
            (Some(h), Some(snap)) => Some(SnapshotInfo {
                revision: h.revision.0,
                id: snap.id.0.to_string(),
                created_ms: snap.header.created_ms,
                created: format_time(snap.header.created_ms),
                entries,
            }),
            _ => None,
        };
        (last, conflicts)
    };

    let state_name = match (&live, pending.files) {
        (Some(_), _) if disk.as_ref().is_some_and(|d| d.full) => "disk full",
        (None, _) => "not mounted",
        (Some(_), 0) => "synced",
        (Some(_), _) => "pending",
    };
    let ds = daemon_status.unwrap_or_default();
    let mut peer_faults = equivocation_faults(&device)?;
    peer_faults.extend(ds.peer_faults);
    // From the key files: the daemon saves an epoch before it seals anything under it.
    let epoch = state.key_epochs().current();
    Ok(Report {
        vault: state.name.clone(),
        vault_id: vault_id.to_string(),
        device_id: state.device.device_id().to_string(),
        key_epoch: epoch.number,
        key_epoch_id: epoch.id().to_string(),
        state_dir: state.dir.clone(),
        state: state_name,
        mount: live.map(|m| MountInfo {
            pid: m.pid,
            mountpoint: m.mountpoint,
            started_ms: (ds.pid != 0).then_some(ds.started_ms),
        }),
        pending_uploads: pending,
        ignored,
        last_snapshot,
        conflicts,
        held: crate::held_summaries(&state.dir)?,
        peers: ds.peers,
        downloads: ds.downloads,
        last_flush_ms: ds.last_flush_ms,
        last_error: ds.last_error,
        peer_faults,
        disk,
        local,
    })
}

fn pending_label(p: &cairn_overlay::PendingPath) -> String {
    if p.deleted {
        format!("{} (deleted)", p.path)
    } else {
        p.path.clone()
    }
}

/// What can be said without the vault's databases, which a full disk may keep closed.
fn disk_full_report(
    state: &VaultState,
    disk: Option<DiskInfo>,
    live: Option<crate::LiveMount>,
    daemon_status: Option<DaemonStatus>,
    pending_paths: Vec<cairn_overlay::PendingPath>,
    mode: SyncMode,
) -> Report {
    let ds = daemon_status.unwrap_or_default();
    let epoch = state.key_epochs().current();
    Report {
        vault: state.name.clone(),
        vault_id: state.secret.vault_id().to_string(),
        device_id: state.device.device_id().to_string(),
        key_epoch: epoch.number,
        key_epoch_id: epoch.id().to_string(),
        state_dir: state.dir.clone(),
        state: "disk full",
        mount: live.map(|m| MountInfo {
            pid: m.pid,
            mountpoint: m.mountpoint,
            started_ms: (ds.pid != 0).then_some(ds.started_ms),
        }),
        pending_uploads: Pending {
            files: pending_paths.len() as u64,
            bytes: pending_paths.iter().map(|p| p.bytes).sum(),
            paths: pending_paths.iter().map(pending_label).collect(),
        },
        ignored: Ignored { files: 0, bytes: 0 },
        last_snapshot: None,
        conflicts: Vec::new(),
        held: crate::held_summaries(&state.dir).unwrap_or_default(),
        peers: ds.peers,
        downloads: ds.downloads,
        last_flush_ms: ds.last_flush_ms,
        last_error: ds.last_error,
        peer_faults: ds.peer_faults,
        disk,
        local: LocalSummary {
            mode,
            ..LocalSummary::default()
        },
    }
}

/// One fault per equivocating device, from the evidence in the registry.
fn equivocation_faults(device: &OpenVault) -> Result<Vec<PeerFault>> {
    let mut out: Vec<PeerFault> = Vec::new();
    for e in device.registry.equivocations(&device.vault_id)? {
        let detail = format!(
            "revision {}: payloads {} and {} (members keep the lower)",
            e.revision(),
            e.low.payload,
            e.high.payload
        );
        let id = e.device().to_string();
        match out.iter_mut().find(|f| f.device == id) {
            Some(f) => {
                f.count += 1;
                if e.detected_ms >= f.last_ms {
                    f.last_ms = e.detected_ms;
                    f.detail = detail;
                }
            }
            None => out.push(PeerFault {
                device: id,
                kind: FaultKind::Equivocation,
                detail,
                count: 1,
                last_ms: e.detected_ms,
            }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_vault_is_not_mounted_and_has_nothing_pending() {
        let d = tempfile::tempdir().unwrap();
        let s = VaultState::create(d.path(), "v").unwrap();
        let r = report(&s, &ReportOptions::default()).unwrap();
        assert_eq!(r.state, "not mounted");
        assert_eq!(r.pending_uploads.files, 0);
        assert!(r.last_snapshot.is_none());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["pending_uploads"]["files"], 0);
        assert_eq!(json["state"], "not mounted");
    }
}
