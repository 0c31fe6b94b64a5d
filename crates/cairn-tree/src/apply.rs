//! Incremental update: apply a sorted batch of upserts and removals, rewriting only the nodes
//! whose content changes, with a result identical to rebuilding from scratch.
//!
//! Levels are processed bottom-up. At each level the old nodes touched by an edit are re-cut with
//! a fresh [`Chunker`]; because node starts in the old tree are points where the cutting rule
//! restarts, a fresh chunker started at an old node start behaves exactly like a full rebuild from
//! there. An edit to the first item of a node also touches the node before it when that one was
//! closed by the size cap, since the cap was applied against the edited item; re-cutting then
//! starts one node earlier. Re-cutting continues into following old nodes until the new cut is a
//! hash boundary on an old node end with no edits pending before the next old node; from then on
//! old and new cuts coincide (see `boundary`). The replaced and new nodes become edits, keyed by first key, for the level
//! above, which is processed the same way. The old root level produces the items of a virtual
//! level above it; a [`LevelStack`] turns those into the new top of the tree, and a final pass
//! drops single-child roots left when the tree got shallower.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::boundary::{ChunkItem, Chunker, LeafItem, is_boundary};
use crate::build::{LevelStack, NodeSink};
use crate::error::{Result, TreeError};
use crate::node::{ChildRef, LeafEntry, Node, NodeId};
use crate::store::NodeStore;
use crate::tree::{NodeSealer, Tree, TreeUpdate, WriteStats, seal};

/// One change in an `apply` batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Insert or replace the value under the key.
    Upsert(Vec<u8>, Vec<u8>),
    /// Remove the key; a no-op if absent.
    Remove(Vec<u8>),
}

impl Edit {
    pub fn key(&self) -> &[u8] {
        match self {
            Edit::Upsert(k, _) | Edit::Remove(k) => k,
        }
    }
}

/// An edit to the item sequence of one level.
enum LevelEdit<T> {
    Put(T),
    Del(Vec<u8>),
}

impl<T: ChunkItem> LevelEdit<T> {
    fn key(&self) -> &[u8] {
        match self {
            LevelEdit::Put(t) => t.key(),
            LevelEdit::Del(k) => k,
        }
    }
}

/// New nodes are held back until the final root is known, so nodes discarded by the root collapse
/// are never written and the write count is exact.
struct PendingSink {
    nodes: Vec<(NodeId, Vec<u8>)>,
    sealer: Arc<dyn NodeSealer>,
}

impl NodeSink for PendingSink {
    fn write(&mut self, id: NodeId, bytes: Vec<u8>) -> Result<()> {
        self.nodes.push((id, bytes));
        Ok(())
    }
    fn sealer(&self) -> &dyn NodeSealer {
        self.sealer.as_ref()
    }
}

impl PendingSink {
    fn position(&self, id: &NodeId) -> Option<usize> {
        self.nodes.iter().rposition(|(i, _)| i == id)
    }
}

/// Walks the nodes of one level of the old tree in key order.
struct LevelCursor {
    /// Internal nodes from the root down to the parent of `current`, with the index followed.
    stack: Vec<(Arc<Node>, usize)>,
    current: Arc<Node>,
    current_id: NodeId,
}

fn corrupt(id: NodeId, reason: &'static str) -> TreeError {
    TreeError::Corrupt { id, reason }
}

impl LevelCursor {
    /// Positions on the node of `level` holding the last item with a key below `key`, or on the
    /// first node of the level if there is none. The item at `key` itself, if any, is either in
    /// that node or first in the next one.
    fn seek_before<S: NodeStore>(
        tree: &Tree<S>,
        root_id: NodeId,
        root: Arc<Node>,
        level: u8,
        key: &[u8],
    ) -> Result<Self> {
        let mut stack = Vec::new();
        let (mut node, mut id) = (root, root_id);
        while node.level() > level {
            let Node::Internal { level: l, children } = &*node else {
                return Err(corrupt(id, "leaf above level 0"));
            };
            let idx = children
                .partition_point(|c| c.key.as_slice() < key)
                .saturating_sub(1);
            let child = tree.read_child(*l, &children[idx])?;
            id = children[idx].id;
            stack.push((node.clone(), idx));
            node = child;
        }
        Ok(LevelCursor {
            stack,
            current: node,
            current_id: id,
        })
    }

    /// First key of the node after `current` on the same level.
    fn next_first_key(&self) -> Option<&[u8]> {
        self.stack
            .iter()
            .rev()
            .find_map(|(node, idx)| match &**node {
                Node::Internal { children, .. } => children.get(idx + 1).map(|c| c.key.as_slice()),
                Node::Leaf(_) => None,
            })
    }

