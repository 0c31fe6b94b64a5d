//! SQLite persistence of registry heads, the log of accepted entries, and the member list.
//!
//! Settings and why:
//! - WAL journal: readers never block the single writer, and several handles (threads or
//!   processes: the mount daemon and the CLI) share one file.
//! - `synchronous = FULL`: with WAL, NORMAL keeps the file consistent but may forget the last
//!   commits on power loss. An accepted entry is pushed to peers right after the commit; if
//!   we then forgot it, this device would sign a *different* payload under the same revision
//!   after reboot and every peer would refuse it as a conflict. One fsync per publish is a
//!   small price for never equivocating by accident.
//! - `BEGIN IMMEDIATE` for every mutation: the compare-and-swap reads the head and writes the
//!   new one; taking the write lock up front makes that read+write atomic across
//!   connections and processes (a deferred transaction could read, then fail to upgrade).
//! - `busy_timeout`: waiting writers block in SQLite instead of failing at once.
//!
//! Revisions are stored as 8-byte big-endian blobs: SQLite integers are signed 64-bit, and
//! blob comparison of big-endian bytes orders them like the `u64` they are.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_crypto::{DeviceId, VaultId};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::accept::{Outcome, check_authentic, check_cas};
use crate::epoch::EpochRecord;
use crate::names::{DeviceName, NameRecord};
use crate::roster::{MemberRecord, RosterChange};
use crate::{Payload, RegistryEntry, RegistryError, Revision};

