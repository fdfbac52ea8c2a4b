#!/usr/bin/env bash
# Runs the chart's end-to-end suite (tests/helm_e2e.rs) against a kind cluster: a real kubelet,
# CoreDNS, kube-proxy and real container images, instead of the local target's control plane on
# loopback and stand-in kubelet.
#
#   bash tests/e2e/kind.sh [LIBTEST ARGS...]
#   bash tests/e2e/kind.sh --exact helm_install_meshes_two_services     (one test)
#
# Steps: check the prerequisites; build the test binary; build the images meshlet:TAG,
# meshlet-init:TAG and meshlet-e2e-app:TAG from ./Dockerfile; create the cluster (or reuse one);
# `kind load docker-image` the three images; run
#   MESHLET_E2E_TARGET=kind MESHLET_E2E_IMAGE_TAG=TAG KUBECONFIG=... cargo test --test helm_e2e -- --nocapture ARGS
# (the test installs, upgrades and uninstalls the chart itself; this script never does); on a
# failure print diagnostics; delete the cluster on exit. The exit status is the test's.
#
# Prerequisites (checked up front; a missing one exits 2 naming it):
#   docker    with a reachable engine (`docker info` must work), BuildKit (Docker >= 23)
#   kind      >= v0.20; the default node image is the one published with kind v0.31.0
#   kubectl   any version within one minor of the cluster's
#   helm      v3 (the suite is written against helm 3)
#   cargo     the Rust toolchain (https://rustup.rs), to build and run the test
#   go        only to fetch cert-manager's CRDs from the Go module proxy (one test validates the
#             chart's cert-manager objects against them)
#   git       only to derive the default image tag
#
# Environment:
#   KIND_CLUSTER            cluster name (default meshlet-e2e)
#   KIND_NODE_IMAGE         node image (default below: Kubernetes 1.35.0, pinned by digest)
#   MESHLET_E2E_IMAGE_TAG   tag of the three images (default e2e-<git short sha>, plus -dirty when
#                           the work tree has changes; never `latest`, which would make the
#                           kubelet pull from a registry instead of using the loaded image)
#   KEEP_CLUSTER=1          do not delete the cluster at the end (to poke at it afterwards)
#   REUSE_CLUSTER=1         use an existing cluster of that name instead of failing; a cluster
#                           this script did not create is never deleted
#   KIND_DIAG_DIR           where failure diagnostics are written (kept); default: a temporary
#                           directory, removed at exit after its essentials are printed
#   MESHLET_K8S_BIN         if set, helm and kubectl are taken from this directory (the test
#                           does the same); otherwise from PATH
#
# Exit status: the test's; 2 when a prerequisite is missing; otherwise, if a setup step fails
# (image build, cluster creation, image load), that step's.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/../.." && pwd)
cd "$repo_root"

# kind v0.31.0's default node image (its `kind version` names it). Node images are only
# guaranteed to work with the kind release that published them, and only at the digest the
# release notes list (https://github.com/kubernetes-sigs/kind/releases): when bumping kind, take
# the image from its release notes, digest included. 1.35 is the minor of the local target
# (v1.35.4); native sidecars need >= 1.29.
readonly default_node_image="kindest/node:v1.35.0@sha256:452d707d4862f52530247495d180205e029056831160e22870e37e3f6c1ac31f"
# kind v0.30.0's Kubernetes 1.34.0 image: for hosts still on cgroup v1, where the 1.35 kubelet
# refuses to start (KEP-5573, failCgroupV1 defaults to true from 1.35).
readonly cgroup_v1_node_image="kindest/node:v1.34.0@sha256:7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a"

KIND_CLUSTER=${KIND_CLUSTER:-meshlet-e2e}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
REUSE_CLUSTER=${REUSE_CLUSTER:-0}
KIND_DIAG_DIR=${KIND_DIAG_DIR:-}

readonly system_ns=meshlet-system
readonly apps_ns=meshlet-apps

