#!/usr/bin/env bash
# meshlet's Kubernetes discovery at scale: a real control plane (tests/e2e/control-plane.sh) with
# 1,000 selectorless Services of 10 endpoints each (hand-made EndpointSlices), one meshlet with
# `discovery.kubernetes` and 10 `upstreams`, and real backends (one nginx in a network namespace)
# behind those 10 services. Measures what one sidecar costs: memory, CPU idle and under a bounded
# load, and the watches it holds on the API server. A benchmark: it reports numbers, it never
# fails on one.
#
# Usage:  bench/discovery-scale.sh        (as root: it creates a network namespace; ~3 minutes
#                                          plus the meshlet build)
# Settings (environment): see bench/README.md, "Kubernetes discovery at scale".
#
# Addresses: only 127.0.0.0/8 and 198.18.0.0/15 (the control plane's ClusterIPs are 198.19.0.0/16,
# the endpoints are in 198.18.0.0/16, the live backends on 198.18.250.0/24). Every process started
# here is ended by its PID in the EXIT trap; nothing is killed by name.
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Settings
SERVICES=${BENCH_SERVICES:-1000}              # Services (each with one EndpointSlice)
NAMESPACES=${BENCH_NAMESPACES:-10}            # spread over this many namespaces
ENDPOINTS=${BENCH_ENDPOINTS:-10}              # endpoints per EndpointSlice
LIVE=${BENCH_LIVE:-10}                        # services with real backends, named in upstreams
BATCH=${BENCH_BATCH:-100}                     # Services (+ their slices) per kubectl create
PARALLEL=${BENCH_PARALLEL:-2}                 # kubectl create processes at a time
RATE=${BENCH_RATE:-500}                       # req/s in total over the LIVE upstreams
LOAD_SECONDS=${BENCH_LOAD_SECONDS:-30}
SETTLE_SECONDS=${BENCH_SETTLE_SECONDS:-10}    # after /ready, before the idle figures
IDLE_SECONDS=${BENCH_IDLE_SECONDS:-30}        # idle CPU window
PORT_BASE=${BENCH_PORT_BASE:-17600}           # admin = base, upstreams = base+1 .. base+LIVE
BENCH_OUT=${BENCH_OUT:-}                      # keep logs and results here (default: a temp dir)
BENCH_NO_BUILD=${BENCH_NO_BUILD:-0}           # 1: no cargo build, use MESHLET_BIN as it is
TARGET_RSS_MIB=32                             # the figure to compare against

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
MESHLET_BIN=${MESHLET_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/meshlet}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
ADMIN_PORT=$PORT_BASE
BENCH_NAME=discovery-scale
# Helpers, cleanup (EXIT trap), build, control plane, objects, backends: shared with eviction.sh.
# shellcheck source=bench/k8s-bench.sh
source "$HERE/k8s-bench.sh"

# ---------------------------------------------------------------------------------------------
# Preconditions
command -v oha >/dev/null || die "oha not found (cargo install oha --locked)"
for p in $(seq "$PORT_BASE" $((PORT_BASE + LIVE))); do
    port_free "$p" || die "127.0.0.1:$p is in use (set BENCH_PORT_BASE)"
done
kb_init oha
mkdir -p "$WORK/oha"

# 1. meshlet build, 2. the control plane, 3. the objects, 4. the live backends
kb_build_meshlet
kb_start_control_plane
kb_create_objects
kb_backend_netns

# ---------------------------------------------------------------------------------------------
# 5. meshlet
LIVE_NAMES=()
{
    echo "admin: {listen: 127.0.0.1:$ADMIN_PORT}"
    echo "discovery: {kubernetes: {kubeconfig: $DIR/kubeconfig}}"
    echo "workers: 1"
    echo "log: {level: warn}"
    echo "upstreams:"
    for i in $(seq 0 $((LIVE - 1))); do
        name=$(printf 'svc-%05d.mlbench-%d' "$i" $((i % NAMESPACES)))
        LIVE_NAMES+=("$name")
        echo "  - {listen: 127.0.0.1:$((PORT_BASE + 1 + i)), service: \"$name:80\"}"
    done
} >"$WORK/meshlet.yaml"

METRICS_BEFORE=$WORK/apiserver-metrics-before.txt
api_metrics >"$METRICS_BEFORE" || die "cannot read the API server's /metrics"

log "starting meshlet (workers: 1, $LIVE upstreams)"
kb_start_meshlet "$WORK/meshlet.yaml" "$ADMIN_PORT"
log "meshlet ready in $READY_S s; settling $SETTLE_SECONDS s"
pause "$SETTLE_SECONDS"