const SCHEMA_VERSION: i64 = 4;
/// Revisions per device kept as equivocation evidence: one pair already proves the device
/// signed two states under one number, so more only costs space a hostile device controls.
const MAX_EVIDENCE_PER_DEVICE: i64 = 16;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    vault       BLOB NOT NULL CHECK (length(vault) = 16),
    device      BLOB NOT NULL CHECK (length(device) = 32),
    revision    BLOB NOT NULL CHECK (length(revision) = 8),
    payload     BLOB NOT NULL CHECK (length(payload) = 32),
    signature   BLOB NOT NULL CHECK (length(signature) = 64),
    raw         BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (vault, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entry_log (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    vault       BLOB NOT NULL,
    device      BLOB NOT NULL,
    revision    BLOB NOT NULL,
    payload     BLOB NOT NULL,
    raw         BLOB NOT NULL,
    accepted_at INTEGER NOT NULL,
    UNIQUE (vault, device, revision)
);
-- v2: the signed member list (one winning record per device) and the last socket
-- addresses each device was seen at (with address lookup off, this is how peers find
-- each other again after a restart).
CREATE TABLE IF NOT EXISTS roster (
    vault  BLOB NOT NULL CHECK (length(vault) = 16),
    device BLOB NOT NULL CHECK (length(device) = 32),
    record BLOB NOT NULL,
    PRIMARY KEY (vault, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS addresses (
    vault      BLOB NOT NULL CHECK (length(vault) = 16),
    device     BLOB NOT NULL CHECK (length(device) = 32),
    addrs      TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (vault, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS epochs (
    vault  BLOB NOT NULL CHECK (length(vault) = 16),
    rid    BLOB NOT NULL CHECK (length(rid) = 16),
    epoch  BLOB NOT NULL CHECK (length(epoch) = 8),
    record BLOB NOT NULL,
    PRIMARY KEY (vault, rid)
) WITHOUT ROWID;
-- v3: equivocation evidence. Two validly signed entries of one device with one revision
-- and different payloads; `low` holds the one with the lower payload id (the one every
-- member keeps as the head for that revision, see `Registry::offer`), `high` another one.
-- Both are raw signed entries, so the evidence convinces anyone who receives it.
CREATE TABLE IF NOT EXISTS equivocations (
    vault       BLOB NOT NULL CHECK (length(vault) = 16),
    device      BLOB NOT NULL CHECK (length(device) = 32),
    revision    BLOB NOT NULL CHECK (length(revision) = 8),
    low         BLOB NOT NULL,
    high        BLOB NOT NULL,
    detected_at INTEGER NOT NULL,
    PRIMARY KEY (vault, device, revision)
) WITHOUT ROWID;
-- v4: each device's signed name for itself (see names.rs).
CREATE TABLE IF NOT EXISTS names (
    vault  BLOB NOT NULL CHECK (length(vault) = 16),
    device BLOB NOT NULL CHECK (length(device) = 32),
    record BLOB NOT NULL,
    PRIMARY KEY (vault, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    vault    BLOB NOT NULL CHECK (length(vault) = 16),
    device   BLOB NOT NULL CHECK (length(device) = 32),
    added_at INTEGER NOT NULL,
    PRIMARY KEY (vault, device)
) WITHOUT ROWID;
";

/// What [`Registry::offer`] did with a peer's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offered {
    /// The ordinary compare-and-swap outcome, as from [`Registry::put`].
    Stored(Outcome),
    /// The entry proves its device equivocated; see [`Equivocated`].
    Equivocation(Equivocated),
}

/// An equivocation [`Registry::offer`] just saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Equivocated {
    pub device: DeviceId,
    pub revision: Revision,
    /// The offered entry had the lower payload and became the head for its revision.
    pub head_replaced: bool,
    /// The pair was not known before (worth telling other members about).
    pub new_evidence: bool,
    /// The entry with the same revision this registry held (or logged) before.
    pub other: RegistryEntry,
}

/// Evidence that a device signed two payloads under one revision: both signed entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Equivocation {
    /// The entry with the lower payload id: the one members keep for the revision.
    pub low: RegistryEntry,
    pub high: RegistryEntry,
    pub detected_ms: u64,
}

impl Equivocation {
    pub fn device(&self) -> DeviceId {
        self.low.device
    }

    pub fn revision(&self) -> Revision {
        self.low.revision
    }
}

/// A handle to the registry database. `Send + Sync`: share one handle between threads (calls
/// serialize on its connection) or open one handle per thread on the same file (calls run
/// concurrently, SQLite serializes the writes).
#[derive(Debug)]
pub struct Registry {
    conn: Mutex<Connection>,
    path: Option<PathBuf>,
}

impl Registry {
    /// Open (creating if needed) the registry at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RegistryError> {
        let path = path.as_ref();
        let wrap = |source| RegistryError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(wrap)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(wrap)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(RegistryError::Corrupt(format!(
                "{} refused WAL journal mode (got {mode}); is it on a network filesystem?",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(wrap)?;
        Self::init(conn, Some(path.to_path_buf()))
    }

    /// A private, throw-away registry (tests, simulations).
    pub fn open_in_memory() -> Result<Self, RegistryError> {
        Self::init(Connection::open_in_memory()?, None)
    }

    /// Another handle on the same file, for another thread. `None` for in-memory registries.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn init(mut conn: Connection, path: Option<PathBuf>) -> Result<Self, RegistryError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(RegistryError::UnsupportedSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock drops any open transaction, which rolls it back,
        // so the connection behind a poisoned mutex is still in a clean state.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Offer an entry for `vault`. Verifies it, then applies the compare-and-swap rule
    /// atomically with respect to every other handle on the same file. A refusal leaves the
    /// database exactly as it was.
    pub fn put(&self, vault: &VaultId, entry: &RegistryEntry) -> Result<Outcome, RegistryError> {
        // Signature checking needs no lock; do it before blocking other writers.
        check_authentic(vault, entry)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let is_member = member_in(&tx, &entry.vault, &entry.device)?;
        let held = get_in(&tx, &entry.vault, &entry.device)?;
        let outcome = check_cas(is_member, held.as_ref(), entry)?;
        if let Outcome::Accepted { .. } = outcome {
            accept_in(&tx, entry)?;
            tx.commit()?;
        }
        Ok(outcome)
    }

    /// Offer an entry that came from a peer. Like [`put`](Self::put), except that an entry
    /// proving its device equivocated (signed a different payload under a revision this
    /// registry already holds or logged) is not just refused:
    ///
    /// - both entries are kept as evidence (see [`equivocations`](Self::equivocations));
    /// - **the lower payload id wins the revision**: if the incoming entry has the lower
    ///   payload and its revision is the held head's, it replaces the head. Every member
    ///   that sees both entries thus holds the same head whatever the arrival order, so
    ///   members do not silently diverge about what the device's revision N is. (Content
    ///   already merged from the other payload stays merged: merges only add, and every
    ///   member merges every other member's snapshots, so their trees converge as well.)
    ///
    /// The local publish loop must keep using `put`: there a same-revision conflict is an
    /// ordinary lost race between two producers on this device, not evidence.
    pub fn offer(&self, vault: &VaultId, entry: &RegistryEntry) -> Result<Offered, RegistryError> {
        check_authentic(vault, entry)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let is_member = member_in(&tx, &entry.vault, &entry.device)?;
        let held = get_in(&tx, &entry.vault, &entry.device)?;
        let refusal = match check_cas(is_member, held.as_ref(), entry) {
            Ok(outcome @ Outcome::Accepted { .. }) => {
                accept_in(&tx, entry)?;
                tx.commit()?;
                return Ok(Offered::Stored(outcome));
            }
            Ok(Outcome::Unchanged) => return Ok(Offered::Stored(Outcome::Unchanged)),
            Err(e) => e,
        };
        // The other entry of the same revision: the held head, or one logged earlier.
        let other = match &refusal {
            RegistryError::Conflict { .. } => held.clone(),
            RegistryError::Stale { .. } => logged_in(&tx, entry)?,
            _ => None,
        };
        let Some(other) = other.filter(|o| o.payload != entry.payload) else {
            return Err(refusal);
        };
        let new_evidence = store_evidence(&tx, &other, entry)?;
        let head_replaced = settle_revision(&tx, held.as_ref(), entry, &other)?;
        tx.commit()?;
        Ok(Offered::Equivocation(Equivocated {
            device: entry.device,
            revision: entry.revision,
            head_replaced,
            new_evidence,
            other,
        }))
    }

    /// Takes equivocation evidence a peer passed on: two entries of one member with one
    /// revision and different payloads, each checked here. Applies the same rule as
    /// [`offer`](Self::offer) (the lower payload wins the revision if it is the held head's).
    /// Returns whether anything changed (new evidence, or the head replaced).
    pub fn record_equivocation(
        &self,
        vault: &VaultId,
        a: &RegistryEntry,
        b: &RegistryEntry,
    ) -> Result<bool, RegistryError> {
        check_authentic(vault, a)?;
        check_authentic(vault, b)?;
        if a.device != b.device || a.revision != b.revision || a.payload == b.payload {
            return Err(RegistryError::NotEvidence);
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !member_in(&tx, vault, &a.device)? {
            return Err(RegistryError::NotMember {
                vault: *vault,
                device: a.device,
            });
        }
        let new_evidence = store_evidence(&tx, a, b)?;
        let (low, high) = if a.payload < b.payload {
            (a, b)
        } else {
            (b, a)
        };
        let held = get_in(&tx, vault, &a.device)?;
        let head_replaced = settle_revision(&tx, held.as_ref(), low, high)?;
        tx.commit()?;
        Ok(new_evidence || head_replaced)
    }

    /// Every equivocation this registry holds evidence of for `vault`, by device then revision.
    pub fn equivocations(&self, vault: &VaultId) -> Result<Vec<Equivocation>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT device, low, high, detected_at FROM equivocations
             WHERE vault = ?1 ORDER BY device, revision",
        )?;
        let rows = stmt.query_map(params![&vault.0[..]], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (d, low, high, at) = row?;
            out.push(Equivocation {
                low: decode_stored(&vault.0, &d, &low)?,
                high: decode_stored(&vault.0, &d, &high)?,
                detected_ms: u64::try_from(at).unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// [`put`](Self::put) for bytes straight off the network.
    pub fn put_bytes(&self, vault: &VaultId, bytes: &[u8]) -> Result<Outcome, RegistryError> {
        self.put(vault, &RegistryEntry::decode(bytes)?)
    }

    /// The entry held for `device` in `vault`.
    pub fn get(
        &self,
        vault: &VaultId,
        device: &DeviceId,
    ) -> Result<Option<RegistryEntry>, RegistryError> {
        get_in(&self.conn(), vault, device)
    }

    /// Every entry held for `vault`, ordered by device id bytes, so two devices reconciling
    /// walk their lists in the same order.
    pub fn list(&self, vault: &VaultId) -> Result<Vec<RegistryEntry>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT vault, device, raw FROM entries WHERE vault = ?1 ORDER BY device",
        )?;
        let rows = stmt.query_map(params![&vault.0[..]], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (v, d, raw) = row?;
            out.push(decode_stored(&v, &d, &raw)?);
        }
        Ok(out)
    }

    /// Every (revision, payload) this registry accepted from `device` in `vault`, newest first:
    /// the snapshots the device published, as far as this registry saw them.
    pub fn log(
        &self,
        vault: &VaultId,
        device: &DeviceId,
    ) -> Result<Vec<(Revision, Payload)>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT revision, payload FROM entry_log
             WHERE vault = ?1 AND device = ?2 ORDER BY revision DESC",
        )?;
        let rows = stmt.query_map(params![&vault.0[..], &device.0[..]], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (rev, payload) = row?;
            let rev: [u8; 8] = rev
                .try_into()
                .map_err(|_| RegistryError::Corrupt("entry_log revision is not 8 bytes".into()))?;
            let payload: [u8; 32] = payload
                .try_into()
                .map_err(|_| RegistryError::Corrupt("entry_log payload is not 32 bytes".into()))?;
            out.push((Revision(u64::from_be_bytes(rev)), Payload(payload)));
        }
        Ok(out)
    }

    /// Drops log records of `device` whose payload is in `payloads` (snapshots that history
    /// no longer keeps), never the record of the device's current head, which the
    /// compare-and-swap rule and equivocation checks still compare against. Returns how many
    /// went. Equivocation evidence (its own table) is never touched.
    pub fn forget_logged(
        &self,
        vault: &VaultId,
        device: &DeviceId,
        payloads: &[Payload],
    ) -> Result<u64, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head: Option<Vec<u8>> = tx
            .query_row(
                "SELECT revision FROM entries WHERE vault = ?1 AND device = ?2",
                params![&vault.0[..], &device.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        let mut n = 0;
        for p in payloads {
            n += tx.execute(
                "DELETE FROM entry_log WHERE vault = ?1 AND device = ?2 AND payload = ?3
                 AND (?4 IS NULL OR revision != ?4)",
                params![&vault.0[..], &device.0[..], &p.0[..], &head],
            )? as u64;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Allow `device`'s entries for `vault`. Returns false if it already was a member.
    pub fn add_member(&self, vault: &VaultId, device: &DeviceId) -> Result<bool, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO members (vault, device, added_at) VALUES (?1, ?2, ?3)",
            params![&vault.0[..], &device.0[..], unix_millis()],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }

    /// Stop accepting `device`'s entries for `vault`. Entries already held stay (they are
    /// history); deciding whether to ignore them is the engine's business. Returns false if
    /// it was not a member.
    pub fn remove_member(&self, vault: &VaultId, device: &DeviceId) -> Result<bool, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM members WHERE vault = ?1 AND device = ?2",
            params![&vault.0[..], &device.0[..]],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }

    pub fn is_member(&self, vault: &VaultId, device: &DeviceId) -> Result<bool, RegistryError> {
        member_in(&self.conn(), vault, device)
    }

    /// Members of `vault`, ordered by device id bytes.
    pub fn members(&self, vault: &VaultId) -> Result<Vec<DeviceId>, RegistryError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT device FROM members WHERE vault = ?1 ORDER BY device")?;
        let rows = stmt.query_map(params![&vault.0[..]], |row| row.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let d: [u8; 32] = row?
                .try_into()
                .map_err(|_| RegistryError::Corrupt("member device id is not 32 bytes".into()))?;
            out.push(DeviceId(d));
        }
        Ok(out)
    }

    /// The signed member records of `vault` (removals included), ordered by device.
    pub fn roster(&self, vault: &VaultId) -> Result<Vec<MemberRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT record FROM roster WHERE vault = ?1 ORDER BY device")?;
        let rows = stmt.query_map(params![&vault.0[..]], |row| row.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let (r, _) = MemberRecord::decode_prefix(&row?)
                .map_err(|e| RegistryError::Corrupt(format!("stored member record: {e}")))?;
            out.push(r);
        }
        Ok(out)
    }

    /// Merges member records received from a peer (or made locally) into the roster and the
    /// member list, by the rules in [`crate::roster`]. Refused records are reported, not
    /// fatal; every accepted change commits atomically.
    pub fn merge_roster(
        &self,
        vault: &VaultId,
        records: &[MemberRecord],
    ) -> Result<RosterChange, RegistryError> {
        let mut change = RosterChange::default();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Records signed by a device added earlier in the same batch count: a roster is
        // usually sent whole, founder first or not.
        let mut pending: Vec<&MemberRecord> = records.iter().collect();
        loop {
            let mut progressed = false;
            let mut retry = Vec::new();
            for r in pending {
                if r.vault != *vault {
                    change.refused.push((
                        r.device,
                        RegistryError::WrongVault {
                            expected: *vault,
                            got: r.vault,
                        }
                        .to_string(),
                    ));
                    continue;
                }
                if let Err(e) = r.verify() {
                    change.refused.push((r.device, e.to_string()));
                    continue;
                }
                if !member_in(&tx, vault, &r.signer)? && !mutual_removal(&tx, vault, r)? {
                    retry.push(r);
                    continue;
                }
                let held: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT record FROM roster WHERE vault = ?1 AND device = ?2")?
                    .query_row(params![&vault.0[..], &r.device.0[..]], |row| row.get(0))
                    .optional()?;
                if let Some(h) = held {
                    let (h, _) = MemberRecord::decode_prefix(&h).map_err(|e| {
                        RegistryError::Corrupt(format!("stored member record: {e}"))
                    })?;
                    if !r.supersedes(&h) {
                        continue;
                    }
                }
                tx.execute(
                    "INSERT OR REPLACE INTO roster (vault, device, record) VALUES (?1, ?2, ?3)",
                    params![&vault.0[..], &r.device.0[..], r.encode()],
                )?;
                if r.removed {
                    let n = tx.execute(
                        "DELETE FROM members WHERE vault = ?1 AND device = ?2",
                        params![&vault.0[..], &r.device.0[..]],
                    )?;
                    // Where a removed device was reachable is of no use any more, and
                    // must not be passed on to other members.
                    tx.execute(
                        "DELETE FROM addresses WHERE vault = ?1 AND device = ?2",
                        params![&vault.0[..], &r.device.0[..]],
                    )?;
                    if n == 1 {
                        change.removed.push(r.device);
                    }
                } else {
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO members (vault, device, added_at) VALUES (?1, ?2, ?3)",
                        params![&vault.0[..], &r.device.0[..], unix_millis()],
                    )?;
                    if n == 1 {
                        change.added.push(r.device);
                    }
                }
                progressed = true;
            }
            pending = retry;
            if pending.is_empty() || !progressed {
                break;
            }
        }
        for r in pending {
            change.refused.push((
                r.device,
                format!("signed by {}, who is not a member of this vault", r.signer),
            ));
        }
        tx.commit()?;
        Ok(change)
    }

    /// Stores the name records that are valid (signed by the device they name, of this
    /// vault, the device a member) and newer than the one held; returns the devices whose
    /// name changed. Invalid records are skipped: names are cosmetic, a bad one must not
    /// stop the roster exchange that carried it.
    pub fn merge_names(
        &self,
        vault: &VaultId,
        records: &[NameRecord],
    ) -> Result<Vec<DeviceId>, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut changed = Vec::new();
        for r in records {
            if r.vault != *vault || r.verify().is_err() || !member_in(&tx, vault, &r.device)? {
                tracing::debug!(device = %r.device.short(), "refused a device name record");
                continue;
            }
            let held: Option<Vec<u8>> = tx
                .prepare_cached("SELECT record FROM names WHERE vault = ?1 AND device = ?2")?
                .query_row(params![&vault.0[..], &r.device.0[..]], |row| row.get(0))
                .optional()?;
            if let Some(h) = held {
                let (h, _) = NameRecord::decode_prefix(&h)
                    .map_err(|e| RegistryError::Corrupt(format!("stored device name: {e}")))?;
                if !r.supersedes(&h) {
                    continue;
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO names (vault, device, record) VALUES (?1, ?2, ?3)",
                params![&vault.0[..], &r.device.0[..], r.encode()],
            )?;
            if !changed.contains(&r.device) {
                changed.push(r.device);
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// The name records held for the members of `vault`, ordered by device.
    pub fn names(&self, vault: &VaultId) -> Result<Vec<NameRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT record FROM names WHERE vault = ?1
               AND device IN (SELECT device FROM members WHERE vault = ?1)
             ORDER BY device",
        )?;
        let rows = stmt.query_map(params![&vault.0[..]], |row| row.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let (r, _) = NameRecord::decode_prefix(&row?)
                .map_err(|e| RegistryError::Corrupt(format!("stored device name: {e}")))?;
            out.push(r);
        }
        Ok(out)
    }

    /// Every named member's name, for printing.
    pub fn name_map(
        &self,
        vault: &VaultId,
    ) -> Result<std::collections::HashMap<DeviceId, DeviceName>, RegistryError> {
        Ok(self
            .names(vault)?
            .into_iter()
            .map(|r| (r.device, r.name))
            .collect())
    }

    /// Whether `device` was removed from `vault` (a removal record is held).
    pub fn is_removed(&self, vault: &VaultId, device: &DeviceId) -> Result<bool, RegistryError> {
        Ok(self
            .roster(vault)?
            .iter()
            .any(|r| r.device == *device && r.removed))
    }

    /// Stores the key-epoch records that are new, valid (signature, vault) and signed by a
    /// device that is or was a member; returns those. Others are skipped: a record whose
    /// signer is not (yet) known here comes again with the next roster exchange. One epoch
    /// may have several records (its creation, then a share for each device that joined
    /// later). A record by a since-removed member is kept so what was sealed under it stays
    /// readable; the caller never writes under such an epoch (see `cairn_crypto::KeyEpochs`).
    pub fn merge_epochs(
        &self,
        vault: &VaultId,
        records: &[EpochRecord],
    ) -> Result<Vec<EpochRecord>, RegistryError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut added = Vec::new();
        for r in records {
            if r.vault != *vault || r.number == 0 || r.verify().is_err() {
                tracing::debug!(signer = %r.signer.short(), "refused an invalid key epoch record");
                continue;
            }
            let in_roster = tx
                .prepare_cached("SELECT 1 FROM roster WHERE vault = ?1 AND device = ?2")?
                .exists(params![&vault.0[..], &r.signer.0[..]])?;
            if !in_roster && !member_in(&tx, vault, &r.signer)? {
                tracing::debug!(signer = %r.signer.short(), "key epoch record by a non-member");
                continue;
            }
            let bytes = r.encode();
            let hash = blake3::hash(&bytes);
            let n = tx.execute(
                "INSERT OR IGNORE INTO epochs (vault, rid, epoch, record) VALUES (?1, ?2, ?3, ?4)",
                params![&vault.0[..], &hash.as_bytes()[..16], &r.epoch.0[..], bytes],
            )?;
            if n == 1 {
                added.push(r.clone());
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// Every key-epoch record held for `vault`, by epoch number.
    pub fn epochs(&self, vault: &VaultId) -> Result<Vec<EpochRecord>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT record FROM epochs WHERE vault = ?1")?;
        let rows = stmt.query_map(params![&vault.0[..]], |row| row.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for raw in rows {
            let (r, _) = EpochRecord::decode_prefix(&raw?)
                .map_err(|e| RegistryError::Corrupt(format!("stored key epoch record: {e}")))?;
            out.push(r);
        }
        out.sort_by_key(|r| (r.number, r.epoch, r.at_ms));
        Ok(out)
    }

    /// Remembers where member `device` was last reachable (socket addresses as text).
    /// Returns false, storing nothing, if `device` is not a member: a peer must not make
    /// us remember (and later dial, or pass on) addresses of strangers.
    pub fn set_addrs(
        &self,
        vault: &VaultId,
        device: &DeviceId,
        addrs: &[String],
    ) -> Result<bool, RegistryError> {
        let conn = self.conn();
        let n = conn.execute(
            "INSERT OR REPLACE INTO addresses (vault, device, addrs, updated_at)
             SELECT ?1, ?2, ?3, ?4
             WHERE EXISTS (SELECT 1 FROM members WHERE vault = ?1 AND device = ?2)",
            params![&vault.0[..], &device.0[..], addrs.join(","), unix_millis()],
        )?;
        Ok(n == 1)
    }

    /// Last known addresses of every member of `vault`. Addresses of devices that are not
    /// members (any more) are never returned, so they are neither dialed nor passed on.
    pub fn addrs(&self, vault: &VaultId) -> Result<Vec<(DeviceId, Vec<String>)>, RegistryError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT device, addrs FROM addresses WHERE vault = ?1
               AND device IN (SELECT device FROM members WHERE vault = ?1)
             ORDER BY device",
        )?;
        let rows = stmt.query_map(params![&vault.0[..]], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (d, a) = row?;
            let d: [u8; 32] = d
                .try_into()
                .map_err(|_| RegistryError::Corrupt("address device id is not 32 bytes".into()))?;
            let list = a
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            out.push((DeviceId(d), list));
        }
        Ok(out)
    }
}

/// Whether `r` removes the very device that removed `r`'s signer: two members that removed
/// each other (while partitioned). Both removals stand, on every device whatever the order
/// they arrive in; otherwise each side would refuse the other's record (its signer is no
/// longer a member there) and the member lists would split for good.
fn mutual_removal(
    conn: &Connection,
    vault: &VaultId,
    r: &MemberRecord,
) -> Result<bool, RegistryError> {
    if !r.removed {
        return Ok(false);
    }
    let held: Option<Vec<u8>> = conn
        .prepare_cached("SELECT record FROM roster WHERE vault = ?1 AND device = ?2")?
        .query_row(params![&vault.0[..], &r.signer.0[..]], |row| row.get(0))
        .optional()?;
    let Some(held) = held else {
        return Ok(false);
    };
    let (held, _) = MemberRecord::decode_prefix(&held)
        .map_err(|e| RegistryError::Corrupt(format!("stored member record: {e}")))?;
    Ok(held.removed && held.signer == r.device)
}

fn member_in(conn: &Connection, vault: &VaultId, device: &DeviceId) -> Result<bool, RegistryError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM members WHERE vault = ?1 AND device = ?2")?
        .exists(params![&vault.0[..], &device.0[..]])?)
}

/// Stores an entry the compare-and-swap rule accepted: the new head, and a log record.
fn accept_in(conn: &Connection, entry: &RegistryEntry) -> Result<(), RegistryError> {
    store_head(conn, entry)?;
    conn.execute(
        "INSERT INTO entry_log (vault, device, revision, payload, raw, accepted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            &entry.vault.0[..],
            &entry.device.0[..],
            &entry.revision.0.to_be_bytes()[..],
            &entry.payload.0[..],
            &entry.encode()[..],
            unix_millis()
        ],
    )?;
    Ok(())
}

