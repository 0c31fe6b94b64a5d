//! Conflict-copy names: `name.sync-conflict-YYYYMMDD-HHMMSS-<device>.ext`.
//!
//! The name is a pure function of the losing version (its HLC wall time in UTC and its
//! author) and of an attempt number, so every device that detects the same conflict picks
//! the same name. Attempt `k > 0` appends `-k` before the extension; the merge moves on to
//! the next attempt only when the name is held by an unrelated, still-live version.

use crate::path::{MAX_NAME_LEN, VaultPath};
use crate::version::Version;

const MARKER: &str = ".sync-conflict-";

/// The conflict-copy path for `loser`, which lost the name `path`.
pub fn conflict_path(path: &VaultPath, loser: &Version, attempt: u32) -> VaultPath {
    conflict_path_for(path, &loser.device, loser.hlc.wall_ms, attempt)
}

/// The conflict-copy path for a version written by `device` at `wall_ms` (for callers that
/// detect a conflict before the version exists, such as a mount flushing an edit made on
/// top of content a peer has replaced since).
pub fn conflict_path_for(
    path: &VaultPath,
    device: &cairn_crypto::DeviceId,
    wall_ms: u64,
    attempt: u32,
) -> VaultPath {
    let name = path.name();
    let (stem, ext) = split_extension(name);
    let stamp = format_utc(wall_ms);
    let suffix = if attempt == 0 {
        String::new()
    } else {
        format!("-{attempt}")
    };
    let tail = format!("{MARKER}{stamp}-{}{suffix}{ext}", device.short());
    // Keep the result a valid name: shorten the stem (never the marker, which is what makes
    // the copy recognizable) at a character boundary.
    let budget = MAX_NAME_LEN.saturating_sub(tail.len());
    let mut cut = stem.len().min(budget);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    let new_name = format!("{}{tail}", &stem[..cut]);
    let parent = path.parent().unwrap_or_default();
    // Every piece is a valid component character sequence of bounded length; the only way
    // `join` can fail is a parent path near PATH_MAX, in which case we fall back to the
    // vault root so the content is never dropped.
    parent
        .join(&new_name)
        .or_else(|_| VaultPath::root().join(&new_name))
        .unwrap_or_else(|_| VaultPath::root())
}

/// Whether a name looks like a conflict copy (for status displays).
pub fn is_conflict_name(name: &str) -> bool {
    name.contains(MARKER)
}

/// What a conflict copy's name says: the name it lost, and the short id of the device whose
/// version it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyName {
    pub original: String,
    pub device_short: String,
}

/// Parses a name made by [`conflict_path`]: `stem.sync-conflict-YYYYMMDD-HHMMSS-dev[-k].ext`.
/// `None` for any other name (and for a copy whose stem was shortened to fit, whose original
/// name cannot be known).
pub fn parse_copy_name(name: &str) -> Option<CopyName> {
    let at = name.rfind(MARKER)?;
    let (stem, rest) = (&name[..at], &name[at + MARKER.len()..]);
    // YYYYMMDD-HHMMSS-xxxxxxxx
    let stamp = rest.get(..15)?;
    let ok_stamp = stamp
        .char_indices()
        .all(|(i, c)| if i == 8 { c == '-' } else { c.is_ascii_digit() });
    let dev = rest.get(16..24)?;
    if !ok_stamp
        || rest.as_bytes().get(15) != Some(&b'-')
        || !dev.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return None;
    }
    let mut tail = &rest[24..];
    if let Some(after) = tail.strip_prefix('-') {
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        tail = &after[digits..];
    }
    if !(tail.is_empty() || tail.starts_with('.')) || stem.is_empty() {
        return None;
    }
    Some(CopyName {
        original: format!("{stem}{tail}"),
        device_short: dev.to_string(),
    })
}

/// Where `keep both` moves a conflict copy: its original name with the device that wrote it,
/// `report (8be8d81b).txt`, so it no longer looks like an open conflict.
pub fn kept_copy_name(original: &str, device_short: &str) -> String {
    let (stem, ext) = split_extension(original);
    format!("{stem} ({device_short}){ext}")
}

/// Splits off the final extension; a leading dot (`.bashrc`) is not an extension.
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    }
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::version::VersionVector;
    use cairn_crypto::DeviceId;

    fn v(ms: u64) -> Version {
        Version {
            vv: VersionVector::new(),
            hlc: Hlc {
                wall_ms: ms,
                counter: 0,
            },
            device: DeviceId([0xab; 32]),
            dots: vec![(DeviceId([0xab; 32]), 1)],
        }
    }

    #[test]
    fn names() {
        // 2024-02-29 13:14:15 UTC
        let t = 1_709_212_455_000;
        let p = VaultPath::new("docs/report.txt").unwrap();
        assert_eq!(
            conflict_path(&p, &v(t), 0).as_str(),
            "docs/report.sync-conflict-20240229-131415-abababab.txt"
        );
        assert_eq!(
            conflict_path(&p, &v(t), 2).as_str(),
            "docs/report.sync-conflict-20240229-131415-abababab-2.txt"
        );
        let p = VaultPath::new(".bashrc").unwrap();
        assert_eq!(
            conflict_path(&p, &v(0), 0).as_str(),
            ".bashrc.sync-conflict-19700101-000000-abababab"
        );
        let long = VaultPath::new(&format!("{}.txt", "é".repeat(120))).unwrap();
        let c = conflict_path(&long, &v(t), 9);
        assert!(c.name().len() <= MAX_NAME_LEN);
        assert!(is_conflict_name(c.name()));
    }

    #[test]
    fn copy_names_parse_back_to_their_original() {
        let t = 1_709_212_455_000;
        for (orig, attempt) in [
            ("docs/report.txt", 0),
            ("docs/report.txt", 3),
            (".bashrc", 0),
            ("archive.tar.gz", 1),
            ("Makefile", 0),
        ] {
            let p = VaultPath::new(orig).unwrap();
            let c = conflict_path(&p, &v(t), attempt);
            let parsed = parse_copy_name(c.name()).unwrap_or_else(|| panic!("{c:?}"));
            assert_eq!(parsed.original, p.name(), "{c:?}");
            assert_eq!(parsed.device_short, "abababab");
        }
        for bad in [
            "report.txt",
            "report.sync-conflict-2024-131415-abababab.txt",
            "report.sync-conflict-20240229-131415-abab.txt",
            "report.sync-conflict-20240229-131415-abababab-.txt",
            "report.sync-conflict-20240229-131415-ababababx",
            ".sync-conflict-20240229-131415-abababab",
        ] {
            assert_eq!(parse_copy_name(bad), None, "{bad}");
        }
        assert_eq!(kept_copy_name("a.txt", "abababab"), "a (abababab).txt");
        assert_eq!(kept_copy_name(".bashrc", "ab"), ".bashrc (ab)");
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics_and_inverts_naming(name in "[a-z.é]{1,20}", ms in 0u64..4_000_000_000_000, k in 0u32..20) {
            let _ = parse_copy_name(&name);
            if let Ok(p) = VaultPath::new(&name) {
                let c = conflict_path(&p, &v(ms), k);
                let parsed = parse_copy_name(c.name());
                proptest::prop_assert_eq!(parsed.map(|x| x.original), Some(name.clone()));
            }
        }
    }
}
