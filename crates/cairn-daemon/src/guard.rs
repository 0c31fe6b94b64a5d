//! The mass-delete guard's held state for one vault on this device: `<vault dir>/held.bin`.
//!
//! After every change of the engine's state (a local flush, a merged peer snapshot, a
//! decision) [`Guard::observe`] drops held paths whose tombstone has been replaced (restored,
//! edited, or deleted again by a decision on some device) and holds a new deletion that is too
//! large (see [`cairn_vault::guard`] for why a hold is a view over the engine and never a
//! change to the merge). The set is written to disk before the state that caused it is shown
//! or published, so a restart finds every hold again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use cairn_tree::NodeId;
use cairn_vault::guard::{self, GuardPolicy, HeldEntry, HeldRecord, HeldSet};
use cairn_vault::{Entry, EntryKey, EntrySource, Vault};
use serde::{Deserialize, Serialize};

/// Where a vault's held deletions live.
pub fn held_path(vault_dir: &Path) -> PathBuf {
    vault_dir.join("held.bin")
}

/// One held deletion as `cairn held` and `cairn status --json` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldSummary {
    pub id: u64,
    /// Full device id of who deleted.
    pub device: String,
    pub created_ms: u64,
    /// Files and symlinks held (directories are held too, but not counted).
    pub files: usize,
    pub paths: usize,
    /// Up to a few held paths, to recognise the deletion by.
    pub sample: Vec<String>,
}

impl HeldSummary {
    fn of(r: &HeldRecord) -> Self {
        Self {
            id: r.id,
            device: r.origin.to_string(),
            created_ms: r.created_ms,
            files: r.files(),
            paths: r.entries.len(),
            sample: r
                .entries
                .iter()
                .filter(|e| e.is_file())
                .take(3)
                .filter_map(|e| EntryKey::from_bytes(&e.key).ok())
                .map(|k| k.path.as_str().to_string())
                .collect(),
        }
    }
}

