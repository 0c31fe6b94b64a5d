//! The read side: one resolved view over several layers (the local overlay, this device's
//! snapshot, peers' latest snapshots).
//!
//! Per key the layers' entries are resolved by the merge rules ([`crate::merge::resolve`]):
//! a dominating version wins, concurrent versions go to the newest by (HLC, device), a
//! live entry beats a concurrent tombstone, and tombstones hide the path. The view never
//! invents conflict copies; those appear once the snapshots are actually merged.
//!
//! Everything streams: a scan is a k-way merge of the layers' sorted iterators, and a
//! directory listing skips each child directory's subtree by restarting the layer scans
//! past it, so listing costs O(layers × children × log n) node visits plus one point lookup
//! per listed file (to hide a file whose name a directory holds), never O(vault).

use std::sync::Arc;

use crate::entry::Entry;
use crate::error::Result;
use crate::merge::resolve;
use crate::path::{EntryKey, VaultPath, prefix_successor};
use crate::source::{EntryIter, EntrySource};

/// A live child in a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub key: EntryKey,
    pub entry: Entry,
}

/// Layers resolved per path. Layer order does not affect results (resolution is by
/// version), only names: a layer is replaced by name when a peer publishes again.
#[derive(Clone, Default)]
pub struct MergedView {
    layers: Vec<(String, Arc<dyn EntrySource>)>,
}

impl MergedView {
    pub fn new(layers: Vec<(String, Arc<dyn EntrySource>)>) -> Self {
        Self { layers }
    }

    /// Adds a layer, or replaces the one with the same name.
    pub fn set_layer(&mut self, name: impl Into<String>, layer: Arc<dyn EntrySource>) {
        let name = name.into();
        match self.layers.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = layer,
            None => self.layers.push((name, layer)),
        }
    }

    pub fn remove_layer(&mut self, name: &str) -> bool {
        let before = self.layers.len();
        self.layers.retain(|(n, _)| n != name);
        self.layers.len() != before
    }

    pub fn layer_names(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|(n, _)| n.as_str())
    }

    /// The resolved entry under `key`, tombstones included.
    pub fn get_key(&self, key: &[u8]) -> Result<Option<Entry>> {
        let dir_key = key.last() == Some(&b'/');
        let mut acc: Option<Entry> = None;
        for (_, layer) in &self.layers {
            if let Some(e) = layer.get(key)? {
                acc = Some(match acc {
                    None => e,
                    Some(a) => resolve(&a, &e, dir_key).keep,
                });
            }
        }
        Ok(acc)
    }

    /// The live entry at `path` (a directory wins the name over a file).
    pub fn get(&self, path: &VaultPath) -> Result<Option<(EntryKey, Entry)>> {
        for key in [EntryKey::dir(path.clone()), EntryKey::file(path.clone())] {
            if let Some(e) = self.get_key(&key.to_bytes())?
                && e.is_live()
            {
                return Ok(Some((key, e)));
            }
        }
        Ok(None)
    }

    /// Live resolved entries with `start <= key < end`, ascending, streamed.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>) -> Result<ViewScan<'_>> {
        let mut heads = Vec::with_capacity(self.layers.len());
        for (_, layer) in &self.layers {
            heads.push(Cursor::new(layer.as_ref(), start, end, None)?);
        }
        Ok(ViewScan { heads })
    }

    /// Every live entry below `dir` (all depths), streamed.
    pub fn scan_prefix(&self, dir: &VaultPath) -> Result<ViewScan<'_>> {
        let (start, end) = inside(dir);
        self.scan(&start, end.as_deref())
    }

    /// The live direct children of `dir`, ascending by key, streamed.
    pub fn list_dir(&self, dir: &VaultPath) -> Result<ListDir<'_>> {
        let prefix = dir.child_prefix();
        let (start, end) = inside(dir);
        let mut heads = Vec::with_capacity(self.layers.len());
        for (_, layer) in &self.layers {
            heads.push(Cursor::new(
                layer.as_ref(),
                &start,
                end.as_deref(),
                Some(prefix.len()),
            )?);
        }
        Ok(ListDir {
            view: self,
            scan: ViewScan { heads },
            prefix_len: prefix.len(),
            dir: dir.clone(),
        })
    }
}

