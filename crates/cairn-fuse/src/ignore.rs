//! Ignore rules: `.cairnignore` files in gitignore syntax, at the vault root and in any
//! directory, matched with the `ignore` crate's gitignore matcher (ripgrep's).
//!
//! A path is ignored when one of its ancestor directories is, or when the deepest
//! `.cairnignore` with a rule matching it (in its own directory or above) says so, a later
//! `!pattern` line re-including it; exactly git's precedence. A `.cairnignore` file is never
//! ignored by a pattern (the rules sync like any file), only by lying in an ignored directory.
//!
//! Ignored paths live only in this device's overlay: the flusher never hands them to the
//! sink, so they are never published, and they stay readable and writable in the mount.

use std::collections::HashMap;
use std::io::Read;

use cairn_overlay::path::name_of;
use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::base::{BaseEntry, BaseLayer, ContentRef, EntryKind};
use crate::core::Core;
use crate::namespace::Node;
use cairn_overlay::Data;

/// The name of a rules file.
pub const IGNORE_FILE: &str = ".cairnignore";
/// Rules files are read up to this size; the rest is not looked at (a rules file this large
/// is a mistake, and reading it whole on every check would cost more than it is worth).
pub const MAX_RULES_BYTES: usize = 256 * 1024;

/// The rules of a tree, each directory's `.cairnignore` loaded once through `read` (which
/// returns a file's content, or `None` if there is no such file).
pub struct IgnoreRules<F: FnMut(&str) -> Option<Vec<u8>>> {
    read: F,
    dirs: HashMap<String, Option<Gitignore>>,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// `a/b/c` → `["", "a", "a/b"]`: the directories whose rules can apply, shallowest first.
fn containing_dirs(path: &str) -> Vec<&str> {
    let mut out = vec![""];
    for (i, c) in path.char_indices() {
        if c == '/' {
            out.push(&path[..i]);
        }
    }
    out
}

impl<F: FnMut(&str) -> Option<Vec<u8>>> IgnoreRules<F> {
    pub fn new(read: F) -> Self {
        Self {
            read,
            dirs: HashMap::new(),
        }
    }

    fn rules(&mut self, dir: &str) -> Option<&Gitignore> {
        if !self.dirs.contains_key(dir) {
            let parsed = (self.read)(&join(dir, IGNORE_FILE)).and_then(|text| {
                let mut b = GitignoreBuilder::new(if dir.is_empty() { "/" } else { dir });
                for line in String::from_utf8_lossy(&text).lines() {
                    // A bad pattern only costs its own line.
                    if let Err(e) = b.add_line(None, line) {
                        tracing::warn!(dir, line, error = %e, "ignoring a .cairnignore line");
                    }
                }
                b.build().ok().filter(|g| !g.is_empty())
            });
            self.dirs.insert(dir.to_string(), parsed);
        }
        self.dirs.get(dir).and_then(Option::as_ref)
    }

    /// What the deepest rules file with a matching rule says about `path` itself.
    fn own_match(&mut self, path: &str, is_dir: bool) -> bool {
        for dir in containing_dirs(path).into_iter().rev() {
            let rel = if dir.is_empty() {
                path
            } else {
                &path[dir.len() + 1..]
            };
            if let Some(g) = self.rules(dir) {
                match g.matched(rel, is_dir) {
                    Match::None => {}
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                }
            }
        }
        false
    }

