#!/bin/sh
# Installs torch and fpn-serve into the Python environment of $PYTHON.
#
# This script is the one place that lists the image's Python install steps: the Dockerfile runs
# it, and CI runs it in a fresh virtual environment (deploy/check_docker_install.sh), so a broken
# dependency line fails CI instead of the next image build.
#
# Usage, from the repository root:
#   VARIANT=gpu|cpu sh deploy/docker-install.sh [torch|project|all]
#     torch    install the pinned torch build only (the Dockerfile's cacheable layer)
#     project  install this project with the variant's extras, keeping that torch
#     all      both (default)
#
# Environment:
#   VARIANT          gpu: CUDA build of torch, extras serve,gpu (default)
#                    cpu: CPU build of torch, extras serve,onnx
#   TORCH_INDEX_URL  index that serves the torch wheel. Empty or unset: PyTorch's index for the
#                    variant (cu130 or cpu). "none": pip's configured index only (CI uses this;
#                    its pip is set up with a local torch CPU wheel).
#   PYTHON           interpreter of the target environment (default: python3)
set -eu

TORCH_VERSION=2.13.0
VARIANT=${VARIANT:-gpu}
PYTHON=${PYTHON:-python3}
STEP=${1:-all}

case "$VARIANT" in
  gpu)
    default_index=https://download.pytorch.org/whl/cu130
    extras=serve,gpu
    ;;
  cpu)
    default_index=https://download.pytorch.org/whl/cpu
    extras=serve,onnx
    ;;
  *)
    echo "docker-install.sh: VARIANT must be gpu or cpu, got '$VARIANT'" >&2
    exit 2
    ;;
esac
TORCH_INDEX_URL=${TORCH_INDEX_URL:-$default_index}

pip_install() {
  "$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check "$@"
}

# Fails unless the environment holds torch $TORCH_VERSION built for $VARIANT.
check_torch() {
  "$PYTHON" - "$VARIANT" "$TORCH_VERSION" <<'PY'
import sys

import torch

variant, pinned = sys.argv[1], sys.argv[2]
version, cuda = torch.__version__, torch.version.cuda
print(f"docker-install.sh: torch {version}, CUDA {cuda or 'none'}")
if version.split("+")[0] != pinned:
    sys.exit(f"docker-install.sh: expected torch {pinned}, found {version}")
if (variant == "cpu") != (cuda is None):
    sys.exit(f"docker-install.sh: the {variant} variant got torch {version} (CUDA {cuda})")
PY
}

install_torch() {
  if [ "$TORCH_INDEX_URL" = none ]; then
    pip_install "torch==$TORCH_VERSION"
  else
    # PyTorch's index holds torch; torch's own dependencies may come from PyPI.
    pip_install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
      "torch==$TORCH_VERSION"
  fi
  check_torch
}

install_project() {
  # torch is already there and satisfies the project's torch>=… bound, so pip keeps it.
  pip_install ".[$extras]"
  check_torch
  "$PYTHON" -m pip check
}

case "$STEP" in
  torch) install_torch ;;
  project) install_project ;;
  all)
    install_torch
    install_project
    ;;
  *)
    echo "docker-install.sh: step must be torch, project or all, got '$STEP'" >&2
    exit 2
    ;;
esac
