#!/usr/bin/env bash
# meshlet's eviction of unused destinations (issue 14): a real control plane
# (tests/e2e/control-plane.sh) with 10,000 selectorless Services (small hand-made EndpointSlices),
# one meshlet with `discovery.kubernetes`, a transparent outbound listener and a short
# `discovery.evict_after`, in a network namespace where iptables redirects 198.19.0.0/16 (the
# ClusterIPs) to that listener. A client there touches each of the 10,000 services once, while
# it keeps using a few live ones (an nginx). Reported: meshlet's RSS, the API server's WATCH
# requests held by this meshlet, meshlet's connections to the API server and the
# `meshlet_destinations` gauge at the start, after the 10,000 (the peak) and after eviction.
# A benchmark: it reports numbers, it never fails on one.
#
# Usage:  bench/eviction.sh        (as root: network namespace, veth, iptables in that namespace;
#                                   ~12 minutes plus the meshlet build)
# Settings (environment): see bench/README.md, "Eviction of unused destinations".
#
# Shares its parts (helpers, cleanup, build, control plane, objects, backends) with
# discovery-scale.sh through k8s-bench.sh. Addresses: only 127.0.0.0/8 and 198.18.0.0/15;
# iptables rules only inside the namespace made here (they go with it). Every process started
# here is ended by its PID in the EXIT trap; nothing is killed by name.
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Settings
SERVICES=${BENCH_SERVICES:-10000}             # Services (each with one EndpointSlice)
NAMESPACES=${BENCH_NAMESPACES:-10}            # spread over this many namespaces
ENDPOINTS=${BENCH_ENDPOINTS:-2}               # endpoints per EndpointSlice
LIVE=${BENCH_LIVE:-5}                         # services with real backends, used all along
BATCH=${BENCH_BATCH:-250}                     # Services (+ their slices) per kubectl create
PARALLEL=${BENCH_PARALLEL:-2}                 # kubectl create processes at a time
EVICT_AFTER=${BENCH_EVICT_AFTER:-240}         # discovery.evict_after, whole seconds (> the touch)
CONCURRENCY=${BENCH_CONCURRENCY:-32}          # touch: requests at a time
TOUCH_DEADLINE=${BENCH_TOUCH_DEADLINE:-600}   # touch: what is not sent by then is left out (s)
LIVE_INTERVAL=${BENCH_LIVE_INTERVAL:-1}       # live: one request per live service this often (s)
SETTLE_SECONDS=${BENCH_SETTLE_SECONDS:-5}     # after /ready; after the live client started
EVICT_DEADLINE=${BENCH_EVICT_DEADLINE:-}      # wait for eviction at most (s); default below
AFTER_SECONDS=${BENCH_AFTER_SECONDS:-95}      # a last reading this long after eviction
SAMPLE_SECONDS=${BENCH_SAMPLE_SECONDS:-5}     # the gauge is read this often (its /metrics is large)
PORT_BASE=${BENCH_PORT_BASE:-17700}           # admin = base, outbound = base+1 (in the namespace)
BENCH_OUT=${BENCH_OUT:-}                      # keep logs and results here (default: a temp dir)
BENCH_NO_BUILD=${BENCH_NO_BUILD:-0}           # 1: no cargo build, use MESHLET_BIN as it is

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
MESHLET_BIN=${MESHLET_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/meshlet}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
ADMIN_PORT=$PORT_BASE
OUT_PORT=$((PORT_BASE + 1))
BENCH_NAME=eviction
# Helpers, cleanup (EXIT trap), build, control plane, objects, backends: shared with
# discovery-scale.sh.
# shellcheck source=bench/k8s-bench.sh
source "$HERE/k8s-bench.sh"

[[ $EVICT_AFTER =~ ^[0-9]+$ ]] && ((EVICT_AFTER >= 1)) || die "BENCH_EVICT_AFTER must be whole seconds >= 1"
# The eviction loop runs every quarter of evict_after (0.1 s to 60 s): a destination goes at
# most that long after it became due.
EVICT_PERIOD=$(calc "min(60, max(0.1, $EVICT_AFTER / 4))")
EVICT_DEADLINE=${EVICT_DEADLINE:-$(calc "int($EVICT_AFTER + $EVICT_PERIOD + 60)")}

