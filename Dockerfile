# syntax=docker/dockerfile:1
#
# fpn-serve service image.
#
#   GPU (default): docker build -t fpn-serve:gpu .
#   CPU:           docker build --build-arg VARIANT=cpu -t fpn-serve:cpu .
#
# Serves the bundled model in /app/checkpoints, or checkpoints from a mounted volume:
#   docker run --gpus all -p 8000:8000 -v "$PWD/my-ckpts:/models:ro" -e FPN_MODEL_DIR=/models fpn-serve:gpu
#
# The Python install steps live in deploy/docker-install.sh; CI runs the same script in a fresh
# virtual environment (deploy/check_docker_install.sh), so the image and CI cannot drift apart.

# gpu or cpu: picks the base image below, the torch build and the onnxruntime package.
ARG VARIANT=gpu

# CUDA 13.0 matches torch 2.13's cu130 build (host driver >= 580). The "base" flavour carries the
# CUDA runtime and the NVIDIA container toolkit settings; cuBLAS, cuDNN and NCCL arrive with
# torch's CUDA wheels, so the larger runtime/cudnn flavours would only duplicate them.
FROM nvidia/cuda:13.0.1-base-ubuntu24.04 AS base-gpu
FROM ubuntu:24.04 AS base-cpu

# ---------------------------------------------------------------------------------------------
# base-gpu or base-cpu, the stages above (hadolint cannot resolve a stage name from an ARG).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's archive moves, so exact apt pins would break rebuilds; the base image tag pins them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
FROM base AS build
ARG VARIANT
# Empty: PyTorch's index for the variant; "none": pip's configured index (a mirror, say).
ARG TORCH_INDEX_URL=""
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first, in its own layer: it is the large download and changes least often.
COPY deploy/docker-install.sh deploy/docker-install.sh
RUN VARIANT="$VARIANT" TORCH_INDEX_URL="$TORCH_INDEX_URL" sh deploy/docker-install.sh torch

COPY pyproject.toml README.md ./
COPY models/ models/
COPY training/ training/
COPY service/ service/
RUN VARIANT="$VARIANT" TORCH_INDEX_URL="$TORCH_INDEX_URL" sh deploy/docker-install.sh project

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="fpn-serve" \
      org.opencontainers.image.description="Fixed Point Network classifiers with per-sample adaptive depth" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.fpn-serve.variant="${VARIANT}"

RUN groupadd --system --gid 10001 fpn \
    && useradd --system --uid 10001 --gid fpn --create-home --home-dir /home/fpn \
       --shell /usr/sbin/nologin fpn

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The bundled default model; mount a volume and set FPN_MODEL_DIR to serve others.
COPY checkpoints/ /app/checkpoints/

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/fpn \
    FPN_MODEL_DIR=/app/checkpoints \
    FPN_DEVICE=auto \
    FPN_GRPC_PORT=8001

USER 10001:10001
# HTTP (native v1, V2, /metrics) and gRPC (Open Inference Protocol), one process.
EXPOSE 8000 8001

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["fpn-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
