#!/usr/bin/env bash
# One command from a fresh Debian machine to a working cairn: installs what is missing,
# builds the release binary, and creates the default vault if there is none.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "run: building cairn (release)" >&2
cargo build --release --locked -p cairn

BIN="$PWD/target/release/cairn"
echo "run: binary at $BIN" >&2
"$BIN" ensure
