#!/usr/bin/env bash
# Installs what cairn needs to build, mount and test, and nothing else.
# Idempotent: packages already present are not touched, and `apt-get update` only runs
# when something is actually missing. Safe to run on every start.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        log "not root and no sudo: install packages by hand if any are reported missing"
    fi
fi

# Debian packages: fuse3 (fusermount3 + /etc/fuse.conf), libfuse3-dev and pkg-config (the
# mount links libfuse3 and its examples provide the benchmark passthrough baseline), gcc for
# bundled SQLite; attr, rsync, git, tar, sqlite3, python3 and make are real programs the
# end-to-end tests run; autoconf, automake, make and perl (prove) build and run pjdfstest.
PKGS=(fuse3 libfuse3-dev pkg-config gcc attr rsync git tar sqlite3 python3 make autoconf automake perl)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "system packages present: ${PKGS[*]}"
fi

if ! command -v cargo >/dev/null; then
    log "cargo not found: install Rust (https://rustup.rs) and re-run"
    exit 1
fi

if [ ! -e /dev/fuse ]; then
    log "/dev/fuse is missing; trying 'modprobe fuse'"
    $SUDO modprobe fuse 2>/dev/null || true
    [ -e /dev/fuse ] || log "warning: /dev/fuse still missing: mounting will not work on this machine"
fi
