#!/usr/bin/env bash
# meshlet benchmark: the same fixed-rate load against a backend directly, through meshlet and
# through HAProxy, for HTTP/1.1 (oha -> nginx) and gRPC unary over h2c (ghz -> a Go gRPC server).
#
# Usage:  bench/run.sh            (default: 10 s per round, 3 rounds, about 5.5 minutes)
#         BENCH_SECONDS=5 BENCH_ROUNDS=3 bench/run.sh
#
# Two optional parts (off by default), alone or with the above:
#   BENCH_STACK=1  meshlet "bare" (no breaker, no retries, no dedup) against meshlet with the full
#                  resilience stack, same fixed rates, distinct request paths (oha --rand-regex-url)
#   BENCH_DEDUP=1  bursts of identical concurrent GETs to a slow backend (bench/slow-backend),
#                  meshlet with dedup on against dedup off: upstream requests saved, client latency
#   e.g.  BENCH_HTTP=0 BENCH_GRPC=0 BENCH_STACK=1 BENCH_DEDUP=1 bench/run.sh
#
# Everything listens on 127.0.0.1 only. Every process started here is recorded by PID and ended
# by that PID on exit (trap EXIT). See bench/README.md for the method.
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Settings (environment)
BENCH_SECONDS=${BENCH_SECONDS:-10}          # measured duration of one fixed-rate run
BENCH_ROUNDS=${BENCH_ROUNDS:-3}             # alternating rounds (direct, meshlet, haproxy, ...)
BENCH_RATES=${BENCH_RATES:-"2000 5000"}     # HTTP fixed rates, req/s
BENCH_GRPC_RATE=${BENCH_GRPC_RATE:-2000}    # gRPC fixed rate, req/s
BENCH_SAT_SECONDS=${BENCH_SAT_SECONDS:-5}   # unthrottled saturation run per target
BENCH_WARMUP_SECONDS=${BENCH_WARMUP_SECONDS:-1}
BENCH_CONNS=${BENCH_CONNS:-16}
BENCH_HTTP=${BENCH_HTTP:-1}                 # 0: skip the HTTP part
BENCH_GRPC=${BENCH_GRPC:-1}                 # 0: skip the gRPC part
BENCH_LOADGEN_CPU=${BENCH_LOADGEN_CPU:-0}   # CPU for oha / ghz
BENCH_SUT_CPU=${BENCH_SUT_CPU:-1}           # CPU for nginx, the gRPC backend, meshlet, haproxy
BENCH_PORT_BASE=${BENCH_PORT_BASE:-18000}   # all ports are BENCH_PORT_BASE + a small offset
BENCH_OUT=${BENCH_OUT:-}                    # where to keep raw results (default: a temp dir)
BENCH_NO_BUILD=${BENCH_NO_BUILD:-0}         # 1: do not run cargo build / go build
GHZ_VERSION=${GHZ_VERSION:-v0.120.0}        # the newest ghz that `go install` builds with Go 1.26
# The resilience stack (BENCH_STACK=1): two meshlets, the same backends (nginx) and rates.
BENCH_STACK=${BENCH_STACK:-0}
BENCH_STACK_RATES=${BENCH_STACK_RATES:-$BENCH_RATES}
STACK_BARE=${STACK_BARE:-'{breaker: "off", max_retries: 0, retry_on: none, dedup: false}'}
STACK_FULL=${STACK_FULL:-'{breaker: consecutive, max_retries: 2, dedup: true}'}
STACK_PATH=${STACK_PATH-'[a-z0-9]{16}'}     # oha --rand-regex-url: a distinct path per request ('': GET /)
# Dedup under bursts (BENCH_DEDUP=1): two meshlets (dedup on / off) before a slow backend.
BENCH_DEDUP=${BENCH_DEDUP:-0}
BENCH_BURST_SIZE=${BENCH_BURST_SIZE:-50}            # identical GETs per burst (= oha connections)
BENCH_BURST_INTERVAL_MS=${BENCH_BURST_INTERVAL_MS:-100}
BENCH_BACKEND_DELAY_MS=${BENCH_BACKEND_DELAY_MS:-50}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
MESHLET_BIN=${MESHLET_BIN:-$REPO/target/release/meshlet}
# Another meshlet build (say the commit before a change) measured as a fourth target,
# "baseline", in the same rounds as the others: a before/after comparison in one run.
MESHLET_BASELINE_BIN=${MESHLET_BASELINE_BIN:-}
HAPROXY_BIN=${HAPROXY_BIN:-/usr/sbin/haproxy}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
export PATH="$HOME/.cargo/bin:$HOME/go/bin:/usr/local/go/bin:$PATH"

