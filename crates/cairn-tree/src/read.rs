//! Point lookups and streaming range scans.

use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use crate::error::{Result, TreeError};
use crate::node::{Node, NodeId};
use crate::store::NodeStore;
use crate::tree::Tree;

/// Index of the child whose subtree may contain keys `>= key` starting at `key`: the last child
/// whose separator is `<= key`, or the first child.
fn child_for(children: &[crate::node::ChildRef], key: &[u8]) -> usize {
    children
        .partition_point(|c| c.key.as_slice() <= key)
        .saturating_sub(1)
}

impl<S: NodeStore> Tree<S> {
    /// Value stored under `key` in the tree rooted at `root`.
    pub fn get(&self, root: &NodeId, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut node = self.read_node(root)?;
        loop {
            let next = match &*node {
                Node::Leaf(entries) => {
                    return Ok(entries.search(key).ok().map(|i| entries.value(i).to_vec()));
                }
                Node::Internal { level, children } => {
                    let idx = children.partition_point(|c| c.key.as_slice() <= key);
                    if idx == 0 {
                        return Ok(None);
                    }
                    self.read_child(*level, &children[idx - 1])?
                }
            };
            node = next;
        }
    }

    /// Entries with keys in `range`, in key order. Lazy: holds one node per level, never the
    /// whole tree. Tuples of `Bound<&[u8]>` and `..` work as ranges.
    pub fn scan<R: RangeBounds<[u8]>>(&self, root: &NodeId, range: R) -> Scan<'_, S> {
        Scan {
            tree: self,
            root: *root,
            start: Some(range.start_bound().map(<[u8]>::to_vec)),
            end: range.end_bound().map(<[u8]>::to_vec),
            stack: Vec::new(),
            done: false,
        }
    }

    /// Every entry of the tree.
    pub fn scan_all(&self, root: &NodeId) -> Scan<'_, S> {
        self.scan(root, ..)
    }

    /// Entries whose key starts with `prefix`.
    pub fn scan_prefix(&self, root: &NodeId, prefix: &[u8]) -> Scan<'_, S> {
        let end = match prefix_successor(prefix) {
            Some(s) => Bound::Excluded(s),
            None => Bound::Unbounded,
        };
        Scan {
            tree: self,
            root: *root,
            start: Some(Bound::Included(prefix.to_vec())),
            end,
            stack: Vec::new(),
            done: false,
        }
    }
}

/// Smallest key greater than every key starting with `prefix`; `None` if there is none
/// (empty prefix or all `0xff`).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

/// Iterator returned by [`Tree::scan`]. Yields `Err` at most once, then ends.
pub struct Scan<'t, S> {
    tree: &'t Tree<S>,
    root: NodeId,
    /// Start bound until the first call positions the cursor.
    start: Option<Bound<Vec<u8>>>,
    end: Bound<Vec<u8>>,
    /// Path from the root to the current leaf; the index is the next item to visit in leaves and
    /// the child being visited in internal nodes.
    stack: Vec<(Arc<Node>, usize)>,
    done: bool,
}

impl<S: NodeStore> Scan<'_, S> {
    fn seek(&mut self, start: &Bound<Vec<u8>>) -> Result<()> {
        let mut node = self.tree.read_node(&self.root)?;
        loop {
            match &*node {
                Node::Leaf(entries) => {
                    let idx = match start {
                        Bound::Unbounded => 0,
                        Bound::Included(s) => entries.partition_point(|k| k < s.as_slice()),
                        Bound::Excluded(s) => entries.partition_point(|k| k <= s.as_slice()),
                    };
                    self.stack.push((node, idx));
                    return Ok(());
                }
                Node::Internal { level, children } => {
                    let idx = match start {
                        Bound::Unbounded => 0,
                        Bound::Included(s) | Bound::Excluded(s) => child_for(children, s),
                    };
                    let child = self.tree.read_child(*level, &children[idx])?;
                    self.stack.push((node.clone(), idx));
                    node = child;
                }
            }
        }
    }

    /// Moves to the first entry of the next leaf; false at the end of the tree.
    fn next_leaf(&mut self) -> Result<bool> {
        self.stack.pop();
        loop {
            let Some((parent, idx)) = self.stack.last_mut() else {
                return Ok(false);
            };
            let Node::Internal { level, children } = &**parent else {
                return Err(TreeError::Corrupt {
                    id: self.root,
                    reason: "leaf above another node",
                });
            };
            if *idx + 1 >= children.len() {
                self.stack.pop();
                continue;
            }
            *idx += 1;
            let mut node = self.tree.read_child(*level, &children[*idx])?;
            loop {
                let child = match &*node {
                    Node::Leaf(_) => {
                        self.stack.push((node, 0));
                        return Ok(true);
                    }
                    Node::Internal { level, children } => {
                        self.tree.read_child(*level, &children[0])?
                    }
                };
                self.stack.push((node, 0));
                node = child;
            }
        }
    }

    fn advance(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if let Some(start) = self.start.take() {
            self.seek(&start)?;
        }
        loop {
            let Some((leaf, idx)) = self.stack.last_mut() else {
                return Ok(None);
            };
            let Node::Leaf(entries) = &**leaf else {
                return Err(TreeError::Corrupt {
                    id: self.root,
                    reason: "scan cursor not on a leaf",
                });
            };
            if let Some((key, value)) = entries.get(*idx) {
                let in_range = match &self.end {
                    Bound::Unbounded => true,
                    Bound::Included(end) => key <= end.as_slice(),
                    Bound::Excluded(end) => key < end.as_slice(),
                };
                if !in_range {
                    return Ok(None);
                }
                *idx += 1;
                return Ok(Some((key.to_vec(), value.to_vec())));
            }
            if !self.next_leaf()? {
                return Ok(None);
            }
        }
    }
}

impl<S: NodeStore> Iterator for Scan<'_, S> {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(Some(kv)) => Some(Ok(kv)),
            Ok(None) => {
                self.done = true;
                self.stack.clear();
                None
            }
            Err(e) => {
                self.done = true;
                self.stack.clear();
                Some(Err(e))
            }
        }
    }
}

impl<S: NodeStore> std::iter::FusedIterator for Scan<'_, S> {}

#[cfg(test)]
mod tests {
    use super::prefix_successor;

    #[test]
    fn prefix_successor_handles_ff() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert_eq!(prefix_successor(b""), None);
    }
}