# ---------------------------------------------------------------------------------------------
# Preconditions: kb_init (root, tools, work dir). The watches need descriptors (kube-rs speaks
# HTTP/1.1 to the API server: one connection per watch), in meshlet and in the forwarder.
kb_init iptables
ulimit -Hn 65536 2>/dev/null || true # needs CAP_SYS_RESOURCE; else the hard limit stays
ulimit -n "$(ulimit -Hn)"
((SERVICES + 100 < $(ulimit -n))) || die "meshlet needs more than $((SERVICES + 100)) descriptors; the limit is $(ulimit -n)"
NSX=(ip netns exec "$NS_NET") # run in the namespace

# 1. meshlet build, 2. the control plane, 3. the objects, 4. the live backends (nginx in NS_NET)
kb_build_meshlet
kb_start_control_plane
kb_create_objects
kb_backend_netns

# ---------------------------------------------------------------------------------------------
# 5. The namespace as a pod: ClusterIPs redirected to meshlet's outbound listener, the API
# server reachable at the kubeconfig's own address, the dead services' endpoints unreachable:
#  - 198.19.0.0/16 on-link on the veth (a connect needs a route; the REDIRECT then takes the
#    packets to 127.0.0.1 before they leave, and the host side answers no ARP for them);
#  - 198.18.0.0/16 unreachable, except the connected 198.18.250.0/24 of the live backends: a
#    connection meshlet makes to a dead endpoint fails at once (EHOSTUNREACH), nothing leaves;
#  - nat OUTPUT: TCP to 198.19.0.0/16 -> REDIRECT to the outbound port;
#  - netns-forward.py: 127.0.0.1:API_PORT in the namespace -> the API server on the host's.
ip -n "$NS_NET" route add 198.19.0.0/16 dev "$VETH_NS"
ip -n "$NS_NET" route add unreachable 198.18.0.0/16
"${NSX[@]}" iptables -w -t nat -A OUTPUT -p tcp -d 198.19.0.0/16 -j REDIRECT --to-ports "$OUT_PORT"
"${NSX[@]}" iptables -w -t nat -S OUTPUT >"$WORK/iptables.txt"
# Two descriptors per forwarded connection: enough forwarders (SO_REUSEPORT) that each stays well
# under the descriptor limit with SERVICES + 1 connections in all.
FORWARDERS=$(calc "max(1, -(-($SERVICES + 100) * 2 * 2 // $(ulimit -n)))")
for i in $(seq 1 "$FORWARDERS"); do
    python3 "$HERE/netns-forward.py" "$NS_NET" "$API_PORT" >"$WORK/forward-$i.log" 2>&1 &
    FWD_PID=$!
    PIDS+=("$FWD_PID")
done
ok=0
for _ in $(seq 1 50); do
    if "${NSX[@]}" curl -fsS -o /dev/null --max-time 2 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
        --key "$DIR/pki/admin.key" "$MESHLET_APISERVER_URL/readyz" 2>/dev/null; then ok=1; break; fi
    kill -0 "$FWD_PID" 2>/dev/null || break
    sleep 0.1
done
[ "$ok" = 1 ] || die "the API server is not reachable from $NS_NET: $(tail -n 3 "$WORK/forward-1.log")"

# The targets: every bench Service's ClusterIP, port 80 (the live ones: svc-00000 .. LIVE-1).
"$KUBECTL" get services -A -o json | python3 -c '
import json, sys
live = int(sys.argv[1])
rows = sorted((i["metadata"]["name"], i["metadata"]["namespace"], i["spec"]["clusterIP"])
              for i in json.load(sys.stdin)["items"] if i["metadata"]["namespace"].startswith("mlbench-"))
with open(sys.argv[2], "w") as a, open(sys.argv[3], "w") as l:
    for name, ns, ip in rows:
        a.write(f"{ip} 80 {name}.{ns}\n")
        if int(name.split("-")[1]) < live:
            l.write(f"{ip} 80 {name}.{ns}\n")
