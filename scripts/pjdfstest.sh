#!/usr/bin/env bash
# POSIX conformance (issue 19): pjdfstest against a cairn mount and against libfuse's
# passthrough_ll (-O2, from libfuse3-dev's examples) mounted with the same options, as root.
# Prints both per-directory tables and how long each run took. cairn refuses hard links
# (README, Conformance), so failures in test files that call link(2) are counted apart; the
# script fails when cairn fails more of the other subtests than passthrough_ll does.
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

BUILD="${PJDFSTEST_BUILD:-${TMPDIR:-/tmp}/pjdfstest-build}"
# Failed subtests of the run whose full log is $1, split into "LINKED OTHER": LINKED counts
# the failures in test files that use link(2) (they build on hard links).
split_failures() {
    local linked=0 other=0 file n
    while read -r file n; do
        if grep -q ' link \${' "$BUILD/tests/$file" 2>/dev/null; then
            linked=$((linked + n))
        else
            other=$((other + n))
        fi
    done < <(sed -n 's|^.*/tests/\./\([^ ]*\.t\) .*Failed: \([0-9]*\))$|\1 \2|p' "$1")
    echo "$linked $other"
}

run() { # NAME DIR: runs the suite, prints its table, sets FAILED, LINKED and OTHER
    local start end out log
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
    log=$(echo "$out" | sed -n 's/^full output: //p')
    read -r LINKED OTHER < <(split_failures "$log")
    echo "   $1: $LINKED failed in tests that use link(2), $OTHER elsewhere"
}

"$PT" -o "source=$WORK/pt-src,$OPTS" "$WORK/pt"
mounted "$WORK/pt" || { echo "pjdfstest: passthrough_ll did not mount" >&2; exit 1; }
run passthrough_ll "$WORK/pt" "$@"
PT_FAILED=$FAILED PT_OTHER=$OTHER

export XDG_CONFIG_HOME="$WORK/config" CAIRN_RELAY=disabled CAIRN_BIND=127.0.0.1:0
"$BIN" --data-dir "$WORK/data" init >/dev/null
"$BIN" --data-dir "$WORK/data" mount -o "$OPTS" "$WORK/cairn" 2>"$WORK/cairn.log" &
CAIRN_PID=$!
for _ in $(seq 300); do mounted "$WORK/cairn" && break; sleep 0.1; done
mounted "$WORK/cairn" || { tail -5 "$WORK/cairn.log" >&2; echo "pjdfstest: cairn did not mount" >&2; exit 1; }
run cairn "$WORK/cairn" "$@"
CAIRN_FAILED=$FAILED CAIRN_OTHER=$OTHER

echo "pjdfstest: cairn failed $CAIRN_FAILED ($CAIRN_OTHER outside link tests)," \
    "passthrough_ll failed $PT_FAILED ($PT_OTHER outside link tests), options $OPTS"
if [ "$CAIRN_OTHER" -gt "$PT_OTHER" ]; then
    echo "pjdfstest: cairn fails more subtests than passthrough_ll outside the link tests" \
        "(see README, Conformance)" >&2
    exit 1
fi
