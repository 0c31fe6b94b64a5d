//! The files-on-demand xattrs, which describe this device's copy rather than the file:
//! `user.cairn.local` (read-only: `full`, `partial` or `none` of the content is on this
//! device) and `user.cairn.pin` (`1` or `0`; setting it to `1` pins the path so its content
//! is fetched now and kept, `0` or removing it unpins). The base layer answers them; they are
//! never stored in the overlay (so never synced) and, like `user.cairn.status`, left out of
//! `listxattr` so copying tools do not carry them elsewhere.

use cairn_overlay::Data;
use fuser::Errno;

use crate::base::{ContentRef, EntryKind};
use crate::errno::FsResult;
use crate::fs::CairnFs;
use crate::namespace::Node;

pub const LOCAL_XATTR: &[u8] = b"user.cairn.local";
pub const PIN_XATTR: &[u8] = b"user.cairn.pin";

/// Whether `name` is one of the attributes of this module.
pub(crate) fn is_local_attr(name: &[u8]) -> bool {
    name == LOCAL_XATTR || name == PIN_XATTR
}

fn base_errno(e: &crate::base::BaseError) -> Errno {
    Errno::from_i32(e.errno())
}

impl CairnFs {
    fn path_of_ino(&self, ino: u64) -> FsResult<String> {
        Ok(self.core.ns().path(ino)?.to_string())
    }

    /// The value of a local attribute of `ino`; ENODATA where it does not apply (not a file,
    /// or a base layer without files on demand).
    pub(crate) fn local_attr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let path = self.path_of_ino(ino)?;
        if name == PIN_XATTR {
            return match self.core.base.pinned(&path) {
                Some(on) => Ok(if on { b"1".to_vec() } else { b"0".to_vec() }),
                None => Err(Errno::NO_XATTR),
            };
        }
        let node = self.core.resolve(&path)?.ok_or(Errno::ENOENT)?;
        if node.kind() != EntryKind::File {
            return Err(Errno::NO_XATTR);
        }
        let content = match node {
            Node::Base(b) => b.content,
            Node::Rec(r) => match r.data {
                // Written here and not flushed yet: the overlay holds all of it.
                Data::Staged(_) => return Ok(b"full".to_vec()),
                Data::Content(c) => ContentRef::new(c),
                Data::Base => match self.core.base.get(&path).map_err(|e| base_errno(&e))? {
                    Some(b) => b.content,
                    None => return Err(Errno::NO_XATTR),
                },
                _ => return Err(Errno::NO_XATTR),
            },
        };
        match self.core.base.local_state(&content) {
            Ok(Some(s)) => Ok(s.as_bytes().to_vec()),
            Ok(None) => Err(Errno::NO_XATTR),
            Err(e) => Err(base_errno(&e)),
        }
    }

    /// Sets (`Some`) or removes (`None`) a local attribute of `ino`.
    pub(crate) fn set_local_attr(
        &self,
        ino: u64,
        name: &[u8],
        value: Option<&[u8]>,
    ) -> FsResult<()> {
        if name != PIN_XATTR {
            return Err(Errno::EPERM);
        }
        let on = match value.map(|v| v.strip_suffix(b"\n").unwrap_or(v)) {
            Some(b"1") => true,
            Some(b"0") | None => false,
            Some(_) => return Err(Errno::EINVAL),
        };
        let path = self.path_of_ino(ino)?;
        // Only paths that exist can be pinned; a pending one is pinned by its vault path.
        if !path.is_empty() && self.core.resolve(&path)?.is_none() {
            return Err(Errno::ENOENT);
        }
        match self.core.base.set_pin(&path, on) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Errno::from_i32(libc::EOPNOTSUPP)),
            Err(e) => Err(base_errno(&e)),
        }
    }
}
