#!/usr/bin/env bash
# Decoder fuzzing with a larger budget than the test suite's (issue 14). Runs every test named
# `fuzz_*` in the crates below, one at a time, with PROPTEST_CASES cases each, and prints per
# test (one decoder and one kind of input each) the cases run, the seconds taken and the cases
# per second. A case is one generated input fed to the decoder (mutation tests first encode a
# valid value, then decode the damaged bytes).
#
#   scripts/bench/fuzz.sh                   # 10 000 cases per test, debug test profile
#   PROPTEST_CASES=100000 scripts/bench/fuzz.sh cairn-net cairn-vault
#   FUZZ_PROFILE=release scripts/bench/fuzz.sh
#
# A failure prints proptest's minimal failing input and makes the script exit non-zero after
# the table (the failing case is also saved under the crate's proptest-regressions/).
set -euo pipefail
cd "$(dirname "$0")/../.."

export PROPTEST_CASES="${PROPTEST_CASES:-10000}"
profile_args=()
[[ "${FUZZ_PROFILE:-}" == release ]] && profile_args=(--release)
crates=("$@")
[[ ${#crates[@]} -gt 0 ]] || crates=(cairn-crypto cairn-registry cairn-store
    cairn-tree cairn-vault cairn-overlay cairn-net)

failed=0
printf '%-16s %-46s %9s %9s %11s\n' crate test cases seconds cases/s
for crate in "${crates[@]}"; do
    # Build the crate's test binaries once and learn their paths.
    mapfile -t bins < <(cargo test -p "$crate" --locked "${profile_args[@]}" --no-run \
        --message-format=json 2>/dev/null |
        jq -r 'select(.reason == "compiler-artifact" and .profile.test == true
                      and .executable != null) | .executable')
    for bin in "${bins[@]}"; do
        mapfile -t tests < <("$bin" --list 2>/dev/null | sed -n 's/^\(.*fuzz_[a-z0-9_]*\): test$/\1/p')
        for t in "${tests[@]}"; do
            start=$(date +%s.%N)
            if "$bin" --exact "$t" --test-threads 1 -q >/tmp/fuzz.$$.log 2>&1; then
                status=""
            else
                status="  FAILED"
                failed=1
                cat /tmp/fuzz.$$.log >&2
            fi
            end=$(date +%s.%N)
            awk -v c="$crate" -v t="${t##*::}" -v n="$PROPTEST_CASES" -v s="$start" -v e="$end" \
                -v st="$status" 'BEGIN { d = e - s; printf "%-16s %-46s %9d %9.2f %11.0f%s\n",
                c, t, n, d, n / d, st }'
        done
    done
done
rm -f /tmp/fuzz.$$.log
exit "$failed"
