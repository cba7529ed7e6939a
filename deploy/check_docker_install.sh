#!/bin/sh
# CI check: runs the image's install steps (deploy/docker-install.sh, CPU variant) in a fresh
# virtual environment, then checks that the installed service starts far enough to print its help.
# A broken dependency line in the image therefore fails CI, without a Docker engine.
#
# Usage: sh deploy/check_docker_install.sh
# Environment:
#   PYTHON           interpreter that creates the virtual environment (default: python3)
#   TORCH_INDEX_URL  passed on to docker-install.sh (default here: none, pip's configured index)
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

"${PYTHON:-python3}" -m venv "$work/venv"
venv_python="$work/venv/bin/python"

cd "$repo"
VARIANT=cpu TORCH_INDEX_URL=${TORCH_INDEX_URL:-none} PYTHON="$venv_python" \
  sh deploy/docker-install.sh all

# The image's entry point must exist and import the service.
"$work/venv/bin/fpn-serve" --help >/dev/null
"$venv_python" -c "import models, service"
echo "check_docker_install.sh: the image's install steps work in a fresh virtual environment"
