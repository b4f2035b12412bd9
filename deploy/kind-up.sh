#!/usr/bin/env bash
# Creates a kind cluster with tortie as its network and proves two pods can talk.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-tortie}
for t in kind kubectl; do command -v $t >/dev/null || { echo "kind-up: $t is not installed" >&2; exit 2; }; done
echo "kind-up: creating cluster $CLUSTER"
kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --config deploy/kind-config.yaml
echo "kind-up: building the image"
bash deploy/build-image.sh
kind load docker-image tortie:dev --name "$CLUSTER"
echo "kind-up: applying manifests/tortie.yaml"
kubectl apply -f manifests/tortie.yaml
kubectl -n tortie-system rollout status ds/tortie-node --timeout=300s
kubectl wait --for=condition=Ready nodes --all --timeout=300s
echo "kind-up: starting a test pod pair"
kubectl delete pod tortie-a tortie-b --ignore-not-found --wait=true >/dev/null
kubectl run tortie-a --image=busybox:1.36 --restart=Never -- sleep 3600
kubectl run tortie-b --image=busybox:1.36 --restart=Never -- sleep 3600
kubectl wait --for=condition=Ready pod/tortie-a pod/tortie-b --timeout=180s
ip_b=$(kubectl get pod tortie-b -o jsonpath='{.status.podIP}')
kubectl exec tortie-a -- ping -c 3 -W 2 "$ip_b"
kubectl delete pod tortie-a tortie-b --wait=false
echo "kind-up: cluster $CLUSTER is up with tortie; pods talk"
