#!/usr/bin/env bash
# skv's one test command (README "Run the tests"; .ci/run calls exactly this).
# On a fresh Debian machine it installs what the tests need, then runs every check:
#   1. system packages: etcd-server, etcd-client, prometheus, docker-compose, fuse3, faketime (apt); no protoc (ADR 0011)
#   2. Python grpcio-tools (a client in another language) and kubernetes-validate in a venv
#   3. cargo fmt --check, cargo clippy -D warnings
#   4. every proto compiles with protoc (the one in Python's grpcio-tools)
#   5. the build needs no protoc; cargo build --bins (tests start them); cargo nextest run
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

# Disk: a fresh build of every test binary takes ~6 GB under target/ (it took 11 GB, and a CI
# machine ran out: the linker died with SIGBUS). CI builds once from a clean clone, so it
# keeps no incremental state (another ~2 GB). The free space is printed at each heavy step.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi
disk() { df -h "$ROOT" | awk 'NR==2 {print "disk: " $4 " free on " $6}'; }
disk

# --- 1. system packages ----------------------------------------------------
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)  # python3 without venv is common on Debian
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)  # deploy/ queries (testkit/tests/observability.rs)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)  # deploy/compose (testkit/tests/deploy_compose.rs)
command -v docker >/dev/null 2>&1 || need+=(docker.io)  # the engine the compose test builds and runs images with
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)  # skv-lazyfs mounts without root through it (power-loss test, ADR 0030; as root it mounts with mount(2))
command -v ip >/dev/null 2>&1 || need+=(iproute2)  # network namespaces, veths, a bridge: the chaos partition nemesis (chaos/src/netns.rs, ADR 0031)
command -v iptables >/dev/null 2>&1 || need+=(iptables)  # its DROP rules, inside those namespaces (chaos/tests/partition.rs)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need+=(faketime)  # libfaketime: the chaos clock nemesis (chaos/src/clock.rs, chaos/tests/clock.rs)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]} (apt)"
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "error: the tests need: ${need[*]}" >&2
    echo "       run this script as root, or install them first: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
command -v cargo-nextest >/dev/null 2>&1 || { step "installing cargo-nextest"; cargo install --locked cargo-nextest; }
# s3s-fs: the real S3-compatible server of the object storage tests (issue 11, ADR 0025),
# cached under target/ (testkit::s3 looks there). 0.14.1 is the newest that builds with
# Rust 1.95 (0.15+ need 1.96). About 5.5 minutes to build on 2 busy cores; once per machine.
S3S_FS="${SKV_S3S_FS:-$ROOT/target/s3s-fs/bin/s3s-fs}"  # a preset SKV_S3S_FS skips the build
if [ ! -x "$S3S_FS" ]; then
  step "installing s3s-fs 0.14.1 into target/s3s-fs (cargo install)"
  cargo install s3s-fs --version 0.14.1 --locked --features binary --root "$ROOT/target/s3s-fs"
fi
export SKV_S3S_FS="$S3S_FS"

# --- 2. Python tooling (grpcio-tools) -----------------------------------------
PYENV="$ROOT/target/pyenv"
if [ ! -x "$PYENV/bin/python" ] || ! "$PYENV/bin/python" -c 'import grpc_tools, kubernetes_validate' 2>/dev/null; then
  step "installing grpcio-tools and kubernetes-validate into $PYENV"
  python3 -m venv "$PYENV"
  # kubernetes-validate: deploy/k8s against the Kubernetes schemas (testkit/tests/deploy_k8s.rs)
  "$PYENV/bin/pip" install -q --disable-pip-version-check 'grpcio-tools>=1.60' 'grpcio-health-checking>=1.60' \
    'kubernetes-validate==1.37.0'
fi
export SKV_PYTHON="$PYENV/bin/python"

# --- 3. static checks ------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The storenode's failpoint code too (compiled only with the feature, ADR 0029).
cargo clippy -p skv-storenode -p skv-placement --all-targets --locked --features skv-storenode/failpoints,skv-placement/failpoints -- -D warnings

step "one crypto provider: aws-lc-rs (no ring in the dependency graph)"
# Judged by what cargo tree prints, not its exit code: rustls-webpki names ring behind a weak
# feature (`ring?/std`), which puts ring in Cargo.lock without it ever being built
# (cargo tree then warns "nothing to print" and exits 0).
if cargo tree --workspace --locked -e normal,build --target all -i ring 2>/dev/null | grep -q '^ring '; then
  echo "error: ring is in the dependency graph; skv uses aws-lc-rs only (docs/adr/0005)" >&2
  cargo tree --workspace -e normal,build -i ring >&2 || true
  exit 1
fi

step "the SDK depends on no server crate (ARCHITECTURE.md invariant)"
if cargo tree -p skv --locked -e normal --prefix none | grep -Eq '^skv-(storenode|placement|proxy|testkit) '; then
  echo "error: the sdk (crate skv) depends on a server crate:" >&2
  cargo tree -p skv -e normal -i skv-proxy >&2 || true
  exit 1
fi

step "every server accepts through skv_rpc::incoming (TCP_NODELAY; issue 9)"
if grep -rn --include='*.rs' -e 'TcpListenerStream' -e 'TcpIncoming::from' storenode/src placement/src proxy/src cli/src; then
  echo "error: a server accepts connections without skv_rpc::incoming (Nagle would add ~40 ms)" >&2
  exit 1
fi

# --- 4. protos compile with protoc ---------------------------------------------------
step "protoc -I proto (every proto file, with grpcio-tools' protoc)"
mapfile -t protos < <(cd proto && find skv -name '*.proto' | sort)
pyout=$(mktemp -d)
(cd proto && "$SKV_PYTHON" -m grpc_tools.protoc -I . --descriptor_set_out=/dev/null \
  --python_out="$pyout" --grpc_python_out="$pyout" "${protos[@]}")
rm -rf "$pyout"
echo "all ${#protos[@]} proto files compile with protoc"

# --- 5. build the binaries the tests start, then run every test --------------------
step "building needs no protoc (README's first command on a fresh machine; ADR 0011)"
nopath=$(printf '%s' "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/protoc" ] || printf '%s:' "$d"; done)
cargo clean -p etcd-client --locked 2>/dev/null || true
env PATH="${nopath%:}" cargo build -p etcd-client --locked
# Failpoints compiled in (ADR 0029): the process tests set them with FAILPOINTS or over
# /failpoints. The same feature set for the bins, the tests and the doc tests, so nothing
# is built twice and the tests' build does not replace the bins with ones without it.
# Release builds, the playground and the images never enable it.
features=(--features skv-storenode/failpoints,skv-placement/failpoints)
step "cargo build --bins ${features[*]}"
disk
cargo build --workspace --bins --locked "${features[@]}"
step "the Docker engine answers (testkit/tests/deploy_compose.rs builds and runs images)"
docker info >/dev/null 2>&1 || { echo "error: the docker daemon is not reachable: start it (e.g. dockerd &) or run as a user in the docker group" >&2; exit 1; }
step "cargo nextest run"
disk
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile" --no-fail-fast "${features[@]}"
step "doc tests"
cargo test --workspace --doc --locked "${features[@]}"
