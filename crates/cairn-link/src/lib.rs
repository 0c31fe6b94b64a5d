//! Hard links: how one inode with several names is written down.
//!
//! Every name of a link group is a full entry of its own (kind, mode, times, content) and
//! carries the same [`LinkGroup`] in a reserved attribute, [`LINK_XATTR`]: the group's
//! random id and the sorted list of all its names. The mount shows names that carry one id
//! as one inode (one `st_ino`, `st_nlink` = number of names) and writes a change through any
//! name to every name of the list. Keeping the group in the entry's attribute map means
//! the snapshot format, the flush, the merge and the sync carry links without a format
//! change: an older cairn reads a linked file as an ordinary file.
//!
//! `cairn.link` has no namespace prefix (`user.`, `trusted.`, …), so the kernel never lets
//! a program set, read or remove it: the name cannot collide with a real attribute.
//!
//! Encoding: `id (16 bytes) | varint count | count × (varint len, UTF-8 path)`, paths
//! strictly increasing, at most [`MAX_LINK_NAMES`] names of at most [`MAX_LINK_PATH`]
//! bytes. The decoder accepts exactly the encoder's output and never allocates more than
//! its input's size.

use cairn_codec::{Reader, put_bytes, put_varint};

/// The reserved attribute name that holds an entry's [`LinkGroup`].
pub const LINK_XATTR: &[u8] = b"cairn.link";

/// Most names one inode may have; `link(2)` beyond it fails with `EMLINK`. Every name's
/// entry carries the whole list, so the bound also bounds what one write rewrites.
pub const MAX_LINK_NAMES: usize = 256;

/// Longest vault path a group lists (Linux `PATH_MAX`).
pub const MAX_LINK_PATH: usize = 4096;

/// Identifies one link group across devices: random, made by the device that made the first
/// link.
pub type LinkId = [u8; 16];

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LinkGroup {
    pub id: LinkId,
    /// Every name of the inode, sorted, without duplicates.
    pub names: Vec<String>,
}

impl LinkGroup {
    /// A new group for `names` with a fresh random id.
    pub fn new(names: Vec<String>) -> LinkGroup {
        let mut id = [0u8; 16];
        let seed = std::collections::hash_map::RandomState::new();
        for (i, part) in id.chunks_mut(8).enumerate() {
            use std::hash::{BuildHasher, Hasher};
            let mut h = seed.build_hasher();
            h.write_usize(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            part.copy_from_slice(&h.finish().to_le_bytes());
        }
        let mut g = LinkGroup { id, names };
        g.normalize();
        g
    }

    fn normalize(&mut self) {
        self.names.sort();
        self.names.dedup();
    }

    pub fn nlink(&self) -> u32 {
        self.names.len() as u32
    }

    pub fn with_name(&self, name: &str) -> LinkGroup {
        let mut g = self.clone();
        g.names.push(name.to_string());
        g.normalize();
        g
    }

    pub fn without_name(&self, name: &str) -> LinkGroup {
        let mut g = self.clone();
        g.names.retain(|n| n != name);
        g
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(17 + self.names.iter().map(|n| n.len() + 2).sum::<usize>());
        out.extend_from_slice(&self.id);
        put_varint(&mut out, self.names.len() as u64);
        for n in &self.names {
            put_bytes(&mut out, n.as_bytes());
        }
        out
    }

    /// `None` for anything the encoder would not have written.
    pub fn decode(b: &[u8]) -> Option<LinkGroup> {
        let mut r = Reader::new(b);
        let id: LinkId = r.take_array().ok()?;
        let n = r.varint().ok()?;
        // Each name takes at least two bytes (length and one byte); check before reserving.
        if n == 0 || n > MAX_LINK_NAMES as u64 || n.saturating_mul(2) > r.remaining() as u64 {
            return None;
        }
        let mut names: Vec<String> = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let raw = r.bytes().ok()?;
            if raw.is_empty() || raw.len() > MAX_LINK_PATH {
                return None;
            }
            let name = std::str::from_utf8(raw).ok()?;
            if names.last().is_some_and(|p| p.as_str() >= name) {
                return None;
            }
            names.push(name.to_string());
        }
        r.finish().ok()?;
        Some(LinkGroup { id, names })
    }

    /// The group an attribute map carries, if any (an undecodable value counts as none:
    /// the entry is then an ordinary file).
    pub fn of(xattrs: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>) -> Option<LinkGroup> {
        xattrs.get(LINK_XATTR).and_then(|v| LinkGroup::decode(v))
    }

    /// Writes the group into an attribute map; a group of one name is no group, so the
    /// attribute goes and the entry is an ordinary file again.
    pub fn store(
        group: Option<&LinkGroup>,
        xattrs: &mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    ) {
        match group {
            Some(g) if g.names.len() > 1 => {
                xattrs.insert(LINK_XATTR.to_vec(), g.encode());
            }
            _ => {
                xattrs.remove(LINK_XATTR);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn group() -> impl Strategy<Value = LinkGroup> {
        (
            any::<[u8; 16]>(),
            prop::collection::btree_set("[a-z]{1,6}(/[a-z]{1,6}){0,2}", 1..6),
        )
            .prop_map(|(id, names)| LinkGroup {
                id,
                names: names.into_iter().collect(),
            })
    }

    fn check(b: &[u8]) -> Result<(), TestCaseError> {
        if let Some(g) = LinkGroup::decode(b) {
            // Canonical: what decodes re-encodes to the same bytes.
            prop_assert_eq!(g.encode(), b.to_vec());
            prop_assert!(g.names.len() <= MAX_LINK_NAMES);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cairn_fuzzkit::config())]

        #[test]
        fn fuzz_link_round_trip(g in group()) {
            prop_assert_eq!(LinkGroup::decode(&g.encode()), Some(g));
        }

        #[test]
        fn fuzz_link_random_bytes(b in prop::collection::vec(any::<u8>(), 0..200)) {
            check(&b)?;
        }

        #[test]
        fn fuzz_link_mutations(g in group(), edits in cairn_fuzzkit::edits()) {
            let mut b = g.encode();
            for (op, at, x) in edits {
                cairn_fuzzkit::mutate(&mut b, op, at, x);
            }
            check(&b)?;
        }
    }

    #[test]
    fn a_huge_name_count_is_refused_without_reserving() {
        let mut b = vec![0u8; 16];
        put_varint(&mut b, u64::MAX);
        assert_eq!(LinkGroup::decode(&b), None);
        let mut b = vec![0u8; 16];
        put_varint(&mut b, 200);
        b.extend_from_slice(&[1, b'a']);
        assert_eq!(LinkGroup::decode(&b), None);
    }

    #[test]
    fn one_name_is_no_group() {
        let mut x = std::collections::BTreeMap::new();
        let g = LinkGroup::new(vec!["b".into(), "a".into(), "a".into()]);
        assert_eq!(g.names, vec!["a".to_string(), "b".to_string()]);
        LinkGroup::store(Some(&g), &mut x);
        assert_eq!(LinkGroup::of(&x), Some(g.clone()));
        LinkGroup::store(Some(&g.without_name("a")), &mut x);
        assert!(x.is_empty());
    }
}
