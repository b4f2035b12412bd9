#!/bin/sh
# Removes tortie from one node: the conflist, the binary, and every cali- chain and ipset.
# Run by manifests/uninstall.yaml's DaemonSet (or by hand as root on a node) after
# `kubectl delete -f manifests/tortie.yaml`. Routes of pods go with their veths.
set -u
HOST_ROOT=${HOST_ROOT:-/host}
rm -f "$HOST_ROOT/etc/cni/net.d/10-tortie.conflist" "$HOST_ROOT/opt/cni/bin/tortie"
rm -rf "$HOST_ROOT/opt/cni/bin/tortie.d"
for b in legacy nft; do
  command -v "iptables-$b-save" >/dev/null || continue
  for t in filter nat raw mangle; do
    rules=$("iptables-$b-save" -t "$t" 2>/dev/null) || continue
    echo "$rules" | grep -q 'cali-' || continue
    # Drop our jumps from built-in chains, then flush and delete our chains, in one restore.
    {
      echo "*$t"
      echo "$rules" | grep -E '^-A [A-Z]+ .*-j cali-' | sed 's/^-A/-D/'
      echo "$rules" | grep -oE '^:cali-[^ ]+' | sed 's/^:/-F /'
      echo "$rules" | grep -oE '^:cali-[^ ]+' | sed 's/^:/-X /'
      echo "COMMIT"
    } | "iptables-$b-restore" --noflush -w 5 || echo "uninstall: $b $t cleanup failed" >&2
  done
done
ipset list -n 2>/dev/null | grep '^cali' | while read -r s; do ipset destroy "$s" 2>/dev/null; done
ip link del vxlan.calico 2>/dev/null || true
echo "uninstall: tortie removed from this node"
