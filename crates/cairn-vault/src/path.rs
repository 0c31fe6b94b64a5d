//! Vault paths and the tree keys they map to.
//!
//! Key encoding: a file or symlink at `a/b.txt` is stored under `a/b.txt`; a directory `a/b`
//! under `a/b/`. Consequences, by design:
//! - every descendant of a directory sorts directly after the directory's own key, so
//!   listing a directory is a prefix scan of `dir/`;
//! - a grandchild subtree `dir/c/…` is skipped by restarting the scan at `dir/c0` (`'0'` is
//!   the byte after `'/'`), so a listing costs O(children × log n), not O(descendants);
//! - a file `a` and a directory `a/` are distinct keys and may both exist after a merge of
//!   concurrent edits; the merge's post-pass resolves that clash (the file moves to a
//!   conflict name, the directory stays).

use std::fmt;

use crate::error::PathError;

/// Longest vault path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single component, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// A normalized path inside a vault: relative, `/`-separated, no empty, `.` or `..`
/// components, no NUL bytes. The empty path is the vault root.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct VaultPath(String);

impl VaultPath {
    /// The vault root (the mount point itself). It has no entry of its own.
    pub fn root() -> Self {
        Self(String::new())
    }

    /// Validates `s`. Normalization is deliberately not attempted (`a//b` is refused, not
    /// rewritten): two spellings of one path would otherwise reach the tree.
    pub fn new(s: &str) -> Result<Self, PathError> {
        if s.is_empty() {
            return Ok(Self::root());
        }
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong { len: s.len() });
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_string()));
        }
        for comp in s.split('/') {
            check_component(s, comp)?;
        }
        Ok(Self(s.to_string()))
    }

    /// Decodes a path from tree key bytes (without the directory slash).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PathError> {
        let s = std::str::from_utf8(bytes).map_err(|_| PathError::NotUtf8)?;
        Self::new(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The final component (`""` for the root).
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    /// The containing directory; `None` for the root.
    pub fn parent(&self) -> Option<VaultPath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => Self(self.0[..i].to_string()),
            None => Self::root(),
        })
    }

    /// `self/name`, validating `name` as one component.
    pub fn join(&self, name: &str) -> Result<VaultPath, PathError> {
        check_component(name, name)?;
        let s = if self.is_root() {
            name.to_string()
        } else {
            format!("{}/{}", self.0, name)
        };
        if s.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong { len: s.len() });
        }
        Ok(Self(s))
    }

    /// Every proper ancestor except the root, outermost first (`a`, `a/b` for `a/b/c`).
    pub fn ancestors(&self) -> impl Iterator<Item = VaultPath> + '_ {
        self.0
            .match_indices('/')
            .map(|(i, _)| Self(self.0[..i].to_string()))
    }

    /// Tree key of a file or symlink at this path.
    pub fn file_key(&self) -> Vec<u8> {
        self.0.as_bytes().to_vec()
    }

    /// Tree key of a directory at this path: the path plus `/` (the root's is empty and is
    /// never stored).
    pub fn dir_key(&self) -> Vec<u8> {
        if self.is_root() {
            return Vec::new();
        }
        let mut k = Vec::with_capacity(self.0.len() + 1);
        k.extend_from_slice(self.0.as_bytes());
        k.push(b'/');
        k
    }

    /// The prefix every key strictly inside this directory starts with.
    pub fn child_prefix(&self) -> Vec<u8> {
        self.dir_key()
    }
}

fn check_component(whole: &str, comp: &str) -> Result<(), PathError> {
    if comp.is_empty() {
        return Err(PathError::EmptyComponent(whole.to_string()));
    }
    if comp == "." || comp == ".." {
        return Err(PathError::DotComponent(whole.to_string()));
    }
    if comp.len() > MAX_NAME_LEN {
        return Err(PathError::NameTooLong { len: comp.len() });
    }
    if comp.contains('/') {
        return Err(PathError::Slash(comp.to_string()));
    }
    if comp.contains('\0') {
        return Err(PathError::Nul(whole.to_string()));
    }
    Ok(())
}

impl fmt::Display for VaultPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VaultPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VaultPath({:?})", self.0)
    }
}

/// A decoded tree key: which path, and whether it names a directory.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct EntryKey {
    pub path: VaultPath,
    pub dir: bool,
}

