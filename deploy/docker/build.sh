#!/usr/bin/env bash
# Builds skv's Docker images FROM scratch from binaries that are already built.
#
#   deploy/docker/build.sh [--profile release|debug] [--tag TAG] [--target-dir DIR]
#                          [--only NAME[,NAME...]] [--no-third-party] [--no-strip]
#
# Images (each holds one program, exactly the shared libraries `ldd` lists for it, the
# dynamic loader, /etc/passwd with user skv (65532), /tmp and /data; see Dockerfile):
#   skv-placement:TAG  skv-storenode:TAG  skv-proxy:TAG  skvctl:TAG
#       from <target-dir>/<profile>/ (build them first: `cargo build --release --bins`)
#   skv-etcd:TAG        from /usr/bin/etcd        (Debian package etcd-server)
#   skv-prometheus:TAG  from /usr/bin/prometheus  (Debian package prometheus)
#       third-party images, for deploy/compose; skipped with a warning when the binary
#       is missing, or with --no-third-party.
# No base image is pulled: the engine here has no registry. Grafana has no Debian
# package, so no Grafana image is built (deploy/README.md).
#
# Binaries are stripped in the build context (not in target/) unless --no-strip.
# Prints one line per image: "built NAME:TAG (SIZE)".
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=release
tag=latest
target_dir=${CARGO_TARGET_DIR:-$root/target}
only=""
third_party=1
strip_bins=1

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --profile=*) profile=${1#*=}; shift ;;
    --tag) tag=$2; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --target-dir) target_dir=$2; shift 2 ;;
    --target-dir=*) target_dir=${1#*=}; shift ;;
    --only) only=$2; shift 2 ;;
    --only=*) only=${1#*=}; shift ;;
    --no-third-party) third_party=0; shift ;;
    --no-strip) strip_bins=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$profile" in
  debug|release) ;;
  *) echo "build.sh: --profile must be debug or release, not $profile" >&2; exit 2 ;;
esac
command -v docker >/dev/null 2>&1 || { echo "build.sh: docker is not installed" >&2; exit 1; }
command -v ldd >/dev/null 2>&1 || { echo "build.sh: ldd is not installed (libc-bin)" >&2; exit 1; }

wanted() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

work=$(mktemp -d "${TMPDIR:-/tmp}/skv-images.XXXXXX")
trap 'rm -rf "$work"' EXIT

