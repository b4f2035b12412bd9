#!/usr/bin/env bash
# Deletes the kind cluster made by kind-up.sh (the nodes are containers: tortie goes with them).
set -euo pipefail
command -v kind >/dev/null || { echo "kind-down: kind is not installed" >&2; exit 2; }
kind delete cluster --name "${CLUSTER:-tortie}"
