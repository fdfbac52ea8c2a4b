# syntax=docker/dockerfile:1
#
# meshlet's container images, from one multi-stage build. Targets:
#
#   meshlet       (the last stage, so the default) the sidecar proxy and the injector: FROM
#                 scratch, one static musl binary at /usr/local/bin/meshlet, user 7102:7102,
#                 `meshlet proxy --sidecar` by default. No shell, no CA bundle: the proxy trusts
#                 the API server through the service account's ca.crt.
#   meshlet-init  the init container: the same binary on Alpine with iptables and ip6tables,
#                 `meshlet init` by default. Runs as root (it needs NET_ADMIN to write the pod's
#                 NAT rules) and exits before the app starts.
#   e2e-app       the test app of the Kubernetes end-to-end suite (examples/e2e-app.rs) only.
#
#   docker build -t meshlet:dev .
#   docker build --target meshlet-init -t meshlet-init:dev .
#   docker build --target e2e-app -t meshlet-e2e-app:dev .
#
# BuildKit is required (cache mounts). The build stage compiles for its own platform's musl
# target (x86_64 or aarch64), so `docker buildx build --platform linux/amd64,linux/arm64` builds
# both (arm64 under emulation where the builder is amd64). tests/image/check.sh proves the
# static binary and the scratch layout work without Docker; see tests/image/README.md.

FROM rust:1.95.0-alpine3.23 AS build
# gcc and musl-dev: `ring` compiles C and assembly; make: `tikv-jemalloc-sys` builds jemalloc
# (the binary's allocator) with its configure script and make. Alpine's package versions are
# replaced within a branch, so exact pins would break the build; the branch is pinned by the tag.
# hadolint ignore=DL3018
RUN apk add --no-cache gcc make musl-dev
WORKDIR /src
# Cargo.toml declares [[test]] targets, whose files cargo wants to see even to build one binary.
COPY Cargo.toml Cargo.lock ./
COPY src/ src/
COPY examples/ examples/
COPY tests/ tests/
ARG TARGETARCH
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,id=meshlet-target-${TARGETARCH},target=/src/target,sharing=locked \
    triple="$(rustc --print host-tuple)" \
    && case "$triple" in *-linux-musl) ;; *) echo "not a musl toolchain: $triple" >&2; exit 1 ;; esac \
    && cargo build --release --locked --target "$triple" --bin meshlet --example e2e-app \
    && mkdir -p /out \
    && cp "target/$triple/release/meshlet" "target/$triple/release/examples/e2e-app" /out/

FROM alpine:3.23 AS meshlet-init
# iptables-restore and ip6tables-restore, which `meshlet init` runs. Unpinned for the same
# reason as above: the alpine:3.23 tag pins the branch.
# hadolint ignore=DL3018
RUN apk add --no-cache iptables ip6tables
COPY --from=build /out/meshlet /usr/local/bin/meshlet
LABEL org.opencontainers.image.source="https://github.com/meshlet/meshlet" \
      org.opencontainers.image.title="meshlet-init" \
      org.opencontainers.image.description="meshlet's init container: writes the pod's iptables NAT rules" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/meshlet"]
CMD ["init"]

FROM scratch AS e2e-app
COPY --from=build /out/e2e-app /usr/local/bin/e2e-app
ENV PATH=/usr/local/bin
USER 7102:7102
ENTRYPOINT ["/usr/local/bin/e2e-app"]

FROM scratch AS meshlet
COPY --from=build /out/meshlet /usr/local/bin/meshlet
# The injected containers say `command: ["meshlet"]`, found through PATH.
ENV PATH=/usr/local/bin
LABEL org.opencontainers.image.source="https://github.com/meshlet/meshlet" \
      org.opencontainers.image.title="meshlet" \
      org.opencontainers.image.description="A small, fast Kubernetes sidecar: per-request p2c/peak-EWMA balancing, circuit breaking and honest health" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 7102:7102
ENTRYPOINT ["/usr/local/bin/meshlet"]
CMD ["proxy", "--sidecar"]
