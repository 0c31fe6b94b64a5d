//! Hard links on top of path-keyed records (see [`cairn_overlay::LinkGroup`] for the
//! representation): every name of an inode holds a full record carrying the group, and
//! every change to the inode — content, size, times, mode, owner, attributes, its list of
//! names — is written to all names in one overlay transaction, so the names never differ
//! and a flush publishes them together.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;

use cairn_overlay::path::{now_ns, parent_of};
use cairn_overlay::{Data, Kind, LinkGroup, LinkId, MAX_LINK_NAMES, Record};
use fuser::{Errno, INodeNo};

use crate::core::Core;
use crate::errno::{FsResult, base_errno, overlay_errno};
use crate::fs::CairnFs;
use crate::namespace::{NAME_MAX, Namespace, Node, join};
use crate::stat::Stat;

/// Record kinds that may have several names: regular files, symlinks, and the special
/// files that live on this device only (their groups never leave it either).
fn linkable(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::File | Kind::Symlink | Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev
    )
}

/// The link group of a node, if it is a regular or special file with several names.
pub(crate) fn group_of(node: &Node) -> Option<LinkGroup> {
    let linkable = match node {
        Node::Rec(r) => linkable(r.kind),
        Node::Base(b) => b.kind != crate::base::EntryKind::Dir,
    };
    if !linkable {
        return None;
    }
    LinkGroup::of(node.xattrs()).filter(|g| g.names.len() > 1)
}

impl Core {
    /// Writes `rec` at `path` and, if it carries a link group, at every other name of the
    /// group that still belongs to it (same id) plus the names in `new_names`, in one
    /// transaction. Content that refers to the base "at this path" is pinned to the base's
    /// content reference first, because the other names' base entries may differ (a peer
    /// may have written one name since).
    pub(crate) fn put_shared(
        &self,
        ns: &Namespace,
        path: &str,
        mut rec: Record,
        new_names: &[&str],
    ) -> FsResult<()> {
        let Some(group) = LinkGroup::of(&rec.xattrs).filter(|g| g.names.len() > 1) else {
            let change = self.overlay.put(path, rec).map_err(overlay_errno)?;
            self.drop_released(ns, change.released);
            return Ok(());
        };
        if rec.data == Data::Base && rec.kind == Kind::File {
            match self.base.get(path).map_err(base_errno)? {
                Some(b) => {
                    rec.size = b.size;
                    rec.data = Data::Content(b.content.as_bytes().to_vec());
                }
                None => {
                    rec.size = 0;
                    rec.data = Data::Content(Vec::new());
                }
            }
        }
        let mut puts = vec![(path.to_string(), rec.clone())];
        for name in &group.names {
            if name == path {
                continue;
            }
            let member = new_names.contains(&name.as_str())
                || self
                    .resolve(name)?
                    .as_ref()
                    .and_then(group_of)
                    .is_some_and(|g| g.id == group.id);
            if member {
                puts.push((name.clone(), rec.clone()));
            }
        }
        let change = self.overlay.put_many(puts).map_err(overlay_errno)?;
        self.drop_released(ns, change.released);
        Ok(())
    }

    /// Name `path` of `node` is about to be unlinked or replaced. If the node has other
    /// names, they lose this one (and their ctime moves) and the inode lives on under them;
    /// returns whether that was the case (then there is nothing to detach).
    pub(crate) fn unlink_linked(
        &self,
        ns: &mut Namespace,
        path: &str,
        node: &Node,
    ) -> FsResult<bool> {
        let Some(group) = group_of(node) else {
            return Ok(false);
        };
        let rest = group.without_name(path);
        if rest.names.is_empty() {
            return Ok(false);
        }
        // The surviving record: this one's metadata and content, minus the name.
        let mut rec = self.materialize(node.clone());
        if rec.data == Data::Base && rec.kind == Kind::File {
            let b = self.base.get(path).map_err(base_errno)?;
            rec.size = b.as_ref().map_or(0, |b| b.size);
            rec.data = Data::Content(b.map(|b| b.content.as_bytes().to_vec()).unwrap_or_default());
        }
        rec.ctime_ns = now_ns();
        LinkGroup::store(Some(&rest), &mut rec.xattrs);
        let mut puts = Vec::new();
        for name in &rest.names {
            let member = self
                .resolve(name)?
                .as_ref()
                .and_then(group_of)
                .is_some_and(|g| g.id == group.id);
            if member {
                puts.push((name.clone(), rec.clone()));
            }
        }
        if puts.is_empty() {
            return Ok(false);
        }
        let change = self.overlay.put_many(puts).map_err(overlay_errno)?;
        self.drop_released(ns, change.released);
        ns.unlink_name(path, &rest.names);
        Ok(true)
    }

