//! Content hashes and whole-tree snapshots, to compare a mount with a reference.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::sys::{getxattr, listxattr};

pub fn hash_file(p: &Path) -> io::Result<blake3::Hash> {
    let mut f = File::open(p)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a tree snapshot. Directory sizes are left out (they are filesystem-specific).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapEntry {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub size: u64,
    /// blake3 hex of file content, or the symlink target.
    pub content: String,
    /// `user.*` xattrs (name, blake3 hex of value), sorted. Not collected for symlinks.
    pub xattrs: Vec<(String, String)>,
}

/// Walk `root` (not following symlinks) and describe every entry below it, sorted by path.
/// The root itself is not included (its mode is the tempdir's / mount's own). Panics on any
/// error; see [`try_snapshot`] for a tree that may change while it is walked.
pub fn snapshot(root: &Path) -> Vec<SnapEntry> {
    try_snapshot(root).unwrap_or_else(|e| panic!("snapshot of {root:?}: {e}"))
}

/// [`snapshot`], but any error (an entry vanishing mid-walk while a sync lands, a read
/// failing) is returned, with the path it concerns, so that callers can poll.
pub fn try_snapshot(root: &Path) -> io::Result<Vec<SnapEntry>> {
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// `r` with `what` (an operation and its path) in front of its error message.
fn ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", what())))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<SnapEntry>) -> io::Result<()> {
    for ent in ctx(fs::read_dir(dir), || format!("read_dir {dir:?}"))? {
        let p = ctx(ent, || format!("read_dir {dir:?} entry"))?.path();
        let md = ctx(fs::symlink_metadata(&p), || format!("lstat {p:?}"))?;
        let ft = md.file_type();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let (kind, size, content) = if ft.is_symlink() {
            let t = ctx(fs::read_link(&p), || format!("readlink {p:?}"))?;
            (Kind::Symlink, md.len(), t.to_string_lossy().into_owned())
        } else if ft.is_dir() {
            (Kind::Dir, 0, String::new())
        } else if ft.is_file() {
            let h = ctx(hash_file(&p), || format!("read {p:?}"))?;
            (Kind::File, md.len(), h.to_hex().to_string())
        } else {
            let what = if ft.is_fifo() { "fifo" } else { "special" };
            (Kind::Other, 0, what.to_string())
        };
        let mut xattrs = Vec::new();
        if kind != Kind::Symlink {
            for name in ctx(listxattr(&p), || format!("listxattr {p:?}"))? {
                if !name.starts_with("user.") {
                    continue;
                }
                let v = ctx(getxattr(&p, &name), || format!("getxattr {p:?} {name}"))?;
                xattrs.push((name, blake3::hash(&v).to_hex().to_string()));
            }
        }
        out.push(SnapEntry {
            path: rel,
            kind,
            mode: md.mode() & 0o7777,
            size,
            content,
            xattrs,
        });
        if kind == Kind::Dir {
            walk(root, &p, out)?;
        }
    }
    Ok(())
}

/// Panic with a readable diff if two snapshots differ.
#[track_caller]
pub fn assert_snapshots_eq(left: &[SnapEntry], right: &[SnapEntry], what: &str) {
    if let Some(diff) = diff_snapshots(left, right) {
        panic!("snapshots differ: {what}\n{diff}");
    }
}

/// How two snapshots differ (at most 40 entries), or `None` if they are equal.
pub fn diff_snapshots(left: &[SnapEntry], right: &[SnapEntry]) -> Option<String> {
    if left == right {
        return None;
    }
    let mut msg = String::new();
    let (mut i, mut j) = (0, 0);
    let mut shown = 0;
    while (i < left.len() || j < right.len()) && shown < 40 {
        match (left.get(i), right.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
                continue;
            }
            (Some(a), Some(b)) if a.path == b.path => {
                msg += &format!("  ~ left : {a:?}\n    right: {b:?}\n");
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a.path < b.path => {
                msg += &format!("  - only left : {a:?}\n");
                i += 1;
            }
            (Some(_), Some(b)) => {
                msg += &format!("  + only right: {b:?}\n");
                j += 1;
            }
            (Some(a), None) => {
                msg += &format!("  - only left : {a:?}\n");
                i += 1;
            }
            (None, Some(b)) => {
                msg += &format!("  + only right: {b:?}\n");
                j += 1;
            }
            (None, None) => break,
        }
        shown += 1;
    }
    Some(msg)
}
