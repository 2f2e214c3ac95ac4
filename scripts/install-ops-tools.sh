#!/usr/bin/env bash
# Tools the operations tests need, from Debian's packages: promtool (prometheus) to check and
# unit-test the alert rules in ops/prometheus, headless Chromium to load the operator page, and
# Graphite's carbon (graphite-carbon) to receive the --graphite push; and squawk (PyPI
# squawk-cli), the Postgres migration linter behind `holdfast migrate lint`.
# Idempotent: installs only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null && return 0
  apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "$2" >/dev/null; }
  command -v "$1" >/dev/null
}
need promtool prometheus
need chromium chromium
need carbon-cache graphite-carbon
command -v squawk >/dev/null || pip install -q squawk-cli >/dev/null 2>&1
command -v squawk >/dev/null
