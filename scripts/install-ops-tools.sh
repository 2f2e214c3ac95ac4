#!/usr/bin/env bash
# Tools the operations tests need: promtool (Debian's prometheus package) to check and unit-test
# the alert rules in ops/prometheus. Idempotent; does nothing when promtool is already there.
set -euo pipefail
if command -v promtool >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
  || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
command -v promtool >/dev/null
