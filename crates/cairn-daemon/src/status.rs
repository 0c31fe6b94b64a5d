//! What a running daemon knows that the disk does not: peers, downloads in flight, the last
//! flush and its error. The daemon owns one [`StatusBoard`], every subsystem updates it, and
//! a writer thread publishes it as `<vault dir>/run/status.json` (every 2 s and right after
//! each flush) for `cairn status` to read. The file is replaced atomically (tmp + rename), so
//! a reader never sees half of it; its `pid` lets a reader ignore the file of a dead daemon.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_fuse::{FlushBatch, FlushError, FlushSink};
use serde::{Deserialize, Serialize};

use crate::faults::{PeerFault, PeerFaults};
use crate::open_vault::now_ms;

pub const STATUS_FILE: &str = "status.json";
const REFRESH: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingUploads {
    pub files: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downloads {
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's device id.
    pub device: String,
    /// The name the peer gave itself (`cairn rename-device`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub connected: bool,
    pub last_contact_ms: Option<u64>,
    /// Where this device knows the peer can be reached: `IP:PORT` and relay URLs.
    pub addrs: Vec<String>,
    /// The path traffic to the peer takes now: `direct IP:PORT` or `relay URL`
    /// (`None` while not connected).
    #[serde(default)]
    pub path: Option<String>,
    /// Round-trip time on that path, in microseconds.
    #[serde(default)]
    pub rtt_us: Option<u64>,
    /// Bytes sent to and received from the peer since the daemon started (UDP payload,
    /// including QUIC overhead, on every connection to it).
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
}

/// The content of `status.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub pending_uploads: PendingUploads,
    pub downloads: Downloads,
    pub peers: Vec<PeerStatus>,
    pub last_flush_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Members that sent content contradicting itself or snapshots that are not theirs
    /// (equivocation evidence is on disk and read by `cairn status` directly).
    #[serde(default)]
    pub peer_faults: Vec<PeerFault>,
}

impl DaemonStatus {
    /// The status file in `vault_dir`, if one exists and is readable.
    pub fn read(vault_dir: &Path) -> Option<DaemonStatus> {
        let text = fs::read_to_string(vault_dir.join("run").join(STATUS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

struct Shared {
    status: DaemonStatus,
    dirty: bool,
    stopped: bool,
}

/// The daemon's live status, shared by every thread that has something to report.
pub struct StatusBoard {
    shared: Mutex<Shared>,
    /// Held by one writer at a time: the writer thread and a flush's immediate write share
    /// one temporary file name, and a later snapshot must not be overwritten by an earlier.
    writing: Mutex<()>,
    wake: Condvar,
    file: PathBuf,
    overlay_dir: PathBuf,
    faults: Mutex<Option<Arc<PeerFaults>>>,
}

impl StatusBoard {
    /// A board for the daemon serving `mountpoint` from the vault in `vault_dir`.
    pub fn new(vault_dir: &Path, mountpoint: &Path) -> Arc<StatusBoard> {
        let now = now_ms();
        Arc::new(StatusBoard {
            shared: Mutex::new(Shared {
                status: DaemonStatus {
                    pid: std::process::id(),
                    mountpoint: mountpoint.to_path_buf(),
                    started_ms: now,
                    updated_ms: now,
                    ..Default::default()
                },
                dirty: true,
                stopped: false,
            }),
            writing: Mutex::new(()),
            wake: Condvar::new(),
            file: vault_dir.join("run").join(STATUS_FILE),
            overlay_dir: vault_dir.join("overlay"),
            faults: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, urgent: bool, f: impl FnOnce(&mut DaemonStatus)) {
        let mut s = self.lock();
        f(&mut s.status);
        if urgent {
            s.dirty = true;
            self.wake.notify_all();
        }
    }

    // The network layer reports peers, downloads and its errors here (issue #7).
    #[allow(dead_code)]
    pub fn set_peers(&self, peers: Vec<PeerStatus>) {
        self.update(false, |s| s.peers = peers);
    }

    #[allow(dead_code)]
    pub fn set_downloads(&self, chunks: u64, bytes: u64) {
        self.update(false, |s| s.downloads = Downloads { chunks, bytes });
    }

    /// Records the outcome of a flush and publishes the status right away.
    pub fn note_flush(&self, result: Result<(), String>) {
        self.update(true, |s| match result {
            Ok(()) => {
                s.last_flush_ms = Some(now_ms());
                s.last_error = None;
            }
            Err(e) => s.last_error = Some(e),
        });
    }

    /// Where misbehaviour of members is recorded; copied into every status file written.
    pub fn set_faults(&self, faults: Arc<PeerFaults>) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = Some(faults);
    }

    #[allow(dead_code)]
    pub fn set_error(&self, error: Option<String>) {
        self.update(true, |s| s.last_error = error);
    }

    /// Writes the file now (pending uploads refreshed from the overlay journal).
    pub fn write_now(&self) -> Result<()> {
        let _one_writer = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let pending = cairn_overlay::read_pending(&self.overlay_dir).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the overlay for the status file");
            Vec::new()
        });
        let faults = self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|f| f.list());
        let status = {
            let mut s = self.lock();
            if let Some(f) = faults {
                s.status.peer_faults = f;
            }
            s.status.pending_uploads = PendingUploads {
                files: pending.len() as u64,
                bytes: pending.iter().map(|p| p.bytes).sum(),
            };
            s.status.updated_ms = now_ms();
            s.dirty = false;
            s.status.clone()
        };
        let json = serde_json::to_vec_pretty(&status)?;
        let dir = self.file.parent().context("status file has no directory")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!("{STATUS_FILE}.{}.tmp", std::process::id()));
        fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.file).with_context(|| format!("replacing {}", self.file.display()))
    }

