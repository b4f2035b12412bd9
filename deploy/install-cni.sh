#!/bin/sh
# The DaemonSet's init container: installs the CNI binary and the conflist on the host.
# Both land atomically (copy to a temporary name in the same directory, then rename), so a
# kubelet that reads /etc/cni/net.d mid-install never sees half a file or a config whose
# binary is missing (the binary lands first).
#   HOST_ROOT        where the host's / is mounted (default /host)
#   CNI_BIN_SRC      the binary bundle to install (default /opt/tortie/cni: onedir bundle)
#   CNI_CONFLIST     the conflist text (from the ConfigMap), or CNI_CONFLIST_FILE a path to it
#   CNI_CONF_NAME    file name in net.d (default 10-tortie.conflist)
#   CNI_VALIDATE     command that validates the conflist read on stdin (default: the binary's
#                    own check, `tortie --validate-conflist`)
set -eu
HOST_ROOT=${HOST_ROOT:-/host}
CNI_BIN_SRC=${CNI_BIN_SRC:-/opt/tortie/cni}
CNI_CONF_NAME=${CNI_CONF_NAME:-10-tortie.conflist}
bin_dir="$HOST_ROOT/opt/cni/bin"
conf_dir="$HOST_ROOT/etc/cni/net.d"
mkdir -p "$bin_dir" "$conf_dir"

if [ -n "${CNI_CONFLIST_FILE:-}" ]; then CNI_CONFLIST=$(cat "$CNI_CONFLIST_FILE"); fi
: "${CNI_CONFLIST:?CNI_CONFLIST or CNI_CONFLIST_FILE must be set}"

# 1. The binary bundle: a onedir PyInstaller bundle goes to opt/cni/bin/tortie.d, and the
#    executable name `tortie` is a symlink swapped in with one rename.
if [ -d "$CNI_BIN_SRC" ]; then
  stage="$bin_dir/.tortie.d.$$"
  rm -rf "$stage"; cp -a "$CNI_BIN_SRC" "$stage"
  rm -rf "$bin_dir/tortie.d.old"
  [ -d "$bin_dir/tortie.d" ] && mv "$bin_dir/tortie.d" "$bin_dir/tortie.d.old"
  mv "$stage" "$bin_dir/tortie.d"
  ln -sfn "tortie.d/$(basename "$(ls "$bin_dir/tortie.d" | grep -m1 '^tortie')")" "$bin_dir/.tortie.$$"
  mv -T "$bin_dir/.tortie.$$" "$bin_dir/tortie"
  rm -rf "$bin_dir/tortie.d.old"
else
  cp "$CNI_BIN_SRC" "$bin_dir/.tortie.$$"; chmod 0755 "$bin_dir/.tortie.$$"
  mv -f "$bin_dir/.tortie.$$" "$bin_dir/tortie"
fi

# 2. The conflist: validated by the plugin itself before it may land.
validate=${CNI_VALIDATE:-"$bin_dir/tortie --validate-conflist"}
if ! printf '%s' "$CNI_CONFLIST" | $validate >/dev/null; then
  echo "install-cni: the conflist is not valid; nothing written to $conf_dir" >&2
  exit 1
fi
tmp="$conf_dir/.$CNI_CONF_NAME.$$"
printf '%s\n' "$CNI_CONFLIST" > "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$conf_dir/$CNI_CONF_NAME"
echo "install-cni: installed $bin_dir/tortie and $conf_dir/$CNI_CONF_NAME"