' "$LIVE" "$WORK/targets-all.txt" "$WORK/targets-live.txt"
N_TARGETS=$(wc -l <"$WORK/targets-all.txt")
[ "$(wc -l <"$WORK/targets-live.txt")" = "$LIVE" ] || die "expected $LIVE live targets, got $(wc -l <"$WORK/targets-live.txt")"

# ---------------------------------------------------------------------------------------------
# 6. meshlet, in the namespace: no upstreams (nothing pinned), only the outbound listener.
cat >"$WORK/meshlet.yaml" <<EOF
admin: {listen: 127.0.0.1:$ADMIN_PORT}
outbound: {listen: 127.0.0.1:$OUT_PORT}
discovery:
  kubernetes: {kubeconfig: $DIR/kubeconfig}
  evict_after: ${EVICT_AFTER}s
workers: 1
log: {level: warn}
EOF
api_metrics >"$WORK/apiserver-metrics-before.txt" || die "cannot read the API server's /metrics"
log "starting meshlet in $NS_NET (workers: 1, outbound 127.0.0.1:$OUT_PORT, evict_after ${EVICT_AFTER}s)"
kb_start_meshlet "$WORK/meshlet.yaml" "$ADMIN_PORT" "${NSX[@]}"
log "meshlet ready in $READY_S s"

destinations() { # the meshlet_destinations gauge, now ("?" when /metrics does not answer)
    "${NSX[@]}" curl -fsS --max-time 10 "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null |
        awk '$1 == "meshlet_destinations" { print $2; f = 1 } END { if (!f) print "?" }'
}
# A reading named LABEL: meshlet's /proc figures (WORK/stage-LABEL.txt), its /metrics, the API
# server's /metrics and meshlet's connections to the API server.
STAGES=()
reading() {
    local label=$1 t
    t=$(calc "f'{$(now) - $T0:.1f}'")
    "${NSX[@]}" curl -fsS --max-time 10 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$WORK/meshlet-metrics-$label.txt" ||
        log "cannot read meshlet's /metrics ($label)"
    api_metrics >"$WORK/apiserver-metrics-$label.txt" || log "cannot read the API server's /metrics ($label)"
    {
        echo "t=$t"
        echo "rss=$(status_kb "$MESH_PID" VmRSS)"
        echo "hwm=$(status_kb "$MESH_PID" VmHWM)"
        echo "threads=$(status_kb "$MESH_PID" Threads)"
        echo "fds=$(find "/proc/$MESH_PID/fd" -mindepth 1 -maxdepth 1 | wc -l)"
        echo "api_conns=$(kb_api_conns "$label" "${NSX[@]}")"
        echo "load=$(loadavg)"
    } >"$WORK/stage-$label.txt"
    STAGES+=("$label")
    log "reading '$label' at $t s: destinations $(awk '$1 == "meshlet_destinations" { print $2 }' "$WORK/meshlet-metrics-$label.txt"), RSS $(mib "$(status_kb "$MESH_PID" VmRSS)") MiB, API connections $(sed -n 's/^api_conns=//p' "$WORK/stage-$label.txt")"
}
# One line of WORK/samples.txt: seconds since ready, VmRSS kB, meshlet's connections to the API
# server, and with an argument the gauge ("-" without: reading the gauge means fetching all of
# /metrics, megabytes at the peak, so it is read every SAMPLE_SECONDS only).
sample() {
    echo "$(calc "f'{$(now) - $T0:.1f}'") $(status_kb "$MESH_PID" VmRSS) $(kb_api_conns sample "${NSX[@]}") $([ $# -gt 0 ] && destinations || echo -)" >>"$WORK/samples.txt"
}
echo "t rss_kb api_conns destinations" >"$WORK/samples.txt"
T0=$(now)
pause "$SETTLE_SECONDS"
reading ready

# ---------------------------------------------------------------------------------------------
# 7. The live services, in use for the whole run (a new connection per request)
log "live client: $LIVE services, one request each every $LIVE_INTERVAL s"
"${NSX[@]}" python3 "$HERE/eviction-client.py" live "$WORK/targets-live.txt" "$WORK/live.json" \
    --interval "$LIVE_INTERVAL" --timeout 5 --max-seconds 3600 >"$WORK/live.log" 2>&1 &