    /// Starts the writer thread; [`StatusBoard::stop`] ends it and removes the file.
    pub fn spawn_writer(self: &Arc<Self>) -> Result<JoinHandle<()>> {
        if let Err(e) = self.write_now() {
            tracing::warn!(error = %format!("{e:#}"), "cannot write the daemon status file; `cairn status` will not show peers or the last flush");
        }
        let board = self.clone();
        std::thread::Builder::new()
            .name("cairn-status".into())
            .spawn(move || {
                loop {
                    {
                        let s = board.lock();
                        let (s, _) = board
                            .wake
                            .wait_timeout_while(s, REFRESH, |s| !s.dirty && !s.stopped)
                            .unwrap_or_else(|e| e.into_inner());
                        if s.stopped {
                            return;
                        }
                    }
                    if let Err(e) = board.write_now() {
                        tracing::debug!(error = %format!("{e:#}"), "status file not written");
                    }
                }
            })
            .context("starting the status thread")
    }

    /// Stops the writer and removes the file: a daemon that is gone has no status.
    pub fn stop(&self, writer: JoinHandle<()>) {
        {
            let mut s = self.lock();
            s.stopped = true;
            self.wake.notify_all();
        }
        let _ = writer.join();
        let _ = fs::remove_file(&self.file);
    }
}

/// Reports every flush of the mount to the board, then passes the outcome on.
pub struct StatusSink {
    pub inner: Arc<dyn FlushSink>,
    pub board: Arc<StatusBoard>,
}

impl FlushSink for StatusSink {
    fn flush(&self, batch: FlushBatch) -> Result<(), FlushError> {
        let result = self.inner.flush(batch);
        self.board
            .note_flush(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_file_round_trips_and_disappears_at_stop() {
        let d = tempfile::tempdir().unwrap();
        let board = StatusBoard::new(d.path(), Path::new("/mnt/x"));
        let writer = board.spawn_writer().unwrap();
        board.set_peers(vec![PeerStatus {
            device: "abc".into(),
            name: Some("desk".into()),
            connected: true,
            last_contact_ms: Some(5),
            addrs: vec!["1.2.3.4:5".into(), "http://127.0.0.1:3340/".into()],
            path: Some("relay http://127.0.0.1:3340/".into()),
            rtt_us: Some(3_500),
            bytes_sent: 10,
            bytes_received: 20,
        }]);
        board.set_downloads(3, 300);
        let faults = Arc::new(PeerFaults::default());
        let m = cairn_crypto::DeviceKey::generate().device_id();
        faults.report(
            m,
            crate::faults::FaultKind::BadFile,
            "x: short chunk".into(),
        );
        board.set_faults(faults);
        board.note_flush(Err("disk full".into()));
        board.write_now().unwrap();
        let read = DaemonStatus::read(d.path()).unwrap();
        assert_eq!(read.pid, std::process::id());
        assert_eq!(read.mountpoint, Path::new("/mnt/x"));
        assert_eq!(read.peers.len(), 1);
        assert_eq!(
            read.downloads,
            Downloads {
                chunks: 3,
                bytes: 300
            }
        );
        assert_eq!(read.pending_uploads, PendingUploads::default());
        assert_eq!(read.last_error.as_deref(), Some("disk full"));
        assert_eq!(read.peer_faults.len(), 1);
        assert_eq!(read.peer_faults[0].device, m.to_string());
        board.note_flush(Ok(()));
        board.write_now().unwrap();
        let read = DaemonStatus::read(d.path()).unwrap();
        assert!(read.last_flush_ms.is_some());
        assert!(read.last_error.is_none());
        board.stop(writer);
        assert!(DaemonStatus::read(d.path()).is_none());
    }
}
