#!/usr/bin/env bash
# Makes the Dockerfile's base image (python:3.11-slim-bookworm) locally, for machines that
# reach Debian's package mirror but no container registry.  The image is Debian bookworm
# (debootstrap --variant=minbase from the mirror this machine's apt uses) plus python3,
# python3-venv, python3-pip, libpython3.11 (PyInstaller needs the shared library) and
# ca-certificates, with the EXTERNALLY-MANAGED marker removed so the Dockerfile's pip runs
# as in the official image.  It is imported with `podman import` (or `buildah`) under the
# base's full name, so a build resolves FROM python:3.11-slim-bookworm locally: no pull.
#
#   deploy/base-image.sh [--force | --mirrors]
#     --force     debootstrap again and re-import, even if the image or tarball is here
#     --mirrors   only print the bookworm and bookworm-security mirrors found, one a line
#   BASE_IMAGE      the name to tag (default docker.io/library/python:3.11-slim-bookworm)
#   DEBIAN_MIRROR   the mirror (default: the bookworm one in /etc/apt/sources.list*)
#   APT_ETC         where apt's sources are read from (default /etc/apt)
#   IMAGE_CACHE     where the root filesystem tarball is kept between runs, outside the
#                   repository (default /var/cache/tortie-image)
# Nothing here touches the network namespace: debootstrap and apt run in a chroot on the
# host's network, and importing a tarball starts no container.
set -euo pipefail
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}
IMAGE_CACHE=${IMAGE_CACHE:-/var/cache/tortie-image}
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,libpython3.11,ca-certificates
APT_ETC=${APT_ETC:-/etc/apt}
FORCE=0 MIRRORS_ONLY=0
case "${1:-}" in
  --force) FORCE=1 ;;
  --mirrors) MIRRORS_ONLY=1 ;;
  "") ;;
  *) echo "usage: $0 [--force | --mirrors]" >&2; exit 2 ;;
esac
die() { echo "base-image: $*" >&2; exit 1; }

# The mirror URI of a suite in apt's sources (deb822 .sources stanzas and one-line .list
# entries), e.g. `mirror_of bookworm` -> http://deb.debian.org/debian.
mirror_of() {
  local suite=$1 f
  for f in "$APT_ETC"/sources.list "$APT_ETC"/sources.list.d/*.list "$APT_ETC"/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    case "$f" in
      *.sources)
        awk -v s="$suite" 'BEGIN{RS=""; FS="\n"}
          { uri=""; ok=0; deb=0
            for (i=1;i<=NF;i++) {
              if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri=a[2] }
              if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb=1
              if ($i ~ /^Suites:/) { n=split($i, a, /[ \t]+/); for (j=2;j<=n;j++) if (a[j]==s) ok=1 }
            }
            if (ok && deb && uri!="") { print uri; exit } }' "$f" ;;
      *)
        awk -v s="$suite" '$1=="deb" { i=2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
          if ($(i+1)==s) { print $i; exit } }' "$f" ;;
    esac
  done | head -n1
}
MIRROR=${DEBIAN_MIRROR:-$(mirror_of "$SUITE")}
[ -n "$MIRROR" ] || die "no $SUITE mirror in $APT_ETC/sources.list*; set DEBIAN_MIRROR"
SECURITY=$(mirror_of "$SUITE-security" || true)
if [ "$MIRRORS_ONLY" = 1 ]; then
  echo "$MIRROR"
  [ -z "$SECURITY" ] || echo "$SECURITY"
  exit 0
fi
tool=""
for t in podman buildah; do command -v "$t" >/dev/null && { tool=$t; break; }; done
[ -n "$tool" ] || die "needs podman or buildah (make image-deps installs them)"
image_exists() {
  if [ "$tool" = podman ]; then podman image exists "$1"; else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}
if [ "$FORCE" = 0 ] && image_exists "$BASE_IMAGE"; then
  echo "base-image: $BASE_IMAGE is already here"
  exit 0
fi

command -v debootstrap >/dev/null || die "needs debootstrap (make image-deps installs it)"

mkdir -p "$IMAGE_CACHE"
tarball="$IMAGE_CACHE/$SUITE-python3.tar"
if [ "$FORCE" = 1 ] || [ ! -s "$tarball" ]; then
  rootfs=$(mktemp -d "$IMAGE_CACHE/rootfs.XXXXXX")
  cleanup() {  # debootstrap mounts proc and sys in the target: unmount before removing
    { grep -o " $rootfs/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$rootfs" "$tarball.tmp"
  }
  trap cleanup EXIT
  echo "base-image: debootstrap $SUITE from $MIRROR into $rootfs"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$IMAGE_CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed, see $IMAGE_CACHE/debootstrap.log"
  # The image's own apt sources: the same mirror (and its security suite), so the
  # Dockerfile's apt-get install finds bird2 and friends where this machine does.
  {
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    [ -z "$SECURITY" ] || echo "deb $SECURITY $SUITE-security main"
  } > "$rootfs/etc/apt/sources.list"
  if [ -n "$SECURITY" ]; then
    echo "base-image: security updates from $SECURITY"
    chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
      >>"$IMAGE_CACHE/debootstrap.log" 2>&1 || die "apt-get upgrade in the rootfs failed, see $IMAGE_CACHE/debootstrap.log"
  fi
  # As in the official python image: pip may install into the system's python, and the
  # image carries no package lists, caches or logs.
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  # The runtime provides these; the build host's own stay out of the image.
  rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/usr/share/locale/*
  # apt keeps no downloaded packages or binary caches in image layers (as in the official
  # image): every later apt-get install in a Dockerfile would otherwise add ~90 MB of them.
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  ln -sf python3 "$rootfs/usr/bin/python"  # the official image has `python` too
  tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  cleanup
  trap - EXIT
fi
echo "base-image: importing $tarball as $BASE_IMAGE with $tool"
old=$(if [ "$tool" = podman ]; then podman image inspect --format '{{.Id}}' "$BASE_IMAGE"; else buildah inspect --type image --format '{{.FromImageID}}' "$BASE_IMAGE"; fi 2>/dev/null || true)
if [ "$tool" = podman ]; then
  podman import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE_IMAGE" >/dev/null
else
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  tar --numeric-owner -C "$mnt" -xf "$tarball"
  buildah umount "$ctr" >/dev/null
  buildah config --cmd '["python3"]' --env LANG=C.UTF-8 "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
fi
# The image this one replaces, unless a built image still uses it as its base.
[ -z "$old" ] || "$tool" rmi "$old" >/dev/null 2>&1 || true
echo "base-image: $BASE_IMAGE ready ($(du -h "$tarball" | cut -f1) rootfs)"
