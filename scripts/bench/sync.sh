#!/usr/bin/env bash
# Sync benchmarks between devices on loopback (release build; relays disabled; 127.0.0.1 only).
#
#   (a) latency of a 4 KiB file from write+close on A until readable (right content) on B:
#       TRIALS trials, p50/p95, with the default 150 ms debounce, 500 ms and 50 ms
#   (b) a 1 GiB random file: close on A → B shows the full size / B's store stops growing /
#       B's copy hashes equal; B's fetch window (first to last blob arriving in B's store);
#       baseline: the same file moved by a bare iroh-blobs FsStore→FsStore transfer
#       (crates/cairn-net/examples/blob_baseline.rs) and the ratio of the two throughputs
#   (c) 1,000 small (4 KiB) files dropped at once on A: time until all are on B (RUNS runs)
#   (d) idle RSS and CPU% over 30 s of each daemon of a 100k-file vault with two peers
#
#   (b2) transfer only: A stores and publishes the 1 GiB file while B is stopped, then B starts
#        and fetches it (RUNS runs, median; the baseline also RUNS runs, median)
#   (xfer) only (b2) and its baseline (quicker to iterate on)
#   (relay) over a `cairn relay` started here on 127.0.0.1, both devices relay-only
#       (net.direct = false): 4 KiB latency p50/p95 and a RELAY_MIB file (default 100 MiB)
#       close-on-A → identical-on-B, against the same file over a direct pair in the same run
#       (RUNS runs each, medians); then the time from B's `join` to its first synced file when
#       the configured relay is unreachable (a closed port) against relays disabled
#   (rotate) key rotation in a ROT_FILES-file vault (default 100000) of three devices:
#       `cairn rotate-keys` on A → both B and C hold the new epoch (their epochs.secret, which
#       a daemon writes before sealing anything under it), RUNS runs, median
#
# Usage: scripts/bench/sync.sh [all|latency|big|xfer|many|idle|relay|rotate]...   (default: all)
# Env: TRIALS (25), RUNS (3), BIG_MIB (1024), IDLE_FILES (100000), ROT_FILES (100000), BENCH_DIR (target/),
#      CAIRN_BIN and BASELINE_BIN (prebuilt binaries; default: build them).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
TRIALS="${TRIALS:-25}"
RUNS="${RUNS:-3}"
BIG_MIB="${BIG_MIB:-1024}"
IDLE_FILES="${IDLE_FILES:-100000}"
ROT_FILES="${ROT_FILES:-100000}"
WHAT=("${@:-all}")
want() { for w in "${WHAT[@]}"; do [[ "$w" == all || "$w" == "$1" ]] && return 0; done; return 1; }

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
# CAIRN_BIN / BASELINE_BIN: compare prebuilt binaries (e.g. before/after a change) instead.
if [[ -z "${CAIRN_BIN:-}" ]]; then cargo build --release --locked -q -p cairn; fi
if [[ -z "${BASELINE_BIN:-}" ]]; then
    cargo build --release --locked -q -p cairn-net --example blob_baseline
fi
BIN="${CAIRN_BIN:-$TARGET/release/cairn}"
export BIN
BASELINE="${BASELINE_BIN:-$TARGET/release/examples/blob_baseline}"

# Never leave loopback.
export CAIRN_BIND=127.0.0.1:0 CAIRN_RELAY=disabled
export RUST_LOG="${RUST_LOG:-info}"
unset CAIRN_DATA_DIR CAIRN_VAULT

WORK="$(mktemp -d "${BENCH_DIR:-$ROOT/target}/sync-bench-XXXXXX")"
PIDS=()
MOUNTS=()
cleanup() {
    set +e
    for m in "${MOUNTS[@]}"; do
        if grep -q " $m .* fuse" /proc/self/mountinfo; then
            "$BIN" --data-dir "$(dirname "$m")/data" unmount "$m" >/dev/null 2>&1 &
        fi
    done
    wait_pids 60
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    for m in "${MOUNTS[@]}"; do
        grep -q " $m .* fuse" /proc/self/mountinfo && fusermount3 -u -z "$m" 2>/dev/null
    done
    rm -rf "$WORK"
}
wait_pids() { # wait up to $1 s for every daemon we started to exit
    local t=0
    for p in "${PIDS[@]}"; do
        while kill -0 "$p" 2>/dev/null && (( t < $1 * 10 )); do sleep 0.1; t=$((t + 1)); done
    done
}
trap cleanup EXIT

