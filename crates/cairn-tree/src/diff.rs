//! Streaming difference between two trees.
//!
//! Each side keeps a frontier stack of not-yet-visited subtrees and entries in key order. Equal
//! subtree ids at the head of both frontiers are skipped without loading; otherwise the side whose
//! head is "coarser" (higher level, or same level but starting earlier) is expanded. Because equal
//! content yields equal nodes once the cut points re-synchronise, the work is proportional to the
//! changed regions times the depth, not to the tree size.

use std::cmp::Ordering;
use std::sync::Arc;

use crate::error::{Result, TreeError};
use crate::node::{Node, NodeId};
use crate::store::NodeStore;
use crate::tree::Tree;

/// One difference from the old tree (`a`) to the new tree (`b`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiffEntry {
    Added {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Removed {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Changed {
        key: Vec<u8>,
        old: Vec<u8>,
        new: Vec<u8>,
    },
}

impl DiffEntry {
    pub fn key(&self) -> &[u8] {
        match self {
            DiffEntry::Added { key, .. }
            | DiffEntry::Removed { key, .. }
            | DiffEntry::Changed { key, .. } => key,
        }
    }
}

/// One frontier element: item `idx` of a loaded node (an entry of a leaf, or a child subtree of
/// an internal node). Referring into the shared node avoids copying keys and values that are
/// only compared; emitted entries are copied once, when emitted.
struct Elem {
    node: Arc<Node>,
    idx: usize,
}

/// A borrowed view of an [`Elem`].
enum View<'a> {
    Subtree {
        key: &'a [u8],
        id: NodeId,
        level: u8,
    },
    Entry {
        key: &'a [u8],
        value: &'a [u8],
    },
}

impl Elem {
    fn view(&self) -> View<'_> {
        match &*self.node {
            Node::Leaf(entries) => View::Entry {
                key: entries.key(self.idx),
                value: entries.value(self.idx),
            },
            Node::Internal { level, children } => {
                let c = &children[self.idx];
                View::Subtree {
                    key: &c.key,
                    id: c.id,
                    level: level - 1,
                }
            }
        }
    }

    /// Key and value of an entry element (copied).
    fn entry(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        match self.view() {
            View::Entry { key, value } => Some((key.to_vec(), value.to_vec())),
            View::Subtree { .. } => None,
        }
    }
}

/// Frontier of one side; the next element in key order is at the end.
struct Side {
    stack: Vec<Elem>,
}

impl Side {
    fn push_node(&mut self, node: Arc<Node>) {
        let n = node.len();
        self.stack.extend((0..n).rev().map(|idx| Elem {
            node: node.clone(),
            idx,
        }));
    }

    /// Pops the head, which must be an entry, as a (key, value) pair.
    fn pop_entry(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.stack.pop().and_then(|e| e.entry())
    }

    /// Replaces the subtree at the head with its children.
    fn expand<S: NodeStore>(&mut self, tree: &Tree<S>) -> Result<()> {
        let Some(head) = self.stack.pop() else {
            return Ok(());
        };
        let View::Subtree { key, id, level } = head.view() else {
            self.stack.push(head);
            return Ok(());
        };
        let node = tree.read_node(&id)?;
        if node.level() != level || node.first_key() != Some(key) {
            return Err(TreeError::Corrupt {
                id,
                reason: "child does not match its reference",
            });
        }
        self.push_node(node);
        Ok(())
    }
}

/// Iterator returned by [`Tree::diff`]. Yields `Err` at most once, then ends.
pub struct Diff<'t, S> {
    tree: &'t Tree<S>,
    roots: Option<(NodeId, NodeId)>,
    a: Side,
    b: Side,
    done: bool,
}

