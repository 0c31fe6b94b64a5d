#!/usr/bin/env bash
# History benchmark against a running daemon (issue 17), on one real device whose vault holds a
# FILES-file snapshot and then SNAPSHOTS snapshots from 3 devices (built at library level by
# crates/cairn-daemon/examples/history_folder_bench.rs before the daemon starts):
#   (a) `cairn log` (first page of 20), CLI process end to end, with the daemon running;
#   (b) `ls` and `ls -l` of the mount's .cairn/history/ (one directory per snapshot);
#   (c) `ls -lR` of the FILES-file tree in the oldest past snapshot against the same tree live.
# Medians of RUNS runs, after one untimed warm-up of each (the first `cairn log` indexes every
# header: reported separately as "cold").
#
#   scripts/bench/history_dir.sh [SNAPSHOTS=10000] [FILES=100000] [RUNS=3]
#
# BENCH_PROFILE=test (or dev) skips the release build; figures are then somewhat slower.
# Loopback only, relays disabled.
set -euo pipefail
cd "$(dirname "$0")/../.."
SNAPS="${1:-10000}"; FILES="${2:-100000}"; RUNS="${3:-3}"
PROFILE="${BENCH_PROFILE:-release}"
cargo build --profile "$PROFILE" -q -p cairn --bin cairn
cargo build --profile "$PROFILE" -q -p cairn-daemon --example history_folder_bench
case "$PROFILE" in release) OUT=target/release ;; *) OUT=target/debug ;; esac
BIN="$PWD/$OUT/cairn"; GEN="$PWD/$OUT/examples/history_folder_bench"
WORK="${BENCH_DIR:-$PWD/target/bench-history-dir}"
export CAIRN_BIND=127.0.0.1:0 CAIRN_RELAY=disabled
rm -rf "$WORK"; mkdir -p "$WORK"/{data,mnt}
DAEMON=
cleanup() {
    "$BIN" --data-dir "$WORK/data" unmount "$WORK/mnt" >/dev/null 2>&1 || true
    [ -n "$DAEMON" ] && wait "$DAEMON" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" --data-dir "$WORK/data" init --name bench >/dev/null
"$GEN" "$WORK/data" "$SNAPS" "$FILES"
"$BIN" --data-dir "$WORK/data" mount "$WORK/mnt" 2>"$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 600); do grep -q " $WORK/mnt .* fuse" /proc/self/mountinfo && break; sleep 0.1; done

python3 - "$BIN" "$WORK" "$RUNS" "$FILES" <<'PY'
import statistics, subprocess, sys, time
bin_, work, runs, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mnt = f"{work}/mnt"

def timed(cmd, shell=False):
    t = time.perf_counter()
    out = subprocess.run(cmd, shell=shell, check=True, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL).stdout
    return time.perf_counter() - t, out

def median(cmd, shell=False):
    timed(cmd, shell)  # warm-up
    return statistics.median(timed(cmd, shell)[0] for _ in range(runs))

log = [bin_, "--data-dir", f"{work}/data", "log"]
cold, _ = timed(log)
_, out = timed(log)
print(f"cairn log, first run (indexes every header): {cold*1e3:.0f} ms")
print(f"cairn log, first page ({len([l for l in out.decode().splitlines() if l[:1].isdigit()])} snapshots): "
      f"median {median(log)*1e3:.0f} ms")
_, names = timed(["ls", f"{mnt}/.cairn/history"])
n = len(names.split())
print(f"ls .cairn/history ({n} names): median {median(['ls', f'{mnt}/.cairn/history'])*1e3:.0f} ms")
print(f"ls -l .cairn/history: median {median(['ls', '-l', f'{mnt}/.cairn/history'])*1e3:.0f} ms")
if files:
    oldest = sorted(names.decode().split())[0]
    live = median(f"ls -lR {mnt}/tree | wc -l", shell=True)
    past = median(f"ls -lR {mnt}/.cairn/history/{oldest}/tree | wc -l", shell=True)
    lines_live = timed(f"ls -lR {mnt}/tree | wc -l", shell=True)[1].decode().strip()
    lines_past = timed(f"ls -lR {mnt}/.cairn/history/{oldest}/tree | wc -l", shell=True)[1].decode().strip()
    print(f"ls -lR of {files} files: live {live:.2f} s ({lines_live} lines), "
          f"past snapshot {oldest} {past:.2f} s ({lines_past} lines), ratio past/live {past/live:.2f}")
PY
