#!/bin/sh
# The DaemonSet's init container: installs the CNI binary and the conflist on the host.
#
# Order and atomicity, so a kubelet that runs the plugin or reads /etc/cni/net.d at any
# moment never sees half a file, a dangling binary, or a config whose binary is missing:
#   1. the conflist is validated first, by the binary being installed; an invalid one
#      stops everything before the node is touched (binary and old conflist stay);
#   2. the onedir bundle is copied to opt/cni/bin/tortie.versions/<id>, then the symlink
#      tortie.d -> tortie.versions/<id> is swapped in with one rename; the executable
#      opt/cni/bin/tortie is the stable symlink tortie.d/<exe>.  The previous version is
#      kept until the next upgrade, so a plugin process started just before the swap can
#      still load its libraries;
#   3. the conflist lands last: written to a temporary name in net.d, chmod 0644, renamed.
# Temporary files are removed on every exit path.
#   HOST_ROOT          where the host's / is mounted (default /host)
#   CNI_BIN_SRC        the bundle to install: a onedir directory (default /opt/tortie/cni)
#                      or a single executable file
#   CNI_CONFLIST_FILE  path of the conflist (from the ConfigMap), copied byte for byte;
#                      or CNI_CONFLIST, the conflist text itself
#   CNI_CONF_NAME      file name in net.d (default 10-tortie.conflist)
#   CNI_VALIDATE       shell command validating the conflist read on stdin (default: the new
#                      binary's own check, `<bundle>/tortie-cni --validate-conflist`)
set -eu
HOST_ROOT=${HOST_ROOT:-/host}
CNI_BIN_SRC=${CNI_BIN_SRC:-/opt/tortie/cni}
CNI_CONF_NAME=${CNI_CONF_NAME:-10-tortie.conflist}
bin_dir="$HOST_ROOT/opt/cni/bin"
conf_dir="$HOST_ROOT/etc/cni/net.d"
versions="$bin_dir/tortie.versions"
stage="" conf_tmp="" link_tmp=""
trap 'rm -rf "$stage" "$conf_tmp" "$link_tmp"' EXIT
die() { echo "install-cni: $*" >&2; exit 1; }

conflist() {  # the conflist text on stdout, exactly as given
  if [ -n "${CNI_CONFLIST_FILE:-}" ]; then cat "$CNI_CONFLIST_FILE"; else printf '%s\n' "$CNI_CONFLIST"; fi
}
if [ -n "${CNI_CONFLIST_FILE:-}" ]; then
  [ -r "$CNI_CONFLIST_FILE" ] || die "cannot read $CNI_CONFLIST_FILE"
elif [ -z "${CNI_CONFLIST:-}" ]; then
  die "CNI_CONFLIST or CNI_CONFLIST_FILE must be set"
fi
[ -e "$CNI_BIN_SRC" ] || die "no binary bundle at $CNI_BIN_SRC"

# The executable inside a onedir bundle (PyInstaller names it tortie-cni).
if [ -d "$CNI_BIN_SRC" ]; then
  exe=$(cd "$CNI_BIN_SRC" && for f in tortie*; do [ -f "$f" ] && [ -x "$f" ] && { echo "$f"; break; }; done)
  [ -n "$exe" ] || die "no executable named tortie* in $CNI_BIN_SRC"
  exe_src="$CNI_BIN_SRC/$exe"
else
  exe_src=$CNI_BIN_SRC
fi

# 1. Validate before anything is written.
if [ -n "${CNI_VALIDATE:-}" ]; then
  conflist | sh -c "$CNI_VALIDATE" >/dev/null || die "the conflist is not valid; nothing installed"
else
  conflist | "$exe_src" --validate-conflist >/dev/null || die "the conflist is not valid; nothing installed"
fi
mkdir -p "$bin_dir" "$conf_dir"

# 2. The binary.
if [ -d "$CNI_BIN_SRC" ]; then
  id="$(date +%Y%m%d%H%M%S)-$$"
  mkdir -p "$versions"
  stage="$versions/.$id.tmp"
  cp -a "$CNI_BIN_SRC" "$stage"
  mv "$stage" "$versions/$id"
  stage=""
  previous=$(readlink "$bin_dir/tortie.d" 2>/dev/null || true)
  # A real directory here is an old layout: it cannot be renamed over, so it goes first.
  if [ -d "$bin_dir/tortie.d" ] && [ ! -L "$bin_dir/tortie.d" ]; then rm -rf "$bin_dir/tortie.d"; fi
  link_tmp="$bin_dir/.tortie.d.$$"
  ln -sfn "tortie.versions/$id" "$link_tmp"
  mv -T "$link_tmp" "$bin_dir/tortie.d"
  if [ "$(readlink "$bin_dir/tortie" 2>/dev/null || true)" != "tortie.d/$exe" ]; then
    link_tmp="$bin_dir/.tortie.$$"
    ln -sfn "tortie.d/$exe" "$link_tmp"
    mv -T "$link_tmp" "$bin_dir/tortie"
  fi
  link_tmp=""
  for v in "$versions"/*; do  # keep the new version and the one it replaced
    case "$v" in "$versions/$id" | "$bin_dir/$previous") ;; *) rm -rf "$v" ;; esac
  done
else
  stage="$bin_dir/.tortie.$$"
  cp "$CNI_BIN_SRC" "$stage"
  chmod 0755 "$stage"
  mv -f "$stage" "$bin_dir/tortie"
  stage=""
fi

# 3. The conflist.
conf_tmp="$conf_dir/.$CNI_CONF_NAME.$$"
conflist > "$conf_tmp"
chmod 0644 "$conf_tmp"
mv -f "$conf_tmp" "$conf_dir/$CNI_CONF_NAME"
conf_tmp=""
echo "install-cni: installed $bin_dir/tortie -> $(readlink "$bin_dir/tortie" || echo file) and $conf_dir/$CNI_CONF_NAME"
