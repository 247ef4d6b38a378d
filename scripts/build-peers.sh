#!/usr/bin/env bash
# Builds the real programs flannel-bpf is tested and benchmarked against, from Go modules through
# the module proxy, with this machine's Go, into a cache keyed by version:
#   $PEERS_CACHE/flanneld-<version>/flanneld
#   $PEERS_CACHE/kubernetes-<version>/{kube-apiserver,kube-controller-manager,kubectl}
#   $PEERS_CACHE/etcd-<version>/etcd        (Kubernetes 1.36 wants etcd >= 3.5; Debian has 3.4)
#   $PEERS_CACHE/flannel-cni-<version>/flannel  (the flannel CNI plugin; Debian ships none)
# A directory appears only when its build finished (built in a temporary directory, renamed), so
# a second run says "already built" and an interrupted one starts over. Nothing prebuilt is
# downloaded: only module sources, which the go command checks against the checksum database.
#
#   build-peers.sh [flanneld|kubernetes|etcd|flannel-cni|all]   (default all)
#   build-peers.sh --print-dir NAME                 the cache directory of NAME's pinned version
set -euo pipefail

FLANNEL_VERSION=v0.28.9
# Its go.mod says go 1.26.0, which this machine's Go accepts (v1.37.2's too; v1.36.3 is the newest
# patch of the minor before, on etcd 3.6). Every k8s.io/* module is taken at this one release.
KUBERNETES_VERSION=v1.36.3
# The etcd that Kubernetes v1.36.3's go.mod names.
ETCD_VERSION=v3.6.8
# The flannel CNI plugin (type "flannel" in kube-flannel's cni-conf.json). Its home since 2021,
# github.com/flannel-io/cni-plugin, is not served by the module proxy (403 for every version);
# the same plugin before the move is plugins/meta/flannel of containernetworking/plugins, whose
# last release with it is v0.9.1 (CNI spec 0.1.0-0.4.0; it reads subnet.env, delegates to bridge
# with host-local as flannel-io/cni-plugin does). Debian's containernetworking-plugins has none.
FLANNEL_CNI_VERSION=v0.9.1

PEERS_CACHE=${FLANNEL_BPF_PEERS_CACHE:-/var/cache/flannel-bpf/peers}
GO_CACHE_ROOT=${FLANNEL_BPF_GO_CACHE:-/var/cache/flannel-bpf/go}

say() { printf 'peers: %s\n' "$*"; }
die() { printf 'peers: error: %s\n' "$*" >&2; exit 1; }

dir_of() {
  case $1 in
    flanneld) echo "$PEERS_CACHE/flanneld-$FLANNEL_VERSION" ;;
    kubernetes) echo "$PEERS_CACHE/kubernetes-$KUBERNETES_VERSION" ;;
    etcd) echo "$PEERS_CACHE/etcd-$ETCD_VERSION" ;;
    flannel-cni) echo "$PEERS_CACHE/flannel-cni-$FLANNEL_CNI_VERSION" ;;
    *) die "unknown peer '$1' (flanneld, kubernetes, etcd or flannel-cni)" ;;
  esac
}

if [ "${1:-}" = --print-dir ]; then
  dir_of "${2:?usage: $0 --print-dir flanneld|kubernetes|etcd|flannel-cni}"
  exit 0
fi

check_go() {
  command -v go >/dev/null 2>&1 || die "no 'go' on PATH: the peers are built from Go modules (Go >= 1.26 needed)"
  local proxy
  proxy=$(go env GOPROXY)
  [ "$proxy" != off ] || die "GOPROXY is off: the peers are built from Go modules through the module proxy"
  # One small request tells a missing proxy apart from a failing build.
  if ! go list -m -json "github.com/flannel-io/flannel@$FLANNEL_VERSION" >/dev/null 2>"$WORK/proxy.err"; then
    die "the Go module proxy ($proxy) did not answer for github.com/flannel-io/flannel@$FLANNEL_VERSION: $(tail -n1 "$WORK/proxy.err")"
  fi
}

# Builds run with this machine's Go only (no toolchain download), caches under /var/cache.
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
export GOMODCACHE=$GO_CACHE_ROOT/mod GOCACHE=$GO_CACHE_ROOT/build

version_of() {
  case $1 in
    flanneld) echo "$FLANNEL_VERSION" ;;
    kubernetes) echo "$KUBERNETES_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    flannel-cni) echo "$FLANNEL_CNI_VERSION" ;;
  esac
}

binaries_of() {
  case $1 in
    flanneld) echo flanneld ;;
    kubernetes) echo kube-apiserver kube-controller-manager kubectl ;;
    etcd) echo etcd ;;
    flannel-cni) echo flannel ;;
  esac
}

# is_built NAME: the finished tree is in place (BUILD-INFO is written last, before the rename).
is_built() {
  local final bin
  final=$(dir_of "$1")
  [ -e "$final/BUILD-INFO" ] || return 1
  for bin in $(binaries_of "$1"); do
    [ -x "$final/$bin" ] || return 1
  done
}

