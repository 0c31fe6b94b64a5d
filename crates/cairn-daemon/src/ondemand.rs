//! Files on demand: which content this device keeps.
//!
//! A device in `full` mode fetches every chunk of the vault in the background (the
//! replicator); a device in `on-demand` mode receives every snapshot (all metadata) but
//! fetches content only when it is read, plus what is pinned. Pins are vault paths (a file
//! or a whole tree) that stay local and up to date.
//!
//! Both live in `<vault dir>/ondemand.json`, written atomically; the mode there (set by
//! `cairn join --mode`, `cairn recover --mode` or `cairn mode`) wins over the configuration's
//! `[sync] mode`, which applies to vaults that never chose one. The file is this device's
//! own and is never synced: every device decides for itself what it keeps.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use cairn_store::BlobStore;
use cairn_vault::{Blobs, Content, Entry, EntryKind, VaultPath, manifest_of};
use serde::{Deserialize, Serialize};

use crate::state::VaultState;

const FILE: &str = "ondemand.json";
/// A pin list this large is not one a person made; refusing it keeps a damaged file from
/// being read into memory whole.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Which content a device fetches in the background.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncMode {
    /// Every chunk of the vault (a complete replica, readable offline).
    #[default]
    #[serde(rename = "full")]
    Full,
    /// Only what is read or pinned; everything stays visible.
    #[serde(rename = "on-demand")]
    OnDemand,
}

impl std::str::FromStr for SyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "full" => Ok(Self::Full),
            "on-demand" | "ondemand" => Ok(Self::OnDemand),
            other => Err(format!(
                "sync mode {other:?} is not understood; use \"full\" or \"on-demand\""
            )),
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::OnDemand => "on-demand",
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<SyncMode>,
    #[serde(default)]
    pins: BTreeSet<String>,
}

/// This device's mode and pins for one vault (see the module docs).
pub struct OnDemand {
    file: PathBuf,
    saved: Mutex<Saved>,
    /// The configuration's mode, for a vault whose file names none.
    default_mode: Mutex<SyncMode>,
    /// Bumped on every change, so the replicator knows to walk the whole tree again.
    generation: AtomicU64,
    /// Wakes the replicator (set while the network runs).
    wake: Mutex<Option<SyncSender<()>>>,
    /// Files read through the mount, least recently read first (by content, so a renamed
    /// file stays one), for the cache budget. In memory: after a restart, reads rebuild it.
    recent: Mutex<lru::LruCache<blake3::Hash, Entry>>,
}

/// Files remembered for the cache budget's least-recently-read order.
const RECENT_FILES: usize = 65_536;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `path` is `pin` or inside it (the root pin covers everything).
fn covers(pin: &str, path: &str) -> bool {
    pin.is_empty()
        || path == pin
        || (path.len() > pin.len() && path.starts_with(pin) && path.as_bytes()[pin.len()] == b'/')
}

