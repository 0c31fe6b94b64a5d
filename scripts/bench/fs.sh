#!/usr/bin/env bash
# Filesystem benchmark (issue 5): the same phases on a native directory, on libfuse's
# passthrough_ll (built here with -O2 from libfuse3-dev's examples) over that directory, and on
# a cairn mount whose state lives on the same disk. Medians of RUNS runs; ratios against the
# passthrough baseline. Also untar / `ls -lR` / `rm -r` of an archive of /usr/include made in
# the run (hard links kept), and the cairn daemon's CPU seconds per phase.
# Usage: scripts/bench/fs.sh [SIZE_MIB=1024] [RUNS=3] [NFILES=10000]
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
# /usr/include has no hard links on Debian; one in twenty files gets a second name so the
# archive exercises link(2) the way package and source archives do.
ARCHIVE="$WORK/include.tar"
cp -a /usr/include "$WORK/include"
find "$WORK/include" -type f | awk 'NR % 20 == 0' | while read -r f; do ln "$f" "$f.link"; done
tar -cf "$ARCHIVE" -C "$WORK" include
rm -rf "$WORK/include"
echo "archive: $(tar -tvf "$ARCHIVE" | wc -l) entries, $(tar -tvf "$ARCHIVE" | grep -c ' link to ' || true) hard links, $(( $(stat -c %s "$ARCHIVE") >> 20 )) MiB" >&2
cleanup() {
    fusermount3 -u -z "$WORK/pt" 2>/dev/null || true
    "$BIN" --data-dir "$WORK/cairn-data" unmount "$WORK/cairn" 2>/dev/null || true
    rm -f "$SRC"; rm -rf "$WORK"
}
trap cleanup EXIT

"$PT" -o source="$WORK/pt-back" "$WORK/pt"
"$BIN" --data-dir "$WORK/cairn-data" init >/dev/null
# The phases delete 10k files at once: the mass-delete guard would rightly hold that and lay
# the files back, so this benchmark vault turns it off.
printf '[guard]\nmax_delete_share = 1.0\n' > "$WORK/config.toml"
CAIRN_CONFIG="$WORK/config.toml" "$BIN" --data-dir "$WORK/cairn-data" mount "$WORK/cairn" 2>"$WORK/cairn.log" &
CAIRN_PID=$!
for _ in $(seq 300); do grep -q " $WORK/cairn .* fuse" /proc/self/mountinfo && break; sleep 0.1; done

RESULTS="$WORK/results.jsonl"
for run in $(seq "$RUNS"); do
    for target in native pt cairn; do
        echo "run $run: $target" >&2
        pid=""; [ "$target" = cairn ] && pid="$CAIRN_PID"
        echo "{\"target\":\"$target\",\"r\":$(python3 scripts/bench/fs_phases.py "$WORK/$target" "$SRC" "$NFILES" "$ARCHIVE" $pid)}" >> "$RESULTS"
    done
done
python3 - "$RESULTS" "$SIZE_MIB" "$NFILES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size, n = int(sys.argv[2]), int(sys.argv[3])
med = {}
for t in ("native", "pt", "cairn"):
    rs = [r["r"] for r in rows if r["target"] == t]
    med[t] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k.endswith("_s") and not k.startswith("cpu_")}
cpu = {k: statistics.median(r["r"][k] for r in rows if r["target"] == "cairn")
       for k in next(r["r"] for r in rows if r["target"] == "cairn") if k.startswith("cpu_")}
names = {"native": "native dir", "pt": "passthrough_ll", "cairn": "cairn"}
print(f"medians of {len(rows)//3} runs; {size} MiB file, {n} small files")
print(f"{'phase':<14}" + "".join(f"{names[t]:>20}" for t in med) + f"{'cairn/passthrough':>20}{'cairn CPU':>12}")
for k in med["native"]:
    line = f"{k[:-2]:<14}"
    for t in med:
        v = med[t][k]
        line += f"{(f'{size/v:.0f} MiB/s' if k in ('write_s','read_cold_s','read_warm_s') else f'{v:.2f} s'):>20}"
    if k in ("write_s", "read_cold_s", "read_warm_s"):
        ratio = f"{med['pt'][k]/med['cairn'][k]*100:.0f}% of speed"
    else:
        ratio = f"{med['cairn'][k]/med['pt'][k]:.2f}x time"
    print(line + f"{ratio:>20}" + f"{cpu.get('cpu_' + k, 0):>10.2f} s")
PY