# dev DIR: run cairn for the device in DIR (own data dir and XDG dirs; DIR/env, if present,
# holds extra KEY=VALUE settings such as a test relay).
dev() {
    local d="$1"; shift
    local extra=()
    [[ -f "$d/env" ]] && mapfile -t extra <"$d/env"
    env "${extra[@]}" XDG_CONFIG_HOME="$d/config" XDG_DATA_HOME="$d/xdg" "$BIN" --data-dir "$d/data" "$@"
}
wait_mounted() { # DIR LOGFILE
    for _ in $(seq 600); do
        grep -q "mounted at $1\$" "$2" 2>/dev/null && grep -q " $1 .* fuse" /proc/self/mountinfo && return 0
        sleep 0.1
    done
    echo "mount $1 not ready; log:" >&2; tail -20 "$2" >&2; exit 1
}
# start_dev DIR DEBOUNCE [TICKET]: init+mount (no ticket) or join+mount, in the background.
start_dev() {
    local d="$1" deb="$2" ticket="${3:-}"
    mkdir -p "$d/mnt" "$d/data"
    if [[ -z "$ticket" ]]; then
        dev "$d" mount --init "$d/mnt" --debounce-ms "$deb" >>"$d/log" 2>&1 &
    else
        dev "$d" join "$ticket" "$d/mnt" --debounce-ms "$deb" >>"$d/log" 2>&1 &
    fi
    PIDS+=($!)
    MOUNTS+=("$d/mnt")
    echo $! >"$d/pid"
    daemon_pid "$d"
    wait_mounted "$d/mnt" "$d/log"
}
# daemon_pid DIR: DIR/pid is the background subshell running `dev`; the daemon is its child.
# Its pid goes to DIR/dpid (what CPU and RSS figures must read).
daemon_pid() {
    local p; p="$(cat "$1/pid")"
    for _ in $(seq 100); do
        pgrep -P "$p" -x cairn >"$1/dpid" && return 0
        sleep 0.05
    done
    echo "$p" >"$1/dpid"
}
stop_dev() {
    dev "$1" unmount "$1/mnt" >/dev/null 2>&1 || fusermount3 -u -z "$1/mnt"
    local p; p="$(cat "$1/pid")"
    while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
}
# pair NAME DEBOUNCE [N=2]: devices $WORK/NAME/{a,b[,c]}, b and c joined through a's tickets.
# PAIR_ENV (KEY=VALUE lines) goes into every device's env file.
pair() {
    local base="$WORK/$1" deb="$2" n="${3:-2}"
    local xs=(a b); (( n == 3 )) && xs+=(c)
    for x in "${xs[@]}"; do mkdir -p "$base/$x"; printf '%s' "${PAIR_ENV:-}" >"$base/$x/env"; done
    start_dev "$base/a" "$deb"
    start_dev "$base/b" "$deb" "$(dev "$base/a" invite 2>/dev/null)"
    if (( n == 3 )); then start_dev "$base/c" "$deb" "$(dev "$base/a" invite 2>/dev/null)"; fi
}
stop_pair() {
    for x in c b a; do [[ -d "$WORK/$1/$x" ]] && stop_dev "$WORK/$1/$x"; done
    return 0
}