impl<S: NodeStore> Tree<S> {
    /// Differences turning tree `a` into tree `b`, in key order.
    pub fn diff(&self, a: &NodeId, b: &NodeId) -> Diff<'_, S> {
        Diff {
            tree: self,
            roots: Some((*a, *b)),
            a: Side { stack: Vec::new() },
            b: Side { stack: Vec::new() },
            done: a == b,
        }
    }
}

enum Step {
    EmitA,
    EmitB,
    EmitChanged,
    ExpandA,
    ExpandB,
    ExpandBoth,
    SkipBoth,
    End,
}

impl<S: NodeStore> Diff<'_, S> {
    fn step(&mut self) -> Result<Option<DiffEntry>> {
        if let Some((a, b)) = self.roots.take() {
            self.a.push_node(self.tree.read_node(&a)?);
            self.b.push_node(self.tree.read_node(&b)?);
        }
        loop {
            let step = match (
                self.a.stack.last().map(Elem::view),
                self.b.stack.last().map(Elem::view),
            ) {
                (None, None) => Step::End,
                (Some(View::Subtree { .. }), None) => Step::ExpandA,
                (None, Some(View::Subtree { .. })) => Step::ExpandB,
                (Some(View::Entry { .. }), None) => Step::EmitA,
                (None, Some(View::Entry { .. })) => Step::EmitB,
                (
                    Some(View::Subtree {
                        key: ka,
                        id: ia,
                        level: la,
                    }),
                    Some(View::Subtree {
                        key: kb,
                        id: ib,
                        level: lb,
                    }),
                ) => {
                    if ia == ib {
                        Step::SkipBoth
                    } else {
                        match la.cmp(&lb).then_with(|| kb.cmp(ka)) {
                            Ordering::Greater => Step::ExpandA,
                            Ordering::Less => Step::ExpandB,
                            Ordering::Equal => Step::ExpandBoth,
                        }
                    }
                }
                (Some(View::Entry { key: ka, .. }), Some(View::Subtree { key: kb, .. })) => {
                    if ka < kb { Step::EmitA } else { Step::ExpandB }
                }
                (Some(View::Subtree { key: ka, .. }), Some(View::Entry { key: kb, .. })) => {
                    if kb < ka { Step::EmitB } else { Step::ExpandA }
                }
                (
                    Some(View::Entry { key: ka, value: va }),
                    Some(View::Entry { key: kb, value: vb }),
                ) => match ka.cmp(kb) {
                    Ordering::Less => Step::EmitA,
                    Ordering::Greater => Step::EmitB,
                    Ordering::Equal if va == vb => Step::SkipBoth,
                    Ordering::Equal => Step::EmitChanged,
                },
            };
            match step {
                Step::EmitA => {
                    return Ok(self
                        .a
                        .pop_entry()
                        .map(|(key, value)| DiffEntry::Removed { key, value }));
                }
                Step::EmitB => {
                    return Ok(self
                        .b
                        .pop_entry()
                        .map(|(key, value)| DiffEntry::Added { key, value }));
                }
                Step::EmitChanged => {
                    return Ok(match (self.a.pop_entry(), self.b.pop_entry()) {
                        (Some((key, old)), Some((_, new))) => {
                            Some(DiffEntry::Changed { key, old, new })
                        }
                        _ => None,
                    });
                }
                Step::End => return Ok(None),
                Step::ExpandA => self.a.expand(self.tree)?,
                Step::ExpandB => self.b.expand(self.tree)?,
                Step::ExpandBoth => {
                    self.a.expand(self.tree)?;
                    self.b.expand(self.tree)?;
                }
                Step::SkipBoth => {
                    self.a.stack.pop();
                    self.b.stack.pop();
                }
            }
        }
    }
}

impl<S: NodeStore> Iterator for Diff<'_, S> {
    type Item = Result<DiffEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(d)) => Some(Ok(d)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                self.a.stack.clear();
                self.b.stack.clear();
                Some(Err(e))
            }
        }
    }
}

impl<S: NodeStore> std::iter::FusedIterator for Diff<'_, S> {}
