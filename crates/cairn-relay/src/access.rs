//! The access list: which devices may use the relay, where that list comes from, and the
//! [`AccessControl`] hook that enforces it.
//!
//! The effective list is the union of the explicit device ids and the ids in the allow file.
//! The file is re-read when its modification time or size changes (polled) or when asked
//! ([`crate::RelayServer::reload_access_list`], e.g. on SIGHUP). A file that cannot be read or
//! has a bad line leaves the previous list in force (the error is logged), so a half-written
//! edit never locks everybody out or lets anybody in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use cairn_crypto::DeviceId;
use cairn_net::{device_id_of, endpoint_id_of};
use iroh::EndpointId;
use iroh_relay::server::{Access, AccessControl, ClientRequest, ConnectionId};

use crate::RelayError;

/// What a device that is not on the list is told by the relay (the client sees it as
/// `RelayStatus::auth_denied_reason`).
pub const DENY_REASON: &str = "not a member of this relay's access list";

/// How often the allow file's modification time is checked by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Which devices may use the relay.
///
/// Build it from explicit ids ([`AccessList::devices`], [`AccessList::with_device`]) and/or a
/// file ([`AccessList::with_file`]); or, deliberately, [`AccessList::anyone`]. A list that is
/// empty when the relay starts is refused, because such a relay could serve nobody and is
/// almost always a mistake (a wrong path or a forgotten `--allow`).
#[derive(Debug, Clone)]
pub struct AccessList {
    pub(crate) devices: BTreeSet<DeviceId>,
    pub(crate) file: Option<PathBuf>,
    pub(crate) anyone: bool,
    pub(crate) poll_interval: Duration,
}

impl Default for AccessList {
    fn default() -> Self {
        Self {
            devices: BTreeSet::new(),
            file: None,
            anyone: false,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

impl AccessList {
    /// Exactly these devices.
    pub fn devices(ids: impl IntoIterator<Item = DeviceId>) -> Self {
        Self {
            devices: ids.into_iter().collect(),
            ..Self::default()
        }
    }

    /// An open relay: every endpoint may use it. Only on purpose (`--allow-anyone`).
    pub fn anyone() -> Self {
        Self {
            anyone: true,
            ..Self::default()
        }
    }

    /// Adds one device.
    pub fn with_device(mut self, id: DeviceId) -> Self {
        self.devices.insert(id);
        self
    }

    /// Also allows the devices listed in `path` (see [`parse_allow_file`] for the format),
    /// re-read whenever it changes.
    pub fn with_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// How often the allow file's modification time is checked (default
    /// [`DEFAULT_POLL_INTERVAL`]).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Whether this is an open relay.
    pub fn is_anyone(&self) -> bool {
        self.anyone
    }

    /// The allow file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

/// A line of an allow file that is not a device id, a comment or blank.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct AllowLineError {
    /// 1-based line number.
    pub line: usize,
    pub reason: String,
}

/// Parses an allow file: one device id (64 hex characters, as `cairn peers` prints them)
/// per line; `#` starts a comment (whole line or after the id); blank lines and surrounding
/// whitespace are ignored. Every id must be a valid ed25519 public key. The first bad line
/// fails the whole file, so a typo never silently drops a device.
pub fn parse_allow_file(text: &str) -> Result<Vec<DeviceId>, AllowLineError> {
    let mut ids = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if content.is_empty() {
            continue;
        }
        let err = |reason: String| AllowLineError { line, reason };
        if content.split_whitespace().nth(1).is_some() {
            return Err(err(format!(
                "{:?} holds more than one word; put one device id per line",
                shorten(content)
            )));
        }
        let id: DeviceId = content
            .parse()
            .map_err(|e| err(format!("{:?} is not a device id ({e})", shorten(content))))?;
        endpoint_id_of(&id).map_err(|e| err(e.to_string()))?;
        ids.push(id);
    }
    Ok(ids)
}

/// The first 80 characters of a bad line, so an error message stays one line.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// Reads and parses the allow file, naming the file in every error.
pub(crate) fn read_allow_file(path: &Path) -> Result<Vec<DeviceId>, RelayError> {
    let text = std::fs::read_to_string(path).map_err(|source| RelayError::AllowFileRead {
        path: path.to_path_buf(),
        source,
    })?;
    parse_allow_file(&text).map_err(|e| RelayError::AllowFileLine {
        path: path.to_path_buf(),
        line: e.line,
        reason: e.reason,
    })
}

/// What one reload of the access list changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessReport {
    /// Devices allowed after the reload.
    pub allowed: usize,
    /// Devices that were not allowed before.
    pub added: Vec<DeviceId>,
    /// Devices no longer allowed.
    pub removed: Vec<DeviceId>,
    /// Connected clients that were disconnected because they are no longer allowed.
    pub disconnected: usize,
}

/// The shared state behind the [`AccessControl`] hook, the file watcher and the server
/// handle.
#[derive(Debug)]
pub(crate) struct Gate {
    anyone: bool,
    explicit: BTreeSet<DeviceId>,
    file: Option<PathBuf>,
    allowed: RwLock<HashSet<EndpointId>>,
    /// Admitted connections per endpoint (one endpoint may briefly hold two).
    connected: Mutex<HashMap<EndpointId, usize>>,
    denied: AtomicU64,
    /// (mtime, len) of the allow file when it was last read.
    seen: Mutex<Option<(Option<SystemTime>, u64)>>,
    /// Serializes reloads (watcher tick vs. an explicit reload).
    reload: tokio::sync::Mutex<()>,
}

impl Gate {
    /// Builds the gate from the list as it is now, refusing an empty or contradictory one.
    pub(crate) fn new(list: &AccessList) -> Result<Self, RelayError> {
        if list.anyone && (!list.devices.is_empty() || list.file.is_some()) {
            return Err(RelayError::AnyoneWithList);
        }
        let mut gate = Self {
            anyone: list.anyone,
            explicit: list.devices.clone(),
            file: list.file.clone(),
            allowed: RwLock::new(HashSet::new()),
            connected: Mutex::new(HashMap::new()),
            denied: AtomicU64::new(0),
            seen: Mutex::new(None),
            reload: tokio::sync::Mutex::new(()),
        };
        let mut ids = list.devices.clone();
        if let Some(path) = &list.file {
            let stamp = file_stamp(path);
            ids.extend(read_allow_file(path)?);
            *gate.seen.get_mut().unwrap_or_else(|p| p.into_inner()) = stamp;
        }
        if ids.is_empty() && !list.anyone {
            return Err(RelayError::EmptyAccessList {
                file: list.file.clone(),
            });
        }
        let mut allowed = HashSet::new();
        for id in &ids {
            allowed.insert(endpoint_id_of(id).map_err(|_| RelayError::BadDeviceId(*id))?);
        }
        *gate.allowed.get_mut().unwrap_or_else(|p| p.into_inner()) = allowed;
        Ok(gate)
    }

