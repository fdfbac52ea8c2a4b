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
MESHLET_BIN=${MESHLET_BIN:-$REPO/target/release/meshlet}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
export PATH="$HOME/.cargo/bin:$PATH"

NS_NET=mlbench-$$              # network namespace of the live backends
VETH_HOST=mlb$$h               # veth pair (names <= 15 characters)
VETH_NS=mlb$$n
NET_PREFIX=198.18.250          # host .1, netns .2, backends .10 .. .(9+LIVE), all /24
ADMIN_PORT=$PORT_BASE
T_START=$SECONDS

log() { printf '[discovery-scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Bookkeeping and cleanup: processes by PID, the control plane by its DIR, the netns by name.
PIDS=()
CP_STARTED=0
NET_MADE=0
stop_pid() { # TERM, up to 5 s, then KILL; only PIDs started here
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT
    set +e
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ "$CP_STARTED" = 1 ]; then
        bash "$REPO/tests/e2e/control-plane.sh" stop "$DIR" >>"$WORK/control-plane.log" 2>&1 ||
            log "control-plane.sh stop $DIR failed, see $WORK/control-plane.log"
        rm -rf "$DIR/etcd-data"
    fi
    if [ "$NET_MADE" = 1 ]; then
        ip netns del "$NS_NET" 2>/dev/null
        ip link del "$VETH_HOST" 2>/dev/null
    fi
    [ -n "${WORK:-}" ] && log "logs and raw results kept in $WORK"
    log "total time $((SECONDS - T_START)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

cpu_ticks() { # utime + stime of PID in clock ticks (/proc/PID/stat fields 14 and 15)
    local stat
    stat=$(cat "/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}
status_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
now() { date +%s.%N; }
calc() { python3 -c "print($1)"; }
mib() { calc "f'{$1 / 1024:.1f}'"; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
pause() { sleep "$1" & wait "$!"; } # a sleep that a signal interrupts at once
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# Preconditions
[ "$(id -u)" = 0 ] || die "needs root (ip netns, veth)"
for c in ip python3 curl timeout oha ss; do
    command -v "$c" >/dev/null || die "$c not found (oha: cargo install oha --locked)"
done
[ -x "$NGINX_BIN" ] || die "nginx not found at $NGINX_BIN"
((LIVE >= 1 && LIVE <= 90 && LIVE <= SERVICES)) || die "BENCH_LIVE must be 1..90 and <= BENCH_SERVICES"
((SERVICES <= 60000)) || die "BENCH_SERVICES must be <= 60000 (ClusterIPs come from a /16)"
for p in $(seq "$PORT_BASE" $((PORT_BASE + LIVE))); do
    port_free "$p" || die "127.0.0.1:$p is in use (set BENCH_PORT_BASE)"
done
if [ -n "$(ip -4 -o addr show to "$NET_PREFIX.0/24" 2>/dev/null)" ]; then
    die "$NET_PREFIX.0/24 is already on an interface here (another run?): $(ip -4 -o addr show to "$NET_PREFIX.0/24" | head -n1)"
fi

if [ -n "$BENCH_OUT" ]; then
    mkdir -p "$BENCH_OUT"
    WORK=$(cd "$BENCH_OUT" && pwd)
else
    WORK=$(mktemp -d /tmp/meshlet-discovery-scale.XXXXXX)
fi
DIR=$WORK/cluster
mkdir -p "$DIR" "$WORK/yaml" "$WORK/oha"
log "work dir: $WORK"
LOAD_START=$(loadavg)
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# 1. meshlet build (before the control plane, so the cluster does not idle through it)
BUILD_NOTE="cargo build --release"
if [ "$BENCH_NO_BUILD" != 1 ]; then
    built=0
    for attempt in 1 2 3; do
        log "cargo build --release (attempt $attempt)"
        t0=$SECONDS
        if (cd "$REPO" && cargo build --release --quiet) >"$WORK/build-$attempt.log" 2>&1; then
            log "built in $((SECONDS - t0)) s"
            built=1
            break
        fi
        log "cargo build failed (tail: $(tail -n 3 "$WORK/build-$attempt.log" | tr '\n' ' '))"
        [ "$attempt" -lt 3 ] && sleep 20
    done
    if [ "$built" = 0 ]; then
        [ -x "$MESHLET_BIN" ] || die "cargo build --release failed 3 times and there is no $MESHLET_BIN"
        BUILD_NOTE="cargo build failed 3 times; existing binary of $(date -u -r "$MESHLET_BIN" '+%Y-%m-%d %H:%M UTC')"
        log "using the existing $MESHLET_BIN ($BUILD_NOTE)"
    fi
else
    BUILD_NOTE="BENCH_NO_BUILD=1; binary of $(date -u -r "$MESHLET_BIN" '+%Y-%m-%d %H:%M UTC')"
fi
[ -x "$MESHLET_BIN" ] || die "no meshlet binary at $MESHLET_BIN"
# A private copy: another engineer's build may replace target/release/meshlet during the run.
cp "$MESHLET_BIN" "$WORK/meshlet"
GIT_REV="$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo '+dirty' || true)"

# ---------------------------------------------------------------------------------------------
# 2. The control plane
log "tests/e2e/build-k8s.sh"
bash "$REPO/tests/e2e/build-k8s.sh" >"$WORK/build-k8s.log" 2>&1 ||
    die "tests/e2e/build-k8s.sh failed, see $WORK/build-k8s.log"
log "tests/e2e/control-plane.sh start $DIR"
CP_STARTED=1
t0=$SECONDS
bash "$REPO/tests/e2e/control-plane.sh" start "$DIR" >"$WORK/control-plane.log" 2>&1 || {
    tail -n 20 "$WORK/control-plane.log" >&2
    CP_STARTED=0 # start failed: it stopped what it started
    die "control-plane.sh start failed"
}
log "control plane up in $((SECONDS - t0)) s"
# shellcheck disable=SC1091
source "$DIR/env"
KUBECTL=$MESHLET_K8S_BIN/kubectl
API_PORT=${MESHLET_APISERVER_URL##*:}
K8S_VERSION=$("$KUBECTL" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
api_metrics() { # the API server's /metrics, as the admin (system:masters)
    curl -fsS --max-time 10 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
        --key "$DIR/pki/admin.key" "$MESHLET_APISERVER_URL/metrics"
}

# ---------------------------------------------------------------------------------------------
# 3. The objects: a Node, namespaces, Services + EndpointSlices in batches
python3 - "$WORK/yaml" "$SERVICES" "$NAMESPACES" "$ENDPOINTS" "$LIVE" "$BATCH" "$NET_PREFIX" <<'EOF'
import sys
out, services, namespaces, endpoints, live, batch, prefix = sys.argv[1:]
services, namespaces, endpoints, live, batch = map(int, (services, namespaces, endpoints, live, batch))

def svc_name(i): return f"svc-{i:05d}"
def ns_name(i): return f"mlbench-{i % namespaces}"

def addresses(i):
    if i < live:  # the live services: all the backends' addresses, round robin
        return [f"{prefix}.{10 + (i + j) % live}" for j in range(endpoints)]
    # the others: distinct, never routed, in 198.18.0.0/16 but outside 198.18.250.0/24
    base = i * endpoints
    return [f"198.18.{(base + j) // 250 % 250}.{(base + j) % 250 + 1}" for j in range(endpoints)]

with open(f"{out}/00-node-namespaces.yaml", "w") as f:
    f.write("apiVersion: v1\nkind: Node\nmetadata:\n  name: mlbench-node\n")
    for n in range(namespaces):
        f.write(f"---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: mlbench-{n}\n")

for b in range(0, services, batch):
    docs = []
    for i in range(b, min(b + batch, services)):
        name, ns = svc_name(i), ns_name(i)
        docs.append(f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  type: ClusterIP
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
""")
        eps = "".join(f"- addresses: [\"{a}\"]\n  conditions:\n    ready: true\n" for a in addresses(i))
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {ns}
  labels:
    kubernetes.io/service-name: {name}
    endpointslice.kubernetes.io/managed-by: meshlet-bench
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
{eps}""")
    with open(f"{out}/batch-{b // batch:04d}.yaml", "w") as f:
        f.write("---\n".join(docs))
EOF

log "creating the Node and $NAMESPACES namespaces"
"$KUBECTL" create -f "$WORK/yaml/00-node-namespaces.yaml" >"$WORK/create-00.log" 2>&1 ||
    die "kubectl create failed: $(tail -n 3 "$WORK/create-00.log")"

log "creating $SERVICES Services and $SERVICES EndpointSlices ($ENDPOINTS endpoints each), $BATCH per batch, $PARALLEL at a time"
T_CREATE0=$(now)
running=()
fail=0
for f in "$WORK"/yaml/batch-*.yaml; do
    timeout 120 "$KUBECTL" create -f "$f" >"$f.log" 2>&1 &
    running+=("$!")
    PIDS+=("$!")
    if [ "${#running[@]}" -ge "$PARALLEL" ]; then
        wait "${running[0]}" || fail=1
        running=("${running[@]:1}")
    fi
done
for pid in "${running[@]}"; do wait "$pid" || fail=1; done
PIDS=()
T_CREATE1=$(now)
CREATE_S=$(calc "f'{$T_CREATE1 - $T_CREATE0:.1f}'")
[ "$fail" = 0 ] || die "a kubectl create failed: $(grep -hv created "$WORK"/yaml/batch-*.log | head -n 3)"
N_SVC=$("$KUBECTL" get services -A --no-headers 2>/dev/null | grep -c mlbench- || true)
N_SLICES=$("$KUBECTL" get endpointslices -A --no-headers 2>/dev/null | grep -c mlbench- || true)
log "created in $CREATE_S s: $N_SVC Services, $N_SLICES EndpointSlices in mlbench-* namespaces (load average $(loadavg))"

# ---------------------------------------------------------------------------------------------
# 4. The live backends: one nginx in a network namespace with LIVE addresses
log "network namespace $NS_NET, veth $VETH_HOST/$VETH_NS, nginx on $NET_PREFIX.10-$((9 + LIVE)):8080"
NET_MADE=1
ip netns add "$NS_NET"
ip link add "$VETH_HOST" type veth peer name "$VETH_NS"
ip link set "$VETH_NS" netns "$NS_NET"
ip addr add "$NET_PREFIX.1/24" dev "$VETH_HOST"
ip link set "$VETH_HOST" up
ip -n "$NS_NET" link set lo up
ip -n "$NS_NET" addr add "$NET_PREFIX.2/24" dev "$VETH_NS"
for i in $(seq 0 $((LIVE - 1))); do
    ip -n "$NS_NET" addr add "$NET_PREFIX.$((10 + i))/24" dev "$VETH_NS"
done
ip -n "$NS_NET" link set "$VETH_NS" up

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
user nobody nogroup;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    default_type text/plain;
    server { listen 0.0.0.0:8080; location / { return 200 "ok"; } }
}
EOF
# `ip netns exec` execs the command in place, so $! is nginx's master process.
ip netns exec "$NS_NET" "$NGINX_BIN" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/stderr.log" 2>&1 &
PIDS+=("$!")
ok=0
for _ in $(seq 1 50); do
    if curl -fsS --max-time 1 -o /dev/null "http://$NET_PREFIX.10:8080/"; then ok=1; break; fi
    sleep 0.1
done
[ "$ok" = 1 ] || die "nginx in $NS_NET does not answer on $NET_PREFIX.10:8080: $(cat "$WORK/nginx/stderr.log" "$WORK/nginx/error.log" 2>/dev/null | tail -n 3)"
curl -fsS --max-time 1 -o /dev/null "http://$NET_PREFIX.$((9 + LIVE)):8080/" ||
    die "nginx does not answer on $NET_PREFIX.$((9 + LIVE)):8080"

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
T_MESH0=$(now)
"$WORK/meshlet" proxy --config "$WORK/meshlet.yaml" >"$WORK/meshlet.log" 2>&1 &
MESH_PID=$!
PIDS+=("$MESH_PID")
ready=0
deadline=$((SECONDS + 60))
while ((SECONDS < deadline)); do
    kill -0 "$MESH_PID" 2>/dev/null || die "meshlet exited: $(tail -n 5 "$WORK/meshlet.log")"
    if [ "$(curl -s -o "$WORK/ready.txt" -w '%{http_code}' --max-time 2 "http://127.0.0.1:$ADMIN_PORT/ready")" = 200 ]; then
        ready=1
        break
    fi
    sleep 0.05
done
T_MESH1=$(now)
[ "$ready" = 1 ] || die "meshlet not ready after 60 s: $(cat "$WORK/ready.txt" 2>/dev/null | head -n 5)"
READY_S=$(calc "f'{$T_MESH1 - $T_MESH0:.2f}'")
log "meshlet ready in $READY_S s; settling $SETTLE_SECONDS s"
pause "$SETTLE_SECONDS"

IDLE_RSS=$(status_kb "$MESH_PID" VmRSS)
IDLE_HWM=$(status_kb "$MESH_PID" VmHWM)
THREADS=$(status_kb "$MESH_PID" Threads)
METRICS_DURING=$WORK/apiserver-metrics-during.txt
api_metrics >"$METRICS_DURING" || die "cannot read the API server's /metrics"
# meshlet's TCP connections to the API server (the watches, plus idle keep-alive connections of
# the client's pool)
api_conns() {
    ss -Htnp state established "( dport = :$API_PORT )" 2>/dev/null | grep "pid=$MESH_PID," >"$WORK/meshlet-api-conns-$1.txt" || true
    wc -l <"$WORK/meshlet-api-conns-$1.txt"
}
API_CONNS=$(api_conns idle)
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
API_CONNS_END=$(api_conns end)
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
