#!/usr/bin/env bash
# Filesystem benchmark (issue 5): the same phases on a native directory, on libfuse's
# passthrough_ll (built here with -O2 from libfuse3-dev's examples) over that directory, and on
# a cairn mount whose state lives on the same disk. Medians of RUNS runs; ratios against the
# passthrough baseline. Usage: scripts/bench/fs.sh [SIZE_MIB=1024] [RUNS=3] [NFILES=10000]
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MIB="${1:-1024}"; RUNS="${2:-3}"; NFILES="${3:-10000}"
bash scripts/setup.sh
cargo build --release --locked -q -p cairn
BIN="$PWD/target/release/cairn"
WORK="${BENCH_DIR:-$PWD/target/bench-fs}"
rm -rf "$WORK"; mkdir -p "$WORK"/{native,pt-back,pt,cairn-data,cairn}
PT="$WORK/passthrough_ll"
gcc -O2 -o "$PT" /usr/share/doc/libfuse3-dev/examples/passthrough_ll.c $(pkg-config fuse3 --cflags --libs)
SRC=/dev/shm/cairn-bench-src.bin
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$SRC"
cleanup() {
    fusermount3 -u -z "$WORK/pt" 2>/dev/null || true
    "$BIN" --data-dir "$WORK/cairn-data" unmount "$WORK/cairn" 2>/dev/null || true
    rm -f "$SRC"; rm -rf "$WORK"
}
trap cleanup EXIT

"$PT" -o source="$WORK/pt-back" "$WORK/pt"
"$BIN" --data-dir "$WORK/cairn-data" init >/dev/null
"$BIN" --data-dir "$WORK/cairn-data" mount "$WORK/cairn" 2>"$WORK/cairn.log" &
for _ in $(seq 300); do grep -q " $WORK/cairn .* fuse" /proc/self/mountinfo && break; sleep 0.1; done

RESULTS="$WORK/results.jsonl"
for run in $(seq "$RUNS"); do
    for target in native pt cairn; do
        echo "run $run: $target" >&2
        echo "{\"target\":\"$target\",\"r\":$(python3 scripts/bench/fs_phases.py "$WORK/$target" "$SRC" "$NFILES")}" >> "$RESULTS"
    done
done
python3 - "$RESULTS" "$SIZE_MIB" "$NFILES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size, n = int(sys.argv[2]), int(sys.argv[3])
med = {}
for t in ("native", "pt", "cairn"):
    rs = [r["r"] for r in rows if r["target"] == t]
    med[t] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k.endswith("_s")}
names = {"native": "native dir", "pt": "passthrough_ll", "cairn": "cairn"}
print(f"medians of {len(rows)//3} runs; {size} MiB file, {n} small files")
print(f"{'phase':<14}" + "".join(f"{names[t]:>20}" for t in med) + f"{'cairn/passthrough':>20}")
for k in med["native"]:
    line = f"{k[:-2]:<14}"
    for t in med:
        v = med[t][k]
        line += f"{(f'{size/v:.0f} MiB/s' if k in ('write_s','read_cold_s','read_warm_s') else f'{v:.2f} s'):>20}"
    if k in ("write_s", "read_cold_s", "read_warm_s"):
        ratio = f"{med['pt'][k]/med['cairn'][k]*100:.0f}% of speed"
    else:
        ratio = f"{med['cairn'][k]/med['pt'][k]:.2f}x time"
    print(line + f"{ratio:>20}")
PY
