# syntax=docker/dockerfile:1
#
# GPU worker image: `farm-worker` linked against libtorch from PyPI's torch==2.11.0 wheel (CUDA 13
# build). The builder installs the wheel into a venv and builds with LIBTORCH_USE_PYTORCH=1; the
# runtime keeps only torch's lib/ and the nvidia/* libraries of the wheel's dependencies, laid out as
# in site-packages so that libtorch's RPATH ($ORIGIN/../../nvidia/...) still resolves.
#
# The CUDA user-space libraries (cuBLAS, cuDNN, NCCL, ...) come from those pip packages, so the
# runtime base needs only the NVIDIA container conventions (driver injection by the NVIDIA container
# toolkit); the small `base` flavour of the CUDA 13 image is used. Switch RUNTIME_IMAGE to the
# `runtime` flavour if your site requires it — the worker does not use the image's copies.
#
# Build from the repository root (needs about 12 GB of free disk while building):
#   docker build -f deploy/docker/worker.Dockerfile -t newbie-farm/worker:0.1.0 .
#
# Stopping: SIGTERM makes the worker drain (it finishes the running batch, uploads it, hands queued
# tasks back and exits 0). Give it time: `docker stop -t 300`, `stop_grace_period: 300s` in compose,
# `terminationGracePeriodSeconds: 300` in Kubernetes.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG TORCH_VERSION=2.11.0

FROM ${RUST_IMAGE} AS builder
ARG TORCH_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-input --disable-pip-version-check --progress-bar off \
        "torch==${TORCH_VERSION}"
# tch's build script asks `python3` where torch lives: the venv must come first on PATH.
ENV PATH=/opt/venv/bin:${PATH} \
    LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p farm-worker \
 && install -D -m 0755 target/release/farm-worker /out/farm-worker
# Gather the shared libraries the worker loads, keeping the site-packages layout.
RUN site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && mkdir -p /out/torch/torch \
 && cp -a "${site}/torch/lib" /out/torch/torch/lib \
 && cp -a "${site}/nvidia" /out/torch/nvidia

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 farm \
 && useradd --system --uid 10001 --gid farm --home-dir /var/lib/farm --create-home farm
COPY --from=builder /out/torch /opt/torch
COPY --from=builder /out/farm-worker /usr/local/bin/farm-worker
# Golden tensors for the optional start-up self-check (`farm-worker verify --goldens /opt/farm/goldens`).
COPY worker/tests/fixtures/goldens /opt/farm/goldens
# libtorch_cuda.so is dlopen'ed at start: it must be findable through LD_LIBRARY_PATH.
ENV LD_LIBRARY_PATH=/opt/torch/torch/lib:/opt/torch/nvidia/cu13/lib:/opt/torch/nvidia/cudnn/lib:/opt/torch/nvidia/nccl/lib:/opt/torch/nvidia/cusparselt/lib:/opt/torch/nvidia/nvshmem/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FARM_MODEL_DIR=/models/newbie-exp0.1 \
    RUST_LOG=info
USER farm:farm
WORKDIR /var/lib/farm
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/farm-worker"]
CMD ["--device", "cuda:0", "--precision", "bf16"]
