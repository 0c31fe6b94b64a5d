#!/usr/bin/env bash
# Daemon memory while writing a large file through the mount (issue 5: bounded, well under
# 200 MB for 4 GiB). Prints the daemon's peak RSS (VmHWM) after the write, after the flush
# into the store, and after reading the file back. Usage: scripts/bench/memory.sh [GIB=4]
set -euo pipefail
cd "$(dirname "$0")/../.."
GIB="${1:-4}"
cargo build --release --locked -q -p cairn
BIN="$PWD/target/release/cairn"
WORK="$(mktemp -d "${BENCH_DIR:-$PWD/target}/mem-XXXXXX")"
trap '"$BIN" --data-dir "$WORK/data" unmount "$WORK/mnt" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/mnt"
"$BIN" --data-dir "$WORK/data" init >/dev/null
"$BIN" --data-dir "$WORK/data" mount "$WORK/mnt" 2>"$WORK/log" &
PID=$!
for _ in $(seq 300); do grep -q " $WORK/mnt .* fuse" /proc/self/mountinfo && break; sleep 0.1; done
hwm() { awk '/VmHWM/ {printf "%.1f MB", $2/1024}' "/proc/$PID/status"; }
echo "idle:              $(hwm)"
python3 - "$WORK/mnt/big.bin" "$GIB" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2]) * 1024):
        f.write(os.urandom(1 << 20))
    os.fsync(f.fileno())
PY
echo "after ${GIB} GiB write: $(hwm)"
# The flush (chunk, encrypt, store, publish) runs after the debounce; wait for the overlay
# to empty, i.e. the staging file to be retired.
for _ in $(seq 600); do [ -z "$(ls -A "$WORK/data/vaults/default/overlay/staging" 2>/dev/null)" ] && break; sleep 0.5; done
echo "after flush:       $(hwm)"
cat "$WORK/mnt/big.bin" > /dev/null
echo "after read-back:   $(hwm)"
