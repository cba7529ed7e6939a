#!/usr/bin/env bash
# Serving benchmark (SPEC §6 API, CPU): wrk against real fpn-serve processes.
# Usage: bench/serve_bench.sh [--duration 10] [--concurrency 1 8 64] [--model mnist-fpn]
# Results: a Markdown table on stdout, JSON in bench/results/serve_load.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
  echo "wrk is required: apt-get install -y wrk" >&2
  exit 1
fi
exec "${PYTHON:-.venv/bin/python}" bench/serve_load.py "$@"