impl OnDemand {
    /// Loads the vault's file; a missing file is full mode (or the configured one) with no
    /// pins. A damaged file is an error naming it, never silently dropped pins.
    pub fn load(vault_dir: &Path) -> Result<Self> {
        let file = vault_dir.join(FILE);
        let saved = match std::fs::metadata(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
            Ok(m) if m.len() > MAX_FILE_BYTES => bail!(
                "{} is {} bytes, more than a pin list can be ({MAX_FILE_BYTES}); it is damaged: fix or remove it",
                file.display(),
                m.len()
            ),
            Ok(_) => {
                let text =
                    std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                let saved: Saved = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is damaged; fix or remove it", file.display()))?;
                for p in &saved.pins {
                    VaultPath::new(p).map_err(|e| {
                        anyhow::anyhow!("{}: pin {p:?} is not a vault path: {e}", file.display())
                    })?;
                }
                saved
            }
        };
        Ok(Self {
            file,
            saved: Mutex::new(saved),
            default_mode: Mutex::new(SyncMode::Full),
            generation: AtomicU64::new(0),
            wake: Mutex::new(None),
            recent: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(RECENT_FILES).expect("nonzero"),
            )),
        })
    }

    fn save(&self, saved: &Saved) -> Result<()> {
        let text = serde_json::to_vec_pretty(saved)?;
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
        std::fs::rename(&tmp, &self.file)
            .with_context(|| format!("writing {}", self.file.display()))?;
        Ok(())
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(w) = lock(&self.wake).as_ref() {
            let _ = w.try_send(());
        }
    }

    pub fn mode(&self) -> SyncMode {
        lock(&self.saved)
            .mode
            .unwrap_or_else(|| *lock(&self.default_mode))
    }

    /// The configuration's mode, used while the vault's file names none.
    pub fn set_default_mode(&self, mode: SyncMode) {
        *lock(&self.default_mode) = mode;
        self.changed();
    }

    /// Records `mode` for this vault on this device.
    pub fn set_mode(&self, mode: SyncMode) -> Result<()> {
        let mut saved = lock(&self.saved);
        saved.mode = Some(mode);
        self.save(&saved)?;
        drop(saved);
        self.changed();
        Ok(())
    }

    pub fn pins(&self) -> Vec<String> {
        lock(&self.saved).pins.iter().cloned().collect()
    }

    /// Pins `path`; `false` if it already was.
    pub fn pin(&self, path: &VaultPath) -> Result<bool> {
        let mut saved = lock(&self.saved);
        if !saved.pins.insert(path.as_str().to_string()) {
            return Ok(false);
        }
        if let Err(e) = self.save(&saved) {
            saved.pins.remove(path.as_str());
            return Err(e);
        }
        drop(saved);
        self.changed();
        Ok(true)
    }

    /// Unpins `path`; `false` if it was not pinned itself (it may still be inside a pin).
    pub fn unpin(&self, path: &VaultPath) -> Result<bool> {
        let mut saved = lock(&self.saved);
        if !saved.pins.remove(path.as_str()) {
            return Ok(false);
        }
        if let Err(e) = self.save(&saved) {
            saved.pins.insert(path.as_str().to_string());
            return Err(e);
        }
        drop(saved);
        self.changed();
        Ok(true)
    }

    /// The pin that keeps `path` local, if any (itself or an ancestor).
    pub fn pinned_by(&self, path: &str) -> Option<String> {
        lock(&self.saved)
            .pins
            .iter()
            .find(|p| covers(p, path))
            .cloned()
    }

    /// Whether the content of `path` is fetched in the background.
    pub fn wants(&self, path: &str) -> bool {
        self.mode() == SyncMode::Full || self.pinned_by(path).is_some()
    }

    /// A read of the file whose content reference is `content` (decoded: `entry`).
    pub(crate) fn touch(&self, content: &[u8], entry: &Entry) {
        let key = blake3::hash(content);
        let mut recent = lock(&self.recent);
        if recent.get(&key).is_none() {
            recent.put(key, entry.clone());
        }
    }

    /// The files read through the mount, least recently read first.
    pub(crate) fn least_recent(&self) -> Vec<Entry> {
        lock(&self.recent)
            .iter()
            .rev()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Forgets a file once its content was evicted.
    pub(crate) fn forget(&self, entry: &Entry) {
        lock(&self.recent).retain(|_, e| e != entry);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub(crate) fn set_waker(&self, wake: Option<SyncSender<()>>) {
        *lock(&self.wake) = wake;
    }
}

/// How much of a file's content is on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Full,
    Partial,
    None,
}

impl Local {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Partial => "partial",
            Self::None => "none",
        }
    }
}

