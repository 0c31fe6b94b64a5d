#!/usr/bin/env bash
# Ingest (issue 16): a MIB-MiB random file written through the mount and fsync'd, until the
# snapshot holding it is published (`cairn status`: synced, a new revision), against a plain
# write + fsync of the same bytes to the same disk, in the same run, alternating, RUNS runs,
# medians. Also the daemon's CPU seconds per run and the store's size against the file's.
# One device, relays disabled, bound to 127.0.0.1.
#   Usage: scripts/bench/ingest.sh [MIB=1024] [RUNS=3]   (BENCH_DIR: where the data goes)
set -euo pipefail
cd "$(dirname "$0")/../.."
MIB="${1:-1024}"
RUNS="${2:-3}"
cargo build --release --locked -q -p cairn
BIN="$PWD/target/release/cairn"
WORK="$(mktemp -d "${BENCH_DIR:-$PWD/target}/ingest-XXXXXX")"
export CAIRN_BIND=127.0.0.1:0 CAIRN_RELAY=disabled XDG_CONFIG_HOME="$WORK/config"
cleanup() {
    "$BIN" --data-dir "$WORK/data" unmount "$WORK/mnt" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/mnt" "$WORK/plain"
"$BIN" --data-dir "$WORK/data" init >/dev/null
"$BIN" --data-dir "$WORK/data" mount "$WORK/mnt" 2>"$WORK/log" &
for _ in $(seq 300); do grep -q " $WORK/mnt .* fuse" /proc/self/mountinfo && break; sleep 0.1; done
python3 - "$BIN" "$WORK" "$MIB" "$RUNS" <<'PY'
import json, os, statistics, subprocess, sys, time
bin_, work, mib, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = f"{work}/data"
def status():
    out = subprocess.run([bin_, "--data-dir", data, "status", "--json"], capture_output=True, check=True).stdout
    return json.loads(out)
pid = status()["mount"]["pid"]
hz = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / hz
def revision():
    s = status()
    return (s["last_snapshot"] or {}).get("revision", 0), s["state"]
def write(path, payload):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(payload)
    for i in range(0, len(payload), 1 << 20):
        os.write(fd, view[i:i + (1 << 20)])
    os.fsync(fd)
    os.close(fd)
cairn, plain, cpus = [], [], []
for r in range(runs):
    # Fresh random bytes in memory per run: both writers copy the same bytes, neither reads a
    # disk, and nothing deduplicates against an earlier run.
    payload = os.urandom(mib << 20)
    t = time.monotonic()
    write(f"{work}/plain/f.bin", payload)
    plain.append(time.monotonic() - t)
    os.remove(f"{work}/plain/f.bin")
    rev0, _ = revision()
    c0 = cpu()
    t = time.monotonic()
    write(f"{work}/mnt/big{r}.bin", payload)
    t_fsync = time.monotonic() - t
    while True:
        rev, state = revision()
        if rev > rev0 and state == "synced":
            break
        time.sleep(0.02)
    cairn.append(time.monotonic() - t)
    cpus.append(cpu() - c0)
    print(f"run {r + 1}: plain write+fsync {plain[-1]:.2f} s; cairn write+fsync {t_fsync:.2f} s, "
          f"published after {cairn[-1]:.2f} s; daemon CPU {cpus[-1]:.1f} s", flush=True)
p, c = statistics.median(plain), statistics.median(cairn)
print(f"median: plain {mib / p:.0f} MiB/s, cairn (write+fsync -> snapshot published) {mib / c:.0f} MiB/s "
      f"= {p / c * 100:.0f} % of plain; daemon CPU {statistics.median(cpus):.1f} s per {mib} MiB")
store = sum(f.stat().st_size for f in os.scandir(f"{data}/vaults/default/store/packs") if f.name.endswith(".pack"))
print(f"store: {store / (1 << 20):.0f} MiB of packs for {runs * mib} MiB written "
      f"({len([f for f in os.scandir(f'{data}/vaults/default/store/packs') if f.name.endswith('.pack')])} pack files)")
PY
