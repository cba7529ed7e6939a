"""Every error row of SPEC §7 against a real ``fpn-serve`` process, and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ADMIN_TOKEN, backend_env
from service_support import start_server
from test_server import INFER, MODEL, PREDICT, post_all


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and "Traceback" not in body["message"]
    return body["error"]


@pytest.mark.parametrize(
    "body, code",
    [
        (b'{"inputs": [[0.5]', "invalid_json"),
        ({"inputs": [[0.5] * 100]}, "invalid_input"),  # wrong shape
        ({"inputs": [["a"] * 784]}, "invalid_input"),  # wrong dtype
        ({"inputs": [[1.01] * 784]}, "invalid_input"),  # outside [0, 1]
        ({"images": ["aGVsbG8="]}, "invalid_input"),  # undecodable image ("hello")
        ({"inputs": [[0.5] * 784], "tol": 1e-9}, "invalid_parameter"),
        ({"inputs": [[0.5] * 784], "max_iter": 10_000}, "invalid_parameter"),
        ({"inputs": [[0.5] * 784], "solver": "broyden"}, "invalid_parameter"),
    ],
)
def test_422_rows(server, body, code) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    assert error(httpx.post(server.url + PREDICT, **kwargs), 422) == code


def test_nan_in_a_tensor_is_422(server) -> None:
    x = np.full(784, 0.5, dtype="<f4")
    x[0] = np.inf
    head = httpx.Request("POST", "/", json={"inputs": [{"name": "input", "shape": [1, 784],
        "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}]}).content  # fmt: skip
    response = httpx.post(
        server.url + INFER,
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert error(response, 422) == "invalid_input"
    assert "NaN or Inf" in response.json()["message"]


def test_batch_over_max_batch_size_is_422(tiny_queue_server) -> None:
    body = {"inputs": [[0.5] * 784, [0.5] * 784]}  # FPN_MAX_BATCH_SIZE=1
    assert error(httpx.post(tiny_queue_server.url + PREDICT, json=body), 422) == "batch_too_large"


def test_unknown_model_is_404(server) -> None:
    assert error(httpx.post(server.url + "/v1/models/nope/predict", json={}), 404) == (
        "model_not_found"
    )
    assert error(httpx.post(server.url + "/v2/models/nope/infer", json={}), 404) == (
        "model_not_found"
    )


def test_body_over_limit_is_413(tiny_queue_server) -> None:
    big = b'{"inputs": [' + b"0.5, " * 20_000 + b"0.5]}"  # FPN_MAX_BODY_BYTES=65536
    response = httpx.post(tiny_queue_server.url + PREDICT, content=big)
    assert error(response, 413) == "body_too_large"
    chunked = httpx.post(
        tiny_queue_server.url + PREDICT, content=iter([big[:40_000], big[40_000:]])
    )
    assert error(chunked, 413) == "body_too_large"


def test_admin_reload_needs_the_token(server, batching_server) -> None:
    url = server.url + f"/v1/models/{MODEL}/reload"
    assert error(httpx.post(url), 401) == "unauthorized"
    assert error(httpx.post(url, headers={"Authorization": "Bearer nope"}), 401) == "unauthorized"
    ok = httpx.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["reloaded"] is True
    # No token configured: the admin endpoint does not exist.
    other = batching_server.url + f"/v1/models/{MODEL}/reload"
    assert error(httpx.post(other, headers={"Authorization": "Bearer x"}), 404) == "not_found"


def test_full_queue_is_503_with_retry_after(slow_server) -> None:
    bodies = [{"inputs": [[0.5] * 784]} for _ in range(12)]
    responses = asyncio.run(post_all(slow_server.url, bodies, "/v1/models/slow/predict"))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    assert len(codes) == 12  # every request answered: solved or refused at once
    for r in responses:
        if r.status_code == 503:
            assert error(r, 503) == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1


def test_sigterm_finishes_queued_and_in_flight_requests(model_dir, backend, tmp_path: Path) -> None:
    env = {"FPN_MAX_QUEUE_DELAY_MS": "1500", **backend_env(backend)}
    server = start_server(model_dir, tmp_path / "log", env)
    results: list[httpx.Response] = []

    def send() -> None:
        results.extend(asyncio.run(post_all(server.url, [{"inputs": [[0.5] * 784]}] * 4)))

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)  # requests are queued, waiting out the 1.5 s delay
    server.process.send_signal(signal.SIGTERM)
    sender.join(30)
    code = server.process.wait(30)
    assert [r.status_code for r in results] == [200] * 4
    assert code in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz")