/// What of `entry`'s content the local store holds, and the plaintext bytes of that
/// (`local`) and in all (`total`). Only the local store is looked at: asking never fetches.
pub fn local_state(local: &BlobStore, entry: &Entry) -> (Local, u64, u64) {
    if entry.kind != EntryKind::File {
        return (Local::Full, 0, 0);
    }
    let m = match &entry.content {
        Content::Inline(_) | Content::None | Content::Target(_) => {
            return (Local::Full, entry.size, entry.size);
        }
        c => match manifest_of(local as &dyn Blobs, c) {
            Ok(Some(m)) => m,
            // The chunk list is not here (or unreadable): nothing of the file is.
            _ => return (Local::None, 0, entry.size),
        },
    };
    let (mut have, mut bytes, mut total) = (0usize, 0u64, 0u64);
    for c in m.chunks() {
        let len = u64::from(c.len);
        total += len;
        if local.has(&c.id).unwrap_or(false) {
            have += 1;
            bytes += len;
        }
    }
    let state = if have == m.chunks().len() {
        Local::Full
    } else if have == 0 {
        Local::None
    } else {
        Local::Partial
    };
    (state, bytes, total)
}

/// How long `cairn pin` waits for the daemon between two progress reports.
const PIN_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// The vault paths of what the user typed (relative to the vault root, or inside the mount).
fn resolve(state: &VaultState, paths: &[String]) -> Result<Vec<VaultPath>> {
    let live = crate::mount::writable_mount(&state.dir);
    let mountpoint = live.as_ref().map(|m| m.mountpoint.as_path());
    paths
        .iter()
        .map(|p| crate::restore::vault_path(p, mountpoint, "PATH"))
        .collect()
}

fn json(p: &VaultPath) -> String {
    serde_json::to_string(p.as_str()).unwrap_or_default()
}

/// What `cairn pin` did for one path.
pub enum PinOutcome {
    /// Pinned and fetched by the running daemon: this many chunks were fetched.
    Fetched(u64),
    /// Recorded; the daemon (not running) fetches it when it next runs.
    Recorded,
}

/// `cairn pin`: pins each path and, with the daemon running, fetches it now (`progress`
/// sees the path, chunks done and chunks in all).
pub fn pin_paths(
    state: &VaultState,
    paths: &[String],
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Vec<(String, PinOutcome)>> {
    let mut out = Vec::new();
    for p in resolve(state, paths)? {
        let shown = p.as_str().to_string();
        let reply = crate::control::request_with_progress(
            &state.dir,
            &format!("pin {}", json(&p)),
            PIN_WAIT,
            |words| {
                let mut w = words
                    .split_whitespace()
                    .map(|x| x.parse::<u64>().unwrap_or(0));
                let (done, total) = (w.next().unwrap_or(0), w.next().unwrap_or(0));
                progress(&shown, done, total);
            },
        )?;
        let outcome = match reply {
            Some(r) => PinOutcome::Fetched(r.trim().parse().unwrap_or(0)),
            None => {
                OnDemand::load(&state.dir)?.pin(&p)?;
                PinOutcome::Recorded
            }
        };
        out.push((shown, outcome));
    }
    Ok(out)
}

/// `cairn unpin`: the content stays until evicted (or, over a cache budget, reclaimed).
pub fn unpin_paths(state: &VaultState, paths: &[String]) -> Result<()> {
    for p in resolve(state, paths)? {
        if crate::control::request(&state.dir, &format!("unpin {}", json(&p)))?.is_none() {
            let od = OnDemand::load(&state.dir)?;
            if !od.unpin(&p)? {
                match od.pinned_by(p.as_str()) {
                    Some(pin) => bail!("{p} is not pinned itself; it is inside the pin {pin:?}"),
                    None => bail!("{p} is not pinned"),
                }
            }
        }
    }
    Ok(())
}

/// `cairn evict`: needs the running daemon, which asks the members whether they hold the
/// content before anything goes.
pub fn evict_paths(state: &VaultState, paths: &[String]) -> Result<crate::net::EvictReport> {
    let mut all = crate::net::EvictReport::default();
    for p in resolve(state, paths)? {
        let reply = crate::control::request_within(
            &state.dir,
            &format!("evict {}", json(&p)),
            PIN_WAIT,
        )?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the daemon of this vault is not running; evicting needs it to ask the other members whether they hold the content. Start it (`cairn mount DIR` or `cairn sync`) and retry"
            )
        })?;
        let r: crate::net::EvictReport = serde_json::from_str(reply.trim()).map_err(|e| {
            anyhow::anyhow!(
                "the daemon's evict reply is unreadable ({e}); is it the same cairn version?"
            )
        })?;
        all.evicted_files += r.evicted_files;
        all.freed_bytes += r.freed_bytes;
        all.refused.extend(r.refused);
    }
    Ok(all)
}

