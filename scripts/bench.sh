#!/usr/bin/env bash
# skv side by side with etcd and Redis, on this machine (docs/bench/README.md).
#
#   ./scripts/bench.sh
#
# 1. builds release binaries (skvctl, skv-bench);
# 2. starts on 127.0.0.1, on free ports, in a temporary folder:
#      skv    `skvctl playground` (placement, 3 storenodes and a proxy in one process)
#      etcd   3 members (Debian's etcd 3.4)
#      Redis  1 node, no persistence (the in-memory ceiling)
#    and stops every process it started, by PID, when it exits (also on Ctrl-C);
# 3. loads the same keys into each (etcd is then compacted and defragmented, DESIGN.md §13);
# 4. runs every scenario on every system, interleaved (round 1: each scenario on each
#    system, the systems' order rotating; then round 2, ...);
# 5. writes docs/bench/RESULTS.md (medians over rounds, ratios skv/etcd) and PNG charts.
#
# Knobs (environment):
#   BENCH_ROUNDS=3          rounds (medians are taken over them)
#   BENCH_DURATION=20s      measured time per run;  BENCH_WARMUP=5s  warm-up per run
#   BENCH_KEYS=100000       keys loaded;            BENCH_VALUE_SIZE=1024  bytes per value
#   BENCH_SYSTEMS="skv etcd redis"
#   BENCH_ONLY=REGEX        only scenarios whose name matches (grep -E)
#   BENCH_OUT=docs/bench    where RESULTS.md and the charts go
#   BENCH_SKIP_BUILD=1      use the binaries already built (BENCH_BIN_DIR, default target/release)
#   BENCH_KEEP_TMP=1        keep the temporary folder (logs and data, target/bench/tmp.*) after the run
#   BENCH_SKV_ARGS="..."    extra flags for `skvctl playground`, e.g. '--placement-arg=--split-qps-threshold=100000000'
#                           (one machine: load splits add ranges, not capacity; see docs/bench/write-path-profile.md)
# JSON results of every run are kept in target/bench/<UTC date>/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-20s}
WARMUP=${BENCH_WARMUP:-5s}
KEYS=${BENCH_KEYS:-100000}
VALUE_SIZE=${BENCH_VALUE_SIZE:-1024}
SYSTEMS=${BENCH_SYSTEMS:-"skv etcd redis"}
ONLY=${BENCH_ONLY:-}
OUT=${BENCH_OUT:-docs/bench}
for sys in $SYSTEMS; do
  case "$sys" in skv | etcd | redis) ;; *) echo "error: unknown system '$sys' in BENCH_SYSTEMS" >&2; exit 1 ;; esac
done

# name | skv-bench flags | (optional) scenario whose result gives the open-loop rate
SCENARIOS=(
  "write c=1|--workload write --distribution uniform -c 1|"
  "write c=64|--workload write --distribution uniform -c 64|"
  "write c=256|--workload write --distribution uniform -c 256|"
  "read c=1|--workload c --distribution uniform -c 1|"
  "read c=64|--workload c --distribution uniform -c 64|"
  "read c=256|--workload c --distribution uniform -c 256|"
  "ycsb-a zipfian c=64|--workload a --distribution zipfian -c 64|"
  "ycsb-b zipfian c=64|--workload b --distribution zipfian -c 64|"
  "ycsb-c zipfian c=64|--workload c --distribution zipfian -c 64|"
  "ycsb-e zipfian c=64|--workload e --distribution zipfian -c 64|"
  "ycsb-f zipfian c=64|--workload f --distribution zipfian -c 64|"
  "write 70% of saturated, open loop|--workload write --distribution uniform -c 256 --rate-fraction 0.7|write c=256"
)

