#!/usr/bin/env bash
# Installs the S3-compatible server the upload tests run their S3 blob store against: moto's
# server (`moto_server`, from PyPI's `moto[server]`), for the current user. Idempotent.
# Needs python3 with pip.
set -euo pipefail

VERSION="${MOTO_VERSION:-5.2.5}"
log() { printf 'install-s3-server: %s\n' "$*" >&2; }

if python3 -c "import moto, flask, flask_cors, sys; sys.exit(moto.__version__ != '$VERSION')" 2>/dev/null; then
  log "moto[server] $VERSION already installed"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$VERSION"
log "installed moto[server] $VERSION"
