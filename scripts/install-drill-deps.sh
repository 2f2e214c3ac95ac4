#!/usr/bin/env bash
# Installs what `holdfast drill --backend postgres` needs: the PostgreSQL server binaries
# (initdb, pg_ctl, postgres); and what `--sessions redis` needs: `redis-server` on PATH
# (Debian's `redis-server` package; the drill runs its own, non-persistent, on a free port —
# never the machine's on 6379 — and the package's own service is left as the package sets it). The drill runs a throwaway cluster of its own with them, on a
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

packages=()
if have_server_binaries; then
  log "PostgreSQL server binaries found"
else
  packages+=(postgresql)
fi
if command -v redis-server >/dev/null; then
  log "redis-server found"
else
  packages+=(redis-server)
fi
if [ "${#packages[@]}" -eq 0 ]; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  log "missing ${packages[*]} and no apt-get: install your distribution's packages for them"
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
log "installing ${packages[*]} (postgresql also creates the unprivileged postgres user)"
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
have_server_binaries || { log "postgresql installed but initdb/pg_ctl not found"; exit 1; }
command -v redis-server >/dev/null || { log "redis-server installed but not on PATH"; exit 1; }
log "done"
