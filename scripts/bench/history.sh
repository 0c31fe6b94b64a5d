#!/usr/bin/env bash
# History benchmark: `cairn log` over a vault with many snapshots from 3 devices.
#
#   scripts/bench/history.sh [SNAPSHOTS]     (default 10000)
#
# Builds the snapshots with the engine directly (crates/cairn-daemon/examples/history_bench.rs:
# three devices committing and snapshotting in turn, merging each other every 10 rounds), then
# times the history index: the cold build (one age decryption per header), the warm refresh
# every `cairn log` pays, and the first page of 20 snapshots with their changed paths.
#
# BENCH_PROFILE=dev uses the dev profile (dependencies optimized, cairn's crates not): no
# release build needed, figures somewhat slower than release.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo run --profile "${BENCH_PROFILE:-release}" -q -p cairn-daemon --example history_bench -- "${1:-10000}"