# fill_files MNT N: N small files in directories of 1,000, written through a mount.
fill_files() {
    python3 - "$1" "$2" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for d in range(n // 1000 + 1):
    os.makedirs(os.path.join(root, f"d{d:03}"), exist_ok=True)
for i in range(n):
    with open(os.path.join(root, f"d{i // 1000:03}", f"f{i:06}"), "wb") as f:
        f.write(b"%d\n" % i)
PY
}
# wait_files BASE N LABEL: until devices b and c under BASE show all N files (an hour at most).
wait_files() {
    python3 - "$1" "$2" "$3" <<'PY'
import os, sys, time
base, n, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.monotonic()
for x in "bc":
    root = os.path.join(base, x, "mnt")
    while True:
        try:
            c = sum(len(os.listdir(os.path.join(root, d))) for d in os.listdir(root))
        except OSError:
            c = -1
        if c == n: break
        if time.monotonic() - t0 > 3600: sys.exit(f"{x}: {c} of {n} files after an hour")
        time.sleep(2)
    print(f"{label} device {x.upper()} shows all {n} files {time.monotonic() - t0:.0f} s after creation ended")
PY
}

echo "cairn sync benchmarks — $(date -u +%FT%TZ), $(nproc) cores, work dir $WORK"

# latency_trials A_MNT B_MNT TRIALS LABEL: 4 KiB write+close on A until readable on B.
latency_trials() {
    python3 - "$1" "$2" "$3" "$4" <<'PY'
import os, sys, time
a, b, n, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
open(os.path.join(a, "warm"), "wb").write(b"w")
while not os.path.exists(os.path.join(b, "warm")): time.sleep(0.01)
lat = []
for i in range(n):
    data = os.urandom(4096)
    name = f"lat-{i}.bin"
    t0 = time.monotonic()
    with open(os.path.join(a, name), "wb") as f:
        f.write(data)
    tp = os.path.join(b, name)
    while True:
        try:
            with open(tp, "rb") as f:
                if f.read() == data: break
        except OSError:
            pass
        if time.monotonic() - t0 > 60: sys.exit(f"trial {i}: not on B after 60 s")
        time.sleep(0.002)
    lat.append(time.monotonic() - t0)
    time.sleep(0.2)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]
print(f"{label}, {n} trials: p50 {q(0.5)*1000:.0f} ms, "
      f"p95 {q(0.95)*1000:.0f} ms, min {lat[0]*1000:.0f} ms, max {lat[-1]*1000:.0f} ms")
PY
}

# file_transfer A_MNT B_MNT MIB: seconds from close on A until B's copy hashes equal.
file_transfer() {
    python3 - "$1" "$2" "$3" <<'PY'
import hashlib, os, sys, time
a, b, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
name = f"t-{time.time_ns()}.bin"
h = hashlib.sha256()
with open(os.path.join(a, name), "wb") as f:
    for _ in range(mib):
        buf = os.urandom(1 << 20); h.update(buf); f.write(buf)
t0 = time.monotonic()
want, size, p = h.hexdigest(), mib << 20, os.path.join(b, name)
while True:
    try:
        if os.path.getsize(p) == size:
            hb = hashlib.sha256()
            with open(p, "rb") as f:
                while True:
                    buf = f.read(1 << 20)
                    if not buf: break
                    hb.update(buf)
            if hb.hexdigest() == want: break
    except OSError:
        pass
    if time.monotonic() - t0 > 1200: sys.exit("not on B after 20 min")
    time.sleep(0.5)
print(f"{time.monotonic() - t0:.2f}")
PY
}

# ---------------------------------------------------------------------------------------
if want latency; then
    for deb in 150 500 50; do   # 150 ms is the default
        pair "lat$deb" "$deb"
        latency_trials "$WORK/lat$deb/a/mnt" "$WORK/lat$deb/b/mnt" "$TRIALS" "(a) 4 KiB latency, debounce $deb ms"
        stop_pair "lat$deb"
    done
fi

# ---------------------------------------------------------------------------------------
if want big || want xfer; then
    SRC="$WORK/big-src.bin"
    # The source file outside the mount: the same bytes go through cairn and the baseline.
    python3 - "$SRC" "$BIG_MIB" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])): f.write(os.urandom(1 << 20))
PY
fi
if want big; then
    pair big 500
    D="$WORK/big"
    FETCH_OUT="$WORK/fetch.txt" python3 - "$SRC" "$D/a/mnt/big.bin" "$D/b/mnt/big.bin" "$D/a/data/vaults/default/store" "$D/b/data/vaults/default/store" <<'PY'
