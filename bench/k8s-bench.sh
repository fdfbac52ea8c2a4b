# shellcheck shell=bash
# The parts shared by bench/discovery-scale.sh and bench/eviction.sh: sourced, not run.
#
# The sourcing script sets, before calling anything here:
#   BENCH_NAME   the log prefix and the temp dir's name (/tmp/meshlet-$BENCH_NAME.XXXXXX)
#   HERE, REPO   bench/ and the repository
#   SERVICES NAMESPACES ENDPOINTS LIVE BATCH PARALLEL   the objects (kb_create_objects)
#   BENCH_OUT BENCH_NO_BUILD MESHLET_BIN NGINX_BIN      as in bench/README.md
# and gets: WORK, DIR (the control plane's), PIDS (ended by PID in the EXIT trap), NS_NET /
# VETH_HOST / VETH_NS / NET_PREFIX (the live backends' network namespace), KUBECTL, API_PORT,
# K8S_VERSION, BUILD_NOTE, GIT_REV, CREATE_S, N_SVC, N_SLICES, READY_S, LOAD_START, CLK_TCK.
#
# Addresses: only 127.0.0.0/8 and 198.18.0.0/15 (the control plane's ClusterIPs are
# 198.19.0.0/16, the endpoints are in 198.18.0.0/16, the live backends on 198.18.250.0/24).
# Nothing is killed by name.

NS_NET=mlbench-$$              # network namespace of the live backends
VETH_HOST=mlb$$h               # veth pair (names <= 15 characters)
VETH_NS=mlb$$n
NET_PREFIX=198.18.250          # host .1, netns .2, backends .10 .. .(9+LIVE), all /24
T_START=$SECONDS
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
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
        ip netns del "$NS_NET" 2>/dev/null # its iptables rules and addresses go with it
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

# The common preconditions and the work dir.
kb_init() {
    [ "$(id -u)" = 0 ] || die "needs root (ip netns, veth)"
    local c
    for c in ip python3 curl timeout ss "$@"; do
        command -v "$c" >/dev/null || die "$c not found"
    done
    [ -x "$NGINX_BIN" ] || die "nginx not found at $NGINX_BIN"
    ((LIVE >= 1 && LIVE <= 90 && LIVE <= SERVICES)) || die "BENCH_LIVE must be 1..90 and <= BENCH_SERVICES"
    ((SERVICES <= 60000)) || die "BENCH_SERVICES must be <= 60000 (ClusterIPs come from a /16)"
    if [ -n "$(ip -4 -o addr show to "$NET_PREFIX.0/24" 2>/dev/null)" ]; then
        die "$NET_PREFIX.0/24 is already on an interface here (another run?): $(ip -4 -o addr show to "$NET_PREFIX.0/24" | head -n1)"
    fi
    if [ -n "$BENCH_OUT" ]; then
        mkdir -p "$BENCH_OUT"
        WORK=$(cd "$BENCH_OUT" && pwd)
    else
        WORK=$(mktemp -d "/tmp/meshlet-$BENCH_NAME.XXXXXX")
    fi
    DIR=$WORK/cluster
    mkdir -p "$DIR" "$WORK/yaml"
    log "work dir: $WORK"
    LOAD_START=$(loadavg)
    CLK_TCK=$(getconf CLK_TCK)
}

# ---------------------------------------------------------------------------------------------
# meshlet build (before the control plane, so the cluster does not idle through it)
kb_build_meshlet() {
    BUILD_NOTE="cargo build --release"
    if [ "$BENCH_NO_BUILD" != 1 ]; then
        local built=0 attempt t0
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
    # A private copy: another engineer's build may replace the binary during the run.
    cp "$MESHLET_BIN" "$WORK/meshlet"
    GIT_REV="$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo '+dirty' || true)"
}

# ---------------------------------------------------------------------------------------------
# The control plane
kb_start_control_plane() {
    local t0
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
}
api_metrics() { # the API server's /metrics, as the admin (system:masters)
    curl -fsS --max-time 10 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
        --key "$DIR/pki/admin.key" "$MESHLET_APISERVER_URL/metrics"
}

