//! The pieces every cairn decoder fuzz test (a proptest named `fuzz_*`) shares: how many cases
//! to run and how to damage a valid encoding. It owns no decoder and no strategy for any
//! cairn type; those stay next to the code they test. Only `[dev-dependencies]` use it.

use proptest::prelude::*;

/// Cases per fuzz test when `PROPTEST_CASES` is not set: small enough that every fuzz test of
/// the workspace together adds well under a minute to `scripts/test.sh`;
/// `scripts/bench/fuzz.sh` sets `PROPTEST_CASES` for longer runs.
pub const CASES: u32 = 512;

/// The fuzz budget: [`CASES`], unless `PROPTEST_CASES` says otherwise.
pub fn config() -> ProptestConfig {
    config_with(CASES)
}

/// The fuzz budget for tests whose cases are expensive (an X25519 unwrap each, say): `cases`
/// unless `PROPTEST_CASES` says otherwise.
pub fn config_with(cases: u32) -> ProptestConfig {
    // `ProptestConfig::default()` reads PROPTEST_CASES; only its absence gets the budget.
    let cases = match std::env::var_os("PROPTEST_CASES") {
        Some(_) => ProptestConfig::default().cases,
        None => cases,
    };
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// One random edit of an encoding at `at`: `op` 0 flips bits of a byte (never none), 1
/// overwrites it with `x`, 2 inserts `x`, 3 deletes the byte, anything else truncates there.
/// An empty input gets `x`.
pub fn mutate(b: &mut Vec<u8>, op: u8, at: prop::sample::Index, x: u8) {
    if b.is_empty() {
        b.push(x);
        return;
    }
    let i = at.index(b.len());
    match op {
        0 => b[i] ^= x.max(1),
        1 => b[i] = x,
        2 => b.insert(i, x),
        3 => {
            b.remove(i);
        }
        _ => b.truncate(i),
    }
}

/// One to three edits for [`mutate`].
pub fn edits() -> impl Strategy<Value = Vec<(u8, prop::sample::Index, u8)>> {
    prop::collection::vec((0u8..5, any::<prop::sample::Index>(), any::<u8>()), 1..4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn every_edit_changes_the_bytes_or_their_length() {
        let mut runner = TestRunner::default();
        let idx = any::<prop::sample::Index>();
        for op in 0..5u8 {
            let at = idx.new_tree(&mut runner).unwrap().current();
            let good = vec![7u8; 16];
            let mut b = good.clone();
            mutate(&mut b, op, at, 0);
            if op == 1 {
                assert_eq!(b.len(), 16);
            } else {
                assert_ne!(b, good, "op {op} left the bytes alone");
            }
        }
        let mut empty = Vec::new();
        mutate(
            &mut empty,
            3,
            idx.new_tree(&mut runner).unwrap().current(),
            9,
        );
        assert_eq!(empty, vec![9]);
    }

    #[test]
    fn the_budget_is_fixed_unless_proptest_cases_is_set() {
        if std::env::var_os("PROPTEST_CASES").is_none() {
            assert_eq!(config().cases, CASES);
            assert_eq!(config_with(7).cases, 7);
        }
    }
}