import hashlib, os, sys, time
src, a, b, sa, sb = sys.argv[1:]
def count(store):
    # Bytes in the store's pack files: they grow by one record per arriving blob.
    n = 0
    try:
        for f in os.scandir(os.path.join(store, "packs")):
            if f.name.endswith(".pack"):
                n += f.stat().st_size
    except FileNotFoundError:
        pass
    return n
size = os.path.getsize(src)
h = hashlib.sha256()
a0, b0 = count(sa), count(sb)
t_start = time.monotonic()
with open(src, "rb") as fi, open(a, "wb") as fo:
    while True:
        buf = fi.read(1 << 20)
        if not buf: break
        h.update(buf); fo.write(buf)
t_close = time.monotonic()
want = h.hexdigest()
t_size = None; first_b = None; last_b = None; last_a = t_close
na_prev, nb_prev = count(sa), count(sb)
stable_since = None
while True:
    now = time.monotonic()
    na, nb = count(sa), count(sb)
    if na != na_prev: last_a, na_prev = now, na
    if nb != nb_prev:
        if first_b is None: first_b = now
        last_b, nb_prev = now, nb
        stable_since = None
    if t_size is None:
        try:
            if os.path.getsize(b) == size: t_size = now
        except OSError: pass
    if t_size is not None and last_b is not None and nb > b0:
        stable_since = stable_since or now
        if now - stable_since > 3: break
    if now - t_close > 1800: sys.exit("1 GiB file not on B after 30 min")
    time.sleep(0.05)
t_hash0 = time.monotonic()
hb = hashlib.sha256()
with open(b, "rb") as f:
    while True:
        buf = f.read(1 << 20)
        if not buf: break
        hb.update(buf)
t_ok = time.monotonic()
assert hb.hexdigest() == want, "B's copy differs"
mib = size / (1 << 20)
fetch = (last_b - first_b) if first_b else float("nan")
print(f"(b) {mib:.0f} MiB: write on A {t_close - t_start:.1f} s; A's store stops growing "
      f"{last_a - t_close:.1f} s after close; B shows full size after {t_size - t_close:.1f} s; "
      f"B's last blob arrives {last_b - t_close:.1f} s after close "
      f"({mib / (last_b - t_close):.0f} MiB/s end to end); "
      f"B's fetch window (first→last blob) {fetch:.1f} s = {mib / fetch:.0f} MiB/s; "
      f"{(nb_prev - b0) / (1 << 20):.0f} MiB of packs; B's copy verified (sha256 through the mount, {t_ok - t_hash0:.1f} s "
      f"to read) {t_ok - t_close:.1f} s after close")
open(os.environ.get("FETCH_OUT", "/dev/null"), "w").write(f"{mib / fetch:.3f}\n")
PY
    stop_pair big
    rm -rf "$D"
fi
if want big || want xfer; then
    # (b2) transfer only: B is stopped while A stores and publishes the file, then B starts
    # and fetches everything it lacks; timed from B's start until its last blob lands.
    xfer_run() {
        pair xfer 500
        X="$WORK/xfer"
        stop_dev "$X/b"
        cp "$SRC" "$X/a/mnt/big.bin"
        python3 - "$X/a" <<'PY'
import json, subprocess, sys, time, os
a = sys.argv[1]
env = dict(os.environ, XDG_CONFIG_HOME=f"{a}/config", XDG_DATA_HOME=f"{a}/xdg")
ok = 0
while ok < 3:
    s = json.loads(subprocess.run([os.environ["BIN"], "--data-dir", f"{a}/data", "status", "--json"],
                                  capture_output=True, env=env, check=True).stdout)
    ok = ok + 1 if s["state"] == "synced" and s.get("last_snapshot") else 0
    time.sleep(0.5)
PY
        t0=$(date +%s.%N)
        dev "$X/b" mount "$X/b/mnt" >>"$X/b/log" 2>&1 &
        PIDS+=($!); echo $! >"$X/b/pid"
        daemon_pid "$X/b"
        python3 - "$X/b/data/vaults/default/store" "$t0" "$BIG_MIB" "$WORK/xfer.txt" "$(cat "$X/a/dpid")" "$(cat "$X/b/dpid")" <<'PY'
import os, sys, time
store, t0, mib, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
pids = {"A": int(sys.argv[5]), "B": int(sys.argv[6])}
hz = os.sysconf("SC_CLK_TCK")
def cpu(p): # (user, system) seconds of a process so far
    try:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) / hz, int(f[12]) / hz
    except OSError:
        return 0.0, 0.0