    fn advance<S: NodeStore>(&mut self, tree: &Tree<S>) -> Result<bool> {
        let target = self.current.level();
        let (mut node, mut id) = loop {
            let Some((parent, idx)) = self.stack.last_mut() else {
                return Ok(false);
            };
            let Node::Internal { level, children } = &**parent else {
                return Err(corrupt(self.current_id, "leaf above level 0"));
            };
            if *idx + 1 >= children.len() {
                self.stack.pop();
                continue;
            }
            *idx += 1;
            let r = &children[*idx];
            break (tree.read_child(*level, r)?, r.id);
        };
        while node.level() > target {
            let Node::Internal { level, children } = &*node else {
                return Err(corrupt(id, "leaf above level 0"));
            };
            let child = tree.read_child(*level, &children[0])?;
            id = children[0].id;
            self.stack.push((node.clone(), 0));
            node = child;
        }
        self.current = node;
        self.current_id = id;
        Ok(true)
    }
}

struct Window<'a, T> {
    chunker: Chunker<T>,
    closed: Vec<Vec<T>>,
    level: u8,
    sink: &'a mut PendingSink,
    new: Vec<ChildRef>,
}

impl<T: ChunkItem> Window<'_, T> {
    fn feed(&mut self, item: T) -> Result<()> {
        self.chunker.push(item, &mut self.closed);
        self.drain()
    }

    fn drain(&mut self) -> Result<()> {
        for chunk in std::mem::take(&mut self.closed) {
            self.seal_chunk(chunk)?;
        }
        Ok(())
    }

    fn seal_chunk(&mut self, chunk: Vec<T>) -> Result<()> {
        let (r, bytes) = seal(chunk, self.level, self.sink.sealer.as_ref());
        self.sink.write(r.id, bytes)?;
        self.new.push(r);
        Ok(())
    }

    /// Feeds the old `items` of one node merged with `edits` (both sorted by key).
    fn merge(&mut self, items: Vec<T>, edits: &[LevelEdit<T>]) -> Result<()> {
        let mut items = items.into_iter().peekable();
        let mut edits = edits.iter().peekable();
        loop {
            match (items.peek(), edits.peek()) {
                (None, None) => return Ok(()),
                (Some(it), e) if e.is_none_or(|e| e.key() > it.key()) => {
                    if let Some(it) = items.next() {
                        self.feed(it)?;
                    }
                }
                (it, _) => {
                    let Some(e) = edits.next() else {
                        return Ok(());
                    };
                    if it.is_some_and(|it| it.key() == e.key()) {
                        items.next();
                    }
                    if let LevelEdit::Put(t) = e {
                        self.feed(t.clone())?;
                    }
                }
            }
        }
    }
}

impl<S: NodeStore> Tree<S> {
    /// Applies `batch` (strictly increasing keys) to the tree at `root`. Only nodes whose content
    /// changes are written; the new root equals what [`Tree::build`] would produce for the
    /// resulting entries. `stats.nodes_written` counts the nodes handed to the store.
    pub fn apply<I: IntoIterator<Item = Edit>>(
        &self,
        root: &NodeId,
        batch: I,
    ) -> Result<TreeUpdate> {
        let cfg = *self.config();
        let mut edits: Vec<LevelEdit<LeafItem>> = Vec::new();
        for e in batch {
            if edits.last().is_some_and(|p| p.key() >= e.key()) {
                return Err(TreeError::Unsorted {
                    key: e.key().to_vec(),
                });
            }
            edits.push(match e {
                Edit::Upsert(key, value) => {
                    cfg.check_entry(&key, Some(&value))?;
                    LevelEdit::Put(LeafItem::New(LeafEntry { key, value }))
                }
                Edit::Remove(key) => {
                    cfg.check_entry(&key, None)?;
                    LevelEdit::Del(key)
                }
            });
        }
        let unchanged = TreeUpdate {
            root: *root,
            stats: WriteStats::default(),
        };
        let root_node = self.read_node(root)?;
        if edits.is_empty() {
            return Ok(unchanged);
        }
        if root_node.is_empty() {
            return self.build(edits.into_iter().filter_map(|e| match e {
                LevelEdit::Put(item) => Some(item.into_pair()),
                LevelEdit::Del(_) => None,
            }));
        }

        let mut sink = PendingSink {
            nodes: Vec::new(),
            sealer: self.sealer.clone(),
        };
        let top = root_node.level();
        let mut up = self.apply_level(root, &root_node, 0, edits, &mut sink)?;
        for level in 1..=top {
            if up.is_empty() {
                break;
            }
            up = self.apply_level(root, &root_node, level, up, &mut sink)?;
        }
        if up.is_empty() {
            return Ok(unchanged);
        }

        // `up` edits the virtual level above the old root, whose only item (the old root) has
        // been consumed: what remains are the new nodes of the old root level.
        let mut stack = LevelStack::new(top + 1, self.threshold, cfg.max_node_bytes);
        for e in up {
            if let LevelEdit::Put(r) = e {
                stack.push(r, &mut sink)?;
            }
        }
        let mut new_root = stack
            .finish(&mut sink)?
            .unwrap_or_else(Tree::<S>::empty_root);

        // A lower level may now hold a single node, leaving a chain of single-child nodes above
        // it; the canonical root is the bottom of that chain.
        loop {
            let node = match sink.position(&new_root) {
                Some(i) => {
                    let plain =
                        sink.sealer
                            .open(&sink.nodes[i].1)
                            .map_err(|reason| TreeError::Unseal {
                                id: new_root,
                                reason,
                            })?;
                    Arc::new(Node::decode(&plain).map_err(|source| TreeError::Decode {
                        id: new_root,
                        source,
                    })?)
                }
                None => self.read_node(&new_root)?,
            };
            match &*node {
                Node::Internal { children, .. } if children.len() == 1 => {
                    if let Some(i) = sink.position(&new_root) {
                        sink.nodes.remove(i);
                    }
                    new_root = children[0].id;
                }
                _ => break,
            }
        }

        let mut stats = WriteStats::default();
        for (id, bytes) in &sink.nodes {
            self.write_encoded(id, bytes, &mut stats)?;
        }
        tracing::debug!(root = %new_root, nodes = stats.nodes_written, "applied batch");
        Ok(TreeUpdate {
            root: new_root,
            stats,
        })
    }