    pub(crate) fn is_anyone(&self) -> bool {
        self.anyone
    }

    pub(crate) fn has_file(&self) -> bool {
        self.file.is_some()
    }

    fn is_allowed(&self, id: &EndpointId) -> bool {
        self.anyone
            || self
                .allowed
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(id)
    }

    pub(crate) fn allowed_devices(&self) -> Vec<DeviceId> {
        let mut v: Vec<_> = self
            .allowed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(device_id_of)
            .collect();
        v.sort();
        v
    }

    pub(crate) fn connected_clients(&self) -> usize {
        self.connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub(crate) fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Whether the allow file changed since it was last read (or cannot be inspected now).
    pub(crate) fn file_changed(&self) -> bool {
        let Some(path) = &self.file else {
            return false;
        };
        let now = file_stamp(path);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) != now
    }

    /// Re-reads the allow file and swaps in the new list; on error the old list stays.
    /// Then disconnects every connected client that is no longer allowed.
    pub(crate) async fn reload(
        &self,
        disconnect: impl Fn(EndpointId) -> bool,
    ) -> Result<AccessReport, RelayError> {
        let _serial = self.reload.lock().await;
        let mut report = AccessReport::default();
        if let Some(path) = self.file.clone() {
            let stamp = file_stamp(&path);
            let read = tokio::task::spawn_blocking(move || read_allow_file(&path))
                .await
                .map_err(|e| RelayError::Internal(format!("allow file reader: {e}")))?;
            // Remember the stamp even on error, so a bad file is reported once, not at
            // every poll; the next edit changes the stamp again.
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = stamp;
            let mut ids: BTreeSet<DeviceId> = self.explicit.clone();
            ids.extend(read?);
            let new: HashSet<EndpointId> = ids
                .iter()
                .filter_map(|id| endpoint_id_of(id).ok())
                .collect();
            let mut allowed = self.allowed.write().unwrap_or_else(|p| p.into_inner());
            report.added = sorted_ids(new.difference(&allowed));
            report.removed = sorted_ids(allowed.difference(&new));
            *allowed = new;
            report.allowed = allowed.len();
        } else {
            report.allowed = self.allowed.read().unwrap_or_else(|p| p.into_inner()).len();
        }
        report.disconnected = self.sweep(disconnect);
        Ok(report)
    }