packs = os.path.join(store, "packs")
def count():
    # Bytes in the store's pack files (blobs are appended to them).
    n = 0
    try:
        for f in os.scandir(packs):
            if f.name.endswith(".pack"):
                n += f.stat().st_size
    except FileNotFoundError:
        pass
    return n
def newest():
    # The newest pack mtime: a fetched blob is appended to one, so this is the kernel's time
    # of the latest arrival, for a few stats per poll.
    t = 0.0
    try:
        for f in os.scandir(packs):
            if f.name.endswith(".pack"):
                t = max(t, f.stat().st_mtime)
    except FileNotFoundError:
        pass
    return t
c0 = {x: cpu(p) for x, p in pids.items()}
n0, prev = count(), newest()
first, last, seen, c_last = None, t0, time.time(), c0
while time.time() - seen < 3:
    t = newest()
    if t != prev:
        prev, last, seen = t, t, time.time()
        first = first or seen
        c_last = {x: cpu(p) for x, p in pids.items()}
    time.sleep(0.05)
if first is None:
    sys.exit("(b2) B's store did not change within 3 s of its start")
dt = last - t0
print(f"(b2) transfer only: B started after A published; {(count() - n0) / (1 << 20):.0f} MiB of packs ({mib:.0f} MiB file) "
      f"in {dt:.1f} s from B's start = {mib / dt:.0f} MiB/s "
      f"(first blob {first - t0:.1f} s after B's start)")
print("(b2) CPU from B's start to its last blob: " + ", ".join(
    f"{x} user {c_last[x][0] - c0[x][0]:.1f} s + sys {c_last[x][1] - c0[x][1]:.1f} s" for x in pids))
open(out, "a").write(f"{mib / dt:.3f}\n")
PY
        cmp "$SRC" "$X/b/mnt/big.bin" && echo "(b2) B's copy is byte-identical"
        stop_pair xfer
        rm -rf "$X"
    }
    for _ in $(seq "$RUNS"); do xfer_run; done
    for i in $(seq "$RUNS"); do
        rm -rf "$WORK/baseline"; mkdir -p "$WORK/baseline"
        "$BASELINE" "$SRC" "$WORK/baseline"
    done | tee "$WORK/baseline.txt" | sed 's/^/(b) baseline iroh-blobs FsStore→FsStore: /'
    rm -rf "$WORK/baseline" "$SRC"
    python3 - "$WORK/baseline.txt" "$WORK/fetch.txt" "$WORK/xfer.txt" <<'PY'
import re, sys, statistics
v = [float(re.search(r"mib_s=([\d.]+)", l).group(1)) for l in open(sys.argv[1]) if "mib_s=" in l]
base = statistics.median(v)
print(f"(b) baseline median {base:.0f} MiB/s over {len(v)} runs")
try:
    cairn = float(open(sys.argv[2]).read())
    print(f"(b) cairn's fetch window {cairn:.0f} MiB/s = {cairn / base:.2f}× the bare iroh-blobs transfer")
except FileNotFoundError:
    pass
xs = [float(l) for l in open(sys.argv[3]) if l.strip()]
x = statistics.median(xs)
print(f"(b2) transfer only: median {x:.0f} MiB/s over {len(xs)} runs "
      f"({', '.join(f'{v:.0f}' for v in xs)}) = {x / base:.2f}× the bare iroh-blobs transfer")
PY
fi

