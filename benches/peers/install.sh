#!/usr/bin/env bash
# Installs the peers `holdfast bench jobs --peers` measures Holdfast against, from the
# package registries, into this directory (nothing here is committed; see .gitignore):
#
#   node/           graphile-worker from npm (pinned below; runs on Node >= 14, so on v20)
#   apalis-bench/   our harness over apalis + apalis-postgres + apalis-sqlite from crates.io
#                   (pinned in its Cargo.toml; sqlx without TLS), built in release mode
#
# Idempotent: re-running only does what is missing or out of date. Needs node/npm and cargo.
set -euo pipefail

# graphile-worker 0.18 requires Node >= 22.18; 0.17.3 is the newest that runs on Node 20.
GRAPHILE_WORKER_VERSION="0.17.3"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

need() { command -v "$1" >/dev/null 2>&1 || { echo "install.sh: $1 is required but not on PATH" >&2; exit 1; }; }
need node
need npm
need cargo

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 14 ]; then
  echo "install.sh: graphile-worker $GRAPHILE_WORKER_VERSION needs Node >= 14 (found $(node --version))" >&2
  exit 1
fi

# --- graphile-worker (npm) -----------------------------------------------------------------
installed="$(node -p "try { require('./node/node_modules/graphile-worker/package.json').version } catch (e) { '' }" 2>/dev/null || true)"
if [ "$installed" != "$GRAPHILE_WORKER_VERSION" ]; then
  echo "install.sh: installing graphile-worker@$GRAPHILE_WORKER_VERSION into $here/node" >&2
  mkdir -p node
  if [ ! -f node/package.json ]; then
    cat > node/package.json <<'JSON'
{
  "name": "holdfast-peer-bench",
  "private": true,
  "description": "Peers for `holdfast bench jobs --peers`, installed by ../install.sh"
}
JSON
  fi
  npm install --prefix node --no-audit --no-fund --save-exact "graphile-worker@$GRAPHILE_WORKER_VERSION"
else
  echo "install.sh: graphile-worker@$installed already installed" >&2
fi

# --- apalis (crates.io), through our harness -----------------------------------------------
echo "install.sh: building apalis-bench (cargo build --release; first build takes minutes)" >&2
cargo build --release --manifest-path apalis-bench/Cargo.toml --target-dir apalis-bench/target

test -x apalis-bench/target/release/apalis-bench
test -f node/node_modules/graphile-worker/package.json
echo "install.sh: peers ready" >&2