# copy_with_libs BIN ROOTFS: the binary's shared libraries and loader, by ldd's paths.
copy_with_libs() {
  local bin=$1 rootfs=$2 line lib
  local out
  out=$(ldd "$bin" 2>&1) || {
    if printf '%s' "$out" | grep -q 'not a dynamic executable'; then return 0; fi
    echo "build.sh: ldd $bin failed: $out" >&2
    return 1
  }
  if printf '%s\n' "$out" | grep -q 'not found'; then
    echo "build.sh: $bin needs libraries that are not installed:" >&2
    printf '%s\n' "$out" | grep 'not found' >&2
    return 1
  fi
  while IFS= read -r line; do
    lib=""
    case "$line" in
      *'=>'*) lib=$(printf '%s' "$line" | awk '{print $3}') ;;  # libc.so.6 => /lib/.../libc.so.6 (0x..)
      *) lib=$(printf '%s' "$line" | awk '{print $1}') ;;        # /lib64/ld-linux-x86-64.so.2 (0x..)
    esac
    case "$lib" in
      /*) mkdir -p "$rootfs$(dirname "$lib")"; cp -L "$lib" "$rootfs$lib" ;;
      *) ;;  # linux-vdso.so.1: provided by the kernel
    esac
  done <<<"$out"
}

# prepare NAME BINARY [EXTRA_SRC EXTRA_DEST]...: a build context in $work/NAME.
prepare() {
  local name=$1 bin=$2
  shift 2
  local ctx=$work/$name
  local rootfs=$ctx/rootfs
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$ctx/writable/tmp" "$ctx/writable/data"
  chmod 1777 "$ctx/writable/tmp"
  local base
  base=$(basename "$bin")
  cp -L "$bin" "$rootfs/usr/local/bin/$base"
  chmod 0755 "$rootfs/usr/local/bin/$base"
  if [ "$strip_bins" = 1 ] && command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$rootfs/usr/local/bin/$base" 2>/dev/null || true
  fi
  ln -s "usr/local/bin/$base" "$rootfs/entrypoint"
  copy_with_libs "$bin" "$rootfs"
  printf 'root:x:0:0:root:/:/sbin/nologin\nskv:x:65532:65532:skv:/data:/sbin/nologin\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nskv:x:65532:\n' >"$rootfs/etc/group"
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  while [ $# -ge 2 ]; do
    mkdir -p "$rootfs$(dirname "$2")"
    cp -a "$1" "$rootfs$2"
    shift 2
  done
  # The entrypoint is the binary's own path, so that its usage lines name it.
  sed "s|^ENTRYPOINT .*|ENTRYPOINT [\"/usr/local/bin/$base\"]|" "$here/Dockerfile" >"$ctx/Dockerfile"
}

# build NAME BINARY: docker build of $work/NAME, in the background (see finish).
pending=()
build() {
  local name=$1 binary=$2
  (DOCKER_BUILDKIT=0 docker build -q \
    --build-arg "BINARY=$binary" \
    --build-arg "VERSION=$tag" \
    -t "$name:$tag" "$work/$name" >/dev/null 2>"$work/$name.err") &
  pending+=("$name:$!")
}

# finish: waits for every build, prints "built NAME:TAG (SIZE)" per image, fails if one did.
finish() {
  local failed=0 entry name pid size
  for entry in "${pending[@]}"; do
    name=${entry%%:*}
    pid=${entry##*:}
    if wait "$pid"; then
      size=$(docker image inspect -f '{{.Size}}' "$name:$tag" | awk '{printf "%.1f MB", $1/1000000}')
      echo "built $name:$tag ($size)"
    else
      grep -v -e DEPRECATED -e 'legacy builder' -e BuildKit -e '^ *$' "$work/$name.err" >&2 || true
      echo "build.sh: docker build of $name:$tag failed" >&2
      failed=1
    fi
  done
  return "$failed"
}

built=0
for bin in skv-placement skv-storenode skv-proxy skvctl; do
  wanted "$bin" || continue
  path=$target_dir/$profile/$bin
  if [ ! -x "$path" ]; then
    echo "build.sh: $path not found: build it first (cargo build $([ "$profile" = release ] && echo '--release ')--bins)" >&2
    exit 1
  fi
  prepare "$bin" "$path"
  build "$bin" "$bin"
  built=$((built + 1))
done

if [ "$third_party" = 1 ]; then
  if wanted skv-etcd; then
    if [ -x /usr/bin/etcd ]; then
      prepare skv-etcd /usr/bin/etcd
      build skv-etcd etcd
      built=$((built + 1))
    else
      echo "build.sh: warning: /usr/bin/etcd not found (apt-get install etcd-server): no skv-etcd image" >&2
    fi
  fi
  if wanted skv-prometheus; then
    if [ -x /usr/bin/prometheus ]; then
      extra=()
      [ -d /usr/share/prometheus/web ] && extra+=(/usr/share/prometheus/web /usr/share/prometheus/web)
      [ -d /etc/prometheus/console_libraries ] && extra+=(/etc/prometheus/console_libraries /usr/share/prometheus/console_libraries)
      [ -d /etc/prometheus/consoles ] && extra+=(/etc/prometheus/consoles /usr/share/prometheus/consoles)
      prepare skv-prometheus /usr/bin/prometheus "${extra[@]}"
      build skv-prometheus prometheus
      built=$((built + 1))
    else
      echo "build.sh: warning: /usr/bin/prometheus not found (apt-get install prometheus): no skv-prometheus image" >&2
    fi
  fi
fi

if [ "$built" = 0 ]; then
  echo "build.sh: no image built (--only $only matched nothing?)" >&2
  exit 1
fi
finish
