#!/usr/bin/env bash
# Storage-core and engine benchmarks (issues 3 and 4). Each prints its own baseline measured
# in the same run and the ratio against it. Run from anywhere: scripts/bench/core.sh
# Set BENCH_DIR to put on-disk data elsewhere (default: a temp dir under the repo's disk).
set -euo pipefail
cd "$(dirname "$0")/../.."
export BENCH_DIR="${BENCH_DIR:-$PWD/target/bench-tmp}"
mkdir -p "$BENCH_DIR"
trap 'rm -rf "$BENCH_DIR"' EXIT

echo "== prolly tree (cairn-tree)"
cargo run --release --locked -q -p cairn-tree --example tree_bench
echo "== chunk + encrypt + store (cairn-store)"
cargo run --release --locked -q -p cairn-store --example store_bench -- --dir "$BENCH_DIR"
echo "== publish and merge (cairn-vault)"
cargo run --release --locked -q -p cairn-vault --example vault_bench