/// Writes `entry` as the held head of its device.
fn store_head(conn: &Connection, entry: &RegistryEntry) -> Result<(), RegistryError> {
    conn.execute(
        "INSERT OR REPLACE INTO entries
             (vault, device, revision, payload, signature, raw, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            &entry.vault.0[..],
            &entry.device.0[..],
            &entry.revision.0.to_be_bytes()[..],
            &entry.payload.0[..],
            &entry.signature.0[..],
            &entry.encode()[..],
            unix_millis()
        ],
    )?;
    Ok(())
}

/// Applies "the lower payload wins the revision" to one equivocated revision: if
/// `candidate` is lower than `other`, it replaces whatever the log holds for that revision,
/// and the head too when the head is at that revision (and higher). Returns whether the head
/// was replaced.
fn settle_revision(
    conn: &Connection,
    held: Option<&RegistryEntry>,
    candidate: &RegistryEntry,
    other: &RegistryEntry,
) -> Result<bool, RegistryError> {
    if candidate.payload >= other.payload {
        return Ok(false);
    }
    let head_replaced =
        held.is_some_and(|h| h.revision == candidate.revision && candidate.payload < h.payload);
    if head_replaced {
        store_head(conn, candidate)?;
    }
    relog(conn, candidate)?;
    Ok(head_replaced)
}