/// `cairn mode`, `join --mode`, `recover --mode`: through the running daemon if there is one
/// (it holds the file), else in the file.
pub fn set_sync_mode(state: &VaultState, mode: SyncMode) -> Result<()> {
    if crate::control::request(&state.dir, &format!("mode {mode}"))?.is_none() {
        OnDemand::load(&state.dir)?.set_mode(mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_cover_their_tree_only() {
        assert!(covers("a", "a"));
        assert!(covers("a", "a/b/c"));
        assert!(!covers("a", "ab"));
        assert!(!covers("a/b", "a"));
        assert!(covers("", "anything"));
    }

    #[test]
    fn pins_and_mode_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let od = OnDemand::load(dir.path()).unwrap();
        assert_eq!(od.mode(), SyncMode::Full);
        od.set_default_mode(SyncMode::OnDemand);
        assert_eq!(od.mode(), SyncMode::OnDemand);
        od.set_mode(SyncMode::Full).unwrap();
        assert!(od.pin(&VaultPath::new("music/jazz").unwrap()).unwrap());
        assert!(!od.pin(&VaultPath::new("music/jazz").unwrap()).unwrap());
        let again = OnDemand::load(dir.path()).unwrap();
        again.set_default_mode(SyncMode::OnDemand);
        assert_eq!(again.mode(), SyncMode::Full, "the vault's own choice wins");
        assert_eq!(again.pins(), vec!["music/jazz".to_string()]);
        assert_eq!(
            again.pinned_by("music/jazz/a.flac").as_deref(),
            Some("music/jazz")
        );
        assert!(again.unpin(&VaultPath::new("music/jazz").unwrap()).unwrap());
        assert!(again.pinned_by("music/jazz/a.flac").is_none());
    }

    #[test]
    fn a_damaged_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            &b"{not json"[..],
            br#"{"pins":["../etc"]}"#,
            br#"{"mode":"sometimes"}"#,
            br#"{"pins":[],"extra":1}"#,
        ] {
            std::fs::write(dir.path().join(FILE), bad).unwrap();
            let e = OnDemand::load(dir.path()).err().expect("refused");
            assert!(format!("{e:#}").contains(FILE), "{e:#}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(cairn_fuzzkit::config_with(64))]

        /// Arbitrary and mutated pin files load or are refused, never panic, and whatever
        /// loads holds only valid vault paths.
        #[test]
        fn fuzz_pin_file(
            arbitrary in proptest::collection::vec(any::<u8>(), 0..256),
            op in any::<u8>(), at in any::<prop::sample::Index>(), x in any::<u8>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut mutated = br#"{"mode":"on-demand","pins":["a/b","c"]}"#.to_vec();
            cairn_fuzzkit::mutate(&mut mutated, op, at, x);
            for bytes in [arbitrary, mutated] {
                std::fs::write(dir.path().join(FILE), &bytes).unwrap();
                if let Ok(od) = OnDemand::load(dir.path()) {
                    for p in od.pins() {
                        prop_assert!(VaultPath::new(&p).is_ok());
                    }
                }
            }
        }
    }
}
