use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::error::OverlayError;
use crate::path::{name_of, now_ns, parent_of};
use crate::record::{Data, Kind, Record, StagingId, decode_xattrs, encode_xattrs};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    path TEXT PRIMARY KEY NOT NULL,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    atime_ns INTEGER,
    size INTEGER NOT NULL,
    xattrs BLOB NOT NULL,
    data_kind INTEGER NOT NULL,
    data_blob BLOB,
    staging INTEGER,
    generation INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_parent ON records(parent, name);
CREATE INDEX IF NOT EXISTS records_by_staging ON records(staging) WHERE staging IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID;
";

const COLUMNS: &str = "path, kind, mode, uid, gid, mtime_ns, ctime_ns, atime_ns, size, xattrs, \
                       data_kind, data_blob, staging, generation";

/// The root has no parent; this value can never be a vault path, so the root never shows up
/// among anybody's children.
const ROOT_PARENT: &str = "/";

/// The result of a mutation: the generation stamped on the records it wrote, and the staging
/// files no record references any more. The overlay never deletes those itself because an
/// open file handle may still be using one; the caller removes them with
/// [`Overlay::remove_staging`] once nothing holds them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub generation: u64,
    pub released: Vec<StagingId>,
}

/// How long mutations may sit in an uncommitted group transaction by default. A commit is
/// cheap (no fsync) but not free: one per create/write was most of the cost of creating
/// many small files. A killed process loses at most this much unsynced metadata, each
/// operation wholly or not at all, like a local filesystem's journal commit interval.
pub const DEFAULT_GROUP_WINDOW: Duration = Duration::from_millis(10);

/// Bounds the size of one group transaction however busy the mount is.
const GROUP_MAX_OPS: usize = 512;

/// An open group transaction: mutations since `since`, each inside its own savepoint so a
/// failed one rolls back alone.
struct Group {
    since: Instant,
    ops: usize,
    /// Staging files released by the group's mutations. They are deleted only once the
    /// group commits: until then a crash rolls the records back to pointing at them.
    removals: Vec<StagingId>,
}

struct Inner {
    conn: Connection,
    next_gen: u64,
    next_staging: u64,
    group: Option<Group>,
    /// A group commit failed after its mutations had been acknowledged: the next
    /// [`Overlay::durable_barrier`] reports it (like writeback errors surfacing at fsync).
    lost_commit: bool,
    shutdown: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the committer when a group opens or the overlay closes.
    cv: Condvar,
    staging_dir: PathBuf,
    window: Duration,
}

/// The durable overlay: `<dir>/journal.sqlite` plus `<dir>/staging/<id>`. Cheap to share
/// behind an `Arc`; every method takes `&self` and serialises on one connection.
pub struct Overlay {
    dir: PathBuf,
    staging_dir: PathBuf,
    journal_path: PathBuf,
    shared: Arc<Shared>,
    committer: Option<JoinHandle<()>>,
    _lock: File,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("dir", &self.dir).finish()
    }
}

/// The `parent` column. Unlike [`parent_of`], the root gets [`ROOT_PARENT`]: as its own
/// parent it would be listed among its own children.
fn parent_column(path: &str) -> &str {
    if path.is_empty() {
        ROOT_PARENT
    } else {
        parent_of(path)
    }
}

