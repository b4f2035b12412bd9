#!/bin/sh
# Removes tortie from one node: the conflist, the binary, the agent's state, every cali-
# chain (and every rule elsewhere that jumps to one), every cali40 and cali60 ipset, the routes
# carrying tortie's protocol number (80) and the VXLAN device.  Nothing else: other
# chains, ipsets, routes and CNI configs stay.  Run by manifests/uninstall.yaml's
# DaemonSet (or by hand as root on a node) after `kubectl delete -f manifests/tortie.yaml`.
# Pods' own routes go with their veths.  Safe to run twice.
#   HOST_ROOT   where the host's / is mounted (default /host; "" when run on the host)
set -u
HOST_ROOT=${HOST_ROOT-/host}
rm -f "$HOST_ROOT/etc/cni/net.d/10-tortie.conflist" "$HOST_ROOT/opt/cni/bin/tortie"
rm -rf "$HOST_ROOT/opt/cni/bin/tortie.d" "$HOST_ROOT/opt/cni/bin/tortie.versions" "$HOST_ROOT"/opt/cni/bin/.tortie*
# The agent's state (IPAM allocations, socket, BIRD's files).  In the uninstall pod these
# are mount points: empty them, and remove the directory itself where that is possible.
for d in "$HOST_ROOT/var/lib/tortie" "$HOST_ROOT/var/run/tortie"; do
  [ -d "$d" ] || continue
  find "$d" -mindepth 1 -delete
  rmdir "$d" 2>/dev/null || true
done
failed=0
for bv in legacy nft legacy:6 nft:6; do
  b=${bv%:6}; ipt=iptables; [ "$b" = "$bv" ] || ipt=ip6tables  # ip6tables: the raw loopback guard
  command -v "$ipt-$b-save" >/dev/null || continue
  for t in filter nat raw mangle; do
    rules=$("$ipt-$b-save" -t "$t" 2>/dev/null) || continue
    echo "$rules" | grep -q 'cali-' || continue
    # One restore per table: drop every jump/goto into a cali- chain from chains that are
    # not ours (built-in or foreign: a reference left behind would block the deletion),
    # then flush all our chains before deleting any (they reference each other).
    {
      echo "*$t"
      echo "$rules" | grep -E '^-A ' | grep -vE '^-A cali-' | grep -E ' -[jg] cali-' | sed 's/^-A/-D/'
      echo "$rules" | grep -oE '^:cali-[^ ]+' | sed 's/^:/-F /'
      echo "$rules" | grep -oE '^:cali-[^ ]+' | sed 's/^:/-X /'
      echo "COMMIT"
    } | "$ipt-$b-restore" --noflush -w 5 || { echo "uninstall: $ipt-$b $t cleanup failed" >&2; failed=1; }
  done
done
# Our ipsets, after the rules that used them are gone (tortie's names all start cali40, and
# their IPv6 twins cali60).
for s in $(ipset list -n 2>/dev/null | grep -E '^cali[46]0'); do
  ipset destroy "$s" || { echo "uninstall: could not destroy ipset $s" >&2; failed=1; }
done
ip -4 route flush proto 80 2>/dev/null || true
ip -6 route flush proto 80 2>/dev/null || true
ip link del vxlan.calico 2>/dev/null || true
if [ "$failed" -ne 0 ]; then
  echo "uninstall: finished with errors (see above)" >&2
  exit 1
fi
echo "uninstall: tortie removed from this node"