/// The key range strictly inside `dir` (its own key `dir/` excluded).
fn inside(dir: &VaultPath) -> (Vec<u8>, Option<Vec<u8>>) {
    let prefix = dir.child_prefix();
    let end = prefix_successor(&prefix);
    let mut start = prefix;
    if !start.is_empty() {
        start.push(0);
    }
    (start, end)
}

/// One layer's sorted stream. With `child_depth` set, keys deeper than a direct child of
/// the prefix are skipped by restarting the scan past the child directory's subtree.
struct Cursor<'a> {
    src: &'a dyn EntrySource,
    iter: EntryIter<'a>,
    end: Option<Vec<u8>>,
    child_depth: Option<usize>,
    head: Option<(Vec<u8>, Entry)>,
}

impl<'a> Cursor<'a> {
    fn new(
        src: &'a dyn EntrySource,
        start: &[u8],
        end: Option<&[u8]>,
        child_depth: Option<usize>,
    ) -> Result<Self> {
        let mut c = Self {
            src,
            iter: src.scan(start, end)?,
            end: end.map(<[u8]>::to_vec),
            child_depth,
            head: None,
        };
        c.advance()?;
        Ok(c)
    }

    fn advance(&mut self) -> Result<()> {
        loop {
            let Some(item) = self.iter.next() else {
                self.head = None;
                return Ok(());
            };
            let (k, e) = item?;
            if let Some(depth) = self.child_depth {
                let rest = &k[depth.min(k.len())..];
                if let Some(slash) = rest.iter().position(|&b| b == b'/')
                    && slash + 1 < rest.len()
                {
                    // A grandchild: jump past the whole `child/` subtree.
                    let skip_to = prefix_successor(&k[..depth + slash + 1]);
                    match skip_to {
                        Some(s) if self.end.as_deref().is_none_or(|end| s.as_slice() < end) => {
                            self.iter = self.src.scan(&s, self.end.as_deref())?;
                            continue;
                        }
                        _ => {
                            self.head = None;
                            return Ok(());
                        }
                    }
                }
            }
            self.head = Some((k, e));
            return Ok(());
        }
    }
}

/// Iterator of [`MergedView::scan`]: resolved, live entries in key order.
pub struct ViewScan<'a> {
    heads: Vec<Cursor<'a>>,
}

impl ViewScan<'_> {
    fn next_resolved(&mut self) -> Result<Option<(Vec<u8>, Entry)>> {
        loop {
            let Some(min) = self
                .heads
                .iter()
                .filter_map(|c| c.head.as_ref().map(|h| h.0.clone()))
                .min()
            else {
                return Ok(None);
            };
            let dir_key = min.last() == Some(&b'/');
            let mut acc: Option<Entry> = None;
            for c in &mut self.heads {
                if c.head.as_ref().is_some_and(|h| h.0 == min) {
                    let (_, e) = c.head.take().unwrap_or_else(|| unreachable!());
                    acc = Some(match acc {
                        None => e,
                        Some(a) => resolve(&a, &e, dir_key).keep,
                    });
                    c.advance()?;
                }
            }
            if let Some(e) = acc
                && e.is_live()
            {
                return Ok(Some((min, e)));
            }
        }
    }
}

impl Iterator for ViewScan<'_> {
    type Item = Result<(Vec<u8>, Entry)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_resolved() {
            Ok(Some(x)) => Some(Ok(x)),
            Ok(None) => None,
            Err(e) => {
                // Fuse after an error so callers do not spin on a broken layer.
                self.heads.clear();
                Some(Err(e))
            }
        }
    }
}

/// Iterator of [`MergedView::list_dir`].
pub struct ListDir<'a> {
    view: &'a MergedView,
    scan: ViewScan<'a>,
    prefix_len: usize,
    dir: VaultPath,
}

impl ListDir<'_> {
    fn next_child(&mut self) -> Result<Option<DirEntry>> {
        for item in self.scan.by_ref() {
            let (k, entry) = item?;
            let key = EntryKey::from_bytes(&k)?;
            let name_bytes = &k[self.prefix_len..];
            let name_bytes = name_bytes.strip_suffix(b"/").unwrap_or(name_bytes);
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            if !key.dir {
                let dk = self.dir.join(&name)?.dir_key();
                if self.view.get_key(&dk)?.is_some_and(|d| d.is_live()) {
                    continue;
                }
            }
            return Ok(Some(DirEntry { name, key, entry }));
        }
        Ok(None)
    }
}

impl Iterator for ListDir<'_> {
    type Item = Result<DirEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_child().transpose()
    }
}