# build NAME WHAT: builds one peer with compile_NAME TMPDIR (sources in TMPDIR/src, binaries
# into TMPDIR/out, output into a log shown on failure), then writes VERSION and BUILD-INFO and
# moves the finished tree into place.
build() {
  local name=$1 what=$2 version final tmp started
  version=$(version_of "$name")
  final=$(dir_of "$name")
  if is_built "$name"; then
    say "$name $version: already built ($final)"
    return
  fi
  say "$name $version: building $what"
  started=$(date +%s)
  tmp=$(mktemp -d "$WORK/$name.XXXX")
  mkdir "$tmp/src" "$tmp/out"
  echo "version=$version" >"$tmp/out/VERSION"
  ( set -e; "compile_${name//-/_}" "$tmp" ) >"$tmp/build.log" 2>&1 \
    || { tail -n 30 "$tmp/build.log" >&2; die "$name: go build failed (log above)"; }
  {
    echo "name=$name"
    echo "go=$(go env GOVERSION)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(( $(date +%s) - started ))"
  } >"$tmp/out/BUILD-INFO"
  rm -rf "$final"
  mv "$tmp/out" "$final"
  say "$name: built in $(( $(date +%s) - started )) s into $final ($(du -sh "$final" | cut -f1))"
}

compile_flanneld() {
  local tmp=$1 src
  src=$(go mod download -json "github.com/flannel-io/flannel@$FLANNEL_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || { echo "flanneld: the module source was not downloaded"; return 1; }
  rm -rf "$tmp/src" && cp -r "$src" "$tmp/src" && chmod -R u+w "$tmp/src"
  # v0.28.9 links a Tencent Cloud backend whose SDK module (tencentcloud/vpc v1.3.149) the module
  # proxy refuses ("not available"). It is a cloud-routing backend no test here can use, so it is
  # left out of main.go; every other backend and the whole of flanneld are built as released.
  sed -i '\#"github.com/flannel-io/flannel/pkg/backend/tencentvpc"#d' "$tmp/src/main.go"
  cd "$tmp/src"
  go mod edit -droprequire=github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc \
    -droprequire=github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/common
  # The udp backend's packet proxy is C (cgo), as in flannel's own amd64 build.
  CGO_ENABLED=1 go build -trimpath -o "$tmp/out/flanneld" \
    -ldflags "-s -w -X github.com/flannel-io/flannel/pkg/version.Version=$FLANNEL_VERSION" .
  echo "note=built without pkg/backend/tencentvpc (its SDK module is not served)" >>"$tmp/out/VERSION"
}

compile_etcd() {
  local tmp=$1
  # etcd's own main module carries replace lines, so it cannot be built by module path; its
  # main.go is one call into etcdmain, which is an ordinary package of the server module.
  cat >"$tmp/src/main.go" <<'EOF'
// The etcd server, as etcd's own main.go starts it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  cd "$tmp/src"
  go mod init flannel-bpf.invalid/peers/etcd
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go mod tidy
  go build -trimpath -o "$tmp/out/etcd" \
    -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" .
}

compile_flannel_cni() {
  local tmp=$1
  cd "$tmp/src"
  go mod init flannel-bpf.invalid/peers/flannel-cni
  go get "github.com/containernetworking/plugins/plugins/meta/flannel@$FLANNEL_CNI_VERSION"
  go build -trimpath -o "$tmp/out/flannel" -ldflags "-s -w" \
    github.com/containernetworking/plugins/plugins/meta/flannel
}

compile_kubernetes() {
  local tmp=$1 gomod minor ldflags pkg
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || { echo "kubernetes: the module's go.mod was not downloaded"; return 1; }
  minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  cd "$tmp/src"
  go mod init flannel-bpf.invalid/peers/kubernetes
  # k8s.io/kubernetes points its staging modules at ./staging; outside its tree each one is
  # the published module of the same release: v1.36.3 -> v0.36.3.
  sed -n 's#^\t\(k8s.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod" | while read -r mod; do
    go mod edit -replace="$mod=$mod@v0.${KUBERNETES_VERSION#v1.}"
  done
  go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
  go get k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
  # What hack/lib/version.sh stamps, so the binaries report their release (the apiserver's
  # /version, kubectl's skew check).
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  go build -trimpath -o "$tmp/out/" -ldflags "$ldflags" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
}

mkdir -p "$PEERS_CACHE" "$GO_CACHE_ROOT"
# Two set-ups at once (make test beside make bench) build once: the second waits here.
exec 9>"$PEERS_CACHE/.lock"
if ! flock -n 9; then
  say "another build-peers.sh is building; waiting for it"
  flock 9
fi
WORK=$(mktemp -d "$PEERS_CACHE/.work.XXXX")
trap 'rm -rf "$WORK"' EXIT

what=${1:-all}
case $what in
  flanneld|kubernetes|etcd|flannel-cni|all) ;;
  *) die "usage: $0 [flanneld|kubernetes|etcd|flannel-cni|all] | --print-dir NAME" ;;
esac
# The proxy is asked only when something is to be built.
need=()
for name in flanneld flannel-cni etcd kubernetes; do
  [ "$what" = all ] || [ "$what" = "$name" ] || continue
  need+=("$name")
done
for name in "${need[@]}"; do
  is_built "$name" || { check_go; break; }
done
for name in "${need[@]}"; do
  case $name in
    flanneld) build flanneld "from github.com/flannel-io/flannel (a few minutes)" ;;
    etcd) build etcd "from go.etcd.io/etcd/server/v3 (a few minutes)" ;;
    flannel-cni) build flannel-cni "from github.com/containernetworking/plugins/plugins/meta/flannel" ;;
    kubernetes) build kubernetes "kube-apiserver, kube-controller-manager, kubectl from k8s.io/kubernetes (20-40 minutes on 2 cores)" ;;
  esac
done