/// Makes `entry` the log's record of its revision (if the log has one), so `log` reports
/// the payload every member keeps for it.
fn relog(conn: &Connection, entry: &RegistryEntry) -> Result<(), RegistryError> {
    conn.execute(
        // Only ever towards a lower payload (blobs compare bytewise, like `Payload`).
        "UPDATE entry_log SET payload = ?4, raw = ?5
         WHERE vault = ?1 AND device = ?2 AND revision = ?3 AND payload > ?4",
        params![
            &entry.vault.0[..],
            &entry.device.0[..],
            &entry.revision.0.to_be_bytes()[..],
            &entry.payload.0[..],
            &entry.encode()[..]
        ],
    )?;
    Ok(())
}

/// The entry the log holds for `entry`'s device and revision.
fn logged_in(
    conn: &Connection,
    entry: &RegistryEntry,
) -> Result<Option<RegistryEntry>, RegistryError> {
    let raw: Option<Vec<u8>> = conn
        .prepare_cached(
            "SELECT raw FROM entry_log WHERE vault = ?1 AND device = ?2 AND revision = ?3",
        )?
        .query_row(
            params![
                &entry.vault.0[..],
                &entry.device.0[..],
                &entry.revision.0.to_be_bytes()[..]
            ],
            |row| row.get(0),
        )
        .optional()?;
    raw.map(|raw| decode_stored(&entry.vault.0, &entry.device.0, &raw))
        .transpose()
}