    /// Disconnects every connected client that is not allowed (any more). Also catches a
    /// client admitted concurrently with its removal. Returns how many were disconnected.
    pub(crate) fn sweep(&self, disconnect: impl Fn(EndpointId) -> bool) -> usize {
        if self.anyone {
            return 0;
        }
        let stale: Vec<EndpointId> = {
            let connected = self.connected.lock().unwrap_or_else(|p| p.into_inner());
            connected
                .keys()
                .filter(|id| !self.is_allowed(id))
                .copied()
                .collect()
        };
        let mut n = 0;
        for id in stale {
            if disconnect(id) {
                tracing::info!(device = %device_id_of(&id), "disconnected a device removed from the access list");
                n += 1;
            }
        }
        n
    }
}

fn sorted_ids<'a>(ids: impl Iterator<Item = &'a EndpointId>) -> Vec<DeviceId> {
    let mut v: Vec<_> = ids.map(device_id_of).collect();
    v.sort();
    v
}

/// (mtime, len) of a file, or `None` if it cannot be inspected.
fn file_stamp(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len()))
}

/// The hook installed in the relay: admits listed endpoints, counts the rest.
#[derive(Debug)]
pub(crate) struct GateAccess(pub(crate) std::sync::Arc<Gate>);

impl AccessControl for GateAccess {
    async fn on_connect(&self, request: &ClientRequest) -> Access {
        let id = request.endpoint_id();
        if self.0.is_allowed(&id) {
            *self
                .0
                .connected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id)
                .or_default() += 1;
            tracing::debug!(device = %device_id_of(&id), "relay client admitted");
            Access::Allow
        } else {
            self.0.denied.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(device = %device_id_of(&id), "relay client denied");
            Access::Deny {
                reason: Some(DENY_REASON.to_string()),
            }
        }
    }

    fn on_disconnect(&self, endpoint_id: EndpointId, _connection_id: ConnectionId) {
        let mut connected = self.0.connected.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = connected.get_mut(&endpoint_id) {
            *n -= 1;
            if *n == 0 {
                connected.remove(&endpoint_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_crypto::DeviceKey;
    use proptest::prelude::*;

    #[test]
    fn comments_blanks_and_trailing_comments() {
        let a = DeviceKey::generate().device_id();
        let b = DeviceKey::generate().device_id();
        let text = format!("# members\n\n  {a}  \n{b} # laptop\n   # end\n");
        assert_eq!(parse_allow_file(&text).unwrap(), vec![a, b]);
        assert_eq!(parse_allow_file("").unwrap(), vec![]);
    }

    #[test]
    fn bad_lines_are_named() {
        let a = DeviceKey::generate().device_id();
        let e = parse_allow_file(&format!("{a}\n# ok\nnot-hex\n")).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("not a device id"), "{e}");
        let e = parse_allow_file(&format!("{a} {a}\n")).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.reason.contains("one device id per line"), "{e}");
        let e = parse_allow_file(&format!("{}\n", &a.to_string()[..62])).unwrap_err();
        assert!(e.reason.contains("64 hex"), "{e}");
    }

    #[test]
    fn ids_that_are_not_keys_are_refused() {
        // Find 32 bytes that are not a valid ed25519 point (about half of them are not).
        let bad = (0u8..=255)
            .map(|b| DeviceId([b; 32]))
            .find(|id| endpoint_id_of(id).is_err())
            .expect("some constant byte string is not a curve point");
        let e = parse_allow_file(&format!("{bad}\n")).unwrap_err();
        assert_eq!(e.line, 1);
    }

    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 32]>().prop_map(hex::encode),
            Just(DeviceKey::generate().device_id().to_string()),
            "[0-9a-fA-F]{0,70}",
            "[ \t]*#.*",
            ".*",
        ]
    }

    proptest! {
        #[test]
        fn parser_never_panics_and_accepts_only_keys(text in ".*", lines in prop::collection::vec(line(), 0..8)) {
            for text in [text, lines.join("\n")] {
                if let Ok(ids) = parse_allow_file(&text) {
                    for id in &ids {
                        prop_assert!(endpoint_id_of(id).is_ok());
                        prop_assert!(text.to_lowercase().contains(&id.to_string()));
                    }
                    let listed = text
                        .lines()
                        .filter(|l| !l.split('#').next().unwrap().trim().is_empty())
                        .count();
                    prop_assert_eq!(ids.len(), listed);
                } else {
                    let e = parse_allow_file(&text).unwrap_err();
                    prop_assert!(e.line >= 1 && e.line <= text.lines().count());
                }
            }
        }
    }
}
