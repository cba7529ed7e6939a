"""deploy/prometheus/prometheus.yml passes Prometheus' own checker."""

from __future__ import annotations

import subprocess

import pytest


def promtool_check_config(promtool: str, path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prometheus_config_is_valid(repo_root, tool):
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = promtool_check_config(promtool, repo_root / "deploy" / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path, tool):
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    broken = tmp_path / "prometheus.yml"
    broken.write_text("global:\n  scrape_interval: 5 seconds\nscrape_configs: []\n")
    assert promtool_check_config(promtool, broken).returncode != 0