/// Keeps `a` and `b` (one device, one revision, different payloads) as evidence: the lowest
/// payload seen at that revision and one other. Returns whether the evidence is new (a first
/// pair for the revision, or a payload lower than the kept one). At most
/// [`MAX_EVIDENCE_PER_DEVICE`] revisions are kept per device.
fn store_evidence(
    conn: &Connection,
    a: &RegistryEntry,
    b: &RegistryEntry,
) -> Result<bool, RegistryError> {
    let (low, high) = if a.payload < b.payload {
        (a, b)
    } else {
        (b, a)
    };
    let rev = low.revision.0.to_be_bytes();
    let held: Option<Vec<u8>> = conn
        .prepare_cached(
            "SELECT low FROM equivocations WHERE vault = ?1 AND device = ?2 AND revision = ?3",
        )?
        .query_row(
            params![&low.vault.0[..], &low.device.0[..], &rev[..]],
            |row| row.get(0),
        )
        .optional()?;
    match held {
        Some(raw) => {
            let kept = decode_stored(&low.vault.0, &low.device.0, &raw)?;
            if low.payload >= kept.payload {
                return Ok(false);
            }
            conn.execute(
                "UPDATE equivocations SET low = ?4, high = ?5
                 WHERE vault = ?1 AND device = ?2 AND revision = ?3",
                params![
                    &low.vault.0[..],
                    &low.device.0[..],
                    &rev[..],
                    &low.encode()[..],
                    &raw[..]
                ],
            )?;
            Ok(true)
        }
        None => {
            let n: i64 = conn
                .prepare_cached(
                    "SELECT count(*) FROM equivocations WHERE vault = ?1 AND device = ?2",
                )?
                .query_row(params![&low.vault.0[..], &low.device.0[..]], |row| {
                    row.get(0)
                })?;
            if n >= MAX_EVIDENCE_PER_DEVICE {
                return Ok(false);
            }
            conn.execute(
                "INSERT INTO equivocations (vault, device, revision, low, high, detected_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    &low.vault.0[..],
                    &low.device.0[..],
                    &low.revision.0.to_be_bytes()[..],
                    &low.encode()[..],
                    &high.encode()[..],
                    unix_millis()
                ],
            )?;
            Ok(true)
        }
    }
}