fn check_path(path: &str) -> Result<(), OverlayError> {
    let bad = |reason| {
        Err(OverlayError::InvalidPath {
            path: path.to_string(),
            reason,
        })
    };
    if path.is_empty() {
        return Ok(());
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    for comp in path.split('/') {
        if comp.is_empty() {
            return bad("leading, trailing or doubled '/'");
        }
        if comp == "." || comp == ".." {
            return bad("'.' and '..' are not vault path components");
        }
    }
    Ok(())
}

/// Upper bound (exclusive) of the descendants of `path` in byte order: every descendant
/// starts with `path/`, and '0' is the byte right after '/'.
fn subtree_bounds(path: &str) -> (String, String) {
    (format!("{path}/"), format!("{path}0"))
}

impl Overlay {
    /// Opens (creating if needed) the overlay in `dir`. Replaying the journal is just loading
    /// it: every committed record is already the current state. Staging files that no record
    /// references (written by a process that died before recording them, or released but
    /// not yet deleted) are deleted.
    pub fn open(dir: impl AsRef<Path>) -> Result<Overlay, OverlayError> {
        Self::open_with_window(dir, DEFAULT_GROUP_WINDOW)
    }

    /// [`Overlay::open`] with a chosen group-commit window: how long a mutation may stay
    /// uncommitted (lost by a kill -9) before a background commit. Tests use a long one to
    /// make a crash between group commits deterministic.
    pub fn open_with_window(
        dir: impl AsRef<Path>,
        window: Duration,
    ) -> Result<Overlay, OverlayError> {
        let dir = dir.as_ref().to_path_buf();
        let staging_dir = dir.join("staging");
        let dir_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OverlayError::Dir { path, source }
        };
        fs::create_dir_all(&staging_dir).map_err(dir_err(&staging_dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(dir_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(OverlayError::Locked { path: dir }),
            Err(fs::TryLockError::Error(e)) => return Err(dir_err(&lock_path)(e)),
        }

        let journal_path = dir.join("journal.sqlite");
        let jerr = |source| OverlayError::Journal {
            path: journal_path.clone(),
            source,
        };
        let conn = Connection::open(&journal_path).map_err(jerr)?;
        // Normal (shared) locking, not EXCLUSIVE: only this process writes (the lock file
        // above guarantees it), but `cairn status` reads the journal while the daemon runs
        // (see `pending`). Group commit below is what keeps the per-operation cost low.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(jerr)?;
        // NORMAL in WAL mode fsyncs only at checkpoints, and a checkpoint always syncs the
        // database before reusing the WAL, so the journal is never corrupt; what NORMAL risks
        // is losing the newest commits on power loss, which durable_barrier() covers.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(jerr)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(jerr)?;
        conn.execute_batch(SCHEMA).map_err(jerr)?;

        let max_gen: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(generation), 0) FROM records",
                [],
                |r| r.get(0),
            )
            .map_err(jerr)?;
        let referenced: HashSet<u64> = {
            let mut stmt = conn
                .prepare("SELECT staging FROM records WHERE staging IS NOT NULL")
                .map_err(jerr)?;
            let rows = stmt
                .query_map([], |r| r.get::<_, i64>(0))
                .map_err(jerr)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(jerr)?;
            rows.into_iter().map(|v| v as u64).collect()
        };

        let mut max_staging = referenced.iter().copied().max().unwrap_or(0);
        let mut orphans = 0usize;
        for entry in fs::read_dir(&staging_dir).map_err(dir_err(&staging_dir))? {
            let entry = entry.map_err(dir_err(&staging_dir))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(StagingId::parse) else {
                tracing::warn!(file = ?entry.path(), "ignoring unexpected file in overlay staging directory");
                continue;
            };
            max_staging = max_staging.max(id.0);
            if !referenced.contains(&id.0) {
                fs::remove_file(entry.path()).map_err(|source| OverlayError::Staging {
                    path: entry.path(),
                    source,
                })?;
                orphans += 1;
            }
        }
        if orphans > 0 {
            tracing::info!(
                count = orphans,
                dir = %staging_dir.display(),
                "deleted staging files no overlay record references (left by an interrupted write)"
            );
        }
        let records: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM records WHERE kind < {LOCAL_KIND_MIN}"),
                [],
                |r| r.get(0),
            )
            .map_err(jerr)?;
        if records > 0 {
            tracing::info!(records, dir = %dir.display(), "overlay replayed unflushed changes");
        }

        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                conn,
                next_gen: max_gen as u64 + 1,
                next_staging: max_staging + 1,
                group: None,
                lost_commit: false,
                shutdown: false,
            }),
            cv: Condvar::new(),
            staging_dir: staging_dir.clone(),
            window,
        });
        let committer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("cairn-overlay-commit".into())
                .spawn(move || shared.run_committer())
                .map_err(dir_err(&dir))?
        };

        Ok(Overlay {
            dir,
            staging_dir,
            journal_path,
            shared,
            committer: Some(committer),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// Commits the open group transaction now, if any.
    pub fn commit(&self) -> Result<(), OverlayError> {
        let mut inner = self.lock();
        self.shared
            .commit_group(&mut inner)
            .map_err(|e| self.jerr(e))
    }

    /// Test support: stops like a killed process would, abandoning the open group (its
    /// mutations and the deletion of the staging files they released) without committing.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.stop_committer();
        let mut inner = self.lock();
        inner.group = None;
        if !inner.conn.is_autocommit() {
            let _ = inner.conn.execute_batch("ROLLBACK");
        }
    }

    fn stop_committer(&mut self) {
        self.lock().shutdown = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.committer.take()
            && t.join().is_err()
        {
            tracing::error!("overlay commit thread panicked");
        }
    }

    fn jerr(&self, source: rusqlite::Error) -> OverlayError {
        OverlayError::Journal {
            path: self.journal_path.clone(),
            source,
        }
    }

    pub fn staging_path(&self, id: StagingId) -> PathBuf {
        self.staging_dir.join(id.to_string())
    }

    pub fn get(&self, path: &str) -> Result<Option<Record>, OverlayError> {
        check_path(path)?;
        let inner = self.lock();
        get_in(&inner.conn, path).map_err(|e| self.map_read(e))
    }

    /// Direct children of `dir` (whiteouts included), sorted by name. Served by the
    /// (parent, name) index, so the cost is the size of this directory, not of the journal.
    pub fn children(&self, dir: &str) -> Result<Vec<(String, Record)>, OverlayError> {
        check_path(dir)?;
        let inner = self.lock();
        let mut stmt = inner
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM records WHERE parent = ?1 ORDER BY name"
            ))
            .map_err(|e| self.jerr(e))?;
        let rows = stmt
            .query_map([dir], row_to_record)
            .map_err(|e| self.jerr(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (path, rec) = row.map_err(|e| self.jerr(e))??;
            out.push((name_of(&path).to_string(), rec));
        }
        Ok(out)
    }

    /// Every record, in path order: what a flush has to fold into the next snapshot.
    pub fn dirty(&self) -> Result<Vec<(String, Record)>, OverlayError> {
        let mut inner = self.lock();
        // A snapshot must never hold changes a crash could still take out of the overlay:
        // the overlay would then come back older than the snapshot and shadow it.
        self.shared
            .commit_group(&mut inner)
            .map_err(|e| self.jerr(e))?;
        let mut stmt = inner
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM records WHERE kind < {LOCAL_KIND_MIN} ORDER BY path"
            ))
            .map_err(|e| self.jerr(e))?;
        let rows = stmt
            .query_map([], row_to_record)
            .map_err(|e| self.jerr(e))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(|e| self.jerr(e))??);
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> Result<bool, OverlayError> {
        let inner = self.lock();
        let n: i64 = inner
            .conn
            .query_row(
                &format!("SELECT COUNT(*) FROM records WHERE kind < {LOCAL_KIND_MIN}"),
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.jerr(e))?;
        Ok(n == 0)
    }

    pub fn is_referenced(&self, id: StagingId) -> Result<bool, OverlayError> {
        let inner = self.lock();
        is_referenced_in(&inner.conn, id).map_err(|e| self.jerr(e))
    }

    /// Writes `record` at `path`, replacing whatever was there.
    pub fn put(&self, path: &str, record: Record) -> Result<Change, OverlayError> {
        check_path(path)?;
        self.mutate(|tx, generation| {
            let old = get_in(tx, path)?;
            let mut record = record;
            record.generation = generation;
            upsert(tx, path, &record)?;
            let mut released = Vec::new();
            release_if_orphaned(tx, old.and_then(|r| r.staging()), &mut released)?;
            Ok(released)
        })
    }

    /// Writes several records in one transaction (one generation, one commit): materialising
    /// a renamed directory's base entries is one operation, not one commit per entry.
    pub fn put_many(&self, records: Vec<(String, Record)>) -> Result<Change, OverlayError> {
        for (path, _) in &records {
            check_path(path)?;
        }
        self.mutate(|tx, generation| {
            let mut released = Vec::new();
            let mut old_ids = Vec::new();
            for (path, mut record) in records {
                if let Some(id) = get_in(tx, &path)?.and_then(|r| r.staging()) {
                    old_ids.push(id);
                }
                record.generation = generation;
                upsert(tx, &path, &record)?;
            }
            for id in old_ids {
                release_if_orphaned(tx, Some(id), &mut released)?;
            }
            Ok(released)
        })
    }

    /// Records a deletion of the base layer's entry at `path`.
    pub fn whiteout(&self, path: &str) -> Result<Change, OverlayError> {
        self.put(path, Record::whiteout(now_ns()))
    }

    /// Forgets `path` entirely (for entries the base layer never had).
    pub fn remove(&self, path: &str) -> Result<Change, OverlayError> {
        check_path(path)?;
        self.mutate(|tx, _| {
            let old = get_in(tx, path)?;
            tx.execute("DELETE FROM records WHERE path = ?1", [path])?;
            let mut released = Vec::new();
            release_if_orphaned(tx, old.and_then(|r| r.staging()), &mut released)?;
            Ok(released)
        })
    }

    /// Moves the records of `from` and its descendants to `to`, in one transaction.
    ///
    /// Non-whiteout records already at or under `to` are replaced (their staging files are
    /// released); whiteouts under `to` stay unless a moved record lands on them, because
    /// they still hide base entries there. Whiteouts at or under `from` stay where they are
    /// for the same reason. Records whose data is [`Data::Base`] refer to the base at their
    /// old path and are refused ([`OverlayError::UnpinnedBase`]): the caller pins them first.
    /// The caller also adds whiteouts for base entries left visible at the old paths.
    pub fn rename_subtree(&self, from: &str, to: &str) -> Result<Change, OverlayError> {
        check_path(from)?;
        check_path(to)?;
        check_move(from, to)?;
        self.mutate(|tx, generation| {
            let mut released = Vec::new();
            move_subtree(tx, from, to, generation, &mut released)?;
            Ok(released)
        })
    }

    /// Swaps the subtrees at `a` and `b` atomically (`renameat2(RENAME_EXCHANGE)`), with the
    /// same rules as [`Overlay::rename_subtree`].
    pub fn exchange_subtrees(&self, a: &str, b: &str) -> Result<Change, OverlayError> {
        check_path(a)?;
        check_path(b)?;
        check_move(a, b)?;
        check_move(b, a)?;
        if a == b {
            return self.mutate(|_, _| Ok(Vec::new()));
        }
        // Parking place for `a` while `b` moves in: a leading '/' is refused by check_path,
        // so no real record can live there, and it only exists inside this transaction.
        let tmp = "/cairn-exchange";
        self.mutate(|tx, generation| {
            let mut released = Vec::new();
            move_subtree(tx, a, tmp, generation, &mut released)?;
            move_subtree(tx, b, a, generation, &mut released)?;
            move_subtree(tx, tmp, b, generation, &mut released)?;
            Ok(released)
        })
    }

    /// Drops the records a flush committed, but only those whose generation is still the one
    /// the flush saw: anything changed meanwhile stays dirty for the next flush. Returns the
    /// staging files that became unreferenced (see [`Change`] for who deletes them).
    pub fn retire(&self, committed: &[(String, u64)]) -> Result<Vec<StagingId>, OverlayError> {
        self.retire_keeping_owners(committed, None)
    }

    /// [`Overlay::retire`], except that a committed record whose owner differs from
    /// `default_owner` (uid, gid) becomes a [`Kind::Owner`] record instead of going: the
    /// snapshot has no owners, so this device keeps the `chown` locally.
    pub fn retire_keeping_owners(
        &self,
        committed: &[(String, u64)],
        default_owner: Option<(u32, u32)>,
    ) -> Result<Vec<StagingId>, OverlayError> {
        let mut inner = self.lock();
        let result = (|| {
            self.shared.commit_group(&mut inner)?;
            let tx = Transaction::new(&mut inner.conn, TransactionBehavior::Immediate)?;
            let mut released = Vec::new();
            for (path, generation) in committed {
                let row: Option<(i64, u32, u32, Option<i64>)> = tx
                    .query_row(
                        "SELECT kind, uid, gid, staging FROM records \
                         WHERE path = ?1 AND generation = ?2",
                        params![path, *generation as i64],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()?;
                let Some((kind, uid, gid, staging)) = row else {
                    continue;
                };
                let keep = kind != kind_code(Kind::Whiteout)
                    && default_owner.is_some_and(|d| d != (uid, gid));
                if keep {
                    tx.execute(
                        "UPDATE records SET kind = ?2, size = 0, xattrs = x'', data_kind = 0, \
                         data_blob = NULL, staging = NULL WHERE path = ?1",
                        params![path, kind_code(Kind::Owner)],
                    )?;
                } else {
                    tx.execute("DELETE FROM records WHERE path = ?1", [path])?;
                }
                if let Some(id) = staging {
                    release_if_orphaned(&tx, Some(StagingId(id as u64)), &mut released)?;
                }
            }
            tx.commit()?;
            Ok(released)
        })();
        result.map_err(|e| self.jerr(e))
    }

    /// Creates a new, empty staging file. It is not referenced by any record until the caller
    /// puts one with [`Data::Staged`]; if the process dies first, the next open deletes it.
    pub fn create_staging(&self) -> Result<(StagingId, File), OverlayError> {
        let id = {
            let mut inner = self.lock();
            let id = StagingId(inner.next_staging);
            inner.next_staging += 1;
            id
        };
        let path = self.staging_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| OverlayError::Staging { path, source })?;
        Ok((id, file))
    }

    pub fn open_staging(&self, id: StagingId) -> Result<File, OverlayError> {
        let path = self.staging_path(id);
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| OverlayError::Staging { path, source })
    }

    /// Deletes a staging file; a file that is already gone is not an error. While a group
    /// transaction is open the deletion waits for its commit, because the release that made
    /// the file unreferenced is not durable yet.
    pub fn remove_staging(&self, id: StagingId) -> Result<(), OverlayError> {
        {
            let mut inner = self.lock();
            if let Some(g) = inner.group.as_mut() {
                g.removals.push(id);
                return Ok(());
            }
        }
        remove_staging_file(&self.staging_dir, id)
    }

    /// Makes everything committed so far survive power loss. Staging file *contents* are the
    /// caller's to fsync; this makes the staging directory entries and the journal durable.
    pub fn durable_barrier(&self) -> Result<(), OverlayError> {
        File::open(&self.staging_dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| OverlayError::Staging {
                path: self.staging_dir.clone(),
                source,
            })?;
        let mut inner = self.lock();
        self.shared
            .commit_group(&mut inner)
            .map_err(|e| self.jerr(e))?;
        if std::mem::take(&mut inner.lost_commit) {
            return Err(self.jerr(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some(
                    "a group commit failed since the last fsync; changes made since were lost"
                        .into(),
                ),
            )));
        }
        let conn = &inner.conn;
        // One commit with synchronous=FULL fsyncs the WAL. The WAL is append-only and every
        // earlier commit's frames precede this one in it (or were already checkpointed into
        // the database file, which a checkpoint always fsyncs), so this single fsync makes all
        // previous NORMAL commits durable too. The commit must change a page: an empty
        // transaction writes no WAL frame and therefore syncs nothing.
        let result = (|| {
            conn.pragma_update(None, "synchronous", "FULL")?;
            let written = conn.execute(
                "INSERT INTO meta(key, value) VALUES('barrier', 1) \
                 ON CONFLICT(key) DO UPDATE SET value = value + 1",
                [],
            );
            let restored = conn.pragma_update(None, "synchronous", "NORMAL");
            written?;
            restored
        })();
        result.map_err(|e| self.jerr(e))
    }

    /// Runs one mutation inside the group transaction (opening one if needed): atomic on
    /// its own through a savepoint, committed together with its neighbours.
    fn mutate(
        &self,
        f: impl FnOnce(&Connection, u64) -> Result<Vec<StagingId>, MutateError>,
    ) -> Result<Change, OverlayError> {
        let mut inner = self.lock();
        let generation = inner.next_gen;
        let result = (|| {
            if inner.group.is_none() {
                inner.conn.execute_batch("BEGIN IMMEDIATE")?;
                inner.group = Some(Group {
                    since: Instant::now(),
                    ops: 0,
                    removals: Vec::new(),
                });
                self.shared.cv.notify_all();
            }
            let sp = inner.conn.savepoint()?;
            let released = f(&sp, generation)?;
            sp.commit()?;
            Ok(released)
        })();
        if let Err(e) = self.shared.end_op(&mut inner, result.is_ok()) {
            return Err(self.jerr(e));
        }
        match result {
            Ok(released) => {
                inner.next_gen += 1;
                Ok(Change {
                    generation,
                    released,
                })
            }
            Err(MutateError::Sql(e)) => Err(self.jerr(e)),
            Err(MutateError::Overlay(e)) => Err(e),
        }
    }

    fn map_read(&self, e: MutateError) -> OverlayError {
        match e {
            MutateError::Sql(e) => self.jerr(e),
            MutateError::Overlay(e) => e,
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.stop_committer();
        let mut inner = self.lock();
        if let Err(e) = self.shared.commit_group(&mut inner) {
            tracing::error!(error = %e, "could not commit the overlay journal at close");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-done mutation behind (its
        // savepoint rolls back on drop), so the data behind a poisoned lock is still sound.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bookkeeping after a mutation: commits early when the group is big enough.
    fn end_op(&self, inner: &mut Inner, ok: bool) -> Result<(), rusqlite::Error> {
        let Some(g) = inner.group.as_mut() else {
            return Ok(());
        };
        if ok {
            g.ops += 1;
        }
        if g.ops >= GROUP_MAX_OPS || g.since.elapsed() >= self.window {
            self.commit_group(inner)?;
        }
        Ok(())
    }

    fn commit_group(&self, inner: &mut Inner) -> Result<(), rusqlite::Error> {
        let Some(group) = inner.group.take() else {
            return Ok(());
        };
        if let Err(e) = inner.conn.execute_batch("COMMIT") {
            // The records are back to the last commit, which still references the staging
            // files this group released, so those stay.
            if !inner.conn.is_autocommit() {
                let _ = inner.conn.execute_batch("ROLLBACK");
            }
            tracing::error!(error = %e, ops = group.ops, "overlay group commit failed; its changes are lost");
            inner.lost_commit = true;
            return Err(e);
        }
        for id in group.removals {
            if let Err(e) = remove_staging_file(&self.staging_dir, id) {
                tracing::warn!(error = %e, "could not delete a released staging file; the next open removes it");
            }
        }
        Ok(())
    }

    /// Commits each group once its window has passed, so an idle mount does not keep
    /// acknowledged changes uncommitted.
    fn run_committer(&self) {
        let mut inner = self.lock();
        loop {
            if inner.shutdown {
                return;
            }
            let deadline = inner.group.as_ref().map(|g| g.since + self.window);
            match deadline {
                None => inner = self.cv.wait(inner).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if d <= now {
                        // A failure is logged and remembered for the next fsync.
                        let _ = self.commit_group(&mut inner);
                    } else {
                        inner = self
                            .cv
                            .wait_timeout(inner, d - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        }
    }
}

fn remove_staging_file(staging_dir: &Path, id: StagingId) -> Result<(), OverlayError> {
    let path = staging_dir.join(id.to_string());
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(OverlayError::Staging { path, source }),
    }
}

enum MutateError {
    Sql(rusqlite::Error),
    Overlay(OverlayError),
}

impl From<rusqlite::Error> for MutateError {
    fn from(e: rusqlite::Error) -> Self {
        MutateError::Sql(e)
    }
}

impl From<OverlayError> for MutateError {
    fn from(e: OverlayError) -> Self {
        MutateError::Overlay(e)
    }
}

fn check_move(from: &str, to: &str) -> Result<(), OverlayError> {
    if from.is_empty() || to.is_empty() {
        return Err(OverlayError::InvalidPath {
            path: String::new(),
            reason: "the root cannot be moved or replaced",
        });
    }
    if to.starts_with(&format!("{from}/")) {
        return Err(OverlayError::IntoOwnSubtree {
            from: from.to_string(),
            to: to.to_string(),
        });
    }
    Ok(())
}

fn move_subtree(
    tx: &Connection,
    from: &str,
    to: &str,
    generation: u64,
    released: &mut Vec<StagingId>,
) -> Result<(), MutateError> {
    if from == to {
        return Ok(());
    }
    let (lo, hi) = subtree_bounds(from);
    let mut moving = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM records WHERE (path = ?1 OR (path >= ?2 AND path < ?3)) \
             AND kind != ?4 ORDER BY path"
        ))?;
        let rows = stmt.query_map(
            params![from, lo, hi, kind_code(Kind::Whiteout)],
            row_to_record,
        )?;
        for row in rows {
            moving.push(row??);
        }
    }
    if let Some((path, _)) = moving.iter().find(|(_, r)| r.data == Data::Base) {
        return Err(OverlayError::UnpinnedBase { path: path.clone() }.into());
    }

    // Clear the destination's live records first; their staging files may become orphans
    // only after the move has settled, so collect candidates and check at the end.
    let (dlo, dhi) = subtree_bounds(to);
    let mut candidates = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "DELETE FROM records WHERE (path = ?1 OR (path >= ?2 AND path < ?3)) AND kind != ?4 \
             RETURNING staging",
        )?;
        let rows = stmt.query_map(params![to, dlo, dhi, kind_code(Kind::Whiteout)], |r| {
            r.get::<_, Option<i64>>(0)
        })?;
        for row in rows {
            if let Some(id) = row? {
                candidates.push(StagingId(id as u64));
            }
        }
    }
    for (path, _) in &moving {
        tx.execute("DELETE FROM records WHERE path = ?1", [path])?;
    }
    for (path, mut rec) in moving {
        let new_path = format!("{to}{}", &path[from.len()..]);
        rec.generation = generation;
        upsert(tx, &new_path, &rec)?;
    }
    for id in candidates {
        release_if_orphaned(tx, Some(id), released)?;
    }
    Ok(())
}

