"""Draining on SIGTERM (SPEC §9 ``FPN_DRAIN_SECONDS``): under closed-loop keep-alive load from
many connections, a real ``fpn-serve`` receiving SIGTERM turns not-ready at once (HTTP and
gRPC), answers every request it accepted (``Connection: close`` while draining), and no client
sees a connection error on a request it had already sent; only new connections are refused,
once the listeners have closed."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import backend_env
from service_support import ServerProcess, start_server
from test_server import INFER, MODEL

pytestmark = pytest.mark.slow

CONNECTIONS = 32
DRAIN_SECONDS = 2.0


def v2_body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


async def closed_loop(url: str, body: dict, stats: collections.Counter) -> None:
    """One keep-alive client: the next request as soon as the last is answered, until its
    connection is refused (the listener closed: that request was never sent)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        while True:
            try:
                response = await client.post(INFER, json=body)
            except httpx.ConnectError:
                stats["refused"] += 1
                return
            except httpx.TransportError as exc:  # sent, and no complete answer: the bug
                stats[f"cut: {type(exc).__name__}"] += 1
                return
            stats[response.status_code] += 1
            if response.headers.get("connection") == "close":
                stats["connection: close"] += 1


async def load_then_sigterm(server: ServerProcess, body: dict) -> collections.Counter:
    stats: collections.Counter = collections.Counter()
    clients = [
        asyncio.create_task(closed_loop(server.url, body, stats)) for _ in range(CONNECTIONS)
    ]
    started = time.monotonic()
    while stats[200] < 4 * CONNECTIONS:  # every connection is open and busy
        assert time.monotonic() - started < 60, stats
        await asyncio.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await asyncio.sleep(0.3)
    # Not ready at once, on both protocols, while requests are still served.
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as probe:
        ready = await probe.get("/readyz")
        v2_ready = await probe.get("/v2/health/ready")
    assert ready.status_code == 503 and v2_ready.status_code == 503
    assert ready.headers["connection"] == "close"
    stats["grpc ready"] = await asyncio.to_thread(grpc_ready, server)
    await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
    stats["drained after"] = round(time.monotonic() - signalled, 1)
    return stats


def grpc_ready(server: ServerProcess) -> bool:
    import tritonclient.grpc as tritonclient_grpc

    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    x = np.full((1, 1, 28, 28), 0.5, dtype=np.float32)
    tensor = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    assert client.infer(MODEL, [tensor]).as_numpy("label").shape == (1,)  # still served
    return client.is_server_ready() or client.is_model_ready(MODEL)


@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_under_keep_alive_load_drops_nothing(
    model_dir: Path, backend: str, digits, tmp_path: Path, attempt: int
) -> None:
    env = {"FPN_DRAIN_SECONDS": str(DRAIN_SECONDS), **backend_env(backend)}
    server = start_server(model_dir, tmp_path / "log", env)
    try:
        stats = asyncio.run(load_then_sigterm(server, v2_body(digits[:1])))
        code = server.process.wait(60)
    finally:
        server.stop()
    cut = {k: v for k, v in stats.items() if str(k).startswith("cut")}
    assert not cut, stats
    assert set(stats) <= {200, "refused", "connection: close", "grpc ready", "drained after"}
    assert stats["refused"] == CONNECTIONS  # every client ran until the listener closed
    assert stats["connection: close"] >= 1  # while draining, connections were closed cleanly
    assert stats["grpc ready"] is False
    assert stats["drained after"] >= DRAIN_SECONDS - 0.5  # listeners stayed open
    assert code in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()