# ---------------------------------------------------------------------------------------
if want many; then
    pair many 500
    python3 - "$WORK/many/a/mnt" "$WORK/many/b/mnt" "$RUNS" <<'PY'
import os, statistics, sys, time
a, b, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = []
for r in range(runs):
    d = f"batch{r}"
    os.mkdir(os.path.join(a, d))
    t0 = time.monotonic()
    for i in range(1000):
        with open(os.path.join(a, d, f"f{i:04}.txt"), "wb") as f:
            f.write(os.urandom(4096))
    t_written = time.monotonic()
    while True:
        try:
            names = os.listdir(os.path.join(b, d))
            if len(names) == 1000 and all(
                os.path.getsize(os.path.join(b, d, n)) == 4096 for n in names):
                break
        except OSError:
            pass
        if time.monotonic() - t0 > 600: sys.exit("1,000 files not on B after 10 min")
        time.sleep(0.05)
    t = time.monotonic()
    out.append(t - t_written)
    print(f"(c) run {r}: writing 1,000 × 4 KiB on A took {t_written - t0:.2f} s; "
          f"all on B {t - t_written:.2f} s after the last close")
    time.sleep(2)
print(f"(c) 1,000 small files: median {statistics.median(out):.2f} s after the last close "
      f"(runs: {', '.join(f'{x:.2f}' for x in out)})")
PY
    stop_pair many
fi

# ---------------------------------------------------------------------------------------
if want idle; then
    pair idle 500 3
    D="$WORK/idle"
    t0=$(date +%s.%N)
    fill_files "$D/a/mnt" "$IDLE_FILES"
    t1=$(date +%s.%N)
    echo "(d) created $IDLE_FILES files through A's mount in $(awk "BEGIN{printf \"%.0f\", $t1 - $t0}") s"
    # Wait until B and C show every file (sync settles), then let things calm down.
    wait_files "$D" "$IDLE_FILES" "(d)"
    sleep 10
    python3 - "$D" <<'PY'
import os, sys, time
base = sys.argv[1]
hz = os.sysconf("SC_CLK_TCK")
pids = {x: int(open(os.path.join(base, x, "dpid")).read()) for x in "abc"}
def cpu(p):
    f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
