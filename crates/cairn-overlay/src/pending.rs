//! A read-only look at an overlay that may be in use: what `cairn status` reports as pending
//! uploads. It never takes the overlay's lock and opens the journal read-only, so it can run
//! beside the daemon that owns the overlay (SQLite's WAL mode lets a reader see the last
//! committed state while the writer continues).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use crate::error::OverlayError;

/// One path with a change not yet folded into a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingPath {
    pub path: String,
    /// A local deletion (whiteout) rather than new content or metadata.
    pub deleted: bool,
    /// Bytes of file content to upload (0 for directories, symlinks, deletions and
    /// metadata-only changes).
    pub bytes: u64,
}

/// Every pending path of the overlay in `dir`, in path order. A directory without a journal
/// (never mounted) has nothing pending.
pub fn read_pending(dir: &Path) -> Result<Vec<PendingPath>, OverlayError> {
    let Some((conn, jerr)) = open_read_only(dir)? else {
        return Ok(Vec::new());
    };
    // kind 3 = whiteout, data_kind 2 = staged content, kinds from LOCAL_KIND_MIN on are
    // never uploaded (see journal.rs).
    let mut stmt = conn
        .prepare(&format!(
            "SELECT path, kind, CASE WHEN data_kind = 2 THEN size ELSE 0 END \
                 FROM records WHERE path != '' AND kind < {} ORDER BY path",
            crate::journal::LOCAL_KIND_MIN
        ))
        .map_err(&jerr)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(PendingPath {
                path: r.get(0)?,
                deleted: r.get::<_, i64>(1)? == 3,
                bytes: r.get::<_, i64>(2)?.max(0) as u64,
            })
        })
        .map_err(&jerr)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(&jerr)
}

/// The base-content references (`Data::Content`) held by pending records of the overlay in
/// `dir`: content that is not in any snapshot this device published yet (a renamed base file
/// that the base may have dropped meanwhile), which garbage collection must keep. Read-only,
/// like [`read_pending`].
pub fn read_content_refs(dir: &Path) -> Result<Vec<Vec<u8>>, OverlayError> {
    let Some((conn, jerr)) = open_read_only(dir)? else {
        return Ok(Vec::new());
    };
    // data_kind 4 = Data::Content (see journal.rs).
    let mut stmt = conn
        .prepare("SELECT data_blob FROM records WHERE data_kind = 4 AND data_blob IS NOT NULL")
        .map_err(&jerr)?;
    let rows = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .map_err(&jerr)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(&jerr)
}

/// The journal of the overlay in `dir`, opened read-only beside a possibly running daemon,
/// with the error mapping that names it; `None` when there is no journal (never mounted).
#[allow(clippy::type_complexity)]
fn open_read_only(
    dir: &Path,
) -> Result<Option<(Connection, impl Fn(rusqlite::Error) -> OverlayError)>, OverlayError> {
    let journal = dir.join("journal.sqlite");
    if !journal.exists() {
        return Ok(None);
    }
    let jerr = move |source| OverlayError::Journal {
        path: journal.clone(),
        source,
    };
    let conn = Connection::open_with_flags(
        dir.join("journal.sqlite"),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&jerr)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(&jerr)?;
    Ok(Some((conn, jerr)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Data, Kind, Overlay, Record};
    use std::collections::BTreeMap;
    use std::io::Write;

    fn file(size: u64, data: Data) -> Record {
        Record {
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1,
            ctime_ns: 1,
            atime_ns: None,
            size,
            xattrs: BTreeMap::new(),
            data,
            generation: 0,
        }
    }

    #[test]
    fn reads_pending_paths_while_the_overlay_is_open() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_pending(d.path()).unwrap().is_empty());
        let o = Overlay::open(d.path()).unwrap();
        let (id, mut f) = o.create_staging().unwrap();
        f.write_all(b"hello").unwrap();
        o.put("a.txt", file(5, Data::Staged(id))).unwrap();
        o.put("meta-only", file(99, Data::Base)).unwrap();
        o.whiteout("gone").unwrap();
        // Readers see what the journal committed; the writer groups commits over a few ms.
        o.commit().unwrap();
        let p = read_pending(d.path()).unwrap();
        assert_eq!(
            p,
            vec![
                PendingPath {
                    path: "a.txt".into(),
                    deleted: false,
                    bytes: 5
                },
                PendingPath {
                    path: "gone".into(),
                    deleted: true,
                    bytes: 0
                },
                PendingPath {
                    path: "meta-only".into(),
                    deleted: false,
                    bytes: 0
                },
            ]
        );
        drop(o);
        // Closed overlay: still readable, and the reader left no lock behind.
        assert_eq!(read_pending(d.path()).unwrap().len(), 3);
        Overlay::open(d.path()).unwrap();
    }
}
