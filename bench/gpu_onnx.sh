#!/usr/bin/env bash
# torch vs onnxruntime, in process, on a CUDA machine (the "ONNX Runtime backend" section of
# BENCHMARKS.md measures the same on the 2-core CPU VM).
#
# Usage, from anywhere:  bench/gpu_onnx.sh [extra bench/onnx_backends.py arguments]
#   e.g.                 bench/gpu_onnx.sh --checkpoint checkpoints/mnist-opteq
# Environment:           PYTHON (default .venv/bin/python, else python3)
#
# What it does: prints the versions and the execution providers onnxruntime offers, exports the
# checkpoint into a temporary copy (fpn-export's library call), then times batches of 1, 64 and
# 256 through both backends (the code the service's solve thread runs) on FPN_DEVICE=cuda.
# It degrades instead of failing: without a GPU both run on the CPU; with a GPU but without
# onnxruntime-gpu (or with a CUDA provider that cannot start, e.g. a CUDA major version that
# onnxruntime-gpu was not built for) torch runs on CUDA and onnxruntime on the CPU, and the
# table says so ("fallback"). Results: a Markdown table on stdout, JSON in
# bench/results/onnx_backends_gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

device=$("$PYTHON" - <<'PY'
import importlib.metadata as md
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}", file=sys.stderr)
gpu = torch.cuda.is_available()
if gpu:
    print(f"GPU: {torch.cuda.get_device_name(0)}", file=sys.stderr)
wheels = []
for dist in ("onnxruntime", "onnxruntime-gpu"):
    try:
        wheels.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        pass
print("installed: " + (", ".join(wheels) or "no onnxruntime"), file=sys.stderr)
if len(wheels) == 2:
    print("warning: onnxruntime and onnxruntime-gpu are both installed; they share one module "
          "and must not be mixed (pip uninstall -y onnxruntime onnxruntime-gpu, then install one)",
          file=sys.stderr)
try:
    import onnxruntime as ort
except ImportError:
    sys.exit("onnxruntime is missing: pip install 'onnxruntime-gpu>=1.18' (GPU) or "
             "'onnxruntime>=1.18' (CPU), plus onnx and onnxscript for the export")
providers = ort.get_available_providers()
print(f"onnxruntime {ort.__version__}: available providers {providers}", file=sys.stderr)
if gpu and "CUDAExecutionProvider" not in providers:
    print("note: this onnxruntime has no CUDAExecutionProvider: torch runs on CUDA, onnxruntime "
          "falls back to the CPU (install onnxruntime-gpu instead of onnxruntime to compare on "
          "the GPU)", file=sys.stderr)
print("cuda" if gpu else "cpu")
PY
)
echo "FPN_DEVICE=$device" >&2

# The export needs onnx and onnxscript (the onnx/gpu extras); say so instead of a traceback.
if ! "$PYTHON" -c "import onnx, onnxscript" 2>/dev/null; then
  echo "onnx/onnxscript missing: pip install 'onnx>=1.16' 'onnxscript>=0.1'" >&2
  exit 1
fi

exec "$PYTHON" bench/onnx_backends.py --in-process-only --device "$device" \
  --batches 1 64 256 --out bench/results/onnx_backends_gpu.json "$@"
