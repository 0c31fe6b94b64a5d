//! Vault paths as the overlay and the filesystem above it spell them: components joined by
//! `/`, no leading, trailing or doubled slash, and `""` for the root (the journal refuses
//! anything else on the way in).

/// The directory holding `path`: `""` for a top-level name, and `""` for the root itself (the
/// root is its own parent, as `/..` is `/`).
pub fn parent_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

/// The last component of `path`; `""` for the root.
pub fn name_of(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

/// Wall-clock time as records store it: nanoseconds since the Unix epoch. A clock set before
/// 1970 reads as 0 rather than failing a filesystem operation.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() {
        for (path, parent, name) in [
            ("", "", ""),
            ("a", "", "a"),
            ("a/b", "a", "b"),
            ("a/b/c", "a/b", "c"),
        ] {
            assert_eq!(parent_of(path), parent, "{path:?}");
            assert_eq!(name_of(path), name, "{path:?}");
        }
    }
}