# Ports (127.0.0.1 only)
P_NGINX1=$((BENCH_PORT_BASE + 81))
P_NGINX2=$((BENCH_PORT_BASE + 82))
P_GRPC1=$((BENCH_PORT_BASE + 51))
P_GRPC2=$((BENCH_PORT_BASE + 52))
P_MESH_HTTP=$((BENCH_PORT_BASE + 100))
P_MESH_HTTP_ADMIN=$((BENCH_PORT_BASE + 190))
P_MESH_GRPC=$((BENCH_PORT_BASE + 101))
P_MESH_GRPC_ADMIN=$((BENCH_PORT_BASE + 191))
P_HAP_HTTP=$((BENCH_PORT_BASE + 200))
P_BASE_HTTP=$((BENCH_PORT_BASE + 102))       # MESHLET_BASELINE_BIN
P_BASE_HTTP_ADMIN=$((BENCH_PORT_BASE + 196))
P_BASE_GRPC=$((BENCH_PORT_BASE + 103))
P_BASE_GRPC_ADMIN=$((BENCH_PORT_BASE + 197))
P_HAP_GRPC=$((BENCH_PORT_BASE + 201))
P_SLOW1=$((BENCH_PORT_BASE + 61))           # the slow backend (BENCH_DEDUP)
P_SLOW2=$((BENCH_PORT_BASE + 62))
P_MESH_BARE=$((BENCH_PORT_BASE + 110))      # BENCH_STACK
P_MESH_BARE_ADMIN=$((BENCH_PORT_BASE + 192))
P_MESH_FULL=$((BENCH_PORT_BASE + 111))
P_MESH_FULL_ADMIN=$((BENCH_PORT_BASE + 193))
P_MESH_DEDUP_ON=$((BENCH_PORT_BASE + 120))  # BENCH_DEDUP
P_MESH_DEDUP_ON_ADMIN=$((BENCH_PORT_BASE + 194))
P_MESH_DEDUP_OFF=$((BENCH_PORT_BASE + 121))
P_MESH_DEDUP_OFF_ADMIN=$((BENCH_PORT_BASE + 195))

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: every background process is recorded; the EXIT trap ends them by PID.
PIDS=()
cleanup() {
    local rc=$?
    local pid alive
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 1 30); do
        alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg NAME CPU CMD... : start CMD pinned to CPU in the background, log to $WORK/NAME.log,
# record its PID; the PID is left in $LAST_PID.
start_bg() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    echo "$name $LAST_PID" >>"$WORK/pids.txt"
}

# stop_pid PID : TERM, wait up to 3 s, then KILL. Only PIDs this script started.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# run_loadgen NAME CMD... : run a load generator pinned to the load CPU, bounded in time, record
# its PID while it runs and wait for it. Its stdout goes to $WORK/NAME.out.
run_loadgen() {
    local name=$1
    shift
    local limit=$((BENCH_SECONDS > BENCH_SAT_SECONDS ? BENCH_SECONDS : BENCH_SAT_SECONDS))
    limit=$((limit + 60))
    taskset -c "$BENCH_LOADGEN_CPU" timeout --kill-after=5 "$limit" "$@" \
        >"$WORK/$name.out" 2>"$WORK/$name.err" &
    local pid=$!
    PIDS+=("$pid")
    local rc=0
    wait "$pid" || rc=$?
    if [ "$rc" != 0 ]; then
        log "load generator run $name exited $rc: $(tail -n 3 "$WORK/$name.err" | tr '\n' ' ')"
    fi
    return 0
}

wait_port() { # wait_port PORT : until something accepts on 127.0.0.1:PORT (10 s)
    local port=$1
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$port after 10 s"
}

port_free() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        die "127.0.0.1:$1 is already in use (set BENCH_PORT_BASE to move every port)"
    fi
}