LIVE_PID=$!
PIDS+=("$LIVE_PID")
pause "$SETTLE_SECONDS"
reading start

# ---------------------------------------------------------------------------------------------
# 8. Touch every service once; meshlet's RSS and the gauge sampled every second meanwhile
log "touching $N_TARGETS services once ($CONCURRENCY at a time, deadline $TOUCH_DEADLINE s; load average $(loadavg))"
"${NSX[@]}" timeout --kill-after=10 $((TOUCH_DEADLINE + 60)) python3 "$HERE/eviction-client.py" touch \
    "$WORK/targets-all.txt" "$WORK/touch.json" --concurrency "$CONCURRENCY" --timeout 10 \
    --deadline "$TOUCH_DEADLINE" >"$WORK/touch.log" 2>&1 &
TOUCH_PID=$!
PIDS+=("$TOUCH_PID")
T_TOUCH0=$(now)
while kill -0 "$TOUCH_PID" 2>/dev/null; do
    sample
    sleep 1
done
wait "$TOUCH_PID" || log "the touch client exited $?: $(tail -n 3 "$WORK/touch.log")"
T_TOUCH1=$(now)
TOUCH_S=$(calc "f'{$T_TOUCH1 - $T_TOUCH0:.1f}'")
log "touched in $TOUCH_S s: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["outcomes"])' "$WORK/touch.json" 2>/dev/null || echo '?')"
reading peak

# ---------------------------------------------------------------------------------------------
# 9. Eviction: due evict_after after a destination's last use, done by the next pass of the
# loop. The gauge is polled every SAMPLE_SECONDS until it is back to the live services, or
# until EVICT_DEADLINE s after the touch ended.
log "waiting for eviction (evict_after ${EVICT_AFTER}s, loop every ${EVICT_PERIOD}s; deadline $EVICT_DEADLINE s)"
EVICTED_S=""
while :; do
    sample gauge
    d=$(tail -n 1 "$WORK/samples.txt" | cut -d' ' -f4)
    if [[ $d =~ ^[0-9]+$ ]] && ((d <= LIVE)); then
        EVICTED_S=$(calc "f'{$(now) - $T_TOUCH1:.1f}'")
        break
    fi
    [ "$(calc "int($(now) - $T_TOUCH1 >= $EVICT_DEADLINE)")" = 1 ] && break
    sleep "$SAMPLE_SECONDS"
done
if [ -n "$EVICTED_S" ]; then
    log "destinations back to $d, $EVICTED_S s after the touch ended"
else
    log "destinations still $d after $EVICT_DEADLINE s: not evicted (reported as is)"
fi
pause 2 # the watches end when their connections close; let the API server count them out
reading evicted
log "a last reading in $AFTER_SECONDS s"
for _ in $(seq 1 "$AFTER_SECONDS"); do
    sample
    sleep 1
done
reading after

# ---------------------------------------------------------------------------------------------
# 10. The live client's totals (it writes them on TERM), the report
stop_pid "$LIVE_PID"
{
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine=nproc $(nproc), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
    for v in SERVICES ENDPOINTS NAMESPACES LIVE BATCH PARALLEL EVICT_AFTER EVICT_PERIOD EVICT_DEADLINE \
        CONCURRENCY LIVE_INTERVAL SETTLE_SECONDS AFTER_SECONDS SAMPLE_SECONDS CREATE_S N_SVC N_SLICES N_TARGETS READY_S \
        TOUCH_S EVICTED_S LOAD_START K8S_VERSION GIT_REV BUILD_NOTE; do
        echo "${v,,}=${!v}"
    done
    echo "load_end=$(loadavg)"
    echo "mesh_log_lines=$(wc -l <"$WORK/meshlet.log")"
    echo "stages=${STAGES[*]}"
    echo "nofile=$(ulimit -n)"
    echo "forwarders=$FORWARDERS"
    echo "forward_errors=$(cat "$WORK"/forward-*.log | grep -c 'Error\|error' || true)"
} >"$WORK/figures.txt"
python3 "$HERE/eviction-report.py" "$WORK" >"$WORK/report.md"
log "done (load average $(loadavg))"
cat "$WORK/report.md"
