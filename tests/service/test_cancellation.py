"""Clients that go away (SPEC §5): an HTTP client disconnecting while its body is read, while
its request is queued, or while it is solved is counted in ``fpn_requests_cancelled_total``,
never as a 5xx, and logs no traceback; a request dropped while queued is never solved."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
from test_server import metric, scrape

SLOW = "/v1/models/slow/predict"
ON_PREDICT = {"model": "slow", "endpoint": "predict"}


def raw_post(url: str, path: str, body: bytes, *, declared: int | None = None) -> socket.socket:
    """Send a POST with ``body`` (claiming ``declared`` bytes) on a fresh socket; return it."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def one_sample(**parameters: float) -> bytes:
    return json.dumps({"inputs": np.full((1, 784), 0.5).tolist(), **parameters}).encode()


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def server_errors(samples: dict) -> float:
    return sum(
        value for (name, labels), value in samples.items()
        if name == "fpn_requests_total" and dict(labels)["code"].startswith("5")
    )  # fmt: skip


def test_disconnects_mid_body_are_counted_not_5xx(slow_server) -> None:
    before = scrape(slow_server.url)
    body = one_sample()
    for _ in range(50):
        sock = raw_post(slow_server.url, SLOW, body[:100], declared=len(body))
        time.sleep(0.005)
        sock.close()
    time.sleep(0.5)
    after = scrape(slow_server.url)
    assert delta(after, before, "fpn_requests_cancelled_total", **ON_PREDICT) == 50
    assert server_errors(after) == server_errors(before)  # no new 5xx (the server is shared)
    assert delta(after, before, "fpn_samples_total", model="slow") == 0
    log = slow_server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert log.count("request cancelled") <= 50  # one line each at most


def test_disconnect_while_queued_drops_the_sample(slow_server) -> None:
    """FPN_MAX_BATCH_SIZE=1: the first request solves (~200 ms) while the second waits; the
    second's client leaves, and its sample is never solved."""
    before = scrape(slow_server.url)
    first = raw_post(slow_server.url, SLOW, one_sample())
    time.sleep(0.005)
    second = raw_post(slow_server.url, SLOW, one_sample())
    time.sleep(0.01)
    second.close()
    answer = first.recv(65536)
    first.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    time.sleep(0.3)
    after = scrape(slow_server.url)
    assert delta(after, before, "fpn_requests_cancelled_total", **ON_PREDICT) == 1
    assert delta(after, before, "fpn_samples_total", model="slow") == 1
    assert delta(after, before, "fpn_requests_total", code="200", **ON_PREDICT) == 1
    assert server_errors(after) == server_errors(before)
    assert "Traceback" not in slow_server.log()


def test_disconnect_while_solving_is_counted(slow_server, backend) -> None:
    answer = httpx.post(slow_server.url + SLOW, content=one_sample(), timeout=30).json()
    assert answer["predictions"][0]["iterations"] == 500  # tol is never reached: max_iter is
    full = 1500  # three times the default: ~0.2-0.6 s (onnxruntime's graph is the faster)
    before = scrape(slow_server.url)
    sock = raw_post(slow_server.url, SLOW, one_sample(max_iter=full))
    time.sleep(0.03)  # taken into the solve
    sock.close()
    time.sleep(0.3)
    after = scrape(slow_server.url)
    assert delta(after, before, "fpn_requests_cancelled_total", **ON_PREDICT) == 1
    assert delta(after, before, "fpn_requests_total", code="200", **ON_PREDICT) == 0
    assert server_errors(after) == server_errors(before)
    assert "Traceback" not in slow_server.log()
    if backend == "torch":  # the iteration-level engine: the sample left the running solve
        stepped = delta(after, before, "fpn_engine_iterations_total", model="slow")
        assert 0 < stepped < full, (stepped, full)
    # onnxruntime finishes its graph anyway: wait for it, so that the next test finds it free.
    httpx.post(slow_server.url + SLOW, content=one_sample(max_iter=1), timeout=30)