def rss(p):
    for l in open(f"/proc/{p}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
c0 = {x: cpu(p) for x, p in pids.items()}; t0 = time.monotonic()
r = {x: [] for x in pids}
while time.monotonic() - t0 < 30:
    for x, p in pids.items(): r[x].append(rss(p))
    time.sleep(1)
dt = time.monotonic() - t0
for x, p in pids.items():
    pct = (cpu(p) - c0[x]) / hz / dt * 100
    print(f"(d) idle daemon {x.upper()} (100k-file vault, two peers) over {dt:.0f} s: "
          f"RSS {min(r[x]):.0f}–{max(r[x]):.0f} MB, CPU {pct:.2f}%")
PY
    stop_pair idle
fi

# ---------------------------------------------------------------------------------------
if want relay; then
    RELAY_MIB="${RELAY_MIB:-100}"
    "$BIN" relay --bind 127.0.0.1:0 --allow-anyone >"$WORK/relay.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 300); do grep -q "relay listening" "$WORK/relay.log" && break; sleep 0.1; done
    RELAY_URL="$(grep -o 'http://127\.0\.0\.1:[0-9]*/' "$WORK/relay.log" | head -1)"
    [[ -n "$RELAY_URL" ]] || { echo "relay did not start:" >&2; cat "$WORK/relay.log" >&2; exit 1; }
    echo "(relay) local relay at $RELAY_URL"
    PAIR_ENV=$'CAIRN_RELAY='"$RELAY_URL"$'\nCAIRN_DIRECT=false' pair relay 150
    latency_trials "$WORK/relay/a/mnt" "$WORK/relay/b/mnt" "$TRIALS" "(relay) 4 KiB latency, relay-only"
    PAIR_ENV="" pair direct 150
    latency_trials "$WORK/direct/a/mnt" "$WORK/direct/b/mnt" "$TRIALS" "(relay) 4 KiB latency, direct (same run)"
    r=(); d=()
    for i in $(seq "$RUNS"); do
        r+=("$(file_transfer "$WORK/relay/a/mnt" "$WORK/relay/b/mnt" "$RELAY_MIB")")
        d+=("$(file_transfer "$WORK/direct/a/mnt" "$WORK/direct/b/mnt" "$RELAY_MIB")")
    done
    python3 - "$RELAY_MIB" "${r[*]}" "${d[*]}" <<'PY'
import statistics, sys
mib = int(sys.argv[1]); r = [float(x) for x in sys.argv[2].split()]; d = [float(x) for x in sys.argv[3].split()]
mr, md = statistics.median(r), statistics.median(d)
print(f"(relay) {mib} MiB close→identical on B: relay-only median {mr:.2f} s ({mib/mr:.0f} MiB/s), "
      f"direct median {md:.2f} s ({mib/md:.0f} MiB/s); relay/direct throughput = {md/mr:.2f}x "
      f"(runs: relay {r}, direct {d})")
PY
    stop_pair relay
    stop_pair direct
    # Start-up with the relay unreachable (a closed port) vs relays disabled: B joins, then
    # the time until A's file is readable on B.
    for mode in unreachable disabled; do
        if [[ $mode == unreachable ]]; then env_line="CAIRN_RELAY=http://127.0.0.1:9/"; else env_line="CAIRN_RELAY=disabled"; fi
        base="$WORK/start-$mode"
        mkdir -p "$base/a" "$base/b"; echo "$env_line" >"$base/a/env"; echo "$env_line" >"$base/b/env"
        start_dev "$base/a" 150
        echo first >"$base/a/mnt/first.txt"
        sleep 1
        ticket="$(dev "$base/a" invite 2>/dev/null)"
        t0=$(date +%s.%N)
        start_dev "$base/b" 150 "$ticket"
        while ! grep -qx first "$base/b/mnt/first.txt" 2>/dev/null; do sleep 0.01; done
        t1=$(date +%s.%N)
        echo "(relay) join → first synced file, relay $mode: $(python3 -c "print(f'{$t1-$t0:.2f}')") s"
        stop_dev "$base/b"; stop_dev "$base/a"
    done
fi

# ---------------------------------------------------------------------------------------
if want rotate; then
    pair rot 500 3
    D="$WORK/rot"
    fill_files "$D/a/mnt" "$ROT_FILES"
    wait_files "$D" "$ROT_FILES" "(rotate)"
    sleep 5
    times=()
    for run in $(seq "$RUNS"); do
        t=$(python3 - "$D" "$run" "$BIN" <<'PY'
import os, subprocess, sys, time
base, run, bin_ = sys.argv[1], int(sys.argv[2]), sys.argv[3]
want = 36 * run  # epochs.secret: one 36-byte record per epoch after epoch 0
def size(x):
    try: return os.path.getsize(os.path.join(base, x, "data/vaults/default/epochs.secret"))
    except OSError: return 0
env = dict(os.environ, XDG_CONFIG_HOME=f"{base}/a/config", XDG_DATA_HOME=f"{base}/a/xdg")
t0 = time.monotonic()
subprocess.run([bin_, "--data-dir", f"{base}/a/data", "rotate-keys"], env=env, check=True,
               stdout=subprocess.DEVNULL)
while not (size("b") >= want and size("c") >= want):
    if time.monotonic() - t0 > 120: sys.exit("the new epoch did not reach B and C in 120 s")
    time.sleep(0.005)
print(f"{time.monotonic() - t0:.3f}")
PY
)
        times+=("$t")
    done
    python3 - "$ROT_FILES" "${times[*]}" <<'PY'
import statistics, sys
n = int(sys.argv[1]); t = [float(x) for x in sys.argv[2].split()]
print(f"(rotate) {n}-file vault, 3 devices: rotate-keys on A → B and C hold the new epoch: "
      f"median {statistics.median(t):.3f} s (runs: {t})")
PY
    stop_pair rot
fi
echo "done"