log() { printf 'kind.sh: %s\n' "$*" >&2; }
die() {
  log "$1"
  exit "${2:-1}"
}

# In GitHub Actions, fold long output into collapsible groups.
group() {
  if [[ ${GITHUB_ACTIONS:-} == true ]]; then echo "::group::$*"; else echo "=== $*"; fi
}
endgroup() {
  if [[ ${GITHUB_ACTIONS:-} == true ]]; then echo "::endgroup::"; fi
}

# ---------------------------------------------------------------------------------------------
# Prerequisites: report every missing one, then exit 2.

if [[ -n ${MESHLET_K8S_BIN:-} ]]; then
  helm_bin=$MESHLET_K8S_BIN/helm
  kubectl_bin=$MESHLET_K8S_BIN/kubectl
else
  helm_bin=helm
  kubectl_bin=kubectl
fi

missing=0
if ! command -v docker >/dev/null 2>&1; then
  log "docker not found; install Docker Engine (https://docs.docker.com/engine/install/) or Docker Desktop; this suite needs Docker"
  missing=1
elif ! docker info >/dev/null 2>&1; then
  log "no Docker engine reachable (docker info failed); this suite needs Docker"
  missing=1
fi
if ! command -v kind >/dev/null 2>&1; then
  log "kind not found; install it: go install sigs.k8s.io/kind@v0.31.0 (or see https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
  missing=1
fi
if ! command -v "$kubectl_bin" >/dev/null 2>&1; then
  log "kubectl not found ($kubectl_bin); install it: https://kubernetes.io/docs/tasks/tools/"
  missing=1
fi
if ! command -v "$helm_bin" >/dev/null 2>&1; then
  log "helm not found ($helm_bin); install helm 3: https://helm.sh/docs/intro/install/ (e.g. go install helm.sh/helm/v3/cmd/helm@v3.22.0)"
  missing=1
fi
if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found; install the Rust toolchain: https://rustup.rs"
  missing=1
fi
if ! command -v go >/dev/null 2>&1; then
  log "go not found; install Go (https://go.dev/dl/): the suite fetches cert-manager's CRDs through the Go module proxy"
  missing=1
fi
if [[ ! -f Dockerfile ]]; then
  log "no Dockerfile at the repository root ($repo_root)"
  missing=1
fi
if [[ -z ${MESHLET_E2E_IMAGE_TAG:-} ]] && ! git rev-parse --verify -q HEAD >/dev/null 2>&1; then
  log "cannot derive the image tag (no git, not a git checkout, or git refuses it: see safe.directory); set MESHLET_E2E_IMAGE_TAG"
  missing=1
fi
if ((missing)); then
  exit 2
fi

# Versions: kind >= 0.20 (hard), helm 3 (warning), node image vs. kind release (warning).
kind_version=$(kind version 2>/dev/null | awk '{print $2}')
if [[ $kind_version =~ ^v([0-9]+)\.([0-9]+)\. ]]; then
  if ((BASH_REMATCH[1] == 0 && BASH_REMATCH[2] < 20)); then
    die "kind $kind_version is too old; kind >= v0.20 is needed (go install sigs.k8s.io/kind@v0.31.0)" 2
  fi
else
  log "warning: cannot read kind's version ('$(kind version 2>&1 | head -n 1)'); continuing"
fi
helm_version=$("$helm_bin" version --template '{{.Version}}' 2>/dev/null || true)
if [[ $helm_version != v3.* ]]; then
  log "warning: helm ${helm_version:-of unknown version}: the suite is written against helm 3"
fi