    /// After a rename moved names (`moved`: old path → new path, a whole subtree), fixes
    /// the name lists of every link group with a moved name. Also moves the renamed node's
    /// own ctime to `now` (a rename is a change of the inode, like ext4).
    pub(crate) fn relink_moved(&self, ns: &Namespace, moved: &[(String, String)]) -> FsResult<()> {
        let map: HashMap<&str, &str> = moved
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let mut done: BTreeMap<LinkId, ()> = BTreeMap::new();
        for (_, new) in moved {
            let Some(node) = self.resolve(new)? else {
                continue;
            };
            let Some(group) = group_of(&node) else {
                continue;
            };
            if done.insert(group.id, ()).is_some() {
                continue;
            }
            let renamed = LinkGroup {
                id: group.id,
                names: group
                    .names
                    .iter()
                    .map(|n| map.get(n.as_str()).map_or(n.clone(), |m| m.to_string()))
                    .collect(),
            }
            .with_name(new);
            let mut rec = self.materialize(node);
            rec.ctime_ns = now_ns();
            LinkGroup::store(Some(&renamed), &mut rec.xattrs);
            self.put_shared(ns, new, rec, &[])?;
        }
        Ok(())
    }
}

impl CairnFs {
    /// `link(2)`: `newparent/newname` becomes one more name of inode `ino`.
    pub(crate) fn do_link(
        &self,
        ino: u64,
        newparent: INodeNo,
        newname: &OsStr,
    ) -> FsResult<(u64, Stat)> {
        self.core.space.admit(0)?;
        if newname.len() > NAME_MAX {
            return Err(Errno::from_i32(libc::ENAMETOOLONG));
        }
        let name = newname.to_str().ok_or(Errno::from_i32(libc::EILSEQ))?;
        let dir = self.core.ns_view().path(newparent.0).map(str::to_string);
        if let Ok((src, _)) = self.core.resolve_ino_unlocked(ino)
            && let Ok(dir) = dir
        {
            let dst = join(&dir, name);
            self.core.warm(&[&src, &dir, &dst]);
        }
        let mut ns = self.core.ns();
        let src = ns.path(ino)?.to_string();
        let dst = join(ns.path(newparent.0)?, name);
        let pst = self.core.stat_path(parent_of(&dst))?;
        if pst.kind != crate::base::EntryKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let node = self.core.resolve(&src)?.ok_or(Errno::ENOENT)?;
        match &node {
            Node::Rec(r) if linkable(r.kind) => {}
            Node::Base(b) if b.kind != crate::base::EntryKind::Dir => {}
            // Directories cannot be linked (POSIX).
            _ => return Err(Errno::EPERM),
        }
        if self.core.resolve(&dst)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let group = match group_of(&node) {
            Some(g) => g.with_name(&dst),
            None => LinkGroup::new(vec![src.clone(), dst.clone()]),
        };
        if group.names.len() > MAX_LINK_NAMES {
            return Err(Errno::from_i32(libc::EMLINK));
        }
        let mut rec = self.core.materialize(node);
        let now = now_ns();
        rec.ctime_ns = now;
        LinkGroup::store(Some(&group), &mut rec.xattrs);
        self.core.put_shared(&ns, &src, rec, &[dst.as_str()])?;
        self.core.touch_dir(&ns, parent_of(&dst), now)?;
        ns.join_group(ino, group.id);
        ns.paths.insert(dst.clone(), ino);
        if let Some(i) = ns.inodes.get_mut(&ino) {
            i.nlookup += 1;
        }
        let stat = self.core.stat_path(&dst)?;
        drop(ns);
        self.core.touched();
        Ok((ino, stat))
    }
}

/// Every path at or under `root` in `paths`, paired with where a rename to `to` puts it.
pub(crate) fn moved_pairs(paths: &[String], from: &str, to: &str) -> Vec<(String, String)> {
    paths
        .iter()
        .map(|p| (p.clone(), format!("{to}{}", &p[from.len()..])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_pairs_rewrite_the_prefix() {
        let v = moved_pairs(&["a".into(), "a/b".into()], "a", "x/y");
        assert_eq!(
            v,
            vec![("a".into(), "x/y".into()), ("a/b".into(), "x/y/b".into())]
        );
    }
}
