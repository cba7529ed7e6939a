"""Shared helpers for the deployment tests (tests/deploy only).

Helpers reach the tests as fixtures: with several ``conftest.py`` files and no packages,
``import conftest`` would be ambiguous.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
DASHBOARD_PATH = DEPLOY_DIR / "grafana" / "dashboards" / "fpn-serve.json"


def find_tool(name: str) -> str | None:
    """A command installed next to this interpreter (a venv's console scripts), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def get_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(
    url: str,
    *,
    timeout: float,
    status: int = 200,
    process: subprocess.Popen | None = None,
) -> None:
    """Poll ``url`` until it answers ``status``; fail early if ``process`` has exited."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            code = process.returncode
            raise RuntimeError(f"process exited with code {code} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            if exc.code == status:
                return
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {status} within {timeout:.0f}s (last: {last})")


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    return get_free_port


@pytest.fixture(scope="session")
def http_waiter() -> Callable[..., None]:
    return wait_for_http


@pytest.fixture(scope="session")
def spec_labels(spec_metrics) -> dict[str, set[str]]:
    """SPEC §8: each metric's labels."""
    special = {
        "fpn_requests_total": {"model", "endpoint", "code"},
        "fpn_request_duration_seconds": {"model", "endpoint"},
        "fpn_requests_cancelled_total": {"model", "endpoint"},
        "fpn_model_info": {"model", "family", "backend", "device"},
    }
    return {name: special.get(name, {"model"}) for name in spec_metrics}


@pytest.fixture(scope="session")
def spec_series(spec_metrics) -> set[str]:
    """Every series name a PromQL query may select: SPEC §8 names, histograms' three series."""
    names = set()
    for name, kind in spec_metrics.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str | None]:
    return find_tool


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_PATH.read_text())


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def render_dashboard() -> ModuleType:
    """deploy/render_dashboard.py, a script rather than a package module."""
    return load_module(DEPLOY_DIR / "render_dashboard.py", "fpn_deploy_render_dashboard")
