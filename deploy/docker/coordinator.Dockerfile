# syntax=docker/dockerfile:1
#
# Coordinator image: `farm-coordinator` (serve / migrate / token) plus the `farm` CLI for operators.
# The coordinator does not link libtorch, and `cargo build -p farm-coordinator -p farm` does not
# compile the worker crate, so the builder is a plain Rust image: protoc comes from the vendored
# `protoc-bin-vendored` crate, no torch wheel is needed.
#
# Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t newbie-farm/coordinator:0.1.0 .

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binaries are copied out of
# the cached target directory so that the next stage can pick them up.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p farm-coordinator -p farm \
 && install -D -m 0755 target/release/farm-coordinator /out/farm-coordinator \
 && install -D -m 0755 target/release/farm /out/farm

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 farm \
 && useradd --system --uid 10001 --gid farm --home-dir /var/lib/farm --create-home farm \
 && install -d -o farm -g farm /var/lib/farm/results
COPY --from=builder /out/farm-coordinator /out/farm /usr/local/bin/
USER farm:farm
WORKDIR /var/lib/farm
# Listen on all interfaces inside the container; the defaults of the binary are loopback only.
ENV FARM_LISTEN=0.0.0.0:50051 \
    FARM_METRICS_LISTEN=0.0.0.0:9090 \
    FARM_RESULTS=/var/lib/farm/results \
    RUST_LOG=info
EXPOSE 50051 9090
# SIGTERM stops the gRPC server gracefully; tini forwards it and reaps children.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/farm-coordinator"]
CMD ["serve"]
