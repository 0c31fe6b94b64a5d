#!/usr/bin/env bash
# One command from a fresh Debian machine to a mounted vault: installs what is missing,
# builds the release binary, creates the default vault if there is none, and mounts it at
# $CAIRN_MOUNTPOINT (default: ~/Cairn). Runs in the foreground; Ctrl-C unmounts after
# flushing every change.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "run: building cairn (release)" >&2
cargo build --release --locked -p cairn

BIN="$PWD/target/release/cairn"
MNT="${CAIRN_MOUNTPOINT:-$HOME/Cairn}"
mkdir -p "$MNT"
echo "run: mounting the default vault at $MNT (Ctrl-C to unmount)" >&2
exec "$BIN" mount --init "$MNT"
