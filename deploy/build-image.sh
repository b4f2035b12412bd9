#!/usr/bin/env bash
# make image: builds tortie:dev with docker or podman, whichever is here and working.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-tortie:dev}
for tool in docker podman; do
  if command -v "$tool" >/dev/null && "$tool" info >/dev/null 2>&1; then
    echo "image: building $TAG with $tool"
    exec "$tool" build -t "$TAG" .
  fi
done
echo "image: neither a working docker engine nor podman is available on this machine;" >&2
echo "image: the Dockerfile is ready, run 'make image' where one of them is." >&2
exit 2
