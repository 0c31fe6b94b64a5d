#!/usr/bin/env bash
# POSIX conformance (issue 19): pjdfstest against a cairn mount and against libfuse's
# passthrough_ll (-O2, from libfuse3-dev's examples) mounted with the same options, as root.
# Prints both per-directory tables and how long each run took; fails when cairn fails more
# subtests than passthrough_ll does.
# Skips (exit 0, saying why) without the runner or without root.
# Usage: scripts/pjdfstest.sh [TEST_SUBDIR...]   (runner: ../shared/tools/run-pjdfstest.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNNER="${PJDFSTEST_RUNNER:-../shared/tools/run-pjdfstest.sh}"
if [ ! -f "$RUNNER" ]; then
    echo "pjdfstest: skipped: runner $RUNNER not found" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "pjdfstest: skipped: it switches users, so it must run as root" >&2
    exit 0
fi
BIN="${CAIRN_BIN:-$PWD/target/debug/cairn}"
[ -x "$BIN" ] || cargo build -q --locked -p cairn
OPTS="allow_other,default_permissions"
WORK=$(mktemp -d /tmp/cairn-pjdfstest.XXXXXX)
chmod 755 "$WORK" # the suite's other users must reach the mounts
mkdir -p "$WORK"/{pt-src,pt,cairn,data,config}
chmod 755 "$WORK"/pt-src
PT="$WORK/passthrough_ll"
gcc -O2 -o "$PT" /usr/share/doc/libfuse3-dev/examples/passthrough_ll.c $(pkg-config fuse3 --cflags --libs)
CAIRN_PID=""
cleanup() {
    fusermount3 -u -z "$WORK/pt" 2>/dev/null || true
    if [ -n "$CAIRN_PID" ]; then kill "$CAIRN_PID" 2>/dev/null || true; wait "$CAIRN_PID" 2>/dev/null || true; fi
    fusermount3 -u -z "$WORK/cairn" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
mounted() { grep -q " $1 .* fuse" /proc/self/mountinfo; }

run() { # NAME DIR: runs the suite, prints its table, sets FAILED
    local start end out
    start=$(date +%s)
    out=$(bash "$RUNNER" "$2" "${@:3}" 2>&1) || true
    end=$(date +%s)
    echo "-- $1 ($((end - start)) s)"
    echo "$out"
    FAILED=$(echo "$out" | sed -n 's/^pjdfstest: [0-9]* subtests, \([0-9]*\) failed$/\1/p')
    if [ -z "$FAILED" ]; then
        echo "pjdfstest: the run on $1 gave no summary line" >&2
        exit 1
    fi
}

"$PT" -o "source=$WORK/pt-src,$OPTS" "$WORK/pt"
mounted "$WORK/pt" || { echo "pjdfstest: passthrough_ll did not mount" >&2; exit 1; }
run passthrough_ll "$WORK/pt" "$@"
PT_FAILED=$FAILED

export XDG_CONFIG_HOME="$WORK/config" CAIRN_RELAY=disabled CAIRN_BIND=127.0.0.1:0
"$BIN" --data-dir "$WORK/data" init >/dev/null
"$BIN" --data-dir "$WORK/data" mount -o "$OPTS" "$WORK/cairn" 2>"$WORK/cairn.log" &
CAIRN_PID=$!
for _ in $(seq 300); do mounted "$WORK/cairn" && break; sleep 0.1; done
mounted "$WORK/cairn" || { tail -5 "$WORK/cairn.log" >&2; echo "pjdfstest: cairn did not mount" >&2; exit 1; }
run cairn "$WORK/cairn" "$@"
CAIRN_FAILED=$FAILED

echo "pjdfstest: cairn failed $CAIRN_FAILED, passthrough_ll failed $PT_FAILED, options $OPTS"
if [ "$CAIRN_FAILED" -gt "$PT_FAILED" ]; then
    echo "pjdfstest: cairn fails more subtests than passthrough_ll (see README, Conformance)" >&2
    exit 1
fi
