#!/usr/bin/env bash
# Installs what `holdfast drill --backend postgres` needs: the PostgreSQL server binaries
# (initdb, pg_ctl, postgres). The drill runs a throwaway cluster of its own with them, on a
# free port in a temporary directory, so that it may restart and cut it; it never uses the
# machine's server. Looks where the drill looks (PATH, then /usr/lib/postgresql/*/bin) and
# installs Debian's `postgresql` package only when they are missing. Idempotent.
set -euo pipefail

log() { printf 'install-drill-deps: %s\n' "$*" >&2; }

have_server_binaries() {
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then return 0; fi
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then return 0; fi
  done
  return 1
}

if have_server_binaries; then
  log "PostgreSQL server binaries found"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  log "no initdb/pg_ctl and no apt-get: install your distribution's PostgreSQL server package"
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
log "installing postgresql (server binaries; also creates the unprivileged postgres user)"
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
have_server_binaries || { log "postgresql installed but initdb/pg_ctl not found"; exit 1; }
log "done"
