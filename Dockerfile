# syntax=docker/dockerfile:1
# The serving image: onnxruntime + gRPC + the tokenizer. No torch, no compiler.
# How the model gets in, and every build argument: README, "Deployment".
#
#   make model                                                # models/default, the bundle baked in
#   docker build -t nmtserve:0.1.0 .                          # CPU image, models/default baked in
#   docker build -t nmtserve:0.1.0 --build-arg BUNDLE=deploy/empty-bundle .   # mount one instead
#   docker build -t nmtserve-model:0.1.0 --target model .     # the bundle alone (init container)
#   docker build -t nmtserve:0.1.0-cuda --target cuda .       # CUDA image, same bundle argument
#
# BASE_IMAGE: any Debian-like image with python3 (≥ 3.10) and its venv module (the official
# python:3.11-slim-bookworm by default; `make container-check` uses a locally built Debian base).
# CUDA_BASE_IMAGE: a CUDA + cuDNN 9 runtime image of the CUDA major version that onnxruntime-gpu
# ORT_VERSION is built for (1.31.1: CUDA 13, so GPU nodes need an NVIDIA driver >= 580); python3
# is installed into it when missing, and the build stops where its CUDA is another version.
# ORT_VERSION: onnxruntime's version in both images (onnxruntime on CPU, onnxruntime-gpu on
# CUDA), so both run the same graphs with the same runtime.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG ORT_VERSION=1.31.1
ARG BUNDLE=models/default

# ---------------------------------------------------------------- build: a venv with the service
FROM ${BASE_IMAGE} AS build
ARG ORT_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python3 -m venv /opt/nmtserve \
    && /opt/nmtserve/bin/pip install --upgrade pip \
    && /opt/nmtserve/bin/pip install ".[service]" "onnxruntime==${ORT_VERSION}" \
    && rm -rf /opt/nmtserve/lib/python3*/site-packages/pip

# ---------------------------------------------------------------- model: the bundle alone
# For pods that mount the model (deploy/k8s/overlays/model-volume): an init container of this
# image copies the bundle into a volume; the server verifies its checksums at start.
FROM ${BASE_IMAGE} AS model
ARG BUNDLE
COPY ${BUNDLE} /bundle
USER 10001:10001
ENTRYPOINT ["cp", "-R", "/bundle/.", "/models/default/"]

# ---------------------------------------------------------------- runtime (CPU)
FROM ${BASE_IMAGE} AS runtime
ARG BUNDLE
RUN (getent passwd nmtserve || useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin nmtserve) \
    && mkdir -p /models/default
COPY --from=build /opt/nmtserve /opt/nmtserve
COPY ${BUNDLE} /models/default
ENV PATH=/opt/nmtserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NMTSERVE_BUNDLE=/models/default \
    NMTSERVE_HOST=0.0.0.0 \
    NMTSERVE_PORT=50051 \
    NMTSERVE_METRICS_HOST=0.0.0.0 \
    NMTSERVE_METRICS_PORT=9090 \
    NMTSERVE_PROVIDER=cpu \
    NMTSERVE_GRACE_S=20 \
    NMTSERVE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 50051 9090
# `python -m service health` loads gRPC's health messages only, not the server
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "service", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service", "serve"]

# ---------------------------------------------------------------- CUDA: python3 on the CUDA base
# CUDA runtime images carry no Python: installed from the base's own distribution, whose
# release decides its version (Ubuntu 24.04: 3.12).
FROM ${CUDA_BASE_IMAGE} AS cuda-python
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM cuda-python AS cuda-build
ARG ORT_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# The service extra brings the CPU onnxruntime; onnxruntime-gpu of the same version replaces it.
# The cuda extra (onnx) builds the copy graphs that keep the KV cache on the GPU.
RUN python3 -m venv /opt/nmtserve \
    && /opt/nmtserve/bin/pip install --upgrade pip \
    && /opt/nmtserve/bin/pip install ".[service,cuda]" "onnxruntime==${ORT_VERSION}" \
    && /opt/nmtserve/bin/pip uninstall --yes onnxruntime \
    && /opt/nmtserve/bin/pip install "onnxruntime-gpu==${ORT_VERSION}" \
    && rm -rf /opt/nmtserve/lib/python3*/site-packages/pip
# onnxruntime-gpu's CUDA provider links one CUDA major version (libcudart.so.N): on a base with
# another it cannot load, and --provider cuda refuses to start on every GPU node. The nvidia/cuda
# images name theirs in CUDA_VERSION; a base without it is not checked.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN need=$(ldd /opt/nmtserve/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so \
        | sed -n 's/^[[:space:]]*libcudart[.]so[.]\([0-9]*\) .*/\1/p') \
    && echo "onnxruntime-gpu ${ORT_VERSION} links CUDA ${need}; the base has CUDA ${CUDA_VERSION:-(not named)}" \
    && if [ -n "${CUDA_VERSION:-}" ] && [ "${CUDA_VERSION%%.*}" != "$need" ]; then \
        echo "CUDA_BASE_IMAGE has CUDA ${CUDA_VERSION}: onnxruntime-gpu ${ORT_VERSION} needs a CUDA ${need} base" >&2; \
        exit 1; \
    fi

FROM cuda-python AS cuda
ARG BUNDLE
RUN (getent passwd nmtserve || useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin nmtserve) \
    && mkdir -p /models/default
COPY --from=cuda-build /opt/nmtserve /opt/nmtserve
COPY ${BUNDLE} /models/default
ENV PATH=/opt/nmtserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NMTSERVE_BUNDLE=/models/default \
    NMTSERVE_HOST=0.0.0.0 \
    NMTSERVE_PORT=50051 \
    NMTSERVE_METRICS_HOST=0.0.0.0 \
    NMTSERVE_METRICS_PORT=9090 \
    NMTSERVE_PROVIDER=cuda \
    NMTSERVE_PRECISION=fp32 \
    NMTSERVE_GRACE_S=20 \
    NMTSERVE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service", "serve"]

# The default target is the CPU image.
FROM runtime
