//! The `user.cairn.status` xattr: a path's sync state (`synced`, `pending`, `conflict`,
//! `ignored`; the root may say what is held), computed on each read.

use cairn_overlay::path::{name_of, parent_of};
use fuser::Errno;

use crate::errno::{FsResult, overlay_errno};
use crate::fs::CairnFs;

/// The sync state of one path, readable as `getfattr -n user.cairn.status FILE`. Computed on
/// each read, never stored, and left out of `listxattr` so that copying tools (`cp -a`,
/// `rsync -X`) do not carry it to other filesystems.
pub const STATUS_XATTR: &[u8] = b"user.cairn.status";
/// Marks a conflict copy made by the merge: `name.sync-conflict-YYYYMMDD-HHMMSS-<dev>.ext`.
const CONFLICT_MARK: &str = ".sync-conflict-";

/// Whether `sibling` is a conflict copy of `name` (same stem and extension).
fn is_conflict_copy_of(sibling: &str, name: &str) -> bool {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    sibling.len() > name.len()
        && sibling
            .strip_prefix(stem)
            .is_some_and(|rest| rest.starts_with(CONFLICT_MARK) && rest.ends_with(ext))
}

impl CairnFs {
    /// `conflict` when the path is a conflict copy or has one beside it, `pending` when it
    /// has a local change not yet in a snapshot, else `synced`.
    /// The vault root says what the base has to say about the whole vault (held deletions).
    pub(crate) fn sync_status(&self, ino: u64) -> FsResult<String> {
        self.path_status(ino).map(|s| s.to_string())
    }

    fn path_status(&self, ino: u64) -> FsResult<std::borrow::Cow<'static, str>> {
        let (path, inflight) = {
            let ns = self.core.ns_view();
            let path = ns.path(ino)?.to_string();
            let inflight = ns.inflight.contains(&path);
            (path, inflight)
        };
        if path.is_empty() {
            return Ok(self
                .core
                .base
                .root_note()
                .map_or("synced".into(), Into::into));
        }
        let Some(node) = self.core.resolve(&path)? else {
            return Err(Errno::ENOENT);
        };
        let is_dir = node.kind() == crate::base::EntryKind::Dir;
        if self.core.ignore_rules().is_ignored(&path, is_dir) {
            return Ok("ignored".into());
        }
        let name = name_of(&path);
        if name.contains(CONFLICT_MARK)
            || self
                .core
                .merged_children(parent_of(&path))?
                .iter()
                .any(|(sibling, _)| is_conflict_copy_of(sibling, name))
        {
            return Ok("conflict".into());
        }
        // A record being flushed right now stays in the overlay until the flush succeeds.
        if inflight
            || self
                .core
                .overlay
                .get(&path)
                .map_err(overlay_errno)?
                .is_some()
        {
            return Ok("pending".into());
        }
        Ok("synced".into())
    }
}

#[cfg(test)]
mod tests {
    use super::is_conflict_copy_of;

    #[test]
    fn conflict_copies_are_recognised_beside_their_original() {
        assert!(is_conflict_copy_of(
            "report.sync-conflict-20240229-131415-abababab.txt",
            "report.txt"
        ));
        assert!(is_conflict_copy_of(
            ".bashrc.sync-conflict-19700101-000000-abababab",
            ".bashrc"
        ));
        assert!(!is_conflict_copy_of("report.txt", "report.txt"));
        assert!(!is_conflict_copy_of(
            "other.sync-conflict-20240229-131415-abababab.txt",
            "report.txt"
        ));
        assert!(!is_conflict_copy_of(
            "report.sync-conflict-20240229-131415-abababab.md",
            "report.txt"
        ));
    }
}
