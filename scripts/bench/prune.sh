#!/usr/bin/env bash
# Prune benchmark: one `cairn prune` (default retention policy) of a vault with many files
# and 100 snapshots 12 hours apart (so the policy keeps ~35 and prunes the rest).
#
#   scripts/bench/prune.sh [FILES] [SNAPSHOTS]     (default 100000 100)
#
# Builds the vault with the engine directly (crates/cairn-daemon/examples/prune_bench.rs:
# files in directories of 100, one in ten of 16 KiB, each snapshot rewrites 1 %), then runs
# the prune in a fresh process and prints its time and peak RSS (VmHWM).
#
# BENCH_PROFILE picks the cargo profile (default release; `test` reuses the test build).
set -euo pipefail
cd "$(dirname "$0")/../.."
files="${1:-100000}"
snaps="${2:-100}"
profile="${BENCH_PROFILE:-release}"
cargo build --profile "$profile" -q -p cairn-daemon --example prune_bench
dir="$(cd target && pwd)/$( [ "$profile" = test ] || [ "$profile" = dev ] && echo debug || echo "$profile")/examples"
data="$(mktemp -d "${TMPDIR:-/tmp}/cairn-prune-bench.XXXXXX")"
trap 'rm -rf "$data"' EXIT
"$dir/prune_bench" build "$data" "$files" "$snaps"
"$dir/prune_bench" prune "$data"