fn get_in(
    conn: &Connection,
    vault: &VaultId,
    device: &DeviceId,
) -> Result<Option<RegistryEntry>, RegistryError> {
    let raw: Option<Vec<u8>> = conn
        .prepare_cached("SELECT raw FROM entries WHERE vault = ?1 AND device = ?2")?
        .query_row(params![&vault.0[..], &device.0[..]], |row| row.get(0))
        .optional()?;
    raw.map(|raw| decode_stored(&vault.0, &device.0, &raw))
        .transpose()
}

/// Rebuild an entry from the stored raw bytes, the single source of truth. The signature
/// was checked on the way in; re-checking the key columns catches a damaged file cheaply.
fn decode_stored(vault: &[u8], device: &[u8], raw: &[u8]) -> Result<RegistryEntry, RegistryError> {
    let entry = RegistryEntry::decode(raw)
        .map_err(|e| RegistryError::Corrupt(format!("stored entry does not decode: {e}")))?;
    if entry.vault.0[..] != *vault || entry.device.0[..] != *device {
        return Err(RegistryError::Corrupt(
            "stored entry bytes do not match its vault/device columns".into(),
        ));
    }
    Ok(entry)
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_crypto::DeviceKey;

    #[test]
    fn file_database_uses_wal_full_sync_and_busy_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path().join("r.db")).unwrap();
        let conn = reg.conn();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous should be FULL");
        let busy: i64 = conn
            .pragma_query_value(None, "busy_timeout", |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 5000);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        drop(Registry::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            Registry::open(&path),
            Err(RegistryError::UnsupportedSchema { found, supported })
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION
        ));
    }

    #[test]
    fn members_add_remove_list() {
        let reg = Registry::open_in_memory().unwrap();
        let v = VaultId([1; 16]);
        let other = VaultId([2; 16]);
        let mut ids: Vec<DeviceId> = (0..5).map(|_| DeviceKey::generate().device_id()).collect();
        for id in &ids {
            assert!(reg.add_member(&v, id).unwrap());
        }
        assert!(!reg.add_member(&v, &ids[0]).unwrap());
        ids.sort();
        assert_eq!(reg.members(&v).unwrap(), ids);
        assert!(reg.members(&other).unwrap().is_empty());
        assert!(!reg.is_member(&other, &ids[0]).unwrap());
        assert!(reg.remove_member(&v, &ids[2]).unwrap());
        assert!(!reg.remove_member(&v, &ids[2]).unwrap());
        assert!(!reg.is_member(&v, &ids[2]).unwrap());
        ids.remove(2);
        assert_eq!(reg.members(&v).unwrap(), ids);
    }

    #[test]
    fn removed_member_keeps_history_but_cannot_publish() {
        let reg = Registry::open_in_memory().unwrap();
        let v = VaultId([1; 16]);
        let k = DeviceKey::generate();
        reg.add_member(&v, &k.device_id()).unwrap();
        let e1 = RegistryEntry::sign(&k, v, Revision(1), Payload([1; 32]));
        reg.put(&v, &e1).unwrap();
        reg.remove_member(&v, &k.device_id()).unwrap();
        let e2 = RegistryEntry::sign(&k, v, Revision(2), Payload([2; 32]));
        assert!(matches!(
            reg.put(&v, &e2),
            Err(RegistryError::NotMember { .. })
        ));
        assert_eq!(reg.get(&v, &k.device_id()).unwrap(), Some(e1));
    }

    #[test]
    fn corrupt_stored_row_is_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let reg = Registry::open(&path).unwrap();
        let v = VaultId([1; 16]);
        let k = DeviceKey::generate();
        reg.add_member(&v, &k.device_id()).unwrap();
        reg.put(
            &v,
            &RegistryEntry::sign(&k, v, Revision(1), Payload([1; 32])),
        )
        .unwrap();
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE entries SET raw = x'0102'", [])
            .unwrap();
        assert!(matches!(
            reg.get(&v, &k.device_id()),
            Err(RegistryError::Corrupt(_))
        ));
        assert!(matches!(reg.list(&v), Err(RegistryError::Corrupt(_))));
    }

    #[test]
    fn revisions_above_i64_max_order_correctly() {
        let reg = Registry::open_in_memory().unwrap();
        let v = VaultId([1; 16]);
        let k = DeviceKey::generate();
        reg.add_member(&v, &k.device_id()).unwrap();
        for rev in [1u64, 1 << 40, (1 << 63) + 5, u64::MAX] {
            reg.put(
                &v,
                &RegistryEntry::sign(&k, v, Revision(rev), Payload([rev as u8; 32])),
            )
            .unwrap();
        }
        let revs: Vec<u64> = reg
            .log(&v, &k.device_id())
            .unwrap()
            .iter()
            .map(|(r, _)| r.0)
            .collect();
        assert_eq!(revs, vec![u64::MAX, (1 << 63) + 5, 1 << 40, 1]);
        // And the CAS compares them as u64, not as signed integers.
        let low = RegistryEntry::sign(&k, v, Revision(1 << 62), Payload([0; 32]));
        assert!(matches!(
            reg.put(&v, &low),
            Err(RegistryError::Stale { .. })
        ));
    }
}
