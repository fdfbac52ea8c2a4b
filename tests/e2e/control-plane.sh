#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, without Docker or a kubelet:
# etcd + kube-apiserver + kube-controller-manager, from tests/e2e/build-k8s.sh.
#
#   tests/e2e/control-plane.sh start DIR   # starts it; writes DIR/kubeconfig, DIR/env, DIR/pids, DIR/logs/
#   tests/e2e/control-plane.sh stop DIR    # stops exactly the processes recorded in DIR/pids
#   tests/e2e/control-plane.sh status DIR  # shows the recorded processes and /readyz
#
# Binaries: $MESHLET_K8S_BIN, or the cache directory that build-k8s.sh fills
# (${MESHLET_K8S_CACHE:-$HOME/.cache/meshlet-k8s}/<k8s-version>/bin). Run build-k8s.sh first.
#
# Ports: random free ports on 127.0.0.1, below the ephemeral range, unless set:
#   MESHLET_ETCD_PORT, MESHLET_ETCD_PEER_PORT, MESHLET_APISERVER_PORT, MESHLET_KCM_PORT
# MESHLET_CP_TIMEOUT: seconds to wait for each component to become healthy (default 120).
#
# Only loopback addresses are used. Service ClusterIPs come from 198.19.0.0/16
# (never routed: there is no kube-proxy); pod IPs are whatever the tests write
# into pod status (use 198.18.0.0/16: EndpointSlice validation rejects loopback).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVICE_CIDR=198.19.0.0/16
SERVICE_IP_FIRST=198.19.0.1 # the "kubernetes" Service's ClusterIP
TIMEOUT=${MESHLET_CP_TIMEOUT:-120}
CONTROLLERS=endpointslice-controller,serviceaccount-controller,namespace-controller,garbage-collector-controller,deployment-controller,replicaset-controller

