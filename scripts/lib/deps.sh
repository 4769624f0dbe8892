# shellcheck shell=bash
# The one place that knows what this project needs from the system. Sourced by scripts/test,
# scripts/demo, scripts/bench and scripts/real-clients/run; nothing else installs packages.
#
#   deps_ensure GROUP...   installs (apt, as root) whatever the groups lack, then checks that
#                          every probe now answers; on failure names each missing piece and
#                          the package that provides it, and returns 1.
#
# Each group is a list of "package|probe" pairs. A probe is a command name (found on PATH),
# or an absolute path (a file that must exist). A package may appear in several groups.
# Debian package names; Debian 12 (bookworm) is what CI and the proofs ran on.

# Compiling the workspace: etcd-client's build script runs protoc on etcd's .proto files,
# which import google/protobuf/descriptor.proto (libprotobuf-dev, not pulled in by
# protobuf-compiler without recommends). cc links the binaries and builds ring.
DEPS_build=(
  "protobuf-compiler|protoc"
  "libprotobuf-dev|/usr/include/google/protobuf/descriptor.proto"
  "gcc|cc"
)
# Making simulated nodes and pods in network namespaces, and inspecting them.
DEPS_netns=(
  "iproute2|ip"
  "iproute2|bridge"
  "util-linux|unshare"
  "util-linux|nsenter"
  "nftables|nft"
  "iptables|iptables-restore"
  "iptables|iptables-save"
  "iptables|ip6tables-restore"
)
# Debian's reference plugins: the oracle in the interop tests, the benchmark's rival.
DEPS_reference=(
  "containernetworking-plugins|/usr/lib/cni/bridge"
  "containernetworking-plugins|/usr/lib/cni/host-local"
  "containernetworking-plugins|/usr/lib/cni/portmap"
  "containernetworking-plugins|/usr/lib/cni/loopback"
)
# The route agent's etcd source is tested against a real etcd.
DEPS_etcd=(
  "etcd-server|/usr/bin/etcd"
)
# Real clients (scripts/real-clients/run): libcni (built with go), podman, containerd.
DEPS_clients=(
  "golang-go|go"
  "golang-github-appc-cni-dev|/usr/share/gocode/src/github.com/containernetworking/cni/libcni"
  "podman|podman"
  "conmon|conmon"
  "runc|runc"
  "busybox-static|/bin/busybox"
  "containerd|containerd"
  "containerd|ctr"
  "jq|jq"
  "coreutils|timeout"
)

# deps_missing GROUP...: prints "package|probe" for each probe that does not answer.
deps_missing() {
  local group entry pkg probe
  for group in "$@"; do
    local -n _list="DEPS_$group"
    for entry in "${_list[@]}"; do
      pkg=${entry%%|*}
      probe=${entry#*|}
      case $probe in
        /*) [ -e "$probe" ] && continue ;;
        *) command -v "$probe" >/dev/null 2>&1 && continue ;;
      esac
      echo "$entry"
    done
    unset -n _list
  done
}

deps_ensure() {
  local who=${DEPS_WHO:-$(basename "$0")}
  local missing pkgs
  missing=$(deps_missing "$@")
  [ -z "$missing" ] && return 0
  pkgs=$(printf '%s\n' "$missing" | cut -d'|' -f1 | sort -u | tr '\n' ' ')
  if [ "$(id -u)" -ne 0 ]; then
    echo "$who: missing packages: $pkgs; run as root so that they can be installed" >&2
    return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$who: missing packages: $pkgs; this is not a Debian-like system: install them by hand" >&2
    return 1
  fi
  echo "$who: installing $pkgs(first run only)" >&2
  local log
  log=$(mktemp)
  # shellcheck disable=SC2086 # one word per package
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs; } >"$log" 2>&1; then
    echo "$who: apt-get failed installing $pkgs:" >&2
    tail -n 15 "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
  missing=$(deps_missing "$@")
  if [ -n "$missing" ]; then
    echo "$who: still missing after installing (package: what it should provide):" >&2
    printf '%s\n' "$missing" | sed 's/|/: /; s/^/  /' >&2
    return 1
  fi
}

# deps_require_root WHAT: exits with a clear message unless root (namespaces need it).
deps_require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "${DEPS_WHO:-$(basename "$0")}: needs root: $1" >&2
    exit 1
  fi
}

# deps_check_toolchain: cargo and rustc must be there; rustup cannot be fetched here.
deps_check_toolchain() {
  local tool
  for tool in cargo rustc; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "${DEPS_WHO:-$(basename "$0")}: $tool is not on PATH: install the Rust toolchain (rustup) first" >&2
      exit 1
    fi
  done
}

# CARGO_QUIET: `--quiet` for cargo unless stdout is a terminal. A first build takes minutes;
# a person watching should see cargo's progress, a CI log only the failures. Used as
# ${CARGO_QUIET:+"$CARGO_QUIET"}, so that it vanishes when empty.
if [ -t 1 ]; then
  CARGO_QUIET=""
else
  CARGO_QUIET="--quiet"
fi