/// Reads the held deletions of a vault (no daemon needed). A missing file is an empty set.
pub fn load_held(vault_dir: &Path) -> Result<HeldSet> {
    let path = held_path(vault_dir);
    match std::fs::read(&path) {
        Ok(bytes) => HeldSet::decode(&bytes).with_context(|| {
            format!(
                "{} is damaged; move it aside to drop every held deletion (the files stay in history: `cairn restore`)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HeldSet::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The held summaries of a vault on disk.
pub fn held_summaries(vault_dir: &Path) -> Result<Vec<HeldSummary>> {
    Ok(load_held(vault_dir)?
        .records
        .iter()
        .map(HeldSummary::of)
        .collect())
}

/// What a state change did to the held set.
#[derive(Default)]
pub struct Observed {
    /// Paths held by this change (the mount must stop believing they are gone). Paths no
    /// longer held need no telling: their entries changed, which the view's diff reports.
    pub held: Vec<String>,
}

/// Deletions this close together count as one: `rm -rf` of a large tree through the mount
/// can span several flushes (each one after a short idle pause), and a peer may publish it
/// as several snapshots.
const BURST_MS: u64 = 60_000;
/// At most this many recent deletions are remembered for [`BURST_MS`] (memory stays bounded;
/// a burst past this is held from its next change on).
const BURST_MAX: usize = 200_000;

pub struct Guard {
    dir: PathBuf,
    policy: GuardPolicy,
    set: Mutex<HeldSet>,
    /// Deletions applied (not held) within the last [`BURST_MS`], with when: if the next one
    /// makes the burst too large, they are held with it.
    recent: Mutex<std::collections::VecDeque<(u64, HeldEntry)>>,
    /// The held entries by key, rebuilt when the set changes (read on every view rebuild).
    overrides: RwLock<Arc<BTreeMap<Vec<u8>, Entry>>>,
}

fn key_path(key: &[u8]) -> Option<String> {
    EntryKey::from_bytes(key)
        .ok()
        .map(|k| k.path.as_str().to_string())
}

impl Guard {
    /// Loads the vault's held state. A damaged file is moved aside (named in the log) rather
    /// than stopping the daemon: a hold only keeps deleted files visible, and every one of
    /// them is still in history.
    pub fn open(vault_dir: &Path, policy: GuardPolicy) -> Self {
        let set = match load_held(vault_dir) {
            Ok(s) => s,
            Err(e) => {
                let path = held_path(vault_dir);
                let aside = path.with_extension(format!("damaged-{}", crate::now_ms()));
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(error = %format!("{e:#}"), moved_to = %aside.display(), "held deletions unreadable; holding nothing");
                HeldSet::default()
            }
        };
        let overrides = Arc::new(set.overrides());
        Self {
            dir: vault_dir.to_path_buf(),
            policy,
            set: Mutex::new(set),
            recent: Mutex::new(std::collections::VecDeque::new()),
            overrides: RwLock::new(overrides),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HeldSet> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The held entries, laid over the engine's state in the mount's view.
    pub fn overrides(&self) -> Arc<BTreeMap<Vec<u8>, Entry>> {
        self.overrides
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn summaries(&self) -> Vec<HeldSummary> {
        self.lock().records.iter().map(HeldSummary::of).collect()
    }

    /// What the vault root's `user.cairn.status` says while something is held.
    pub fn note(&self) -> Option<String> {
        let set = self.lock();
        if set.records.is_empty() {
            return None;
        }
        let parts: Vec<String> = set
            .records
            .iter()
            .map(|r| {
                format!(
                    "#{} {} files deleted by {}",
                    r.id,
                    r.files(),
                    r.origin.short()
                )
            })
            .collect();
        Some(format!(
            "held: {} (cairn held / approve / reject)",
            parts.join(", ")
        ))
    }

    /// The records a decision applies to: `id`, or all of them.
    pub fn records(&self, id: Option<u64>) -> Result<Vec<HeldRecord>> {
        let set = self.lock();
        let out: Vec<HeldRecord> = set
            .records
            .iter()
            .filter(|r| id.is_none_or(|id| r.id == id))
            .cloned()
            .collect();
        match (id, out.is_empty()) {
            (Some(id), true) => anyhow::bail!("no held deletion #{id}; see `cairn held`"),
            (None, true) => anyhow::bail!("nothing is held"),
            _ => Ok(out),
        }
    }

    /// Brings the held set up to date after the engine moved from `before` to its current
    /// state (`before == vault.root()` only re-checks what is held).
    pub fn observe(&self, vault: &Vault, before: NodeId, now_ms: u64) -> Result<Observed> {
        let source = vault.source();
        let mut set = self.lock();
        let mut out = Observed::default();
        let mut changed = false;
        for r in &mut set.records {
            let gone = r.prune(&source as &dyn EntrySource)?;
            changed |= !gone.is_empty();
        }
        set.records.retain(|r| !r.entries.is_empty());
        let dels = guard::deletions(vault.stores(), &before, &vault.root())?;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        while recent
            .front()
            .is_some_and(|(t, _)| t.saturating_add(BURST_MS) < now_ms)
        {
            recent.pop_front();
        }
        // The burst: recent deletions still in place, then this change's.
        let mut burst: Vec<HeldEntry> = Vec::new();
        for (_, e) in recent.iter() {
            if source.get(&e.key)?.as_ref() == Some(&e.tombstone) {
                burst.push(e.clone());
            }
        }
        let earlier_files = burst.iter().filter(|e| e.is_file()).count() as u64;
        burst.extend(dels.iter().cloned());
        let files = burst.iter().filter(|e| e.is_file()).count() as u64;
        let mut hold = false;
        if !dels.is_empty() && self.policy.may_hold(files) {
            // The vault as it was before the burst: what `before` had, plus what the
            // burst's earlier changes had already deleted.
            let live_before =
                guard::live_files(&vault.stores().source(before))?.saturating_add(earlier_files);
            hold = self.policy.holds(files, live_before);
            if hold && let Some(origin) = guard::main_author(&burst) {
                recent.clear();
                burst.sort_by(|a, b| a.key.cmp(&b.key));
                burst.dedup_by(|a, b| a.key == b.key);
                let id = set.next_id.max(1);
                set.next_id = id + 1;
                tracing::warn!(
                    id,
                    files,
                    of = live_before,
                    by = %origin.short(),
                    "mass deletion held: the files stay visible until `cairn approve` or `cairn reject`"
                );
                out.held = burst.iter().filter_map(|e| key_path(&e.key)).collect();
                set.records.push(HeldRecord {
                    id,
                    origin,
                    created_ms: now_ms,
                    entries: burst,
                });
                changed = true;
            }
        }
        if !hold {
            for e in dels {
                if recent.len() >= BURST_MAX {
                    recent.pop_front();
                }
                recent.push_back((now_ms, e));
            }
        }
        if changed {
            self.save(&set)?;
            *self.overrides.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set.overrides());
        }
        Ok(out)
    }

    /// Writes the set atomically and durably (temp file, fsync, rename, fsync of the
    /// directory): a crash leaves the old set or the new one.
    fn save(&self, set: &HeldSet) -> Result<()> {
        use std::io::Write;
        let path = held_path(&self.dir);
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .with_context(|| format!("creating a temporary file in {}", self.dir.display()))?;
        tmp.write_all(&set.encode())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}
