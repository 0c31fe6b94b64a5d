//! The vault's timeline: every snapshot any member published that this device can read.
//!
//! Each member's snapshot names its previous one as first parent (and the peer snapshots it
//! merged as the others), so walking parents from every member's registry head reaches the
//! whole history of the vault, whoever wrote it. Opening a header costs an age decryption,
//! so what the walk learned is kept in `<state dir>/history.db`, a cache of decoded headers
//! ordered by time: a refresh only opens snapshots it has not seen (the walk stops at known
//! ones), and a page of `cairn log` is one indexed query. The file holds nothing secret
//! beyond what the key files already protect (device ids, times, tree root ids) and can be
//! deleted at any time; it is rebuilt on the next refresh.
//!
//! A snapshot whose header is not here yet (not fetched) or not readable (sealed before
//! this device joined, by a cairn that did not seal to the key epoch) is remembered as a
//! gap and tried again at every refresh; the walk cannot see past it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_crypto::DeviceId;
use cairn_store::ChunkId;
use cairn_tree::NodeId;
use cairn_vault::{Keyring, SnapshotHeader, SnapshotId, VaultStores, load_header};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

const FILE: &str = "history.db";
const SCHEMA_VERSION: i64 = 1;
/// A header names at most this many parents (`cairn_vault::snapshot::MAX_PARENTS`).
const MAX_PARENTS: usize = 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS snapshots (
    id         BLOB PRIMARY KEY CHECK (length(id) = 32),
    device     BLOB NOT NULL CHECK (length(device) = 32),
    created_ms INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    root       BLOB NOT NULL CHECK (length(root) = 32),
    parents    BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS snapshots_by_time ON snapshots (created_ms DESC, device, id);
CREATE TABLE IF NOT EXISTS gaps (
    id BLOB PRIMARY KEY CHECK (length(id) = 32)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pruned (
    id         BLOB PRIMARY KEY CHECK (length(id) = 32),
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pruned_by_time ON pruned (created_ms);
";

/// One snapshot of the timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: SnapshotId,
    pub device: DeviceId,
    pub created_ms: u64,
    /// The author's own sequence number (1 for its first snapshot).
    pub seq: u64,
    pub root: NodeId,
    /// The author's previous snapshot first, then the peer snapshots it merged.
    pub parents: Vec<SnapshotId>,
}

impl SnapInfo {
    fn of(id: SnapshotId, h: &SnapshotHeader) -> Self {
        Self {
            id,
            device: h.device,
            created_ms: h.created_ms,
            seq: h.seq,
            root: h.root,
            parents: h.parents.clone(),
        }
    }
}

/// Which part of the timeline to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Only snapshots created strictly before this time (paging).
    pub before_ms: Option<u64>,
    /// Only this device's snapshots.
    pub device: Option<DeviceId>,
    pub limit: usize,
}

/// [`Timeline::newest_first`]: the pages of [`Timeline::page`] as one sequence. Pages never end
/// inside a millisecond, so "strictly before the last row's time" continues without a gap.
pub struct NewestFirst<'a> {
    timeline: &'a Timeline,
    query: Query,
    page: std::collections::VecDeque<SnapInfo>,
    done: bool,
}