log() { printf '[control-plane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

find_bin() {
    if [[ -n ${MESHLET_K8S_BIN:-} ]]; then
        BIN=$MESHLET_K8S_BIN
    else
        local v
        v=${MESHLET_K8S_VERSION:-$(sed -n 's/^K8S_VERSION=\${MESHLET_K8S_VERSION:-\(.*\)}$/\1/p' "$HERE/build-k8s.sh")}
        BIN=${MESHLET_K8S_CACHE:-$HOME/.cache/meshlet-k8s}/$v/bin
    fi
    local b
    for b in etcd kube-apiserver kube-controller-manager kubectl; do
        [[ -x $BIN/$b ]] || die "$BIN/$b is missing: run tests/e2e/build-k8s.sh first (or set MESHLET_K8S_BIN)"
    done
}

port_in_use() { # PORT: true when something listens on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
declare -A TAKEN=()
# Picked below the kernel's ephemeral range when it leaves room: a port in that range can be
# given to some outgoing connection between the check here and the server's bind (a CI run
# failed so: etcd "bind: address already in use" on a port found free a second earlier).
EPHEMERAL_LO=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 0)
if [[ $EPHEMERAL_LO =~ ^[0-9]+$ ]] && ((EPHEMERAL_LO >= 15000)); then
    PORT_BASE=10000 PORT_SPAN=$((EPHEMERAL_LO - 10000))
else
    PORT_BASE=20000 PORT_SPAN=40000
fi
free_port() { # a random free port, distinct from the ones already picked
    local p i
    for i in $(seq 1 200); do
        p=$((PORT_BASE + (RANDOM * 32768 + RANDOM) % PORT_SPAN))
        [[ -z ${TAKEN[$p]:-} ]] || continue
        # Neither a listener nor any other socket (connected, TIME-WAIT) on it.
        if ! port_in_use "$p" && ! ss -Htan "sport = :$p" 2>/dev/null | grep -q .; then
            TAKEN[$p]=1
            echo "$p"
            return
        fi
    done
    die "no free port found"
}

# ------------------------------------------------------------------ certificates
gen_certs() { # DIR/pki
    local pki=$1
    mkdir -p "$pki"
    (
        cd "$pki"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
            -keyout ca.key -out ca.crt -subj "/CN=meshlet-e2e-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null

        # sign NAME SUBJECT EXTFILE-CONTENT
        sign() {
            openssl req -new -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
            printf '%s\n' "$3" >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
                -days 3650 -sha256 -out "$1.crt" -extfile "$1.ext" 2>/dev/null
            rm -f "$1.csr" "$1.ext"
        }
        sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$SERVICE_IP_FIRST,IP:198.18.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        # Admin client (kubectl, tests): group system:masters bypasses RBAC.
        sign admin "/O=system:masters/CN=meshlet-e2e-admin" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
        # kube-controller-manager runs all controllers under its own identity
        # (--use-service-account-credentials=false), so it needs more than the
        # system:kube-controller-manager role grants: give it system:masters too.
        sign kcm "/O=system:masters/CN=system:kube-controller-manager" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
        # Service-account token signing key pair.
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
        openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
        rm -f ca.srl
        chmod 644 ./*.crt sa.pub
    )
}

write_kubeconfig() { # FILE SERVER CERTNAME USER
    local f=$1 server=$2 pki=$3/pki name=$4
    umask 077
    cat >"$f" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: meshlet-e2e
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$pki/$name.crt")
    client-key-data: $(base64 -w0 "$pki/$name.key")
contexts:
- name: meshlet-e2e
  context:
    cluster: meshlet-e2e
    user: $name
current-context: meshlet-e2e
EOF
}

# ------------------------------------------------------------------ processes
# spawn NAME ARGS...: start a binary in the background, log to DIR/logs/NAME.log,
# record "NAME PID" in DIR/pids.
spawn() {
    local name=$1
    shift
    "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 &
    local pid=$!
    echo "$name $pid" >>"$DIR/pids"
    log "started $name (pid $pid)"
}

# running PID: alive and not a zombie
running() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z ]]
}

# ours PID: the process is alive and is one we started for DIR (its command line names DIR)
ours() {
    running "$1" && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$DIR/"
}

wait_healthy() { # NAME PID CURL-ARGS...
    local name=$1 pid=$2
    shift 2
    local deadline=$((SECONDS + TIMEOUT)) out=""
    while ((SECONDS < deadline)); do
        if ! running "$pid"; then
            log "$name (pid $pid) exited; last log lines:"
            tail -n 30 "$DIR/logs/$name.log" >&2
            return 1
        fi
        if out=$(curl -fsS --max-time 5 "$@" 2>&1); then
            log "$name healthy: $(printf '%s' "$out" | tail -n1)"
            return 0
        fi
        sleep 0.5
    done
    log "$name not healthy after ${TIMEOUT}s: $out; last log lines:"
    tail -n 30 "$DIR/logs/$name.log" >&2
    return 1
}

cmd_start() {
    find_bin
    if [[ -s $DIR/pids ]]; then
        local name pid
        while read -r name pid; do
            ours "$pid" && die "$DIR already runs $name (pid $pid): stop it first"
        done <"$DIR/pids"
    fi
    mkdir -p "$DIR/logs"
    rm -rf "$DIR/etcd-data" "$DIR/pki" "$DIR/kcm-certs"
    : >"$DIR/pids"
    local etcd_port=${MESHLET_ETCD_PORT:-$(free_port)}
    TAKEN[$etcd_port]=1
    local etcd_peer_port=${MESHLET_ETCD_PEER_PORT:-$(free_port)}
    TAKEN[$etcd_peer_port]=1
    local api_port=${MESHLET_APISERVER_PORT:-$(free_port)}
    TAKEN[$api_port]=1
    local kcm_port=${MESHLET_KCM_PORT:-$(free_port)}
    local etcd_url=http://127.0.0.1:$etcd_port api_url=https://127.0.0.1:$api_port
    local t0=$SECONDS

    log "generating certificates in $DIR/pki"
    gen_certs "$DIR/pki"
    write_kubeconfig "$DIR/kubeconfig" "$api_url" "$DIR" admin
    write_kubeconfig "$DIR/kcm.kubeconfig" "$api_url" "$DIR" kcm

    spawn etcd "$BIN/etcd" \
        --name=meshlet-e2e \
        --data-dir="$DIR/etcd-data" \
        --listen-client-urls="$etcd_url" \
        --advertise-client-urls="$etcd_url" \
        --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
        --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
        --initial-cluster="meshlet-e2e=http://127.0.0.1:$etcd_peer_port" \
        --initial-cluster-state=new \
        --unsafe-no-fsync=true \
        --log-level=warn
    wait_healthy etcd "$(pid_of etcd)" "$etcd_url/health" || start_failed

    local api_args=(
        --etcd-servers="$etcd_url"
        --bind-address=127.0.0.1
        --advertise-address=127.0.0.1
        --secure-port="$api_port"
        --cert-dir="$DIR/pki"
        --tls-cert-file="$DIR/pki/apiserver.crt"
        --tls-private-key-file="$DIR/pki/apiserver.key"
        --client-ca-file="$DIR/pki/ca.crt"
        --service-account-issuer=https://kubernetes.default.svc.cluster.local
        --service-account-key-file="$DIR/pki/sa.pub"
        --service-account-signing-key-file="$DIR/pki/sa.key"
        --service-cluster-ip-range="$SERVICE_CIDR"
        --authorization-mode=RBAC
        --allow-privileged=true
        --endpoint-reconciler-type=none
        --enable-aggregator-routing=true
        --profiling=false
        --v=1
    )
    # Kept so that `start-apiserver` can bring the same API server back after `stop-apiserver`.
    printf '%s\n' "${api_args[@]}" >"$DIR/apiserver.args"
    spawn kube-apiserver "$BIN/kube-apiserver" "${api_args[@]}"
    wait_healthy kube-apiserver "$(pid_of kube-apiserver)" \
        --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" \
        "$api_url/readyz" || start_failed

    spawn kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig="$DIR/kcm.kubeconfig" \
        --authentication-kubeconfig="$DIR/kcm.kubeconfig" \
        --authorization-kubeconfig="$DIR/kcm.kubeconfig" \
        --authentication-skip-lookup=true \
        --client-ca-file="$DIR/pki/ca.crt" \
        --bind-address=127.0.0.1 \
        --secure-port="$kcm_port" \
        --cert-dir="$DIR/kcm-certs" \
        --leader-elect=false \
        --controllers="$CONTROLLERS" \
        --use-service-account-credentials=false \
        --service-account-private-key-file="$DIR/pki/sa.key" \
        --root-ca-file="$DIR/pki/ca.crt" \
        --profiling=false \
        --v=1
    # /healthz is in --authorization-always-allow-paths: anonymous access is fine.
    wait_healthy kube-controller-manager "$(pid_of kube-controller-manager)" \
        -k "https://127.0.0.1:$kcm_port/healthz" || start_failed

    cat >"$DIR/env" <<EOF
# source this file: the control plane in $DIR
export KUBECONFIG=$DIR/kubeconfig
export MESHLET_K8S_BIN=$BIN
export MESHLET_APISERVER_URL=$api_url
export MESHLET_ETCD_URL=$etcd_url
export MESHLET_KCM_HEALTHZ=https://127.0.0.1:$kcm_port/healthz
export MESHLET_SERVICE_CIDR=$SERVICE_CIDR
EOF
    log "control plane up in $((SECONDS - t0))s: apiserver $api_url, etcd $etcd_url"
    log "use: source $DIR/env && kubectl get --raw /readyz"
}

start_failed() {
    log "start failed: stopping what was started (logs stay in $DIR/logs)"
    cmd_stop || true
    exit 1
}

pid_of() { awk -v n="$1" '$1 == n { print $2 }' "$DIR/pids" | tail -n1; }

cmd_stop() {
    [[ -f $DIR/pids ]] || { log "no $DIR/pids: nothing to stop"; return 0; }
    local name pid alive=() line
    # Stop in reverse start order: controller-manager, apiserver, etcd.
    while read -r name pid; do
        [[ -n ${pid:-} ]] || continue
        if ours "$pid"; then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$name:$pid")
            # wait for this one before stopping the next
            local deadline=$((SECONDS + 20))
            while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
            if ours "$pid"; then
                log "$name (pid $pid) still running after 20s: SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                while running "$pid"; do sleep 0.1; done
            fi
        else
            log "$name (pid $pid) is not running"
        fi
    done < <(tac "$DIR/pids")
    for line in "${alive[@]}"; do
        # the child of this shell? reap it quietly (no-op otherwise)
        wait "${line#*:}" 2>/dev/null || true
    done
    mv -f "$DIR/pids" "$DIR/pids.stopped"
    log "stopped"
}

cmd_status() {
    [[ -f $DIR/pids ]] || { echo "not running (no $DIR/pids)"; return 1; }
    local name pid rc=0
    while read -r name pid; do
        if ours "$pid"; then echo "$name $pid running"; else echo "$name $pid gone"; rc=1; fi
    done <"$DIR/pids"
    if [[ -f $DIR/env ]]; then
        # shellcheck disable=SC1091
        (source "$DIR/env" && curl -fsS --max-time 5 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
            --key "$DIR/pki/admin.key" "$MESHLET_APISERVER_URL/readyz" && echo) || rc=1
    fi
    return $rc
}

# The API server alone, for tests of what happens while it is away: kill it (by its recorded
# PID; SIGKILL, as a crash or a lost node would, so its connections drop at once rather than
# through a graceful shutdown that can take 20 s) and start it again with the same arguments,
# data and certificates.
cmd_stop_apiserver() {
    local pid
    pid=$(pid_of kube-apiserver)
    [[ -n $pid ]] && ours "$pid" || die "no running kube-apiserver recorded in $DIR/pids"
    log "killing kube-apiserver (pid $pid)"
    kill -KILL "$pid"
    while running "$pid"; do sleep 0.1; done
}

cmd_start_apiserver() {
    find_bin
    [[ -f $DIR/apiserver.args && -f $DIR/env ]] || die "$DIR was not started by this script"
    local pid
    pid=$(pid_of kube-apiserver)
    if [[ -n $pid ]] && ours "$pid"; then die "kube-apiserver (pid $pid) is running already"; fi
    local api_args
    mapfile -t api_args <"$DIR/apiserver.args"
    spawn kube-apiserver "$BIN/kube-apiserver" "${api_args[@]}"
    # shellcheck disable=SC1091
    source "$DIR/env"
    wait_healthy kube-apiserver "$(pid_of kube-apiserver)" \
        --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" \
        "$MESHLET_APISERVER_URL/readyz"
}

usage() { echo "usage: $0 start|stop|status|stop-apiserver|start-apiserver DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
case $1 in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    stop-apiserver) cmd_stop_apiserver ;;
    start-apiserver) cmd_start_apiserver ;;
    *) usage ;;
esac