    /// Whether `path` (relative to the vault root, no leading slash) is ignored.
    pub fn is_ignored(&mut self, path: &str, is_dir: bool) -> bool {
        if path.is_empty() {
            return false;
        }
        let ancestors: Vec<String> = containing_dirs(path)
            .into_iter()
            .skip(1)
            .map(str::to_string)
            .collect();
        if ancestors.iter().any(|a| self.own_match(a, true)) {
            return true;
        }
        // Rules files sync (unless their whole directory is local).
        name_of(path) != IGNORE_FILE && self.own_match(path, is_dir)
    }
}

/// Reads up to [`MAX_RULES_BYTES`] of a file from a base layer.
pub fn read_base_file(base: &dyn BaseLayer, entry: &BaseEntry) -> Option<Vec<u8>> {
    if entry.kind != EntryKind::File {
        return None;
    }
    let len = (entry.size as usize).min(MAX_RULES_BYTES);
    let mut out = vec![0u8; len];
    let mut at = 0;
    while at < len {
        match base.read(entry, at as u64, &mut out[at..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => at += n,
        }
    }
    out.truncate(at);
    Some(out)
}

impl Core {
    /// A rules file as the mount shows it (the overlay's version first).
    pub(crate) fn read_rules_file(&self, path: &str) -> Option<Vec<u8>> {
        match self.resolve(path).ok()?? {
            Node::Base(e) => read_base_file(self.base.as_ref(), &e),
            Node::Rec(r) => match &r.data {
                Data::Staged(id) => {
                    let f = self.overlay.open_staging(*id).ok()?;
                    let mut out = Vec::new();
                    f.take(MAX_RULES_BYTES as u64).read_to_end(&mut out).ok()?;
                    Some(out)
                }
                Data::Content(c) => {
                    let e = BaseEntry {
                        kind: EntryKind::File,
                        mode: r.mode,
                        mtime_ns: r.mtime_ns,
                        size: r.size,
                        xattrs: Default::default(),
                        target: Vec::new(),
                        content: ContentRef::new(c.clone()),
                    };
                    read_base_file(self.base.as_ref(), &e)
                }
                Data::Base => {
                    let e = self.base.get(path).ok()??;
                    read_base_file(self.base.as_ref(), &e)
                }
                _ => None,
            },
        }
    }

    /// The rules as the mount shows them now.
    pub(crate) fn ignore_rules(&self) -> IgnoreRules<impl FnMut(&str) -> Option<Vec<u8>> + '_> {
        IgnoreRules::new(move |p: &str| self.read_rules_file(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(files: &[(&str, &str)]) -> IgnoreRules<impl FnMut(&str) -> Option<Vec<u8>>> {
        let files: HashMap<String, Vec<u8>> = files
            .iter()
            .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()))
            .collect();
        IgnoreRules::new(move |p: &str| files.get(p).cloned())
    }

    #[test]
    fn gitignore_syntax_at_the_root() {
        let mut r = rules(&[(".cairnignore", "target/\n*.o\n# comment\n\n/build\n")]);
        assert!(r.is_ignored("target", true));
        assert!(
            !r.is_ignored("target", false),
            "target/ matches directories only"
        );
        assert!(r.is_ignored("target/debug/app", false));
        assert!(
            r.is_ignored("src/target/x", false),
            "no slash inside: any depth"
        );
        assert!(r.is_ignored("main.o", false));
        assert!(r.is_ignored("src/deep/main.o", false));
        assert!(!r.is_ignored("main.c", false));
        assert!(r.is_ignored("build", false));
        assert!(!r.is_ignored("src/build", false), "a leading slash anchors");
        assert!(!r.is_ignored(".cairnignore", false));
    }

    #[test]
    fn deeper_files_and_negations_take_precedence() {
        let mut r = rules(&[
            (".cairnignore", "*.log\n"),
            ("keep/.cairnignore", "!important.log\n*.tmp\n"),
        ]);
        assert!(r.is_ignored("a.log", false));
        assert!(r.is_ignored("keep/other.log", false));
        assert!(!r.is_ignored("keep/important.log", false));
        assert!(r.is_ignored("keep/x.tmp", false));
        assert!(
            !r.is_ignored("x.tmp", false),
            "a subdirectory's rules stay inside it"
        );
        // A rules file is never ignored, even by a rule that would match it.
        let mut r = rules(&[(".cairnignore", ".*\n")]);
        assert!(!r.is_ignored("sub/.cairnignore", false));
        assert!(r.is_ignored(".hidden", false));
    }

    #[test]
    fn an_ignored_directory_ignores_everything_below() {
        let mut r = rules(&[(".cairnignore", "node_modules/\n!keep.js\n")]);
        // Like git: a file below an excluded directory cannot be re-included.
        assert!(r.is_ignored("node_modules/keep.js", false));
        assert!(r.is_ignored("web/node_modules/a/b.js", false));
        assert!(!r.is_ignored("web/keep.js", false));
    }

    proptest::proptest! {
        #[test]
        fn matching_agrees_with_the_rules_meaning(
            segs in proptest::collection::vec("[a-z]{1,6}", 1..5),
            ext in "[a-z]{1,2}",
        ) {
            let mut r = rules(&[(".cairnignore", "target/\n*.o\n")]);
            let tail = segs.join("/");
            // Everything below an ignored directory, at any depth.
            let (under, deep, dir) = (
                format!("target/{tail}"),
                format!("{tail}/target/x"),
                format!("{tail}/target"),
            );
            proptest::prop_assert!(r.is_ignored(&under, false));
            proptest::prop_assert!(r.is_ignored(&deep, false));
            proptest::prop_assert!(r.is_ignored(&dir, true));
            // A file is ignored exactly when it is a `.o` or lies below a `target` directory.
            let name = format!("{tail}.{ext}");
            let below_target = segs[..segs.len() - 1].iter().any(|s| s == "target");
            proptest::prop_assert_eq!(r.is_ignored(&name, false), ext == "o" || below_target);
            // A rules file is, only inside an ignored directory.
            proptest::prop_assert_eq!(
                r.is_ignored(&format!("{tail}/{IGNORE_FILE}"), false),
                segs.iter().any(|s| s == "target")
            );
        }
    }

    #[test]
    fn no_rules_ignore_nothing_and_bad_lines_cost_only_themselves() {
        let mut r = rules(&[]);
        assert!(!r.is_ignored("a/b/c", false));
        let mut r = rules(&[(".cairnignore", "a[\n*.o\n")]);
        assert!(r.is_ignored("x.o", false));
    }
}