fn release_if_orphaned(
    conn: &Connection,
    id: Option<StagingId>,
    released: &mut Vec<StagingId>,
) -> Result<(), rusqlite::Error> {
    if let Some(id) = id
        && !is_referenced_in(conn, id)?
        && !released.contains(&id)
    {
        released.push(id);
    }
    Ok(())
}

fn is_referenced_in(conn: &Connection, id: StagingId) -> Result<bool, rusqlite::Error> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM records WHERE staging = ?1 LIMIT 1")?;
    stmt.exists([id.0 as i64])
}

fn get_in(conn: &Connection, path: &str) -> Result<Option<Record>, MutateError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM records WHERE path = ?1"))?;
    match stmt.query_row([path], row_to_record).optional()? {
        None => Ok(None),
        Some(r) => Ok(Some(r?.1)),
    }
}

fn upsert(conn: &Connection, path: &str, r: &Record) -> Result<(), rusqlite::Error> {
    let dev_bytes = match r.data {
        Data::Device(d) => d.to_le_bytes(),
        _ => [0; 8],
    };
    let (data_kind, blob, staging): (i64, Option<&[u8]>, Option<i64>) = match &r.data {
        Data::None => (0, None, None),
        Data::Base => (1, None, None),
        Data::Staged(id) => (2, None, Some(id.0 as i64)),
        Data::Target(t) => (3, Some(t.as_slice()), None),
        Data::Content(c) => (4, Some(c.as_slice()), None),
        Data::Device(_) => (5, Some(&dev_bytes[..]), None),
    };
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO records (path, parent, name, kind, mode, uid, gid, mtime_ns, \
         ctime_ns, atime_ns, size, xattrs, data_kind, data_blob, staging, generation) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?;
    stmt.execute(params![
        path,
        parent_column(path),
        name_of(path),
        kind_code(r.kind),
        r.mode,
        r.uid,
        r.gid,
        r.mtime_ns,
        r.ctime_ns,
        r.atime_ns,
        r.size as i64,
        encode_xattrs(&r.xattrs),
        data_kind,
        blob,
        staging,
        r.generation as i64,
    ])?;
    Ok(())
}

