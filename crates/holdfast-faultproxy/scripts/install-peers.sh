#!/usr/bin/env bash
# Installs the third-party Toxiproxy client the compatibility test drives
# (tests/toxiproxy_client.rs): the npm package `toxiproxy-node-client`, into tools/node
# (gitignored). Idempotent. Needs node >= 18 and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${TOXIPROXY_NODE_CLIENT_VERSION:-4.1.0}"
dir=tools/node
if [ -f "$dir/node_modules/toxiproxy-node-client/package.json" ] &&
  grep -q "\"version\": \"$VERSION\"" "$dir/node_modules/toxiproxy-node-client/package.json"; then
  echo "install-peers: toxiproxy-node-client $VERSION already installed" >&2
  exit 0
fi
mkdir -p "$dir"
[ -f "$dir/package.json" ] || echo '{"private": true}' >"$dir/package.json"
npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "toxiproxy-node-client@$VERSION"
echo "install-peers: installed toxiproxy-node-client $VERSION into $dir" >&2
