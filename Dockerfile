# syntax=docker/dockerfile:1
# The serving image: onnxruntime + gRPC + the tokenizer. No torch, no compiler.
#
#   docker build -t nmtserve .                                       # mount a bundle at run time
#   docker build -t nmtserve --build-arg BUNDLE=models/default .     # bake a bundle in
#   docker build -t nmtserve:cuda --target cuda \
#       --build-arg CUDA_BASE_IMAGE=<a CUDA 12 + cuDNN 9 runtime image with python3 and venv> .
#
# BASE_IMAGE may be any Debian-like image with python3 (≥ 3.10) and its venv module: the
# official python:3.11-slim-bookworm by default, or a locally built Debian base where no
# registry is reachable (see `make container-check`).
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# ---------------------------------------------------------------- build: a venv with the service
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python3 -m venv /opt/nmtserve \
    && /opt/nmtserve/bin/pip install --upgrade pip \
    && /opt/nmtserve/bin/pip install ".[service]" \
    && rm -rf /opt/nmtserve/lib/python3*/site-packages/pip

# ---------------------------------------------------------------- runtime (CPU)
FROM ${BASE_IMAGE} AS runtime
ARG BUNDLE=deploy/empty-bundle
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
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "service", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service", "serve"]

# ---------------------------------------------------------------- CUDA variant
FROM ${CUDA_BASE_IMAGE} AS cuda
ARG BUNDLE=deploy/empty-bundle
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python3 -m venv /opt/nmtserve \
    && /opt/nmtserve/bin/pip install ".[service]" \
    && /opt/nmtserve/bin/pip uninstall --yes onnxruntime \
    && /opt/nmtserve/bin/pip install "onnxruntime-gpu>=1.18" \
    && (getent passwd nmtserve || useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin nmtserve) \
    && mkdir -p /models/default
COPY ${BUNDLE} /models/default
ENV PATH=/opt/nmtserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NMTSERVE_BUNDLE=/models/default \
    NMTSERVE_HOST=0.0.0.0 \
    NMTSERVE_PORT=50051 \
    NMTSERVE_METRICS_HOST=0.0.0.0 \
    NMTSERVE_METRICS_PORT=9090 \
    NMTSERVE_PROVIDER=cuda \
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
