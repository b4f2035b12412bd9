#!/usr/bin/env bash
# make image: builds $TAG (default tortie:dev) with docker, podman or buildah, whichever is
# here: docker when its engine answers, else podman, else buildah (neither needs a daemon).
#
#   TAG                the image name (default tortie:dev)
#   IMAGE_TOOL         docker, podman or buildah: use this one instead of the first found
#   IMAGE_BUILD_FLAGS  extra flags for the build command, word-split, e.g. a CA bundle or pip
#                      configuration mounted read-only into RUN steps:
#                        IMAGE_BUILD_FLAGS='-v /etc/pip.conf:/etc/pip.conf:ro'
#                      Mounts exist only while a RUN step runs: their content never lands in
#                      the image (a mount onto a path the image lacks leaves an empty file).
#   IMAGE_CA_BUNDLE    the host's CA bundle, mounted read-only over the image's own during
#                      RUN steps (podman/buildah), so pip and apt work behind a TLS-inspecting
#                      proxy; default /etc/ssl/certs/ca-certificates.crt when it exists, "" for none
#   BASE_FROM          podman/buildah only: where the base image comes from when it is not in
#                      local storage: debootstrap (default: deploy/base-image.sh makes it from
#                      this machine's Debian mirror, no registry needed) or pull (from a registry)
#   IMAGE_ARCHIVE      also write the image as an OCI archive to this path
# Proxy variables (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, lower case too) reach RUN steps as
# build-time values only: podman and buildah forward them themselves, docker gets them as
# its predefined build arguments, which stay out of the image's history and config.
#
# Machine safety: podman and buildah build with --network host and --isolation chroot: no
# bridge, no netavark/CNI network setup, so the host's nft/iptables rules and forwarding
# sysctls stay exactly as they were (tests/integration/test_image_build.py checks this).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-tortie:dev}
BASE_FROM=${BASE_FROM:-debootstrap}
IMAGE_CA_BUNDLE=${IMAGE_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
case "$BASE_FROM" in debootstrap | pull) ;; *) echo "image: BASE_FROM is debootstrap or pull, not '$BASE_FROM'" >&2; exit 2 ;; esac
read -r -a extra <<<"${IMAGE_BUILD_FLAGS:-}"
base=$(sed -n 's/^ARG BASE=//p' Dockerfile | head -n1)

tool=${IMAGE_TOOL:-}
case "$tool" in
  "" | docker | podman | buildah) ;;
  *) echo "image: IMAGE_TOOL is docker, podman or buildah, not '$tool'" >&2; exit 2 ;;
esac
if [ -n "$tool" ]; then
  command -v "$tool" >/dev/null || { echo "image: IMAGE_TOOL=$tool is not installed" >&2; exit 2; }
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  tool=docker
else
  for t in podman buildah; do command -v "$t" >/dev/null && { tool=$t; break; }; done
fi
if [ -z "$tool" ]; then
  echo "image: no working docker engine, and neither podman nor buildah is installed;" >&2
  echo "image: 'make image-deps' installs podman, buildah and debootstrap from Debian." >&2
  exit 2
fi

if [ "$tool" = docker ]; then
  proxy=()
  for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [ -z "${!v:-}" ] || proxy+=(--build-arg "$v")
  done
  echo "image: building $TAG with docker"
  docker build --network host "${proxy[@]}" "${extra[@]}" -t "$TAG" .
  [ -z "${IMAGE_ARCHIVE:-}" ] || { echo "image: IMAGE_ARCHIVE needs podman or buildah (or use docker save)" >&2; exit 2; }
  exit 0
fi

pull=(--pull=never)
if [ "$BASE_FROM" = pull ]; then
  pull=(--pull=missing)
elif ! { [ "$tool" = podman ] && podman image exists "docker.io/library/$base"; } &&
     ! { [ "$tool" = buildah ] && buildah inspect --type image "docker.io/library/$base" >/dev/null 2>&1; }; then
  echo "image: the base image $base is not here; making it with deploy/base-image.sh"
  BASE_IMAGE="docker.io/library/$base" bash deploy/base-image.sh
fi
mounts=()
if [ -n "$IMAGE_CA_BUNDLE" ] && [ -r "$IMAGE_CA_BUNDLE" ]; then
  mounts+=(-v "$(realpath "$IMAGE_CA_BUNDLE"):/etc/ssl/certs/ca-certificates.crt:ro")
fi
echo "image: building $TAG with $tool (host network, chroot isolation)"
cmd=("$tool" build)
[ "$tool" = buildah ] && cmd=(buildah bud)
"${cmd[@]}" --network host --isolation chroot "${pull[@]}" "${mounts[@]}" "${extra[@]}" -t "$TAG" .
if [ -n "${IMAGE_ARCHIVE:-}" ]; then
  rm -f "$IMAGE_ARCHIVE"
  if [ "$tool" = podman ]; then
    podman save --format oci-archive -o "$IMAGE_ARCHIVE" "$TAG"
  else
    buildah push "$TAG" "oci-archive:$IMAGE_ARCHIVE:$TAG"
  fi
  echo "image: $IMAGE_ARCHIVE ($(du -h "$IMAGE_ARCHIVE" | cut -f1))"
fi