fn kind_code(k: Kind) -> i64 {
    match k {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
        Kind::Whiteout => 3,
        Kind::Fifo => LOCAL_KIND_MIN,
        Kind::Socket => 5,
        Kind::CharDev => 6,
        Kind::BlockDev => 7,
        Kind::Owner => 8,
    }
}

/// Kind codes from here on are [`Kind::is_local`]: `dirty`, `is_empty` and the pending
/// listing skip them with `kind < LOCAL_KIND_MIN`.
pub(crate) const LOCAL_KIND_MIN: i64 = 4;

type RowResult = Result<(String, Record), OverlayError>;

fn row_to_record(row: &rusqlite::Row<'_>) -> Result<RowResult, rusqlite::Error> {
    let path: String = row.get(0)?;
    let corrupt = |reason: String| {
        Ok(Err(OverlayError::Corrupt {
            path: path.clone(),
            reason,
        }))
    };
    let kind = match row.get::<_, i64>(1)? {
        0 => Kind::File,
        1 => Kind::Dir,
        2 => Kind::Symlink,
        3 => Kind::Whiteout,
        4 => Kind::Fifo,
        5 => Kind::Socket,
        6 => Kind::CharDev,
        7 => Kind::BlockDev,
        8 => Kind::Owner,
        k => return corrupt(format!("unknown kind {k}")),
    };
    let blob: Option<Vec<u8>> = row.get(11)?;
    let staging: Option<i64> = row.get(12)?;
    let data = match (row.get::<_, i64>(10)?, blob, staging) {
        (0, _, _) => Data::None,
        (1, _, _) => Data::Base,
        (2, _, Some(id)) => Data::Staged(StagingId(id as u64)),
        (3, Some(t), _) => Data::Target(t),
        (4, Some(c), _) => Data::Content(c),
        (5, Some(d), _) => match <[u8; 8]>::try_from(d.as_slice()) {
            Ok(b) => Data::Device(u64::from_le_bytes(b)),
            Err(_) => return corrupt(format!("device number of {} bytes", d.len())),
        },
        (k, _, _) => return corrupt(format!("data kind {k} without its payload")),
    };
    let xattrs_raw: Vec<u8> = row.get(9)?;
    let Some(xattrs) = decode_xattrs(&xattrs_raw) else {
        return corrupt("undecodable xattrs".to_string());
    };
    let record = Record {
        kind,
        mode: row.get(2)?,
        uid: row.get(3)?,
        gid: row.get(4)?,
        mtime_ns: row.get(5)?,
        ctime_ns: row.get(6)?,
        atime_ns: row.get(7)?,
        size: row.get::<_, i64>(8)? as u64,
        xattrs,
        data,
        generation: row.get::<_, i64>(13)? as u64,
    };
    Ok(Ok((path, record)))
}
