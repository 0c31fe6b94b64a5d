//! Streaming difference between two trees.
//!
//! Each side keeps a frontier stack of not-yet-visited subtrees and entries in key order. Equal
//! subtree ids at the head of both frontiers are skipped without loading; otherwise the side whose
//! head is "coarser" (higher level, or same level but starting earlier) is expanded. Because equal
//! content yields equal nodes once the cut points re-synchronise, the work is proportional to the
//! changed regions times the depth, not to the tree size.

use std::cmp::Ordering;

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

enum Elem {
    Subtree { key: Vec<u8>, id: NodeId, level: u8 },
    Entry { key: Vec<u8>, value: Vec<u8> },
}

impl Elem {
    fn key(&self) -> &[u8] {
        match self {
            Elem::Subtree { key, .. } | Elem::Entry { key, .. } => key,
        }
    }
}

/// Frontier of one side; the next element in key order is at the end.
struct Side {
    stack: Vec<Elem>,
}

impl Side {
    fn push_node(&mut self, node: &Node) {
        match node {
            Node::Leaf(entries) => self.stack.extend(entries.iter().rev().map(|e| Elem::Entry {
                key: e.key.clone(),
                value: e.value.clone(),
            })),
            Node::Internal { level, children } => {
                self.stack
                    .extend(children.iter().rev().map(|c| Elem::Subtree {
                        key: c.key.clone(),
                        id: c.id,
                        level: level - 1,
                    }))
            }
        }
    }

    /// Replaces the subtree at the head with its children.
    fn expand<S: NodeStore>(&mut self, tree: &Tree<S>) -> Result<()> {
        let Some(Elem::Subtree { key, id, level }) = self.stack.pop() else {
            return Ok(());
        };
        let node = tree.read_node(&id)?;
        if node.level() != level || node.first_key() != Some(key.as_slice()) {
            return Err(TreeError::Corrupt {
                id,
                reason: "child does not match its reference",
            });
        }
        self.push_node(&node);
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
    Emit(DiffEntry),
    ExpandA,
    ExpandB,
    ExpandBoth,
    SkipBoth,
    End,
}

impl<S: NodeStore> Diff<'_, S> {
    fn step(&mut self) -> Result<Option<DiffEntry>> {
        if let Some((a, b)) = self.roots.take() {
            self.a.push_node(&*self.tree.read_node(&a)?);
            self.b.push_node(&*self.tree.read_node(&b)?);
        }
        loop {
            let step = match (self.a.stack.last(), self.b.stack.last()) {
                (None, None) => Step::End,
                (Some(Elem::Subtree { .. }), None) => Step::ExpandA,
                (None, Some(Elem::Subtree { .. })) => Step::ExpandB,
                (Some(Elem::Entry { .. }), None) => match self.a.stack.pop() {
                    Some(Elem::Entry { key, value }) => {
                        Step::Emit(DiffEntry::Removed { key, value })
                    }
                    _ => Step::End,
                },
                (None, Some(Elem::Entry { .. })) => match self.b.stack.pop() {
                    Some(Elem::Entry { key, value }) => Step::Emit(DiffEntry::Added { key, value }),
                    _ => Step::End,
                },
                (
                    Some(Elem::Subtree {
                        key: ka,
                        id: ia,
                        level: la,
                    }),
                    Some(Elem::Subtree {
                        key: kb,
                        id: ib,
                        level: lb,
                    }),
                ) => {
                    if ia == ib {
                        Step::SkipBoth
                    } else {
                        match la.cmp(lb).then_with(|| kb.cmp(ka)) {
                            Ordering::Greater => Step::ExpandA,
                            Ordering::Less => Step::ExpandB,
                            Ordering::Equal => Step::ExpandBoth,
                        }
                    }
                }
                (Some(Elem::Entry { key: ka, .. }), Some(sb @ Elem::Subtree { .. })) => {
                    if ka.as_slice() < sb.key() {
                        match self.a.stack.pop() {
                            Some(Elem::Entry { key, value }) => {
                                Step::Emit(DiffEntry::Removed { key, value })
                            }
                            _ => Step::End,
                        }
                    } else {
                        Step::ExpandB
                    }
                }
                (Some(sa @ Elem::Subtree { .. }), Some(Elem::Entry { key: kb, .. })) => {
                    if kb.as_slice() < sa.key() {
                        match self.b.stack.pop() {
                            Some(Elem::Entry { key, value }) => {
                                Step::Emit(DiffEntry::Added { key, value })
                            }
                            _ => Step::End,
                        }
                    } else {
                        Step::ExpandA
                    }
                }
                (Some(Elem::Entry { key: ka, .. }), Some(Elem::Entry { key: kb, .. })) => {
                    match ka.cmp(kb) {
                        Ordering::Less => match self.a.stack.pop() {
                            Some(Elem::Entry { key, value }) => {
                                Step::Emit(DiffEntry::Removed { key, value })
                            }
                            _ => Step::End,
                        },
                        Ordering::Greater => match self.b.stack.pop() {
                            Some(Elem::Entry { key, value }) => {
                                Step::Emit(DiffEntry::Added { key, value })
                            }
                            _ => Step::End,
                        },
                        Ordering::Equal => match (self.a.stack.pop(), self.b.stack.pop()) {
                            (
                                Some(Elem::Entry { key, value: old }),
                                Some(Elem::Entry { value: new, .. }),
                            ) => {
                                if old == new {
                                    continue;
                                }
                                Step::Emit(DiffEntry::Changed { key, old, new })
                            }
                            _ => Step::End,
                        },
                    }
                }
            };
            match step {
                Step::Emit(d) => return Ok(Some(d)),
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