cpu_ticks() { # utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat)
    local stat
    stat=$(cat "/proc/$1/stat")
    stat=${stat##*) }             # drop "pid (comm) " (comm may contain spaces)
    set -- $stat                  # now $1 is field 3 (state)
    echo $(( ${12} + ${13} ))     # fields 14 and 15
}

status_kb() { # status_kb PID FIELD : a kB value from /proc/PID/status
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

now() { date +%s.%N; }

# ---------------------------------------------------------------------------------------------
# Preconditions, tools and builds
[ "$(nproc)" -ge 2 ] || die "needs at least 2 CPUs (load generator and system under test apart)"
for c in taskset timeout python3 curl; do
    command -v "$c" >/dev/null || die "$c not found"
done
NEED_OHA=0
if [ "$BENCH_HTTP" = 1 ] || [ "$BENCH_STACK" = 1 ] || [ "$BENCH_DEDUP" = 1 ]; then NEED_OHA=1; fi
if [ "$BENCH_HTTP" = 1 ] || [ "$BENCH_GRPC" = 1 ]; then
    [ -x "$HAPROXY_BIN" ] || die "haproxy not found at $HAPROXY_BIN (apt-get install haproxy)"
fi
if [ "$BENCH_HTTP" = 1 ] || [ "$BENCH_STACK" = 1 ]; then
    [ -x "$NGINX_BIN" ] || die "nginx not found at $NGINX_BIN (apt-get install nginx)"
fi

if [ -n "$BENCH_OUT" ]; then
    mkdir -p "$BENCH_OUT"
    WORK=$(cd "$BENCH_OUT" && pwd)
else
    WORK=$(mktemp -d /tmp/meshlet-bench.XXXXXX)
fi
RES="$WORK/results"
mkdir -p "$RES"
: >"$WORK/pids.txt"
log "raw results and logs: $WORK"

if [ "$NEED_OHA" = 1 ] && ! command -v oha >/dev/null; then
    log "oha not on PATH: cargo install oha --locked (into ~/.cargo/bin)"
    cargo install oha --locked >"$WORK/oha-install.log" 2>&1 ||
        die "cargo install oha --locked failed, see $WORK/oha-install.log"
fi
if [ "$BENCH_GRPC" = 1 ]; then
    if ! command -v ghz >/dev/null || ! go version -m "$(command -v ghz)" 2>/dev/null | grep -q "bojand/ghz[[:space:]]*$GHZ_VERSION"; then
        log "installing ghz $GHZ_VERSION: go install github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
        GOFLAGS=-buildvcs=false go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION" \
            >"$WORK/ghz-install.log" 2>&1 || die "ghz install failed, see $WORK/ghz-install.log"
    fi
fi

if [ "$BENCH_NO_BUILD" != 1 ]; then
    log "cargo build --release (meshlet)"
    (cd "$REPO" && cargo build --release --quiet) >"$WORK/meshlet-build.log" 2>&1 ||
        die "cargo build --release failed, see $WORK/meshlet-build.log"
fi
[ -x "$MESHLET_BIN" ] || die "meshlet binary not found at $MESHLET_BIN"
# A copy, so that a concurrent build cannot swap the binary in the middle of the run.
MESHLET_PREBUILT=""
if [ "$BENCH_NO_BUILD" = 1 ]; then
    MESHLET_PREBUILT="$MESHLET_BIN, built $(date -u -r "$MESHLET_BIN" '+%Y-%m-%d %H:%M UTC')"
fi
cp "$MESHLET_BIN" "$WORK/meshlet"
MESHLET_BIN="$WORK/meshlet"
TARGETS="direct meshlet haproxy"
if [ -n "$MESHLET_BASELINE_BIN" ]; then
    [ -x "$MESHLET_BASELINE_BIN" ] || die "MESHLET_BASELINE_BIN: not an executable: $MESHLET_BASELINE_BIN"
    MESHLET_BASELINE_BUILT="$MESHLET_BASELINE_BIN, built $(date -u -r "$MESHLET_BASELINE_BIN" '+%Y-%m-%d %H:%M UTC')"
    cp "$MESHLET_BASELINE_BIN" "$WORK/meshlet-baseline"
    MESHLET_BASELINE_BIN="$WORK/meshlet-baseline"
    TARGETS="direct meshlet baseline haproxy"
fi
if [ "$BENCH_GRPC" = 1 ]; then
    GRPC_BACKEND_BIN="$WORK/grpc-backend"
    log "go build (bench/grpc-backend)"
    (cd "$HERE/grpc-backend" && GOFLAGS=-buildvcs=false go build -o "$GRPC_BACKEND_BIN" .) \
        >"$WORK/grpc-backend-build.log" 2>&1 || die "go build failed, see $WORK/grpc-backend-build.log"
fi
if [ "$BENCH_DEDUP" = 1 ]; then
    SLOW_BACKEND_BIN="$WORK/slow-backend"
    log "go build (bench/slow-backend)"
    (cd "$HERE/slow-backend" && GOFLAGS=-buildvcs=false go build -o "$SLOW_BACKEND_BIN" .) \
        >"$WORK/slow-backend-build.log" 2>&1 || die "go build failed, see $WORK/slow-backend-build.log"
fi

for p in $P_NGINX1 $P_NGINX2 $P_GRPC1 $P_GRPC2 $P_MESH_HTTP $P_MESH_HTTP_ADMIN $P_MESH_GRPC \
    $P_MESH_GRPC_ADMIN $P_HAP_HTTP $P_HAP_GRPC $P_SLOW1 $P_SLOW2 $P_MESH_BARE $P_MESH_BARE_ADMIN \
    $P_MESH_FULL $P_MESH_FULL_ADMIN $P_MESH_DEDUP_ON $P_MESH_DEDUP_ON_ADMIN $P_MESH_DEDUP_OFF \
    $P_MESH_DEDUP_OFF_ADMIN $P_BASE_HTTP $P_BASE_HTTP_ADMIN $P_BASE_GRPC $P_BASE_GRPC_ADMIN; do
    port_free "$p"
done

# ---------------------------------------------------------------------------------------------
# Environment facts for the report
CLK_TCK=$(getconf CLK_TCK)
{
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc=$(nproc)"
    echo "cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "kernel=$(uname -r)"
    echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "clk_tck=$CLK_TCK"
    echo "seconds=$BENCH_SECONDS"
    echo "rounds=$BENCH_ROUNDS"
    echo "sat_seconds=$BENCH_SAT_SECONDS"
    echo "conns=$BENCH_CONNS"
    echo "rates=$BENCH_RATES"
    echo "grpc_rate=$BENCH_GRPC_RATE"
    echo "stack_rates=$BENCH_STACK_RATES"
    echo "stack_bare=$STACK_BARE"
    echo "stack_full=$STACK_FULL"
    echo "stack_path=$STACK_PATH"
    echo "burst_size=$BENCH_BURST_SIZE"
    echo "burst_interval_ms=$BENCH_BURST_INTERVAL_MS"
    echo "backend_delay_ms=$BENCH_BACKEND_DELAY_MS"
    echo "meshlet=$("$MESHLET_BIN" version 2>/dev/null | head -n1 | sed "s/^meshlet //") git $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && [ -n "$(git status --porcelain --untracked-files=no -- . ':(exclude)bench' 2>/dev/null)" ] && echo '+dirty')"
    echo "meshlet_prebuilt=$MESHLET_PREBUILT"
    if [ -n "$MESHLET_BASELINE_BIN" ]; then
        echo "baseline=$("$MESHLET_BASELINE_BIN" version 2>/dev/null | head -n1 | sed "s/^meshlet //")"
        echo "baseline_prebuilt=$MESHLET_BASELINE_BUILT"
    fi
    echo "haproxy=$("$HAPROXY_BIN" -v 2>&1 | head -n1 | awk '{print $3}')"
    echo "nginx=$("$NGINX_BIN" -v 2>&1 | sed 's|.*nginx/||')"
    if [ "$NEED_OHA" = 1 ]; then echo "oha=$(oha --version | awk '{print $2}')"; fi
    if [ "$BENCH_GRPC" = 1 ]; then
        echo "ghz=$(go version -m "$(command -v ghz)" | awk '$1 == "mod" { print $3 }')"
        echo "grpc_go=$(cd "$HERE/grpc-backend" && go list -m -f '{{.Version}}' google.golang.org/grpc)"
    fi
    if [ "$BENCH_GRPC" = 1 ] || [ "$BENCH_DEDUP" = 1 ]; then echo "go=$(go env GOVERSION)"; fi
} >"$RES/env.txt"

# ---------------------------------------------------------------------------------------------
# Configs
write_nginx_conf() {
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx/nginx.conf" <<EOF
# Two backends = one nginx with two server blocks on two ports.
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
    server { listen 127.0.0.1:$P_NGINX1; location / { return 200 "ok"; } }
    server { listen 127.0.0.1:$P_NGINX2; location / { return 200 "ok"; } }
}
EOF
}

write_meshlet_conf() { # write_meshlet_conf FILE LISTEN ADMIN SERVICE EP1 EP2 [DEFAULTS]
    cat >"$1" <<EOF
admin: {listen: 127.0.0.1:$3}${7:+
defaults: $7}
upstreams:
  - listen: 127.0.0.1:$2
    service: $4
discovery:
  static:
    - service: $4
      endpoints: ["127.0.0.1:$5", "127.0.0.1:$6"]
workers: 1
log: {level: warn}
EOF
}

write_haproxy_conf() { # write_haproxy_conf FILE LISTEN EP1 EP2 h1|h2
    local bind_proto="" srv_proto=""
    if [ "$5" = h2 ]; then
        bind_proto=" proto h2"
        srv_proto=" proto h2"
    fi
    cat >"$1" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 300s
    timeout http-request 10s
frontend fe
    bind 127.0.0.1:$2$bind_proto
    default_backend be
backend be
    balance leastconn
    http-reuse always
    server s1 127.0.0.1:$3$srv_proto
    server s2 127.0.0.1:$4$srv_proto
EOF
}

# start_meshlet NAME CONF ADMIN_PORT : start meshlet on the SUT CPU and wait for /ready (10 s);
# its PID is left in $LAST_PID.
start_meshlet() { # start_meshlet NAME CONF ADMIN_PORT [BINARY]
    local name=$1 conf=$2 admin=$3 bin=${4:-$MESHLET_BIN} pid
    start_bg "$name" "$BENCH_SUT_CPU" "$bin" proxy --config "$conf"
    pid=$LAST_PID
    for _ in $(seq 1 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$admin/ready" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || die "meshlet ($name) exited: $(tail -n 5 "$WORK/$name.log")"
        sleep 0.1
    done
    curl -fsS -o /dev/null "http://127.0.0.1:$admin/ready" ||
        die "meshlet ($name) not ready: $(tail -n 5 "$WORK/$name.log")"
    LAST_PID=$pid
}

# ---------------------------------------------------------------------------------------------
# Measurement helpers
# measure PROTO TARGET PID KIND LABEL CMD... : run a load generator, record the CPU of PID
# (meshlet / haproxy; "-" for none) around it. KIND is rate or sat; LABEL names the output.
measure() {
    local proto=$1 target=$2 pid=$3 kind=$4 label=$5
    shift 5
    local t0 t1 c0=0 c1=0
    printf '%s\t%s\n' "$label" "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/loadavg.tsv"
    [ "$pid" != - ] && c0=$(cpu_ticks "$pid")
    t0=$(now)
    run_loadgen "$label" "$@"
    t1=$(now)
    [ "$pid" != - ] && c1=$(cpu_ticks "$pid")
    cp "$WORK/$label.out" "$RES/$label.json"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$proto" "$target" "$label" "$kind" "$((c1 - c0))" \
        "$(python3 -c "print(f'{$t1 - $t0:.3f}')")" >>"$RES/cpu.tsv"
}

oha_cmd() { # oha_cmd URL SECONDS RATE(0 = unthrottled) [MORE OHA ARGS...]
    local args=(oha --no-tui --output-format json -c "$BENCH_CONNS" -z "${2}s")
    if [ "$3" != 0 ]; then
        args+=(-q "$3" --latency-correction)
    fi
    args+=("${@:4}" "$1")
    printf '%s\n' "${args[@]}"
}

ghz_cmd() { # ghz_cmd ADDR SECONDS RATE(0 = unthrottled)
    local args=(ghz --insecure --proto "$HERE/grpc-backend/health.proto"
        --call grpc.health.v1.Health/Check -d '{}'
        -c "$BENCH_CONNS" --connections "$BENCH_CONNS" -z "${2}s" --duration-stop=ignore -t 10s -O json)
    if [ "$3" != 0 ]; then
        args+=(--rps "$3")
    fi
    args+=("$1")
    printf '%s\n' "${args[@]}"
}

# run_phase PROTO : start the proxies for PROTO, measure, stop them.
run_phase() {
    local proto=$1
    local -A addr pid
    local mconf="$WORK/meshlet-$proto.yaml" hconf="$WORK/haproxy-$proto.cfg"
    local bconf="$WORK/baseline-$proto.yaml"
    local mesh_pid hap_pid mesh_admin base_pid=- base_admin
    if [ "$proto" = http ]; then
        write_meshlet_conf "$mconf" "$P_MESH_HTTP" "$P_MESH_HTTP_ADMIN" web.default "$P_NGINX1" "$P_NGINX2"
        write_meshlet_conf "$bconf" "$P_BASE_HTTP" "$P_BASE_HTTP_ADMIN" web.default "$P_NGINX1" "$P_NGINX2"
        write_haproxy_conf "$hconf" "$P_HAP_HTTP" "$P_NGINX1" "$P_NGINX2" h1
        addr=([direct]="http://127.0.0.1:$P_NGINX1/" [meshlet]="http://127.0.0.1:$P_MESH_HTTP/"
            [baseline]="http://127.0.0.1:$P_BASE_HTTP/" [haproxy]="http://127.0.0.1:$P_HAP_HTTP/")
        mesh_admin=$P_MESH_HTTP_ADMIN
        base_admin=$P_BASE_HTTP_ADMIN
    else
        write_meshlet_conf "$mconf" "$P_MESH_GRPC" "$P_MESH_GRPC_ADMIN" grpc.default "$P_GRPC1" "$P_GRPC2"
        write_meshlet_conf "$bconf" "$P_BASE_GRPC" "$P_BASE_GRPC_ADMIN" grpc.default "$P_GRPC1" "$P_GRPC2"
        write_haproxy_conf "$hconf" "$P_HAP_GRPC" "$P_GRPC1" "$P_GRPC2" h2
        addr=([direct]="127.0.0.1:$P_GRPC1" [meshlet]="127.0.0.1:$P_MESH_GRPC"
            [baseline]="127.0.0.1:$P_BASE_GRPC" [haproxy]="127.0.0.1:$P_HAP_GRPC")
        mesh_admin=$P_MESH_GRPC_ADMIN
        base_admin=$P_BASE_GRPC_ADMIN
    fi
    "$HAPROXY_BIN" -c -q -f "$hconf" >"$WORK/haproxy-$proto-check.log" 2>&1 ||
        die "haproxy rejects $hconf: $(cat "$WORK/haproxy-$proto-check.log")"

    log "$proto: starting meshlet and haproxy on CPU $BENCH_SUT_CPU"
    start_bg "haproxy-$proto" "$BENCH_SUT_CPU" "$HAPROXY_BIN" -db -f "$hconf"
    hap_pid=$LAST_PID
    start_meshlet "meshlet-$proto" "$mconf" "$mesh_admin"
    mesh_pid=$LAST_PID
    if [ -n "$MESHLET_BASELINE_BIN" ]; then
        start_meshlet "baseline-$proto" "$bconf" "$base_admin" "$MESHLET_BASELINE_BIN"
        base_pid=$LAST_PID
    fi
    if [ "$proto" = http ]; then wait_port "$P_HAP_HTTP"; else wait_port "$P_HAP_GRPC"; fi
    kill -0 "$hap_pid" 2>/dev/null || die "haproxy exited: $(tail -n 5 "$WORK/haproxy-$proto.log")"
    pid=([direct]=- [meshlet]=$mesh_pid [baseline]=$base_pid [haproxy]=$hap_pid)
    sleep 0.5
    # Idle RSS: after startup, before any request through the proxy.
    printf '%s\t%s\tidle_rss_kb\t%s\n' "$proto" meshlet "$(status_kb "$mesh_pid" VmRSS)" >>"$RES/mem.tsv"
    printf '%s\t%s\tidle_rss_kb\t%s\n' "$proto" haproxy "$(status_kb "$hap_pid" VmRSS)" >>"$RES/mem.tsv"
    if [ "$base_pid" != - ]; then
        printf '%s\t%s\tidle_rss_kb\t%s\n' "$proto" baseline "$(status_kb "$base_pid" VmRSS)" >>"$RES/mem.tsv"
    fi

    local rates
    if [ "$proto" = http ]; then rates=$BENCH_RATES; else rates=$BENCH_GRPC_RATE; fi
    local -a cmd
    local t rate r
    # Sanity check and warm-up (discarded): every target must answer.
    for t in $TARGETS; do
        if [ "$proto" = http ]; then
            curl -fsS -o /dev/null "${addr[$t]}" || die "$proto $t (${addr[$t]}) does not answer 200"
            mapfile -t cmd < <(oha_cmd "${addr[$t]}" "$BENCH_WARMUP_SECONDS" "${rates%% *}")
        else
            mapfile -t cmd < <(ghz_cmd "${addr[$t]}" "$BENCH_WARMUP_SECONDS" "${rates%% *}")
        fi
        run_loadgen "warmup-$proto-$t" "${cmd[@]}"
    done
    python3 "$HERE/report.py" --check-warmup "$WORK" "$proto" $TARGETS || die "$proto warm-up failed (see above)"

    for r in $(seq 1 "$BENCH_ROUNDS"); do
        for rate in $rates; do
            for t in $TARGETS; do
                log "$proto round $r/$BENCH_ROUNDS rate $rate: $t"
                if [ "$proto" = http ]; then
                    mapfile -t cmd < <(oha_cmd "${addr[$t]}" "$BENCH_SECONDS" "$rate")
                else
                    mapfile -t cmd < <(ghz_cmd "${addr[$t]}" "$BENCH_SECONDS" "$rate")
                fi
                measure "$proto" "$t" "${pid[$t]}" rate "$proto-r$r-q$rate-$t" "${cmd[@]}"
                sleep 0.3
            done
        done
    done
    for t in $TARGETS; do
        log "$proto saturation (unthrottled, ${BENCH_SAT_SECONDS}s): $t"
        if [ "$proto" = http ]; then
            mapfile -t cmd < <(oha_cmd "${addr[$t]}" "$BENCH_SAT_SECONDS" 0)
        else
            mapfile -t cmd < <(ghz_cmd "${addr[$t]}" "$BENCH_SAT_SECONDS" 0)
        fi
        measure "$proto" "$t" "${pid[$t]}" sat "$proto-sat-$t" "${cmd[@]}"
        sleep 0.3
    done
    printf '%s\t%s\tpeak_rss_kb\t%s\n' "$proto" meshlet "$(status_kb "$mesh_pid" VmHWM)" >>"$RES/mem.tsv"
    printf '%s\t%s\tpeak_rss_kb\t%s\n' "$proto" haproxy "$(status_kb "$hap_pid" VmHWM)" >>"$RES/mem.tsv"
    if [ "$base_pid" != - ]; then
        printf '%s\t%s\tpeak_rss_kb\t%s\n' "$proto" baseline "$(status_kb "$base_pid" VmHWM)" >>"$RES/mem.tsv"
        kill -0 "$base_pid" 2>/dev/null || die "the baseline meshlet died during the $proto phase"
        stop_pid "$base_pid"
    fi
    kill -0 "$mesh_pid" 2>/dev/null || die "meshlet died during the $proto phase"
    kill -0 "$hap_pid" 2>/dev/null || die "haproxy died during the $proto phase"
    stop_pid "$mesh_pid"
    stop_pid "$hap_pid"
}

# scrape ADMIN_PORT FILE : meshlet's /metrics into FILE (report.py takes the differences).
scrape() {
    curl -fsS -o "$2" "http://127.0.0.1:$1/metrics" || log "could not read /metrics on :$1"
}

# rounds_order ROUND A B : "A B" in odd rounds, "B A" in even ones (neither always goes first).
rounds_order() {
    if [ $(($1 % 2)) = 1 ]; then echo "$2 $3"; else echo "$3 $2"; fi
}

# run_stack : meshlet "bare" against meshlet with the full resilience stack, both before the
# nginx backends, at the same fixed rates, alternating. Every request has its own path
# (oha --rand-regex-url), so dedup does its whole bookkeeping on each request and never
# coalesces two of them (the coalesced counter, read around every run, shows it).
run_stack() {
    local -A url pid admin
    local t r rate label
    local -a cmd
    write_meshlet_conf "$WORK/meshlet-stack-bare.yaml" "$P_MESH_BARE" "$P_MESH_BARE_ADMIN" web.default \
        "$P_NGINX1" "$P_NGINX2" "$STACK_BARE"
    write_meshlet_conf "$WORK/meshlet-stack-full.yaml" "$P_MESH_FULL" "$P_MESH_FULL_ADMIN" web.default \
        "$P_NGINX1" "$P_NGINX2" "$STACK_FULL"
    log "stack: starting meshlet bare ($STACK_BARE) and full ($STACK_FULL) on CPU $BENCH_SUT_CPU"
    start_meshlet meshlet-stack-bare "$WORK/meshlet-stack-bare.yaml" "$P_MESH_BARE_ADMIN"
    pid[bare]=$LAST_PID
    start_meshlet meshlet-stack-full "$WORK/meshlet-stack-full.yaml" "$P_MESH_FULL_ADMIN"
    pid[full]=$LAST_PID
    url=([bare]="http://127.0.0.1:$P_MESH_BARE" [full]="http://127.0.0.1:$P_MESH_FULL")
    admin=([bare]=$P_MESH_BARE_ADMIN [full]=$P_MESH_FULL_ADMIN)
    sleep 0.5
    for t in bare full; do
        printf '%s\t%s\tidle_rss_kb\t%s\n' stack "$t" "$(status_kb "${pid[$t]}" VmRSS)" >>"$RES/mem.tsv"
    done
    for t in bare full; do
        curl -fsS -o /dev/null "${url[$t]}/check" || die "stack $t (${url[$t]}) does not answer 200"
        mapfile -t cmd < <(oha_cmd "${url[$t]}/$STACK_PATH" "$BENCH_WARMUP_SECONDS" "${BENCH_STACK_RATES%% *}" --rand-regex-url)
        run_loadgen "warmup-stack-$t" "${cmd[@]}"
    done
    python3 "$HERE/report.py" --check-warmup "$WORK" stack bare full || die "stack warm-up failed (see above)"

    mkdir -p "$RES/metrics"
    for r in $(seq 1 "$BENCH_ROUNDS"); do
        for rate in $BENCH_STACK_RATES; do
            for t in $(rounds_order "$r" bare full); do
                log "stack round $r/$BENCH_ROUNDS rate $rate: $t"
                label="stack-r$r-q$rate-$t"
                mapfile -t cmd < <(oha_cmd "${url[$t]}/$STACK_PATH" "$BENCH_SECONDS" "$rate" --rand-regex-url)
                scrape "${admin[$t]}" "$RES/metrics/$label.before.prom"
                measure stack "$t" "${pid[$t]}" rate "$label" "${cmd[@]}"
                scrape "${admin[$t]}" "$RES/metrics/$label.after.prom"
                sleep 0.3
            done
        done
    done
    for t in bare full; do
        kill -0 "${pid[$t]}" 2>/dev/null || die "meshlet ($t) died during the stack phase"
        printf '%s\t%s\tpeak_rss_kb\t%s\n' stack "$t" "$(status_kb "${pid[$t]}" VmHWM)" >>"$RES/mem.tsv"
        stop_pid "${pid[$t]}"
    done
}

# run_dedup : bursts of BENCH_BURST_SIZE identical concurrent GETs every BENCH_BURST_INTERVAL_MS
# through meshlet with dedup on and with dedup off (everything else at its default), before the
# slow backend (BENCH_BACKEND_DELAY_MS per request). The backend counts the requests it gets
# (GET /__count); meshlet's /metrics is read around every run. oha -w waits for the requests
# still in flight at the deadline, so every request sent is answered and counted.
run_dedup() {
    local -A url pid admin
    local t r label c0 c1 slow_pid
    local -a cmd
    log "dedup: starting the slow backend ($P_SLOW1, $P_SLOW2; ${BENCH_BACKEND_DELAY_MS} ms) on CPU $BENCH_SUT_CPU"
    start_bg slow-backend "$BENCH_SUT_CPU" "$SLOW_BACKEND_BIN" -listen "127.0.0.1:$P_SLOW1,127.0.0.1:$P_SLOW2" \
        -delay "${BENCH_BACKEND_DELAY_MS}ms"
    slow_pid=$LAST_PID
    wait_port "$P_SLOW1"
    wait_port "$P_SLOW2"
    write_meshlet_conf "$WORK/meshlet-dedup-on.yaml" "$P_MESH_DEDUP_ON" "$P_MESH_DEDUP_ON_ADMIN" slow.default \
        "$P_SLOW1" "$P_SLOW2" "{dedup: true}"
    write_meshlet_conf "$WORK/meshlet-dedup-off.yaml" "$P_MESH_DEDUP_OFF" "$P_MESH_DEDUP_OFF_ADMIN" slow.default \
        "$P_SLOW1" "$P_SLOW2" "{dedup: false}"
    log "dedup: starting meshlet with dedup on and off on CPU $BENCH_SUT_CPU"
    start_meshlet meshlet-dedup-on "$WORK/meshlet-dedup-on.yaml" "$P_MESH_DEDUP_ON_ADMIN"
    pid[on]=$LAST_PID
    start_meshlet meshlet-dedup-off "$WORK/meshlet-dedup-off.yaml" "$P_MESH_DEDUP_OFF_ADMIN"
    pid[off]=$LAST_PID
    url=([on]="http://127.0.0.1:$P_MESH_DEDUP_ON/item" [off]="http://127.0.0.1:$P_MESH_DEDUP_OFF/item")
    admin=([on]=$P_MESH_DEDUP_ON_ADMIN [off]=$P_MESH_DEDUP_OFF_ADMIN)
    burst_cmd() { # burst_cmd URL SECONDS
        printf '%s\n' oha --no-tui --output-format json -c "$BENCH_BURST_SIZE" -z "${2}s" -w \
            --burst-delay "${BENCH_BURST_INTERVAL_MS}ms" --burst-rate "$BENCH_BURST_SIZE" "$1"
    }
    for t in on off; do
        curl -fsS -o /dev/null "${url[$t]}" || die "dedup $t (${url[$t]}) does not answer 200"
        mapfile -t cmd < <(burst_cmd "${url[$t]}" "$BENCH_WARMUP_SECONDS")
        run_loadgen "warmup-dedup-$t" "${cmd[@]}"
    done
    python3 "$HERE/report.py" --check-warmup "$WORK" dedup on off || die "dedup warm-up failed (see above)"

    mkdir -p "$RES/metrics"
    for r in $(seq 1 "$BENCH_ROUNDS"); do
        for t in $(rounds_order "$r" on off); do
            log "dedup round $r/$BENCH_ROUNDS: dedup $t"
            label="dedup-r$r-$t"
            mapfile -t cmd < <(burst_cmd "${url[$t]}" "$BENCH_SECONDS")
            c0=$(curl -fsS "http://127.0.0.1:$P_SLOW1/__count") || die "slow backend: no /__count"
            scrape "${admin[$t]}" "$RES/metrics/$label.before.prom"
            measure dedup "$t" "${pid[$t]}" burst "$label" "${cmd[@]}"
            scrape "${admin[$t]}" "$RES/metrics/$label.after.prom"
            c1=$(curl -fsS "http://127.0.0.1:$P_SLOW1/__count") || die "slow backend: no /__count"
            printf '%s\t%s\n' "$label" "$((c1 - c0))" >>"$RES/backend.tsv"
            sleep 0.3
        done
    done
    for t in on off; do
        kill -0 "${pid[$t]}" 2>/dev/null || die "meshlet (dedup $t) died during the dedup phase"
        stop_pid "${pid[$t]}"
    done
    stop_pid "$slow_pid"
}

# ---------------------------------------------------------------------------------------------
# Run
: >"$RES/cpu.tsv"
: >"$RES/mem.tsv"
: >"$RES/loadavg.tsv"
: >"$RES/backend.tsv"
START=$(date +%s)

if [ "$BENCH_HTTP" = 1 ]; then
    write_nginx_conf
    log "http: starting nginx (2 server blocks: $P_NGINX1, $P_NGINX2) on CPU $BENCH_SUT_CPU"
    start_bg nginx "$BENCH_SUT_CPU" "$NGINX_BIN" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" -e "$WORK/nginx/error.log"
    NGINX_PID=$LAST_PID
    wait_port "$P_NGINX1"
    wait_port "$P_NGINX2"
    run_phase http
    stop_pid "$NGINX_PID"
fi

if [ "$BENCH_GRPC" = 1 ]; then
    log "grpc: starting the gRPC backend ($P_GRPC1, $P_GRPC2) on CPU $BENCH_SUT_CPU"
    start_bg grpc-backend "$BENCH_SUT_CPU" "$GRPC_BACKEND_BIN" -listen "127.0.0.1:$P_GRPC1,127.0.0.1:$P_GRPC2"
    GRPC_PID=$LAST_PID
    wait_port "$P_GRPC1"
    wait_port "$P_GRPC2"
    run_phase grpc
    stop_pid "$GRPC_PID"
fi

if [ "$BENCH_STACK" = 1 ]; then
    write_nginx_conf
    log "stack: starting nginx (2 server blocks: $P_NGINX1, $P_NGINX2) on CPU $BENCH_SUT_CPU"
    start_bg nginx-stack "$BENCH_SUT_CPU" "$NGINX_BIN" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" -e "$WORK/nginx/error.log"
    NGINX_PID=$LAST_PID
    wait_port "$P_NGINX1"
    wait_port "$P_NGINX2"
    run_stack
    stop_pid "$NGINX_PID"
fi

if [ "$BENCH_DEDUP" = 1 ]; then
    run_dedup
fi

echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/env.txt"
echo "runtime_s=$(($(date +%s) - START))" >>"$RES/env.txt"
log "done in $(($(date +%s) - START)) s; report:"
echo
python3 "$HERE/report.py" "$WORK" | tee "$WORK/report.md"
echo
log "raw results: $RES ; report: $WORK/report.md"