impl Iterator for NewestFirst<'_> {
    type Item = Result<SnapInfo>;

    fn next(&mut self) -> Option<Result<SnapInfo>> {
        if self.page.is_empty() && !self.done {
            match self.timeline.page(&self.query) {
                Ok(page) => {
                    // A short page (an empty one too) is the end of history.
                    self.done = page.len() < self.query.limit;
                    if let Some(last) = page.last() {
                        self.query.before_ms = Some(last.created_ms);
                    }
                    self.page = page.into();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        self.page.pop_front().map(Ok)
    }
}

/// What a refresh found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    pub added: usize,
    /// Snapshots referenced but not readable here (yet).
    pub gaps: usize,
}

pub struct Timeline {
    conn: Mutex<Connection>,
}

impl Timeline {
    /// Opens (creating) the index in the vault's state directory. An index this cairn cannot
    /// read is a cache: it is dropped and rebuilt.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        match Self::open_file(&path) {
            Ok(t) => Ok(t),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "rebuilding the history index");
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(dir.join(format!("{FILE}-wal")));
                let _ = std::fs::remove_file(dir.join(format!("{FILE}-shm")));
                Self::open_file(&path)
            }
        }
    }

    fn open_file(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the history index {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // A cache: losing the last commits on power loss only costs a re-walk.
        let _: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found != 0 && found != SCHEMA_VERSION {
            anyhow::bail!("history index has schema {found}, expected {SCHEMA_VERSION}");
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// An index private to this process (tests).
    pub fn in_memory() -> Result<Self> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Walks from `heads` (and the gaps of earlier walks) to every snapshot not indexed yet,
    /// opening each header through `stores` (which fetch from peers when the daemon runs).
    pub fn refresh(
        &self,
        stores: &VaultStores,
        keys: &Keyring,
        heads: impl IntoIterator<Item = SnapshotId>,
    ) -> Result<Refreshed> {
        let mut queue: Vec<SnapshotId> = heads.into_iter().collect();
        queue.extend(self.gaps()?);
        let mut seen = HashSet::new();
        let mut found = Vec::new();
        let mut gaps = Vec::new();
        while let Some(id) = queue.pop() {
            if !seen.insert(id) || self.contains(&id)? {
                continue;
            }
            match load_header(stores, keys, id) {
                Ok(h) => {
                    queue.extend(h.parents.iter().copied());
                    found.push(SnapInfo::of(id, &h));
                }
                Err(e) => {
                    tracing::debug!(snapshot = %id, error = %e, "history: snapshot not readable here");
                    gaps.push(id);
                }
            }
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for s in &found {
            tx.execute(
                "INSERT OR IGNORE INTO snapshots (id, device, created_ms, seq, root, parents)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    &s.id.0.0[..],
                    &s.device.0[..],
                    to_sql(s.created_ms),
                    to_sql(s.seq),
                    &s.root.0[..],
                    encode_parents(&s.parents)
                ],
            )?;
            tx.execute("DELETE FROM gaps WHERE id = ?1", params![&s.id.0.0[..]])?;
        }
        for g in &gaps {
            tx.execute(
                "INSERT OR IGNORE INTO gaps (id) VALUES (?1)",
                params![&g.0.0[..]],
            )?;
        }
        tx.commit()?;
        Ok(Refreshed {
            added: found.len(),
            gaps: gaps.len(),
        })
    }

    /// Indexed, or pruned: either way its parents were walked when it was first found.
    fn contains(&self, id: &SnapshotId) -> Result<bool> {
        let conn = self.conn();
        Ok(conn
            .prepare_cached("SELECT 1 FROM snapshots WHERE id = ?1")?
            .exists(params![&id.0.0[..]])?
            || conn
                .prepare_cached("SELECT 1 FROM pruned WHERE id = ?1")?
                .exists(params![&id.0.0[..]])?)
    }

    /// Moves snapshots out of the timeline into the pruned list, in one transaction: listings
    /// stop showing them, and readers can tell "pruned" from "never existed". Prune calls
    /// this before it deletes any of their blobs.
    pub fn mark_pruned(&self, snaps: &[SnapInfo]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for s in snaps {
            tx.execute(
                "INSERT OR IGNORE INTO pruned (id, created_ms) VALUES (?1, ?2)",
                params![&s.id.0.0[..], to_sql(s.created_ms)],
            )?;
            tx.execute(
                "DELETE FROM snapshots WHERE id = ?1",
                params![&s.id.0.0[..]],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// How many pruned snapshots were created in `[from_ms, to_ms]`.
    pub fn pruned_between(&self, from_ms: u64, to_ms: u64) -> Result<u64> {
        let n: i64 = self.conn().query_row(
            "SELECT count(*) FROM pruned WHERE created_ms >= ?1 AND created_ms <= ?2",
            params![to_sql(from_ms), to_sql(to_ms)],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// Every pruned snapshot (their headers are kept; see `crate::prune`).
    pub fn pruned_ids(&self) -> Result<Vec<SnapshotId>> {
        self.ids("SELECT id FROM pruned")
    }

    /// Whether `id` was pruned.
    pub fn is_pruned(&self, id: &SnapshotId) -> Result<bool> {
        Ok(self
            .conn()
            .prepare_cached("SELECT 1 FROM pruned WHERE id = ?1")?
            .exists(params![&id.0.0[..]])?)
    }

    fn gaps(&self) -> Result<Vec<SnapshotId>> {
        self.ids("SELECT id FROM gaps")
    }

    /// The snapshot ids a one-column query returns; rows that are not 32 bytes (a damaged
    /// index) are skipped, the index is only a cache of the registry.
    fn ids(&self, sql: &str) -> Result<Vec<SnapshotId>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(id) = <[u8; 32]>::try_from(r?) {
                out.push(SnapshotId(ChunkId(id)));
            }
        }
        Ok(out)
    }

    /// How many snapshots are indexed, and how many are referenced but unreadable here.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let conn = self.conn();
        let n: i64 = conn.query_row("SELECT count(*) FROM snapshots", [], |r| r.get(0))?;
        let g: i64 = conn.query_row("SELECT count(*) FROM gaps", [], |r| r.get(0))?;
        Ok((n.max(0) as u64, g.max(0) as u64))
    }

    /// A page of the timeline, newest first (ties: by device, then id). A page never ends
    /// inside a millisecond: when the last row shares its time with older ones, they are
    /// added too (the page may exceed `limit`), because the next page starts strictly
    /// before that time and would otherwise skip them.
    pub fn page(&self, q: &Query) -> Result<Vec<SnapInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, device, created_ms, seq, root, parents FROM snapshots
             WHERE created_ms < ?1 AND (?2 IS NULL OR device = ?2)
             ORDER BY created_ms DESC, device, id LIMIT ?3",
        )?;
        let before = q.before_ms.map_or(i64::MAX, to_sql);
        let device = q.device.map(|d| d.0.to_vec());
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![before, &device, limit], row_bytes)?;
        let mut page = rows.map(|r| decode_row(r?)).collect::<Result<Vec<_>>>()?;
        let Some(last_ms) = page.last().map(|s| s.created_ms) else {
            return Ok(page);
        };
        if page.len() < q.limit {
            return Ok(page);
        }
        let mut same = conn.prepare_cached(
            "SELECT id, device, created_ms, seq, root, parents FROM snapshots
             WHERE created_ms = ?1 AND (?2 IS NULL OR device = ?2)
             ORDER BY device, id",
        )?;
        let shown = page.iter().filter(|s| s.created_ms == last_ms).count();
        let rest = same
            .query_map(params![to_sql(last_ms), &device], row_bytes)?
            .skip(shown)
            .map(|r| decode_row(r?))
            .collect::<Result<Vec<_>>>()?;
        page.extend(rest);
        Ok(page)
    }

    /// Every snapshot older than `q.before_ms` (of `q.device`, if set), newest first, read
    /// lazily `q.limit` rows at a time: a caller that stops early reads no further page.
    pub fn newest_first(&self, q: Query) -> NewestFirst<'_> {
        NewestFirst {
            timeline: self,
            query: Query {
                limit: q.limit.max(1),
                ..q
            },
            page: std::collections::VecDeque::new(),
            done: false,
        }
    }

    /// The newest snapshot created at or before `at_ms`, of any member.
    pub fn at_or_before(&self, at_ms: u64) -> Result<Option<SnapInfo>> {
        let next = at_ms.saturating_add(1);
        Ok(self
            .page(&Query {
                before_ms: Some(next),
                device: None,
                limit: 1,
            })?
            .into_iter()
            .next())
    }

    /// The oldest snapshot's time.
    pub fn oldest_ms(&self) -> Result<Option<u64>> {
        let v: Option<i64> = self
            .conn()
            .query_row("SELECT min(created_ms) FROM snapshots", [], |r| r.get(0))
            .optional()?
            .flatten();
        Ok(v.map(|v| v.max(0) as u64))
    }

    pub fn get(&self, id: &SnapshotId) -> Result<Option<SnapInfo>> {
        let conn = self.conn();
        let row = conn
            .prepare_cached(
                "SELECT id, device, created_ms, seq, root, parents FROM snapshots WHERE id = ?1",
            )?
            .query_row(params![&id.0.0[..]], row_bytes)
            .optional()?;
        row.map(decode_row).transpose()
    }
}