# The node image: the default unless KIND_NODE_IMAGE says otherwise; on a cgroup v1 host the
# default (Kubernetes 1.35) cannot start, so say so before creating anything.
if [[ -z $KIND_NODE_IMAGE ]]; then
  cgroup_version=$(docker info --format '{{.CgroupVersion}}' 2>/dev/null || true)
  if [[ $cgroup_version == 1 ]]; then
    die "this Docker host uses cgroup v1, on which the default node image (Kubernetes 1.35) does not start; run with KIND_NODE_IMAGE=$cgroup_v1_node_image (Kubernetes 1.34, kind v0.30.0's image)" 2
  fi
  KIND_NODE_IMAGE=$default_node_image
  if [[ -n $kind_version && $kind_version != v0.31.* ]]; then
    log "warning: kind $kind_version with the node image of kind v0.31.0; if cluster creation or 'kind load' fails, use kind v0.31.0 or set KIND_NODE_IMAGE from your kind release's notes"
  fi
fi

# The image tag.
if [[ -z ${MESHLET_E2E_IMAGE_TAG:-} ]]; then
  MESHLET_E2E_IMAGE_TAG="e2e-$(git rev-parse --short HEAD)"
  if [[ -n $(git status --porcelain --untracked-files=normal 2>/dev/null) ]]; then
    MESHLET_E2E_IMAGE_TAG+="-dirty"
  fi
fi
tag=$MESHLET_E2E_IMAGE_TAG
if [[ $tag == latest ]]; then
  die "MESHLET_E2E_IMAGE_TAG=latest: pick another tag; with :latest the kubelet defaults to imagePullPolicy Always and pulls from a registry instead of using the image loaded into kind" 2
