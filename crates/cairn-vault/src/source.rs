//! Read access to a sorted set of entries keyed by tree key: a snapshot tree, an in-memory
//! overlay, or anything else the merge and the merged view read from.

use std::collections::BTreeMap;

use crate::entry::Entry;
use crate::error::{Result, VaultError};
use crate::path::{EntryKey, VaultPath};

/// Entries in ascending key order.
pub type EntryIter<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Entry)>> + 'a>;

pub trait EntrySource: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>>;
    /// Entries with `start <= key < end` (`end = None`: to the last key), ascending. Must
    /// stream: implementations over large trees may not collect the range.
    fn scan(&self, start: &[u8], end: Option<&[u8]>) -> Result<EntryIter<'_>>;

    /// The live entry at `path`: the directory if there is one (a directory keeps a
    /// contested name), else the file or symlink.
    fn lookup(&self, path: &VaultPath) -> Result<Option<(EntryKey, Entry)>> {
        for key in [EntryKey::dir(path.clone()), EntryKey::file(path.clone())] {
            if let Some(e) = self.get(&key.to_bytes())?
                && e.is_live()
            {
                return Ok(Some((key, e)));
            }
        }
        Ok(None)
    }
}

/// An in-memory source, for overlays and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemorySource(pub BTreeMap<Vec<u8>, Entry>);

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: &EntryKey, entry: Entry) {
        self.0.insert(key.to_bytes(), entry);
    }
}

impl EntrySource for MemorySource {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        Ok(self.0.get(key).cloned())
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>) -> Result<EntryIter<'_>> {
        use std::ops::Bound;
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_vec()),
            None => Bound::Unbounded,
        };
        if end.is_some_and(|e| e <= start) {
            return Ok(Box::new(std::iter::empty()));
        }
        Ok(Box::new(
            self.0
                .range((Bound::Included(start.to_vec()), upper))
                .map(|(k, v)| Ok((k.clone(), v.clone()))),
        ))
    }
}

/// Decodes a tree value and checks it fits its key (directory keys hold directories or
/// tombstones, other keys files, symlinks or tombstones).
pub fn decode_value(key: &[u8], bytes: &[u8]) -> Result<Entry> {
    let shown = || String::from_utf8_lossy(key).into_owned();
    let parsed = EntryKey::from_bytes(key).map_err(|_| VaultError::Entry {
        key: shown(),
        source: crate::error::DecodeError::Invalid("key is not a valid vault path"),
    })?;
    let entry = Entry::decode(bytes).map_err(|source| VaultError::Entry {
        key: shown(),
        source,
    })?;
    if !kind_fits_key(&parsed, &entry) {
        return Err(VaultError::Entry {
            key: shown(),
            source: crate::error::DecodeError::Invalid("entry kind does not match its key"),
        });
    }
    Ok(entry)
}

pub(crate) fn kind_fits_key(key: &EntryKey, entry: &Entry) -> bool {
    use crate::entry::EntryKind::*;
    match entry.kind {
        Tombstone => true,
        Dir => key.dir,
        File | Symlink => !key.dir,
    }
}
