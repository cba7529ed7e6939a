"""End to end: a real fpn-serve, scraped by a real Prometheus, answers every dashboard query.

The service runs from its console script on a loopback port with the bundled checkpoints; a
Prometheus binary (Debian package ``prometheus``) scrapes it every second. After a short load
of good and bad requests, every PromQL expression of the Grafana dashboard must return data
through Prometheus' HTTP API. Renaming a metric, or a label the dashboard groups by, breaks
this test, as it would break the dashboard.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "30s"  # 30 scrapes: every rate() window holds plenty of samples
STARTUP_TIMEOUT_S = 180


# --------------------------------------------------------------------------------------------
# processes


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def service_url(repo_root, free_port, http_waiter, tmp_path_factory) -> Iterator[str]:
    script = Path(sys.executable).parent / "fpn-serve"
    if importlib.util.find_spec("service") is None or not script.is_file():
        pytest.skip("fpn-serve is not installed here (pip install -e '.[serve]')")
    model_dir = repo_root / "checkpoints"
    if not any(model_dir.glob("*/config.json")):
        pytest.skip(f"no checkpoint in {model_dir} to serve")
    port = free_port()
    log = tmp_path_factory.mktemp("fpn-serve") / "fpn-serve.log"
    env = {**os.environ, "FPN_MODEL_DIR": str(model_dir), "FPN_DEVICE": "cpu"}
    env.update({"FPN_GRPC_PORT": "0", "FPN_DRAIN_SECONDS": "0"})  # HTTP only, stop at once
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(script), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=repo_root,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            http_waiter(f"{url}/readyz", timeout=STARTUP_TIMEOUT_S, process=process)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"fpn-serve did not become ready: {exc}\n{tail(log)}")
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def prometheus_url(service_url, free_port, http_waiter, tool, tmp_path_factory) -> Iterator[str]:
    binary = tool("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": [
            {
                "job_name": "fpn-serve",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [urllib.parse.urlsplit(service_url).netloc]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            http_waiter(f"{url}/-/ready", timeout=60, process=process)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"Prometheus did not start: {exc}\n{tail(log)}")
        yield url
    finally:
        stop(process)


# --------------------------------------------------------------------------------------------
# HTTP


def request(url: str, *, body: bytes | None = None, timeout: float = 60) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def prometheus_query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    status, body = request(url, timeout=30)
    assert status == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_for(condition, *, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(message)


# --------------------------------------------------------------------------------------------
# load


def pick_model(service_url: str) -> tuple[str, list[int]]:
    """The model to load: mnist-fpn if served, else the first; with its input shape."""
    status, body = request(f"{service_url}/v1/models")
    assert status == 200, body
    models = body["models"] if isinstance(body, dict) else body
    assert models, "the service lists no model"
    names = [m["name"] for m in models]
    model = models[names.index("mnist-fpn")] if "mnist-fpn" in names else models[0]
    shape = model.get("input_shape") or model.get("shape") or model.get("input", {}).get("shape")
    return model["name"], list(shape or [28, 28])


def nested(shape: list[int], rng: random.Random) -> Any:
    if len(shape) == 1:
        return [round(rng.random(), 4) for _ in range(shape[0])]
    return [nested(shape[1:], rng) for _ in range(shape[0])]


def good_requests(shape: list[int], rng: random.Random) -> list[tuple[int, dict[str, Any]]]:
    """(batch size, body) pairs: varied tol and max_iter, some too tight to converge."""
    out = []
    for i in range(36):
        batch = 1 + i % 4
        body = {
            "inputs": nested([batch, *shape], rng),
            "tol": [1e-2, 1e-3, 1e-4, 1e-5][i % 4],
            "max_iter": [50, 100, 2, 1][(i // 4) % 4],
        }
        out.append((batch, body))
    return out


def bad_requests(predict_url: str, unknown_url: str, shape: list[int]) -> list[tuple[str, bytes]]:
    """Requests SPEC §7 answers with 4xx."""
    rng = random.Random(1)
    one = nested([1, *shape], rng)
    too_bright = json.loads(json.dumps(one))
    first_row = too_bright[0]
    while isinstance(first_row[0], list):
        first_row = first_row[0]
    first_row[0] = 7.0
    return [
        (predict_url, b"{not json"),
        (predict_url, json.dumps({"inputs": [[0.5, 0.5, 0.5]]}).encode()),
        (predict_url, json.dumps({"inputs": too_bright}).encode()),
        (predict_url, json.dumps({"inputs": one, "tol": 10.0}).encode()),
        (predict_url, json.dumps({"inputs": one, "max_iter": 0}).encode()),
        (unknown_url, json.dumps({"inputs": one}).encode()),
    ]


@pytest.fixture(scope="module")
def loaded(service_url, prometheus_url) -> dict[str, Any]:
    """Sends the load in waves across several scrapes; returns what was sent."""
    wait_for(
        lambda: any(
            r["value"][1] == "1" for r in prometheus_query(prometheus_url, 'up{job="fpn-serve"}')
        ),
        timeout=30,
        message="Prometheus never scraped fpn-serve successfully",
    )
    model, shape = pick_model(service_url)
    predict_url = f"{service_url}/v1/models/{model}/predict"
    unknown_url = f"{service_url}/v1/models/no-such-model/predict"
    rng = random.Random(0)
    goods = good_requests(shape, rng)
    bads = bad_requests(predict_url, unknown_url, shape)
    waves = 3
    sent_samples = 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        for wave in range(waves):
            chunk = goods[wave::waves]
            answers = list(
                pool.map(lambda g: request(predict_url, body=json.dumps(g[1]).encode()), chunk)
            )
            for (batch, _), (status, body) in zip(chunk, answers, strict=True):
                assert status == 200, f"predict answered {status}: {body}"
                assert len(body["predictions"]) == batch
                sent_samples += batch
            for url, body in bads:
                status, answer = request(url, body=body)
                assert 400 <= status < 500, f"bad request answered {status}: {answer}"
            time.sleep(2 * SCRAPE_INTERVAL_S)
    # The last scrape must have seen every sample before the dashboard's queries run.
    wait_for(
        lambda: (
            sum(float(r["value"][1]) for r in prometheus_query(prometheus_url, "fpn_samples_total"))
            >= sent_samples
        ),
        timeout=30,
        message=f"fpn_samples_total never reached the {sent_samples} samples sent",
    )
    time.sleep(3 * SCRAPE_INTERVAL_S)
    return {"model": model, "samples": sent_samples}


# --------------------------------------------------------------------------------------------
# tests


def test_metrics_endpoint_exposes_the_spec_metrics(service_url, loaded, spec_metrics, spec_labels):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{service_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in spec_metrics.items():
        family = families.get(name.removesuffix("_total") if kind == "counter" else name)
        assert family is not None, f"/metrics has no {name}"
        assert family.type == kind, f"{name} is a {family.type}, SPEC §8 says {kind}"
        assert family.samples, f"{name} has no samples after the load"
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            assert labels == spec_labels[name], f"{sample.name} labels {labels}"


def test_every_dashboard_query_returns_data(prometheus_url, loaded, dashboard, render_dashboard):
    queries = render_dashboard.dashboard_queries(dashboard)
    assert queries
    empty = []
    for query in queries:
        expr = render_dashboard.substitute(query.expr, rate_interval=RATE_INTERVAL)
        if not prometheus_query(prometheus_url, expr):
            empty.append(f"{query.panel_title} [{query.ref_id}]: {expr}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


def test_one_model_selection_returns_data(prometheus_url, loaded, dashboard, render_dashboard):
    for query in render_dashboard.dashboard_queries(dashboard):
        expr = render_dashboard.substitute(
            query.expr, model=loaded["model"], rate_interval=RATE_INTERVAL
        )
        assert prometheus_query(prometheus_url, expr), f"{query.panel_title}: {expr}"


def test_model_variable_lists_the_served_model(prometheus_url, loaded, dashboard, render_dashboard):
    [variable] = render_dashboard.template_variable_queries(dashboard)
    assert variable == "label_values(fpn_model_info, model)"
    params = urllib.parse.urlencode({"match[]": "fpn_model_info"})
    status, body = request(f"{prometheus_url}/api/v1/label/model/values?{params}")
    assert status == 200, body
    assert loaded["model"] in body["data"]


def test_status_codes_and_non_convergence_are_counted(prometheus_url, loaded):
    codes = {
        r["metric"].get("code")
        for r in prometheus_query(prometheus_url, "sum by (code) (fpn_requests_total)")
    }
    assert "200" in codes
    assert "422" in codes, f"rejected requests are not counted by code: {codes}"
    nonconverged = prometheus_query(prometheus_url, "sum(fpn_solver_nonconverged_total)")
    assert nonconverged and float(nonconverged[0]["value"][1]) > 0, "max_iter=1 must not converge"


def test_render_dashboard_draws_the_live_data(prometheus_url, loaded, render_dashboard, tmp_path):
    out = tmp_path / "dashboard.png"
    code = render_dashboard.main(
        [
            "--prometheus-url", prometheus_url,
            "--out", str(out),
            "--range", "2m",
            "--step", "2s",
            "--rate-interval", RATE_INTERVAL,
        ]
    )  # fmt: skip
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