fi
if [[ ! $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
  die "MESHLET_E2E_IMAGE_TAG='$tag' is not a valid image tag" 2
fi
readonly images=("meshlet:$tag" "meshlet-init:$tag" "meshlet-e2e-app:$tag")

cluster_exists() { kind get clusters 2>/dev/null | grep -qxF "$KIND_CLUSTER"; }
if [[ $REUSE_CLUSTER != 1 ]] && cluster_exists; then
  die "a kind cluster named '$KIND_CLUSTER' already exists; set REUSE_CLUSTER=1 to use it, KIND_CLUSTER=<name> for another, or delete it: kind delete cluster --name $KIND_CLUSTER" 2
fi

# ---------------------------------------------------------------------------------------------
# Cleanup on exit: stop the recorder, delete the cluster if this script created it (unless
# KEEP_CLUSTER=1), remove the temporary directory. The exit status is kept.

work=$(mktemp -d "${TMPDIR:-/tmp}/meshlet-kind.XXXXXX")
kubeconfig=$work/kubeconfig
diag=${KIND_DIAG_DIR:-$work/diag}
created_cluster=0
recorder_pids=()

stop_recorder() {
  local pid
  for pid in "${recorder_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  recorder_pids=()
}

# shellcheck disable=SC2329 # invoked by the EXIT trap below
cleanup() {
  local rc=$?
  set +e
  stop_recorder
  if ((created_cluster)); then
    if [[ $KEEP_CLUSTER == 1 ]]; then
      log "KEEP_CLUSTER=1: cluster '$KIND_CLUSTER' kept; kubeconfig: kind get kubeconfig --name $KIND_CLUSTER > FILE; delete it with: kind delete cluster --name $KIND_CLUSTER"
    else
      log "deleting cluster '$KIND_CLUSTER'"
      kind delete cluster --name "$KIND_CLUSTER" --kubeconfig "$kubeconfig" >&2
    fi
  elif cluster_exists; then
    log "cluster '$KIND_CLUSTER' was not created by this run; left as it is"
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Build: the test binary first (a compile error should not wait for a cluster), then the images.

log "image tag: $tag; cluster: $KIND_CLUSTER; node image: $KIND_NODE_IMAGE"
group "cargo test --test helm_e2e --no-run"
cargo test --test helm_e2e --no-run
endgroup

# BuildKit, and no provenance attestation: with Docker's containerd image store (the default of
# fresh Docker 29 installs) an attestation manifest makes `kind load docker-image` fail with
# "ctr: content digest ...: not found" (kubernetes-sigs/kind#3795).
export DOCKER_BUILDKIT=1
export BUILDX_NO_DEFAULT_ATTESTATIONS=1
group "docker build (tag $tag)"
docker build -t "meshlet:$tag" .
docker build --target meshlet-init -t "meshlet-init:$tag" .
docker build --target e2e-app -t "meshlet-e2e-app:$tag" .
endgroup

# ---------------------------------------------------------------------------------------------
# The cluster. kind writes its kubeconfig to our temporary file, never to ~/.kube/config.

if cluster_exists; then
  log "REUSE_CLUSTER=1: using the existing cluster '$KIND_CLUSTER' (its node image is whatever it was created with)"
else
  group "kind create cluster --name $KIND_CLUSTER"
  created_cluster=1
  kind create cluster --name "$KIND_CLUSTER" --image "$KIND_NODE_IMAGE" \
    --kubeconfig "$kubeconfig" --wait 180s
  endgroup
fi
kind get kubeconfig --name "$KIND_CLUSTER" >"$kubeconfig"
export KUBECONFIG=$kubeconfig

server_minor=$("$kubectl_bin" get --raw /version | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p')
if [[ -z $server_minor ]] || ((server_minor < 29)); then
  die "the cluster runs Kubernetes 1.${server_minor:-?}; the chart's native sidecars need >= 1.29" 2
fi
# The apps reach each other by Service name: wait for cluster DNS too, not just the node.
"$kubectl_bin" -n kube-system rollout status deployment/coredns --timeout=180s

group "kind load docker-image"
for image in "${images[@]}"; do
  if ! kind load docker-image --name "$KIND_CLUSTER" "$image"; then
    # Fallback for the containerd image store (see above): save one platform, load the archive.
    log "kind load docker-image $image failed; retrying through a single-platform archive"
    arch=$(docker version --format '{{.Server.Arch}}')
    docker image save --platform "linux/$arch" -o "$work/image.tar" "$image"
    kind load image-archive --name "$KIND_CLUSTER" "$work/image.tar"
    rm -f "$work/image.tar"
  fi
done
endgroup

# ---------------------------------------------------------------------------------------------
# Diagnostics. The suite deletes its namespaces when it ends, pass or fail, so what is left
# afterwards says little: a recorder keeps the events and the latest logs and descriptions of
# the suite's pods while it runs, and the dump prints those as well as what is still there.

mkdir -p "$diag/logs" "$diag/describe"

record() {
  set +e
  local ns pod ready base
  while :; do
    "$kubectl_bin" get pods -A -o wide >"$diag/pods.txt.new" 2>&1 &&
      mv "$diag/pods.txt.new" "$diag/pods.txt"
    for ns in "$system_ns" "$apps_ns"; do
      mkdir -p "$diag/logs/$ns" "$diag/describe/$ns"
      while read -r pod ready; do
        [[ -n $pod ]] || continue
        base=$diag/logs/$ns/$pod.log
        # Keep the last good copy: a call on a pod that is already gone fails.
        "$kubectl_bin" logs -n "$ns" "$pod" --all-containers --prefix --timestamps >"$base.new" 2>/dev/null &&
          mv "$base.new" "$base"
        rm -f "$base.new"
        base=$diag/describe/$ns/$pod.txt
        if [[ $ready == True ]]; then
          rm -f "$base"
        else
          "$kubectl_bin" describe pod -n "$ns" "$pod" >"$base.new" 2>/dev/null &&
            mv "$base.new" "$base"
          rm -f "$base.new"
        fi
      done < <("$kubectl_bin" get pods -n "$ns" \
        -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null)
    done
    sleep 5
  done
}

dump_diagnostics() {
  set +e
  local ns pod ready file name
  group "diagnostics: kubectl get pods -A -o wide (now)"
  "$kubectl_bin" get pods -A -o wide
  "$kubectl_bin" get namespaces
  endgroup
  for ns in "$system_ns" "$apps_ns"; do
    group "diagnostics: describe of the non-Ready pods in $ns (now)"
    while read -r pod ready; do
      [[ -n $pod && $ready != True ]] && "$kubectl_bin" describe pod -n "$ns" "$pod"
    done < <("$kubectl_bin" get pods -n "$ns" \
      -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null)
    endgroup
  done
  group "diagnostics: injector logs (now)"
  "$kubectl_bin" logs -n "$system_ns" -l app.kubernetes.io/component=injector \
    --all-containers --prefix --tail=200
  endgroup
  pod=$("$kubectl_bin" get pods -n "$apps_ns" -o jsonpath='{.items[0].metadata.name}' 2>/dev/null)
  if [[ -n $pod ]]; then
    group "diagnostics: kubectl logs -n $apps_ns $pod -c meshlet-proxy (now)"
    "$kubectl_bin" logs -n "$apps_ns" "$pod" -c meshlet-proxy --tail=200
    endgroup
  fi

  group "diagnostics (recorded during the run): events in $system_ns and $apps_ns"
  grep -E "^($system_ns|$apps_ns) " "$diag/events.txt" 2>/dev/null | tail -n 200
  endgroup
  group "diagnostics (recorded): last kubectl get pods -A -o wide"
  cat "$diag/pods.txt" 2>/dev/null
  endgroup
  for file in "$diag"/describe/*/*.txt; do
    [[ -f $file ]] || continue
    group "diagnostics (recorded): describe of non-Ready pod ${file#"$diag"/describe/}"
    cat "$file"
    endgroup
  done
  for file in "$diag/logs/$system_ns"/*.log; do
    [[ -f $file ]] || continue
    group "diagnostics (recorded): injector pod ${file##*/}"
    tail -n 200 "$file"
    endgroup
  done
  # One meshlet-proxy container: prefer a pod that was not Ready at its last look.
  file=
  for name in "$diag/describe/$apps_ns"/*.txt; do
    name=${name##*/}
    name=${name%.txt}
    if [[ -f $diag/logs/$apps_ns/$name.log ]]; then
      file=$diag/logs/$apps_ns/$name.log
      break
    fi
  done
  if [[ -z $file ]]; then
    file=$(grep -l '/meshlet-proxy\]' "$diag/logs/$apps_ns"/*.log 2>/dev/null | head -n 1)
  fi
  if [[ -n $file ]]; then
    group "diagnostics (recorded): meshlet-proxy of ${file##*/}"
    grep -F '/meshlet-proxy]' "$file" | tail -n 200
    endgroup
  fi

  group "diagnostics: kind export logs"
  kind export logs "$diag/kind-logs" --name "$KIND_CLUSTER" >&2
  endgroup
  if [[ -n $KIND_DIAG_DIR ]]; then
    log "diagnostics kept in $KIND_DIAG_DIR (pod logs: logs/, descriptions: describe/, events.txt, kind-logs/)"
  fi
}

"$kubectl_bin" get events -A -o wide --watch >"$diag/events.txt" 2>&1 &
recorder_pids+=("$!")
record &
recorder_pids+=("$!")

# ---------------------------------------------------------------------------------------------
# The suite. Arguments are libtest's (a leading `--` is accepted and dropped).

if [[ ${1:-} == -- ]]; then
  shift
fi

# Not folded into a group: this is the output to read when it fails.
log "running: MESHLET_E2E_TARGET=kind MESHLET_E2E_IMAGE_TAG=$tag KUBECONFIG=$kubeconfig cargo test --test helm_e2e -- --nocapture $*"
set +e
MESHLET_E2E_TARGET=kind MESHLET_E2E_IMAGE_TAG=$tag KUBECONFIG=$kubeconfig \
  cargo test --test helm_e2e -- --nocapture "$@"
status=$?
set -e

stop_recorder
if ((status != 0)); then
  log "the suite failed (exit $status); diagnostics follow"
  dump_diagnostics
fi
exit "$status"
