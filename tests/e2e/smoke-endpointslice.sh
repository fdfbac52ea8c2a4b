#!/usr/bin/env bash
# Smoke test of a control plane started by control-plane.sh: the real EndpointSlice
# controller publishes a Ready pod (bound to a registered Node, status patched by us,
# since there is no kubelet) as a ready endpoint of its Service.
#
#   tests/e2e/smoke-endpointslice.sh DIR
#
# Then deletes the pod (endpoint turns ready=false, terminating=true) and force-deletes it.
# Objects: Node meshlet-e2e-node, Namespace meshlet-smoke (deleted at the end),
# Service echo (ClusterIP from 198.19.0.0/16), Pod echo-0 with podIP 198.18.0.10.
set -euo pipefail
DIR=$(cd "${1:?usage: $0 DIR}" && pwd)
# shellcheck disable=SC1091
source "$DIR/env"
kubectl() { "$MESHLET_K8S_BIN/kubectl" "$@"; }
NS=meshlet-smoke
NODE=meshlet-e2e-node
POD_IP=198.18.0.10
say() { printf '\n$ %s\n' "$*"; }
run() { say "kubectl $*"; kubectl "$@"; }

# retry N CMD...: the serviceaccount controller creates "default" in a new
# namespace asynchronously; pod creation fails until then.
retry() {
    local n=$1 i
    shift
    for ((i = 1; i <= n; i++)); do
        "$@" && return 0
        sleep 0.5
    done
    return 1
}

run version
run apply -f - <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels:
    kubernetes.io/hostname: $NODE
    topology.kubernetes.io/zone: zone-a
EOF
run create namespace "$NS"
run apply -n "$NS" -f - <<EOF
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector:
    app: echo
  ports:
  - name: http
    port: 80
    targetPort: http
EOF
run get svc -n "$NS" echo -o jsonpath='{.spec.clusterIP}{"\n"}'
CIP=$(kubectl get svc -n "$NS" echo -o jsonpath='{.spec.clusterIP}')
[[ $CIP == 198.19.* ]] || { echo "FAIL: ClusterIP $CIP not in 198.19.0.0/16"; exit 1; }

POD=$(
    cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: echo-0
  labels:
    app: echo
spec:
  nodeName: $NODE
  automountServiceAccountToken: false
  containers:
  - name: echo
    image: meshlet.invalid/echo:never-pulled
    ports:
    - name: http
      containerPort: 8080
EOF
)
say "kubectl create -n $NS -f - (Pod echo-0, spec.nodeName=$NODE)"
retry 60 kubectl create -n "$NS" -f - <<<"$POD"

STATUS=$(
    cat <<EOF
{"status":{"phase":"Running","hostIP":"198.18.255.1","hostIPs":[{"ip":"198.18.255.1"}],
 "podIP":"$POD_IP","podIPs":[{"ip":"$POD_IP"}],
 "conditions":[{"type":"PodScheduled","status":"True"},{"type":"Initialized","status":"True"},
   {"type":"ContainersReady","status":"True"},{"type":"Ready","status":"True"}]}}
EOF
)
run patch pod -n "$NS" echo-0 --subresource=status --type=merge -p "$STATUS"
run get pod -n "$NS" -o wide

say "waiting for the EndpointSlice controller"
want="$POD_IP true"
got=""
for _ in $(seq 1 60); do
    got=$(kubectl get endpointslices -n "$NS" -l kubernetes.io/service-name=echo \
        -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]} {.conditions.ready}{"\n"}{end}')
    [[ $got == "$want" ]] && break
    sleep 0.5
done
run get endpointslices -n "$NS" -l kubernetes.io/service-name=echo -o yaml
if [[ $got != "$want" ]]; then
    echo "FAIL: endpoints '$got', want '$want'"
    exit 1
fi
# No kubelet: a pod bound to a node only gets a deletionTimestamp on delete and
# stays Terminating (its endpoint turns ready=false, terminating=true) until
# someone deletes it with grace period 0, which would block namespace deletion.
got=""
run delete pod -n "$NS" echo-0 --wait=false
for _ in $(seq 1 60); do
    got=$(kubectl get endpointslices -n "$NS" -l kubernetes.io/service-name=echo \
        -o jsonpath='{range .items[*].endpoints[*]}{.conditions.ready} {.conditions.terminating}{"\n"}{end}')
    [[ $got == "false true" ]] && break
    sleep 0.5
done
run get endpointslices -n "$NS" -l kubernetes.io/service-name=echo \
    -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]} ready={.conditions.ready} serving={.conditions.serving} terminating={.conditions.terminating}{"\n"}{end}'
[[ $got == "false true" ]] || { echo "FAIL: terminating endpoint '$got', want 'false true'"; exit 1; }
run delete pod -n "$NS" echo-0 --grace-period=0 --force
run delete namespace "$NS" --wait=true --timeout=60s
echo
echo "smoke: 1 passed, 0 failed"
