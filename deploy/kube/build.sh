#!/usr/bin/env bash
# Build real Kubernetes binaries from Debian's source package `kubernetes` (the whole upstream
# tree with vendor/) with Debian's golang-go, once, into a cache outside the repository keyed by
# version: $TORTIE_KUBE_CACHE/<version>/bin. Re-running reuses the cache (and Go's build cache).
# Usage: deploy/kube/build.sh            (prints the bin dir on the last line)
set -euo pipefail
CACHE_ROOT=${TORTIE_KUBE_CACHE:-/var/cache/tortie-kube}
SUITE=${TORTIE_KUBE_SUITE:-bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
BINS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
EXTRA="agnhost ginkgo e2e.test"

log() { echo "kube-build: $*" >&2; }

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9   # one build at a time

need_apt=""
command -v go >/dev/null || need_apt="$need_apt golang-go"
command -v dpkg-source >/dev/null || need_apt="$need_apt dpkg-dev"
if [ -n "$need_apt" ]; then
  log "installing$need_apt"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need_apt >/dev/null
fi

# The deb-src line exists only while the source is fetched (a file of our own, removed on exit).
SRCLIST=/etc/apt/sources.list.d/tortie-kube-src.sources
fetch_source() {
  local dest=$1
  trap 'rm -f "$SRCLIST"' EXIT
  printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$SUITE" >"$SRCLIST"
  apt-get update -qq >/dev/null
  mkdir -p "$dest" && (cd "$dest" && apt-get source -qq kubernetes >/dev/null)
  rm -f "$SRCLIST"; trap - EXIT
  apt-get update -qq >/dev/null 2>&1 || true   # drop the deb-src lists again
}

# version = Debian source version; the cache is keyed by it.
VERSION_FILE="$CACHE_ROOT/.source-version"
if [ -z "${TORTIE_KUBE_VERSION:-}" ] && [ -f "$VERSION_FILE" ]; then
  TORTIE_KUBE_VERSION=$(cat "$VERSION_FILE")
fi
# The binaries are rebuilt (from Go's cache: seconds) when this script changed since.
RECIPE=$(sha256sum "$HERE/build.sh" | cut -d' ' -f1)
complete() { [ "$(cat "$1/.complete" 2>/dev/null)" = "$RECIPE" ]; }
if [ -n "${TORTIE_KUBE_VERSION:-}" ] && complete "$CACHE_ROOT/$TORTIE_KUBE_VERSION/bin"; then
  log "reusing $CACHE_ROOT/$TORTIE_KUBE_VERSION/bin"
  echo "$CACHE_ROOT/$TORTIE_KUBE_VERSION/bin"; exit 0
fi

T0=$(date +%s)
DL="$CACHE_ROOT/.download"
if ! ls -d "$DL"/kubernetes-*/ >/dev/null 2>&1; then
  rm -rf "$DL"; log "apt-get source kubernetes ($SUITE)"; fetch_source "$DL"
fi
SRCDIR=$(ls -d "$DL"/kubernetes-*/ | head -1)
VER=$(cd "$SRCDIR" && dpkg-parsechangelog -S Version)
echo "$VER" >"$VERSION_FILE"
OUT="$CACHE_ROOT/$VER"
BIN="$OUT/bin"
if complete "$BIN"; then echo "$BIN"; exit 0; fi
if [ -f "$BIN/.complete" ]; then log "build recipe changed: relinking"; rm -f "$BIN"/*; fi
export GOPATH="$OUT/gopath" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=-mod=vendor
unset GOFLAGS   # GOPATH mode ignores -mod; vendor/ is used because the tree sits under GOPATH
export GOCACHE="$CACHE_ROOT/go-build-cache"
K="$GOPATH/src/k8s.io/kubernetes"
if [ ! -d "$K/vendor" ]; then
  log "copying the tree to $K"
  mkdir -p "$(dirname "$K")"; rm -rf "$K"; cp -a "$SRCDIR" "$K"
fi
cd "$K"

# kubelet 1.20 rewrites GLOBAL sysctls (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops)
# at start unless protect-kernel-defaults; in a lab that shares the kernel with its host it must
# only warn, never write.
CM=pkg/kubelet/cm/container_manager_linux.go
if ! grep -q 'tortie: never modify' "$CM"; then
  sed -i 's|^\(\s*\)b := KernelTunableModify$|\1b := KernelTunableWarn // tortie: never modify global sysctls|' "$CM"
  grep -q 'tortie: never modify' "$CM" || { log "could not patch $CM (KernelTunableModify default)"; exit 1; }
fi

# Vendored reflect2 v1.0.1 calls reflect.mapiterinit with its pre-Go-1.18 signature: with
# Debian's Go 1.19 every sorted-key JSON encoding (pretty output, e.g. for a curl client)
# crashes kube-apiserver with "fatal error: fault" in mapiternext. Iterate as reflect2 v1.0.2
# does: the caller owns the iterator, runtime.mapiterinit fills it.
R2=vendor/github.com/modern-go/reflect2
if grep -q 'func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) \*hiter' "$R2/unsafe_link.go"; then
  perl -0pi -e 's#//go:linkname mapiterinit reflect\.mapiterinit\nfunc mapiterinit\(rtype unsafe\.Pointer, m unsafe\.Pointer\) \*hiter#//go:linkname mapiterinit runtime.mapiterinit\nfunc mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)#' "$R2/unsafe_link.go"
fi
if ! grep -q 'checkBucket uintptr' "$R2/unsafe_link.go"; then
  perl -0pi -e 's#type hiter struct \{.*?\n\}#type hiter struct { // tortie: the whole runtime.hiter of Go 1.18+, which mapiterinit fills\n\tkey         unsafe.Pointer\n\tvalue       unsafe.Pointer\n\tt           unsafe.Pointer\n\th           unsafe.Pointer\n\tbuckets     unsafe.Pointer\n\tbptr        unsafe.Pointer\n\toverflow    unsafe.Pointer\n\toldoverflow unsafe.Pointer\n\tstartBucket uintptr\n\toffset      uint8\n\twrapped     bool\n\tB           uint8\n\ti           uint8\n\tbucket      uintptr\n\tcheckBucket uintptr\n}#s' "$R2/unsafe_link.go"
fi
if grep -q 'hiter:      mapiterinit(' "$R2/unsafe_map.go"; then
  perl -0pi -e 's#\treturn &UnsafeMapIterator\{\n\t\thiter:      mapiterinit\(type2\.rtype, \*\(\*unsafe\.Pointer\)\(obj\)\),#\tit := new(hiter)\n\tmapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), it)\n\treturn &UnsafeMapIterator{\n\t\thiter:      it,#' "$R2/unsafe_map.go"
fi
grep -q 'mapiterinit(type2.rtype, \*(\*unsafe.Pointer)(obj), it)' "$R2/unsafe_map.go" \
  && grep -q 'checkBucket uintptr' "$R2/unsafe_link.go" \
  && grep -q 'linkname mapiterinit runtime.mapiterinit' "$R2/unsafe_link.go" || { log "could not patch $R2"; exit 1; }

export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
# GOPATH mode: the version packages are linked under the vendor/ path
V=k8s.io/kubernetes/vendor/k8s.io
LDFLAGS="-s -w"
for pkg in component-base/version client-go/pkg/version; do
  LDFLAGS="$LDFLAGS -X $V/$pkg.gitVersion=v1.20.2 -X $V/$pkg.gitMajor=1 -X $V/$pkg.gitMinor=20 -X $V/$pkg.gitTreeState=clean"
done
TOOLS="$OUT/tools"; mkdir -p "$TOOLS" "$BIN"

# Generated files the source tarball lacks.
OPENAPI=pkg/generated/openapi/zz_generated.openapi.go
if [ ! -s "$OPENAPI" ]; then
  log "generating $OPENAPI"
  go build -o "$TOOLS/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # the packages tagged for openapi, found as build/root/Makefile.generated_files does
  dirs=$(grep -rlR --include='*.go' '+k8s:openapi-gen=' pkg cmd vendor \
         | grep -v -e vendor/k8s.io/code-generator/ -e vendor/k8s.io/sample-apiserver/ \
         | xargs -n1 dirname | LC_ALL=C sort -u | sed 's#^#k8s.io/kubernetes/#' | paste -sd,)
  "$TOOLS/openapi-gen" --logtostderr -i "$dirs" \
     -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
     -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
     -o "$GOPATH/src" -r "$OUT/openapi-violations.report" 2>"$OUT/openapi-gen.log"
fi
BINDATA=test/e2e/generated/bindata.go
if [ ! -s "$BINDATA" ]; then
  log "generating $BINDATA"
  go build -o "$TOOLS/go-bindata" ./vendor/github.com/go-bindata/go-bindata/go-bindata
  # the same inputs as hack/generate-bindata.sh
  "$TOOLS/go-bindata" -nometadata -o "$BINDATA.tmp" -pkg generated \
    -ignore .jpg -ignore .png -ignore .md -ignore 'BUILD(\.bazel)?' \
    "test/conformance/testdata/..." "test/e2e/testing-manifests/..." \
    "test/e2e_node/testing-manifests/..." "test/images/..." "test/fixtures/..."
  gofmt -s -w "$BINDATA.tmp" && mv "$BINDATA.tmp" "$BINDATA"
fi

for b in $BINS; do
  [ -x "$BIN/$b" ] && continue
  log "go build $b"
  go build -ldflags "$LDFLAGS" -o "$BIN/$b" "./cmd/$b"
done
[ -x "$BIN/agnhost" ] || { log "go build agnhost"; go build -ldflags "-s -w" -o "$BIN/agnhost" ./test/images/agnhost; }
[ -x "$BIN/ginkgo" ] || { log "go build ginkgo"; go build -o "$BIN/ginkgo" ./vendor/github.com/onsi/ginkgo/ginkgo; }
[ -x "$BIN/e2e.test" ] || { log "go test -c ./test/e2e"; go test -c -ldflags "$LDFLAGS" -o "$BIN/e2e.test" ./test/e2e; }
echo "$RECIPE" >"$BIN/.complete"
log "built in $(( $(date +%s) - T0 ))s into $BIN"
echo "$BIN"
