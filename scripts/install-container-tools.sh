#!/usr/bin/env bash
# The container engine the image is built and smoke-tested with: podman with the runc runtime,
# from Debian's packages (crun does not run on every machine this project runs on), and
# podman-compose.
# Idempotent: installs only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need() { # need COMMAND PACKAGE...
  command -v "$1" >/dev/null && return 0
  shift
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}
need runc runc
need podman podman runc
command -v podman >/dev/null && command -v runc >/dev/null
# podman-compose (PyPI) checks the compose file; it brings PyYAML, which the test reads it with.
command -v podman-compose >/dev/null || pip install -q podman-compose >/dev/null 2>&1
command -v podman-compose >/dev/null
