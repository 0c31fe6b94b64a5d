//! Streaming construction of a tree from sorted entries, and the level stack that `apply` reuses
//! when a tree grows taller.

use crate::boundary::{Chunker, LeafItem};
use crate::error::{Result, TreeError};
use crate::node::{ChildRef, LeafEntry, MAX_LEVEL, NodeId};
use crate::store::NodeStore;
use crate::tree::{NodeSealer, Tree, TreeUpdate, WriteStats, seal};

/// Destination of freshly sealed nodes.
pub(crate) trait NodeSink {
    fn write(&mut self, id: NodeId, bytes: Vec<u8>) -> Result<()>;
    fn sealer(&self) -> &dyn NodeSealer;
}

/// Writes straight to the store (build: every sealed node is part of the result).
pub(crate) struct DirectSink<'t, S> {
    pub(crate) tree: &'t Tree<S>,
    pub(crate) stats: WriteStats,
}

impl<S: NodeStore> NodeSink for DirectSink<'_, S> {
    fn write(&mut self, id: NodeId, bytes: Vec<u8>) -> Result<()> {
        self.tree.write_encoded(&id, &bytes, &mut self.stats)
    }
    fn sealer(&self) -> &dyn NodeSealer {
        self.tree.sealer.as_ref()
    }
}

/// Internal levels above some base level, fed bottom-up with the references emitted by the level
/// below.
///
/// Each level holds back its most recent output until a second one arrives. A level that ends up
/// with a single node therefore never creates the level above it, so the root is the lowest level
/// with one node and no single-child node is ever written above it.
pub(crate) struct LevelStack {
    base: u8,
    threshold: u32,
    max_node_bytes: usize,
    held_in: Option<ChildRef>,
    levels: Vec<(Chunker<ChildRef>, Option<ChildRef>)>,
}

impl LevelStack {
    /// A stack whose first level is `base`, receiving references to level `base - 1` nodes.
    pub(crate) fn new(base: u8, threshold: u32, max_node_bytes: usize) -> Self {
        LevelStack {
            base,
            threshold,
            max_node_bytes,
            held_in: None,
            levels: Vec::new(),
        }
    }

    /// Accepts the next node (in key order) of level `base - 1`.
    pub(crate) fn push(&mut self, r: ChildRef, sink: &mut impl NodeSink) -> Result<()> {
        match self.held_in.replace(r) {
            None => Ok(()),
            Some(prev) => self.push_at(0, prev, sink),
        }
    }

    fn push_at(&mut self, i: usize, r: ChildRef, sink: &mut impl NodeSink) -> Result<()> {
        let level = self.level_of(i)?;
        if i == self.levels.len() {
            self.levels.push((
                Chunker::new(level, self.threshold, self.max_node_bytes),
                None,
            ));
        }
        let mut closed = Vec::new();
        self.levels[i].0.push(r, &mut closed);
        for chunk in closed {
            self.emit(i, chunk, sink)?;
        }
        Ok(())
    }

    fn level_of(&self, i: usize) -> Result<u8> {
        let level = usize::from(self.base) + i;
        if level > usize::from(MAX_LEVEL) {
            return Err(TreeError::TooDeep);
        }
        Ok(level as u8)
    }

    fn emit(&mut self, i: usize, chunk: Vec<ChildRef>, sink: &mut impl NodeSink) -> Result<()> {
        let (r, bytes) = seal(chunk, self.level_of(i)?, sink.sealer());
        sink.write(r.id, bytes)?;
        match self.levels[i].1.replace(r) {
            None => Ok(()),
            Some(prev) => self.push_at(i + 1, prev, sink),
        }
    }

    /// Closes every level and returns the root; `None` when nothing was ever pushed.
    pub(crate) fn finish(mut self, sink: &mut impl NodeSink) -> Result<Option<NodeId>> {
        let Some(last) = self.held_in.take() else {
            return Ok(None);
        };
        if self.levels.is_empty() {
            // Level `base - 1` has a single node: that is the root.
            return Ok(Some(last.id));
        }
        self.push_at(0, last, sink)?;
        let mut i = 0;
        loop {
            if let Some(chunk) = self.levels[i].0.take_open() {
                self.emit(i, chunk, sink)?;
            }
            let Some(last) = self.levels[i].1.take() else {
                // Unreachable by construction (a level exists only once it received an item), but
                // refuse rather than invent a root.
                return Err(TreeError::InvalidConfig("level stack lost its output"));
            };
            if i + 1 == self.levels.len() {
                return Ok(Some(last.id));
            }
            self.push_at(i + 1, last, sink)?;
            i += 1;
        }
    }
}

impl<S: NodeStore> Tree<S> {
    /// Builds a tree from entries sorted strictly by key, writing nodes as they close. Memory is
    /// bounded by one open node per level. Fails with [`TreeError::Unsorted`] on out-of-order or
    /// duplicate keys and with `KeyTooLarge`/`ValueTooLarge` beyond the configured limits.
    pub fn build<I, K, V>(&self, entries: I) -> Result<TreeUpdate>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<Vec<u8>>,
        V: Into<Vec<u8>>,
    {
        let cfg = *self.config();
        let mut sink = DirectSink {
            tree: self,
            stats: WriteStats::default(),
        };
        let mut leaves = Chunker::new(0, self.threshold, cfg.max_node_bytes);
        let mut upper = LevelStack::new(1, self.threshold, cfg.max_node_bytes);
        let mut prev: Option<Vec<u8>> = None;
        let mut closed = Vec::new();
        for (k, v) in entries {
            let (key, value) = (k.into(), v.into());
            cfg.check_entry(&key, Some(&value))?;
            match &mut prev {
                Some(p) if key.as_slice() <= p.as_slice() => {
                    return Err(TreeError::Unsorted { key });
                }
                Some(p) => {
                    p.clear();
                    p.extend_from_slice(&key);
                }
                None => prev = Some(key.clone()),
            }
            leaves.push(LeafItem::New(LeafEntry { key, value }), &mut closed);
            for chunk in closed.drain(..) {
                let (r, bytes) = seal(chunk, 0, sink.sealer());
                sink.write(r.id, bytes)?;
                upper.push(r, &mut sink)?;
            }
        }
        if let Some(chunk) = leaves.take_open() {
            let (r, bytes) = seal(chunk, 0, sink.sealer());
            sink.write(r.id, bytes)?;
            upper.push(r, &mut sink)?;
        }
        let root = upper
            .finish(&mut sink)?
            .unwrap_or_else(Tree::<S>::empty_root);
        tracing::debug!(%root, nodes = sink.stats.nodes_written, "built tree");
        Ok(TreeUpdate {
            root,
            stats: sink.stats,
        })
    }
}
