#!/usr/bin/env bash
# Builds the Holdfast image from ops/container/Containerfile with podman. The image is FROM
# scratch: this script assembles its root filesystem from the binary, the shared libraries ldd
# says it links, and an unprivileged user (10001); the Containerfile gives that user /data.
#
#   scripts/build-image.sh [BINARY] [TAG]
#
# BINARY defaults to target/release/holdfast (built if missing); TAG to localhost/holdfast:latest.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/holdfast}"
tag="${2:-localhost/holdfast:latest}"
if [ ! -x "$bin" ]; then
  cargo build --release -p holdfast
fi
bash scripts/install-container-tools.sh

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
# data/uploads: the mount point of the web replicas' shared uploads volume, the user's own.
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$ctx/data/uploads"
# Debug symbols out: the image carries what runs, nothing more.
strip -o "$root/usr/local/bin/holdfast" "$bin"
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo 'holdfast:x:10001:10001:holdfast:/data:/nonexistent' > "$root/etc/passwd"
echo 'holdfast:x:10001:' > "$root/etc/group"
chmod 1777 "$root/tmp"
cp ops/container/Containerfile "$ctx/Containerfile"
podman --runtime runc build --quiet --format docker --tag "$tag" --file "$ctx/Containerfile" "$ctx" >/dev/null
echo "built $tag ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