has() { case " $SYSTEMS " in *" $1 "*) return 0 ;; esac; return 1; }
step() { printf '\n==> %s\n' "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# --- tools ----------------------------------------------------------------------
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "install first: sudo apt-get install ${need[*]}"
  step "installing ${need[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  step "cargo build --release -p skv-cli -p skv-bench"
  cargo build --release -p skv-cli -p skv-bench
fi
BIN=${BENCH_BIN_DIR:-$ROOT/target/release}
SKVCTL="$BIN/skvctl"
BENCH="$BIN/skv-bench"
[ -x "$BENCH" ] || die "missing $BENCH"
if has skv && [ ! -x "$SKVCTL" ]; then die "missing $SKVCTL"; fi

# --- processes we start, stopped by PID on exit -----------------------------------
# Data on the repository's disk (not a tmpfs /tmp, where fsync would be free).
mkdir -p "$ROOT/target/bench"
TMP=$(mktemp -d "$ROOT/target/bench/tmp.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "${BENCH_KEEP_TMP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    echo "logs and data kept in $TMP" >&2
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- free ports -------------------------------------------------------------------
USED=" "
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_free() { case "$USED" in *" $1 "*) return 1 ;; esac; ! port_busy "$1"; }
take() { USED="$USED$1 "; }
# These set PORT / BASE rather than print, so that `take` is remembered (no subshell).
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    if port_free "$p"; then take "$p"; PORT=$p; return 0; fi
  done
  die "no free port found"
}
# The playground uses P, P+1, P+11.., P+111.., P+400, P+401 (cli/src/playground.rs).
playground_base() {
  local b ok off
  for _ in $(seq 1 200); do
    b=$((20000 + RANDOM % 40000))
    ok=1
    for off in 0 1 11 12 13 111 112 113 400 401; do
      port_free $((b + off)) || { ok=0; break; }
    done
    if [ "$ok" = 1 ]; then
      for off in 0 1 11 12 13 111 112 113 400 401; do take $((b + off)); done
      BASE=$b; return 0
    fi
  done
  die "no free port range for the playground"
}

wait_for() { # seconds, description, command...
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up in ${secs}s (logs in $TMP)"
}

declare -A CPU_PIDS
declare -A ARGS

# --- skv: the playground ---------------------------------------------------------
if has skv; then
  playground_base
  step "starting the skv playground (port base $BASE)"
  # shellcheck disable=SC2086 # BENCH_SKV_ARGS holds flags split on purpose
  "$SKVCTL" playground --data-dir "$TMP/skv" --port-base "$BASE" ${BENCH_SKV_ARGS:-} >"$TMP/skv.out" 2>"$TMP/skv.err" &
  SKV_PID=$!
  PIDS+=("$SKV_PID")
  for _ in $(seq 1 900); do
    grep -q '^export SKV_ENDPOINT=' "$TMP/skv.out" 2>/dev/null && break
    kill -0 "$SKV_PID" 2>/dev/null || { tail -n 30 "$TMP/skv.err" >&2; die "the playground exited"; }
    sleep 0.2
  done
  line=$(grep -m1 '^export SKV_ENDPOINT=' "$TMP/skv.out") || die "the playground printed no export line in 180s"
  SKV_ENDPOINT="" SKV_TOKEN="" SKV_PLACEMENT=""
  for kv in ${line#export }; do
    case "$kv" in
      SKV_ENDPOINT=*) SKV_ENDPOINT=${kv#*=} ;;
      SKV_PLACEMENT=*) SKV_PLACEMENT=${kv#*=} ;;
      SKV_TOKEN=*) SKV_TOKEN=${kv#*=} ;;
    esac
  done
  if [ -z "$SKV_ENDPOINT" ] || [ -z "$SKV_TOKEN" ]; then die "cannot parse: $line"; fi
  export SKV_TOKEN SKV_PLACEMENT # through the environment, not the command line
  CPU_PIDS[skv]=$SKV_PID
  ARGS[skv]="--skv-endpoint $SKV_ENDPOINT"
fi

# --- etcd: 3 members ----------------------------------------------------------------
if has etcd; then
  step "starting a 3-member etcd cluster"
  cluster="" clients="" etcd_pids=()
  declare -a CP PP
  for i in 1 2 3; do
    free_port; CP[i]=$PORT
    free_port; PP[i]=$PORT
    cluster="${cluster:+$cluster,}m$i=http://127.0.0.1:${PP[$i]}"
    clients="${clients:+$clients,}http://127.0.0.1:${CP[$i]}"
  done
  for i in 1 2 3; do
    etcd --name "m$i" --data-dir "$TMP/etcd/m$i" \
      --listen-client-urls "http://127.0.0.1:${CP[$i]}" --advertise-client-urls "http://127.0.0.1:${CP[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${PP[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${PP[$i]}" \
      --initial-cluster "$cluster" --initial-cluster-token "skv-bench-$$" --initial-cluster-state new \
      --quota-backend-bytes 8589934592 --logger zap --log-outputs stderr \
      >"$TMP/etcd-m$i.log" 2>&1 &
    PIDS+=($!)
    etcd_pids+=($!)
  done
  wait_for 60 "etcd" env ETCDCTL_API=3 etcdctl --endpoints="$clients" --command-timeout=2s endpoint health
  CPU_PIDS[etcd]=$(IFS=,; echo "${etcd_pids[*]}")
  ARGS[etcd]="--etcd-endpoints $clients"
fi

# --- Redis --------------------------------------------------------------------------
if has redis; then
  free_port; RP=$PORT
  step "starting redis-server on $RP"
  redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" >"$TMP/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_for 30 "redis-server" port_busy "$RP"
  CPU_PIDS[redis]=$REDIS_PID
  ARGS[redis]="--redis-url redis://127.0.0.1:$RP"
fi

# --- load -------------------------------------------------------------------------
COMMON=(--keys "$KEYS" --value-size "$VALUE_SIZE" --op-timeout 10s)
for sys in $SYSTEMS; do
  step "loading $KEYS keys of $VALUE_SIZE bytes into $sys"
  # shellcheck disable=SC2086 # ARGS holds flags split on purpose
  "$BENCH" load --system "$sys" ${ARGS[$sys]} "${COMMON[@]}" --load-concurrency 64
done

# --- rounds, interleaved -----------------------------------------------------------
slug() { echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g'; }
RES="$ROOT/target/bench/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RES"
RESULTS=()
FAILED=()
SKV_RANGES=()
read -r -a SYS_LIST <<<"$SYSTEMS"
for round in $(seq 1 "$ROUNDS"); do
  for sc in "${SCENARIOS[@]}"; do
    IFS='|' read -r name flags rate_of <<<"$sc"
    if [ -n "$ONLY" ] && ! echo "$name" | grep -Eq "$ONLY"; then continue; fi
    n=${#SYS_LIST[@]}
    for k in $(seq 0 $((n - 1))); do
      sys=${SYS_LIST[$(((k + round - 1) % n))]}
      out="$RES/r$round-$(slug "$name")-$sys.json"
      extra=()
      if [ -n "$rate_of" ]; then
        base="$RES/r$round-$(slug "$rate_of")-$sys.json"
        [ -f "$base" ] || { echo "skipping '$name' on $sys: no '$rate_of' result" >&2; continue; }
        extra=(--rate-from "$base")
      fi
      step "round $round/$ROUNDS: $name on $sys"
      # shellcheck disable=SC2086 # ARGS and flags hold flags split on purpose
      if "$BENCH" run --system "$sys" ${ARGS[$sys]} "${COMMON[@]}" $flags "${extra[@]}" \
        --label "$name" --round "$round" --duration "$DURATION" --warmup "$WARMUP" \
        --cpu-pids "${CPU_PIDS[$sys]}" --json-out "$out" --progress never; then
        RESULTS+=("$out")
        if [ "$sys" = skv ]; then
          # Ranges after the run (load splits change skv's per-operation cost).
          if listing=$("$SKVCTL" ranges 2>/dev/null); then
            nr=$(echo "$listing" | tail -n +2 | grep -c . || true)
          else
            nr="?" # placement did not answer: unknown, not 0
          fi
          SKV_RANGES+=("r$round $name: $nr")
        fi
      else
        FAILED+=("round $round: $name on $sys")
      fi
    done
  done
done
[ ${#RESULTS[@]} -gt 0 ] || die "no run succeeded"

# --- report -------------------------------------------------------------------------
step "writing $OUT/RESULTS.md"
mkdir -p "$OUT"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
{
  echo "# skv-bench results"
  echo
  echo "Written by \`scripts/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'); see [README.md](README.md) for how to read it."
  echo
  echo "- machine: $(nproc) cores ($cpu), $mem, Linux $(uname -r); shared, so compare ratios, not absolute numbers"
  echo "- skv: \`skvctl playground${BENCH_SKV_ARGS:+ $BENCH_SKV_ARGS}\` (placement, 3 storenodes, 1 proxy, one process), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), release build"
  if [ ${#SKV_RANGES[@]} -gt 0 ]; then
    echo "- skv's ranges after each run (load splits add ranges, and per-range cost, on one machine): $(printf '%s; ' "${SKV_RANGES[@]}" | sed 's/; $//')"
  fi
  echo "- etcd: 3 members, $(etcd --version 2>/dev/null | head -n1), compacted and defragmented after loading and before each run"
  echo "- Redis: 1 node, $(redis-server --version | awk '{print $3}'), \`--save '' --appendonly no\` (the in-memory ceiling)"
  echo "- data: $KEYS keys, $VALUE_SIZE-byte values; each run: ${WARMUP} warm-up, then ${DURATION} measured; $ROUNDS rounds, interleaved, systems rotating"
  echo "- clients: skv-bench, same loop, keys and values for every system; closed loop unless the scenario says open loop"
  echo "- many idle ranges (not a scenario here): CPU and memory of 10,000 idle ranges are in [idle-ranges.md](idle-ranges.md)"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "- failed runs (not in the table): $(IFS=';'; echo "${FAILED[*]}")"
  fi
} >"$TMP/preamble.md"
"$BENCH" report --out "$OUT/RESULTS.md" --charts-dir "$OUT" --preamble "$TMP/preamble.md" "${RESULTS[@]}"
echo "JSON results: $RES" >&2
[ ${#FAILED[@]} -eq 0 ] || echo "warning: ${#FAILED[@]} run(s) failed: ${FAILED[*]}" >&2
