#!/usr/bin/env bash
# Installs the third-party tus peers into crates/holdfast-uploads/tools/node (gitignored):
# `tus-js-client`, the client the upload tests drive our server with (as-is: nothing on our
# side knows it), and `@tus/server` with `@tus/file-store`, the server `holdfast bench uploads`
# measures ours against. Idempotent. Needs node >= 18 and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

TUS_JS_CLIENT="${TUS_JS_CLIENT_VERSION:-4.3.1}"
TUS_SERVER="${TUS_SERVER_VERSION:-2.4.5}"
TUS_FILE_STORE="${TUS_FILE_STORE_VERSION:-2.1.1}"
dir=tools/node
installed() {
  [ -f "$dir/node_modules/$1/package.json" ] && grep -q "\"version\": \"$2\"" "$dir/node_modules/$1/package.json"
}
if installed tus-js-client "$TUS_JS_CLIENT" && installed @tus/server "$TUS_SERVER" &&
  installed @tus/file-store "$TUS_FILE_STORE"; then
  echo "install-peers: tus-js-client $TUS_JS_CLIENT, @tus/server $TUS_SERVER already installed" >&2
  exit 0
fi
mkdir -p "$dir"
[ -f "$dir/package.json" ] || echo '{"private": true}' >"$dir/package.json"
npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
  "tus-js-client@$TUS_JS_CLIENT" "@tus/server@$TUS_SERVER" "@tus/file-store@$TUS_FILE_STORE"
echo "install-peers: installed tus-js-client $TUS_JS_CLIENT, @tus/server $TUS_SERVER, @tus/file-store $TUS_FILE_STORE into $dir" >&2