# ---------------------------------------------------------------------------------------------
# The objects: a Node, namespaces, Services + EndpointSlices in batches
kb_create_objects() {
    python3 - "$WORK/yaml" "$SERVICES" "$NAMESPACES" "$ENDPOINTS" "$LIVE" "$BATCH" "$NET_PREFIX" <<'EOF'
import sys
out, services, namespaces, endpoints, live, batch, prefix = sys.argv[1:]
services, namespaces, endpoints, live, batch = map(int, (services, namespaces, endpoints, live, batch))

def svc_name(i): return f"svc-{i:05d}"
def ns_name(i): return f"mlbench-{i % namespaces}"

def addresses(i):
    if i < live:  # the live services: all the backends' addresses, round robin
        return [f"{prefix}.{10 + (i + j) % live}" for j in range(endpoints)]
    # the others: never routed, in 198.18.0.0/16 but outside 198.18.250.0/24 (distinct up to
    # 62,500 endpoints in all)
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
    local t0 t1 f pid fail=0 running=() before=("${PIDS[@]}")
    t0=$(now)
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
    PIDS=("${before[@]}") # the kubectl processes have all ended
    t1=$(now)
    CREATE_S=$(calc "f'{$t1 - $t0:.1f}'")
    [ "$fail" = 0 ] || die "a kubectl create failed: $(grep -hv created "$WORK"/yaml/batch-*.log | head -n 3)"
    N_SVC=$("$KUBECTL" get services -A --no-headers 2>/dev/null | grep -c mlbench- || true)
    N_SLICES=$("$KUBECTL" get endpointslices -A --no-headers 2>/dev/null | grep -c mlbench- || true)
    log "created in $CREATE_S s: $N_SVC Services, $N_SLICES EndpointSlices in mlbench-* namespaces (load average $(loadavg))"
}

# ---------------------------------------------------------------------------------------------
# The live backends: one nginx in a network namespace with LIVE addresses
kb_backend_netns() {
    local i ok
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
}

# ---------------------------------------------------------------------------------------------
# meshlet: started in the background (PID in MESH_PID), /ready polled every 50 ms (60 s).
#   kb_start_meshlet CONFIG ADMIN_PORT [COMMAND PREFIX...]   e.g. ip netns exec NS
# The prefix runs curl too, so a meshlet in a network namespace is polled there.
kb_start_meshlet() {
    local config=$1 admin=$2 t0 t1 ready=0 deadline
    shift 2
    t0=$(now)
    "$@" "$WORK/meshlet" proxy --config "$config" >"$WORK/meshlet.log" 2>&1 &
    MESH_PID=$!
    PIDS+=("$MESH_PID")
    deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        kill -0 "$MESH_PID" 2>/dev/null || die "meshlet exited: $(tail -n 5 "$WORK/meshlet.log")"
        if [ "$("$@" curl -s -o "$WORK/ready.txt" -w '%{http_code}' --max-time 2 "http://127.0.0.1:$admin/ready")" = 200 ]; then
            ready=1
            break
        fi
        sleep 0.05
    done
    t1=$(now)
    [ "$ready" = 1 ] || die "meshlet not ready after 60 s: $(head -n 5 "$WORK/ready.txt" 2>/dev/null)"
    READY_S=$(calc "f'{$t1 - $t0:.2f}'")
}

# meshlet's established TCP connections to the API server (the watches, plus idle keep-alive
# connections of the client's pool), listed in WORK/meshlet-api-conns-LABEL.txt; counted.
#   kb_api_conns LABEL [COMMAND PREFIX...]
kb_api_conns() {
    local label=$1
    shift
    "$@" ss -Htnp state established "( dport = :$API_PORT )" 2>/dev/null | grep "pid=$MESH_PID," >"$WORK/meshlet-api-conns-$label.txt" || true
    wc -l <"$WORK/meshlet-api-conns-$label.txt"
}
