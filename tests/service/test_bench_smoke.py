"""The serving benchmark runs end to end (tiny settings; the figures are not checked)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from service_support import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_serve_load_benchmark_smoke(trained_dir, mnist_dir, tmp_path) -> None:
    out = tmp_path / "serve_load.json"
    command = [
        sys.executable, str(REPO_ROOT / "bench" / "serve_load.py"),
        "--model-dir", str(trained_dir), "--model", "mnist-tiny", "--data-dir", str(mnist_dir),
        "--duration", "1", "--rounds", "1", "--concurrency", "1", "4", "--threads", "1",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert set(results["servers"]) == {"batching", "no-batching", "batching-delay-0"}
    for server in results["servers"].values():
        for run in server["runs"].values():
            assert run["requests"] > 0 and run["non_2xx"] == 0 and run["socket_errors"] == 0
    assert "| batching |" in done.stdout


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_grpc_vs_http_benchmark_smoke(trained_dir, mnist_dir, tmp_path) -> None:
    pytest.importorskip("tritonclient.grpc")
    out = tmp_path / "grpc_vs_http.json"
    command = [
        sys.executable, str(REPO_ROOT / "bench" / "grpc_vs_http.py"),
        "--model-dir", str(trained_dir), "--model", "mnist-tiny", "--data-dir", str(mnist_dir),
        "--duration", "1", "--concurrency", "1", "4", "--threads", "1", "--grpc-processes", "1",
        "--images", "16", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    for protocol in ("http", "grpc"):
        assert set(results["runs"][protocol]) == {"c1", "c4"}
        for run in results["runs"][protocol].values():
            assert run["requests"] > 0 and run["rps"] > 0
            assert run.get("errors", 0) == run.get("non_2xx", 0) == run.get("socket_errors", 0) == 0
    assert "| grpc | 4 |" in done.stdout and "| http | 1 |" in done.stdout