type Row = (Vec<u8>, Vec<u8>, i64, i64, Vec<u8>, Vec<u8>);

fn row_bytes(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn decode_row((id, device, created, seq, root, parents): Row) -> Result<SnapInfo> {
    let arr = |v: Vec<u8>, what: &str| -> Result<[u8; 32]> {
        <[u8; 32]>::try_from(v).map_err(|_| {
            anyhow::anyhow!("the history index is damaged ({what}); delete history.db in the vault's state directory")
        })
    };
    Ok(SnapInfo {
        id: SnapshotId(ChunkId(arr(id, "snapshot id")?)),
        device: DeviceId(arr(device, "device id")?),
        created_ms: created.max(0) as u64,
        seq: seq.max(0) as u64,
        root: NodeId(arr(root, "root")?),
        parents: decode_parents(&parents).ok_or_else(|| {
            anyhow::anyhow!("the history index is damaged (parents); delete history.db in the vault's state directory")
        })?,
    })
}

/// SQLite integers are signed: times and counters far beyond any real value saturate.
fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn encode_parents(parents: &[SnapshotId]) -> Vec<u8> {
    parents.iter().flat_map(|p| p.0.0).collect()
}

/// Parent ids stored back to back; `None` unless whole 32-byte ids, at most [`MAX_PARENTS`].
fn decode_parents(b: &[u8]) -> Option<Vec<SnapshotId>> {
    if !b.len().is_multiple_of(32) || b.len() / 32 > MAX_PARENTS {
        return None;
    }
    Some(
        b.chunks_exact(32)
            .map(|c| SnapshotId(ChunkId(c.try_into().expect("32 bytes"))))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(n: u8, device: u8, at: u64, parents: &[u8]) -> SnapInfo {
        SnapInfo {
            id: SnapshotId(ChunkId([n; 32])),
            device: DeviceId([device; 32]),
            created_ms: at,
            seq: n as u64,
            root: NodeId([n; 32]),
            parents: parents
                .iter()
                .map(|p| SnapshotId(ChunkId([*p; 32])))
                .collect(),
        }
    }

    fn insert(t: &Timeline, s: &SnapInfo) {
        t.conn()
            .execute(
                "INSERT INTO snapshots (id, device, created_ms, seq, root, parents)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    &s.id.0.0[..],
                    &s.device.0[..],
                    to_sql(s.created_ms),
                    to_sql(s.seq),
                    &s.root.0[..],
                    encode_parents(&s.parents)
                ],
            )
            .unwrap();
    }

    #[test]
    fn pages_are_newest_first_and_filter_by_device_and_time() {
        let t = Timeline::in_memory().unwrap();
        let all = [
            info(1, 1, 100, &[]),
            info(2, 2, 200, &[1]),
            info(3, 1, 300, &[1, 2]),
            info(4, 2, 300, &[2]),
        ];
        for s in &all {
            insert(&t, s);
        }
        let ids = |v: Vec<SnapInfo>| v.iter().map(|s| s.id.0.0[0]).collect::<Vec<_>>();
        let q = |before, device: Option<u8>, limit| Query {
            before_ms: before,
            device: device.map(|d| DeviceId([d; 32])),
            limit,
        };
        assert_eq!(ids(t.page(&q(None, None, 10)).unwrap()), vec![3, 4, 2, 1]);
        assert_eq!(ids(t.page(&q(None, None, 2)).unwrap()), vec![3, 4]);
        // A page cut inside a millisecond takes the rest of it: the next page starts
        // strictly before 300 and would never show 4.
        assert_eq!(ids(t.page(&q(None, None, 1)).unwrap()), vec![3, 4]);
        assert_eq!(ids(t.page(&q(None, Some(1), 1)).unwrap()), vec![3]);
        let all_of = |query| ids(t.newest_first(query).collect::<Result<Vec<_>>>().unwrap());
        assert_eq!(all_of(q(None, None, 1)), vec![3, 4, 2, 1]);
        assert_eq!(all_of(q(Some(300), None, 1)), vec![2, 1]);
        assert_eq!(all_of(q(None, Some(2), 1)), vec![4, 2]);
        assert_eq!(ids(t.page(&q(Some(300), None, 10)).unwrap()), vec![2, 1]);
        assert_eq!(ids(t.page(&q(None, Some(2), 10)).unwrap()), vec![4, 2]);
        assert_eq!(t.at_or_before(250).unwrap().unwrap().id.0.0[0], 2);
        assert_eq!(t.at_or_before(300).unwrap().unwrap().id.0.0[0], 3);
        assert!(t.at_or_before(99).unwrap().is_none());
        assert_eq!(t.oldest_ms().unwrap(), Some(100));
        assert_eq!(t.get(&all[2].id).unwrap().unwrap(), all[2]);
        assert_eq!(t.counts().unwrap(), (4, 0));
    }

    #[test]
    fn a_damaged_index_is_rebuilt() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), b"not a database at all, not at all").unwrap();
        let t = Timeline::open(d.path()).unwrap();
        assert_eq!(t.counts().unwrap(), (0, 0));
    }

    proptest! {
        #![proptest_config(cairn_fuzzkit::config())]

        #[test]
        fn fuzz_parents_round_trip_and_any_bytes_decode_safely(
            ids in prop::collection::vec(any::<[u8; 32]>(), 0..8),
            junk in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let parents: Vec<SnapshotId> = ids.into_iter().map(|i| SnapshotId(ChunkId(i))).collect();
            prop_assert_eq!(decode_parents(&encode_parents(&parents)), Some(parents));
            if let Some(p) = decode_parents(&junk) {
                prop_assert_eq!(encode_parents(&p), junk);
            }
        }
    }
}