impl EntryKey {
    pub fn file(path: VaultPath) -> Self {
        Self { path, dir: false }
    }

    pub fn dir(path: VaultPath) -> Self {
        Self { path, dir: true }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        if self.dir {
            self.path.dir_key()
        } else {
            self.path.file_key()
        }
    }

    /// Parses tree key bytes; refuses keys no valid vault could contain.
    pub fn from_bytes(key: &[u8]) -> Result<Self, PathError> {
        match key.strip_suffix(b"/") {
            Some(p) => {
                let path = VaultPath::from_bytes(p)?;
                if path.is_root() {
                    return Err(PathError::EmptyComponent("/".into()));
                }
                Ok(Self::dir(path))
            }
            None => {
                let path = VaultPath::from_bytes(key)?;
                if path.is_root() {
                    return Err(PathError::EmptyComponent(String::new()));
                }
                Ok(Self::file(path))
            }
        }
    }
}

/// Smallest key greater than every key starting with `prefix` (for skipping a subtree).
/// `None` when no such key exists (prefix of all 0xff).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut out = prefix.to_vec();
    while let Some(last) = out.pop() {
        if last < 0xff {
            out.push(last + 1);
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_paths() {
        for ok in ["", "a", "a/b.txt", "a b/ c", "é/ü", "...", ".a"] {
            VaultPath::new(ok).unwrap();
        }
        assert!(matches!(VaultPath::new("/a"), Err(PathError::Absolute(_))));
        assert!(matches!(
            VaultPath::new("a//b"),
            Err(PathError::EmptyComponent(_))
        ));
        assert!(matches!(
            VaultPath::new("a/"),
            Err(PathError::EmptyComponent(_))
        ));
        assert!(matches!(
            VaultPath::new("a/./b"),
            Err(PathError::DotComponent(_))
        ));
        assert!(matches!(
            VaultPath::new(".."),
            Err(PathError::DotComponent(_))
        ));
        assert!(matches!(VaultPath::new("a\0b"), Err(PathError::Nul(_))));
        assert!(matches!(
            VaultPath::new(&"x".repeat(256)),
            Err(PathError::NameTooLong { .. })
        ));
        assert!(matches!(
            VaultPath::from_bytes(&[0xff]),
            Err(PathError::NotUtf8)
        ));
    }

    #[test]
    fn parents_ancestors_and_keys() {
        let p = VaultPath::new("a/b/c.txt").unwrap();
        assert_eq!(p.name(), "c.txt");
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        let anc: Vec<_> = p.ancestors().map(|a| a.0).collect();
        assert_eq!(anc, ["a", "a/b"]);
        assert_eq!(p.file_key(), b"a/b/c.txt");
        assert_eq!(p.parent().unwrap().dir_key(), b"a/b/");
        assert_eq!(
            VaultPath::new("a").unwrap().parent(),
            Some(VaultPath::root())
        );
        assert_eq!(
            EntryKey::from_bytes(b"a/b/").unwrap(),
            EntryKey::dir(VaultPath::new("a/b").unwrap())
        );
        assert!(EntryKey::from_bytes(b"/").is_err());
        assert!(EntryKey::from_bytes(b"a//").is_err());
        assert_eq!(prefix_successor(b"a/c/").unwrap(), b"a/c0");
        assert_eq!(prefix_successor(&[b'a', 0xff]).unwrap(), b"b");
        assert_eq!(prefix_successor(&[0xff]), None);
    }

    #[test]
    fn directory_children_are_a_prefix_range() {
        // Sibling names that sort around '/' must not interleave with a directory's children.
        let mut keys = [
            b"a/".to_vec(),
            b"a/x".to_vec(),
            b"a.txt".to_vec(),
            b"a0".to_vec(),
            b"a".to_vec(),
            b"a/y/".to_vec(),
            b"a/y/z".to_vec(),
        ];
        keys.sort();
        let inside: Vec<_> = keys.iter().filter(|k| k.starts_with(b"a/")).collect();
        let first = keys.iter().position(|k| k.starts_with(b"a/")).unwrap();
        assert_eq!(
            &keys[first..first + inside.len()],
            &inside.into_iter().cloned().collect::<Vec<_>>()[..]
        );
    }
}