IDLE_RSS=$(status_kb "$MESH_PID" VmRSS)
IDLE_HWM=$(status_kb "$MESH_PID" VmHWM)
THREADS=$(status_kb "$MESH_PID" Threads)
METRICS_DURING=$WORK/apiserver-metrics-during.txt
api_metrics >"$METRICS_DURING" || die "cannot read the API server's /metrics"
API_CONNS=$(kb_api_conns idle)
curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$WORK/meshlet-metrics-idle.txt"

log "idle CPU over $IDLE_SECONDS s (RSS $(mib "$IDLE_RSS") MiB, load average $(loadavg))"
c0=$(cpu_ticks "$MESH_PID")
t0=$(now)
pause "$IDLE_SECONDS"
c1=$(cpu_ticks "$MESH_PID")
t1=$(now)
IDLE_CPU=$(calc "f'{($c1 - $c0) / $CLK_TCK / ($t1 - $t0) * 100:.2f}'")
IDLE_TICKS=$((c1 - c0))
IDLE_RSS_END=$(status_kb "$MESH_PID" VmRSS)

# ---------------------------------------------------------------------------------------------
# 6. A bounded load over the LIVE upstreams: one oha per upstream, RATE/LIVE req/s each
PER=$(calc "max(1, round($RATE / $LIVE))")
log "load: $LIVE x oha at $PER req/s for $LOAD_SECONDS s (total $((PER * LIVE)) req/s), load average $(loadavg)"
LOAD_PIDS=()
c0=$(cpu_ticks "$MESH_PID")
t0=$(now)
for i in $(seq 0 $((LIVE - 1))); do
    timeout --kill-after=5 $((LOAD_SECONDS + 30)) oha --no-tui --output-format json -c 2 \
        -q "$PER" --latency-correction -z "${LOAD_SECONDS}s" \
        "http://127.0.0.1:$((PORT_BASE + 1 + i))/" >"$WORK/oha/$i.json" 2>"$WORK/oha/$i.err" &
    LOAD_PIDS+=("$!")
    PIDS+=("$!")
done
RSS_MAX=0
RSS_SUM=0
RSS_N=0
while :; do
    alive=0
    for pid in "${LOAD_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || break
    r=$(status_kb "$MESH_PID" VmRSS)
    RSS_SUM=$((RSS_SUM + r))
    RSS_N=$((RSS_N + 1))
    ((r > RSS_MAX)) && RSS_MAX=$r
    sleep 1
done
c1=$(cpu_ticks "$MESH_PID")
t1=$(now)
for pid in "${LOAD_PIDS[@]}"; do wait "$pid" || log "oha (pid $pid) exited $?"; done
LOAD_CPU=$(calc "f'{($c1 - $c0) / $CLK_TCK / ($t1 - $t0) * 100:.1f}'")
LOAD_RSS_AVG=$((RSS_SUM / (RSS_N > 0 ? RSS_N : 1)))
HWM_END=$(status_kb "$MESH_PID" VmHWM)
RSS_END=$(status_kb "$MESH_PID" VmRSS)
curl -fsS --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$WORK/meshlet-metrics-end.txt"
API_CONNS_END=$(kb_api_conns end)
MESH_LOG_LINES=$(wc -l <"$WORK/meshlet.log")
LOAD_END=$(loadavg)

# ---------------------------------------------------------------------------------------------
# 7. What a sidecar would hold if it watched everything
log "sizes of all Services and EndpointSlices"
"$KUBECTL" get endpointslices -A -o json >"$WORK/all-endpointslices.json"
"$KUBECTL" get services -A -o json >"$WORK/all-services.json"

# ---------------------------------------------------------------------------------------------
# 8. The report: the figures go to $WORK/figures.txt (KEY=VALUE); discovery-scale-report.py
# prints the Markdown table from them and the raw files (and can reprint it from a kept BENCH_OUT).
{
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine=nproc $(nproc), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
    for v in SERVICES ENDPOINTS NAMESPACES LIVE BATCH PARALLEL SETTLE_SECONDS IDLE_SECONDS \
        LOAD_SECONDS TARGET_RSS_MIB CLK_TCK PER CREATE_S READY_S IDLE_RSS IDLE_HWM IDLE_RSS_END \
        THREADS IDLE_CPU IDLE_TICKS LOAD_CPU LOAD_RSS_AVG RSS_MAX RSS_END HWM_END API_CONNS API_CONNS_END MESH_LOG_LINES \
        LOAD_START LOAD_END K8S_VERSION GIT_REV BUILD_NOTE; do
        echo "${v,,}=${!v}"
    done
    echo "live_names=${LIVE_NAMES[*]}"
} >"$WORK/figures.txt"
python3 "$HERE/discovery-scale-report.py" "$WORK" >"$WORK/report.md"
log "done (load average $(loadavg))"
cat "$WORK/report.md"
