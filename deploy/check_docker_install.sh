#!/bin/sh
# CI check: runs the image's install steps (deploy/docker-install.sh, CPU variant) in a fresh
# virtual environment on a copy of the image's build context, then checks that the installed
# service starts far enough to print its help. A broken dependency line in the image therefore
# fails CI, without a Docker engine.
#
# Usage: sh deploy/check_docker_install.sh
# Environment:
#   PYTHON           interpreter that creates the virtual environment (default: python3)
#   TORCH_INDEX_URL  passed on to docker-install.sh (default here: none, pip's configured index)
set -eu

# What the Dockerfile's build stage copies from the build context, in the same places.
# tests/deploy/test_dockerfile.py keeps this list equal to the Dockerfile's COPY lines.
BUILD_CONTEXT="deploy/docker-install.sh pyproject.toml README.md models training service"

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# A clean copy, as in the image: building in the working tree would leave build/ behind, and
# setuptools puts stale files from there into later wheels.
mkdir "$work/src"
# shellcheck disable=SC2086 # BUILD_CONTEXT is a list of paths without spaces
(cd "$repo" && tar -cf - --exclude=__pycache__ --exclude='*.py[cod]' $BUILD_CONTEXT) |
  (cd "$work/src" && tar -xf -)

"${PYTHON:-python3}" -m venv "$work/venv"
venv_python="$work/venv/bin/python"

cd "$work/src"
VARIANT=cpu TORCH_INDEX_URL=${TORCH_INDEX_URL:-none} PYTHON="$venv_python" \
  sh deploy/docker-install.sh all

# The image's entry point must exist and import the service; run it outside the source tree
# so that the installed packages, not the copied sources, are imported.
cd "$work"
"$work/venv/bin/fpn-serve" --help >/dev/null
"$venv_python" -c "import models, service"
# The gRPC modules generated for the installed protobuf and grpcio runtimes (a version skew
# between them and the generator fails here, not at the first start).
"$venv_python" -c "import service.protocol.open_inference_grpc_pb2_grpc"
echo "check_docker_install.sh: the image's install steps work in a fresh virtual environment"