    /// Applies `edits` to level `level` of the old tree; returns the edits for the level above.
    fn apply_level<T: ChunkItem>(
        &self,
        root_id: &NodeId,
        root: &Arc<Node>,
        level: u8,
        edits: Vec<LevelEdit<T>>,
        sink: &mut PendingSink,
    ) -> Result<Vec<LevelEdit<ChildRef>>> {
        let mut out: BTreeMap<Vec<u8>, Option<ChildRef>> = BTreeMap::new();
        let mut i = 0;
        // First key of the old node where the previous window re-synchronised.
        let mut resynced_at: Option<Vec<u8>> = None;
        while i < edits.len() {
            let key = edits[i].key();
            let mut cur = LevelCursor::seek_before(self, *root_id, root.clone(), level, key)?;
            // When the edit touches the first item of a node, the node before it is affected too
            // unless it ended on a hash boundary: a node closed by the size cap ended there only
            // because its successor's first item did not fit (boundary rule 1), so changing or
            // removing that item can move the cut. Re-cutting then starts at the earlier node.
            // Not so if the previous window ended right there: it has re-cut the earlier node
            // itself (with its edits) and stopped on a hash boundary.
            if cur.next_first_key() == Some(key) {
                let after_window = resynced_at.as_deref() == Some(key);
                if !T::is_kind(&cur.current) {
                    return Err(corrupt(
                        cur.current_id,
                        "node kind does not match its level",
                    ));
                }
                let last = cur
                    .current
                    .last_key()
                    .ok_or_else(|| corrupt(cur.current_id, "empty node below the root"))?;
                if (after_window || is_boundary(level, last, self.threshold))
                    && !cur.advance(self)?
                {
                    return Err(corrupt(cur.current_id, "level ended before its last node"));
                }
            }
            let mark = sink.nodes.len();
            let mut w = Window {
                chunker: Chunker::new(level, self.threshold, self.config().max_node_bytes),
                closed: Vec::new(),
                level,
                sink: &mut *sink,
                new: Vec::new(),
            };
            let mut old: Vec<(Vec<u8>, NodeId)> = Vec::new();
            loop {
                let node = cur.current.clone();
                let items = T::items(&node)
                    .ok_or_else(|| corrupt(cur.current_id, "node kind does not match its level"))?;
                let Some(first) = items.first() else {
                    return Err(corrupt(cur.current_id, "empty node below the root"));
                };
                old.push((first.key().to_vec(), cur.current_id));
                let next_key = cur.next_first_key().map(<[u8]>::to_vec);
                let j = match &next_key {
                    None => edits.len(),
                    Some(nk) => i + edits[i..].partition_point(|e| e.key() < nk.as_slice()),
                };
                w.merge(items, &edits[i..j])?;
                i = j;
                let Some(nk) = next_key else {
                    if let Some(chunk) = w.chunker.take_open() {
                        w.seal_chunk(chunk)?;
                    }
                    break;
                };
                let resynced = w.chunker.is_empty()
                    && edits
                        .get(i)
                        .is_none_or(|e| e.key().cmp(&nk) != Ordering::Less);
                if resynced {
                    resynced_at = Some(nk);
                    break;
                }
                if !cur.advance(self)? {
                    return Err(corrupt(cur.current_id, "level ended before its last node"));
                }
            }
            let new = std::mem::take(&mut w.new);
            if old.iter().map(|o| o.1).eq(new.iter().map(|n| n.id)) {
                sink.nodes.truncate(mark);
                continue;
            }
            // A re-cut node identical to an old one needs no write; it keeps its reference.
            let old_ids: HashSet<NodeId> = old.iter().map(|o| o.1).collect();
            let mut k = mark;
            while k < sink.nodes.len() {
                if old_ids.contains(&sink.nodes[k].0) {
                    sink.nodes.remove(k);
                } else {
                    k += 1;
                }
            }
            for (key, _) in old {
                out.entry(key).or_insert(None);
            }
            for r in new {
                out.insert(r.key.clone(), Some(r));
            }
        }
        Ok(out
            .into_iter()
            .map(|(k, v)| match v {
                Some(r) => LevelEdit::Put(r),
                None => LevelEdit::Del(k),
            })
            .collect())
    }
}
