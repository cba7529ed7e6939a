"""Logic tests through the app factory (``create_app(settings)`` with its lifespan), on a fake
backend that is instant, deterministic and can hold solves at a gate."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fake_backend import NAN_TRIGGER, FakeBackend
from fastapi.testclient import TestClient
from pydantic import ValidationError

from models import ArchConfig, ModelConfig, create_model, save_checkpoint
from service.app import create_app
from service.backends import BACKENDS, UnsupportedModel
from service.settings import Settings

MODEL = "fake-model"
PREDICT = f"/v1/models/{MODEL}/predict"
INFER = f"/v2/models/{MODEL}/infer"
ONE = [[[0.5] * 28] * 28]  # one sample, (1, 28, 28)


@pytest.fixture(autouse=True)
def fake_backend(monkeypatch) -> Iterator[type[FakeBackend]]:
    monkeypatch.setitem(BACKENDS, "fake", FakeBackend)
    monkeypatch.setattr(FakeBackend, "gate", None)
    monkeypatch.setattr(FakeBackend, "load_gate", None)
    monkeypatch.setattr(FakeBackend, "calls", [])
    for key in list(__import__("os").environ):
        if key.startswith("FPN_"):
            monkeypatch.delenv(key)
    yield FakeBackend


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory) -> Path:
    """A model directory with one (untrained, tiny) checkpoint named ``fake-model``."""
    root = tmp_path_factory.mktemp("fake-models")
    model = create_model(ModelConfig(arch=ArchConfig(kind="mlp", width=8)))
    save_checkpoint(model, root / MODEL)
    return root


def settings(fake_dir: Path, **overrides) -> Settings:
    return Settings(model_dir=fake_dir, backend="fake", **{"grpc_port": 0, **overrides})


def wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError(client.get("/readyz").json())


@pytest.fixture()
def client(fake_dir: Path) -> Iterator[TestClient]:
    app = create_app(settings(fake_dir, admin_token="s3cret", max_batch_size=8, max_queue_size=16))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


async def run_app(app, scenario):
    """Run ``scenario(client)`` against ``app`` with its lifespan, in this event loop."""
    async with app.router.lifespan_context(app):
        registry = app.state.registry
        for _ in range(500):
            if registry.ready:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fpn") as client:
            return await scenario(client)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) >= {"error", "message"} and body["message"], body
    assert "Traceback" not in body["message"]
    return body["error"]


# --- settings -----------------------------------------------------------------------------------
def test_settings_come_from_fpn_environment(monkeypatch, fake_dir) -> None:
    monkeypatch.setenv("FPN_MODEL_DIR", str(fake_dir))
    monkeypatch.setenv("FPN_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("FPN_MAX_QUEUE_DELAY_MS", "5")
    monkeypatch.setenv("FPN_DEVICE", "CPU")
    monkeypatch.setenv("FPN_ADMIN_TOKEN", "t")
    s = Settings()
    assert (s.model_dir, s.max_batch_size, s.max_queue_delay_ms, s.device) == (
        fake_dir,
        16,
        5.0,
        "cpu",
    )
    assert s.admin_token.get_secret_value() == "t"
    assert (s.max_queue_size, s.min_tol, s.max_iter_limit) == (1024, 1e-6, 500)
    assert s.max_body_bytes == 8 * 1024 * 1024 and s.backend == "torch"


@pytest.mark.parametrize(
    "overrides, complaint",
    [
        ({"device": "gpu"}, "device"),
        ({"backend": "tensorrt"}, "available"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 64, "max_queue_size": 8}, "max_queue_size"),
        ({"min_tol": 0}, "min_tol"),
        ({"min_tol": 2}, "min_tol"),
        ({"max_iter_limit": 0}, "max_iter_limit"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
    ],
)
def test_settings_reject_nonsense(overrides, complaint) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Settings(**overrides)


# --- predictions --------------------------------------------------------------------------------
def test_predict_echoes_knobs_and_passes_extras_through(client) -> None:
    response = client.post(PREDICT, json={"inputs": [ONE], "tol": 1e-3, "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    (p,) = body["predictions"]
    assert p["iterations"] == 3 and p["converged"] is True and p["label"] == 5
    assert p["certified_radius_linf"] == pytest.approx(0.05)
    assert [c["label"] for c in p["top_k"]] == [5, 0]
    assert body["solver"] == {"method": "anderson", "tol": 1e-3, "max_iter": 50}
    assert set(body["timing_ms"]) == {"queue", "solve", "total"}


@pytest.mark.parametrize(
    "inputs",
    [
        [ONE],  # [N, 1, H, W]
        [ONE[0]],  # [N, H, W]
        [[0.5] * 784],  # [N, D]
    ],
    ids=["NCHW", "NHW", "ND"],
)
def test_inputs_accept_the_documented_layouts(client, inputs) -> None:
    assert client.post(PREDICT, json={"inputs": inputs}).status_code == 200


def test_nonfinite_residual_is_null_not_an_error(client) -> None:
    response = client.post(PREDICT, json={"inputs": [ONE], "max_iter": NAN_TRIGGER})
    assert response.status_code == 200
    (p,) = response.json()["predictions"]
    assert p["residual"] is None and p["converged"] is False
    v2 = client.post(INFER, json={"inputs": [v2_input()], "parameters": {"max_iter": NAN_TRIGGER}})
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    assert outputs["residual"] == [None]


def test_deadline_passed_while_queued_gets_one_iteration(client) -> None:
    body = {"inputs": [ONE], "tol": 1e-6, "deadline_ms": 1e-6}
    (p,) = client.post(PREDICT, json=body).json()["predictions"]
    assert p["iterations"] == 1 and p["converged"] is False
    (p,) = client.post(PREDICT, json={**body, "deadline_ms": 60_000}).json()["predictions"]
    assert p["iterations"] == 6 and p["converged"] is True


def v2_input(n: int = 1, datatype: str = "FP32", value=0.5) -> dict:
    return {"name": "input", "shape": [n, 1, 28, 28], "datatype": datatype,
            "data": [value] * (n * 784)}  # fmt: skip


def test_v2_outputs_include_family_extras(client) -> None:
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert {"name": "certified_radius_linf", "datatype": "FP32", "shape": [-1]} in meta["outputs"]
    reply = client.post(INFER, json={"inputs": [v2_input(2)]}).json()
    outputs = {o["name"]: o for o in reply["outputs"]}
    assert outputs["certified_radius_linf"]["data"] == pytest.approx([0.05, 0.05])
    assert outputs["certified_radius_linf"]["shape"] == [2]
    assert (outputs["label"]["datatype"], outputs["converged"]["datatype"]) == ("INT64", "BOOL")


def test_v2_binary_tensor_extension_round_trips(client) -> None:
    x = np.full((2, 1, 28, 28), 0.25, dtype="<f4")
    header = {
        "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                    {"name": "iterations"}],
    }  # fmt: skip
    head = httpx.Request("POST", "/", json=header).content
    response = client.post(
        INFER,
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head)),
                 "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    n = int(response.headers["Inference-Header-Content-Length"])
    reply = httpx.Response(200, content=response.content[:n]).json()
    label, iterations = reply["outputs"]
    assert label["parameters"]["binary_data_size"] == 16 and "data" not in label
    assert np.frombuffer(response.content[n:], dtype="<i8").tolist() == [2, 2]
    assert iterations["data"] == [4, 4]


def test_reload_with_admin_token(client) -> None:
    ok = client.post(f"/v1/models/{MODEL}/reload", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["reloaded"] is True
    assert client.post(PREDICT, json={"inputs": [ONE]}).status_code == 200


def test_the_old_model_serves_while_a_reload_loads(fake_dir, fake_backend) -> None:
    app = create_app(settings(fake_dir, admin_token="s3cret"))
    gate = threading.Event()

    async def scenario(client):
        fake_backend.load_gate = gate  # the reload's load blocks here
        headers = {"Authorization": "Bearer s3cret"}
        reload = asyncio.create_task(client.post(f"/v1/models/{MODEL}/reload", headers=headers))
        await asyncio.sleep(0.1)
        served = await client.post(PREDICT, json={"inputs": [ONE]})
        gate.set()
        return served, await reload

    served, reload = asyncio.run(run_app(app, scenario))
    assert served.status_code == 200
    assert reload.status_code == 200 and reload.json()["reloaded"] is True


# --- every error row of SPEC §7 ------------------------------------------------------------------
PNG_1X1 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20).decode()
GIF = base64.b64encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").decode()


@pytest.mark.parametrize(
    "body, code",
    [
        (b'{"inputs": [', "invalid_json"),  # malformed JSON
        (b"[1, 2]", "invalid_json"),  # not an object
        (b'{"inputs": [[0.5, NaN]]}', "invalid_json"),  # NaN is not JSON
        ({"inputs": [[0.5] * 783]}, "invalid_input"),  # wrong shape
        ({"inputs": [[[0.5] * 28] * 27]}, "invalid_input"),  # wrong shape
        ({"inputs": [[0.5] * 783 + [[0.5]]]}, "invalid_input"),  # ragged
        ({"inputs": [["0.5"] * 784]}, "invalid_input"),  # wrong dtype: strings
        ({"inputs": [[True] * 784]}, "invalid_input"),  # wrong dtype: booleans
        ({"inputs": [[None] * 784]}, "invalid_input"),  # nulls
        ({"inputs": [[1.5] * 784]}, "invalid_input"),  # outside [0, 1]
        ({"inputs": [[-0.1] * 784]}, "invalid_input"),  # outside [0, 1]
        ({"inputs": []}, "invalid_input"),  # empty batch
        ({"images": ["not base64!"]}, "invalid_input"),  # undecodable image
        ({"images": [PNG_1X1]}, "invalid_input"),  # truncated PNG
        ({"images": [GIF]}, "invalid_input"),  # not PNG/JPEG
        ({"inputs": [ONE], "images": [PNG_1X1]}, "invalid_input"),  # both
        ({}, "invalid_input"),  # neither
        ({"inputs": [ONE], "tol": 1e-7}, "invalid_parameter"),  # tol < FPN_MIN_TOL
        ({"inputs": [ONE], "tol": 2}, "invalid_parameter"),  # tol > 1
        ({"inputs": [ONE], "tol": 0}, "invalid_parameter"),
        ({"inputs": [ONE], "max_iter": 0}, "invalid_parameter"),
        ({"inputs": [ONE], "max_iter": 501}, "invalid_parameter"),  # > FPN_MAX_ITER_LIMIT
        ({"inputs": [ONE], "max_iter": 2.5}, "invalid_parameter"),
        ({"inputs": [ONE], "solver": "newton"}, "invalid_parameter"),  # unknown solver
        ({"inputs": [ONE], "deadline_ms": -1}, "invalid_parameter"),
        ({"inputs": [ONE], "tolerance": 1e-3}, "invalid_parameter"),  # misspelt knob
        ({"inputs": [ONE] * 9}, "batch_too_large"),  # over FPN_MAX_BATCH_SIZE=8
    ],
)
def test_predict_422(client, body, code) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post(PREDICT, **kwargs)
    assert response.status_code == 422, response.text
    assert error_of(response) == code


def _binary_nan() -> tuple[bytes, dict]:
    x = np.full(784, 0.5, dtype="<f4")
    x[3] = np.nan
    head = httpx.Request("POST", "/", json={"inputs": [{
        "name": "input", "shape": [1, 784], "datatype": "FP32",
        "parameters": {"binary_data_size": x.nbytes}}]}).content  # fmt: skip
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize(
    "body, code",
    [
        ({"inputs": [v2_input(datatype="FP64")]}, "invalid_input"),  # unsupported dtype
        ({"inputs": [v2_input(datatype="UINT8", value=256)]}, "invalid_input"),
        ({"inputs": [v2_input(datatype="UINT8", value=0.5)]}, "invalid_input"),
        ({"inputs": [{**v2_input(), "shape": [1, 1, 28, 27]}]}, "invalid_input"),  # shape/data
        ({"inputs": [v2_input(value=2.0)]}, "invalid_input"),  # outside [0, 1]
        ({"inputs": [v2_input(), v2_input()]}, "invalid_input"),  # two inputs
        ({"inputs": []}, "invalid_parameter"),
        ({"inputs": [v2_input()], "parameters": {"tol": 5}}, "invalid_parameter"),
        ({"inputs": [v2_input()], "parameters": {"solver": "x"}}, "invalid_parameter"),
        ({"inputs": [v2_input()], "outputs": [{"name": "logits"}]}, "invalid_parameter"),
        ({"inputs": [v2_input(9)]}, "batch_too_large"),
        ("binary-nan", "invalid_input"),  # NaN in an FP32 tensor
    ],
)
def test_infer_422(client, body, code) -> None:
    if body == "binary-nan":
        content, headers = _binary_nan()
        response = client.post(INFER, content=content, headers=headers)
    else:
        response = client.post(INFER, json=body)
    assert response.status_code == 422, response.text
    assert error_of(response) == code


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/models/nope/predict"),
        ("GET", "/v1/models/nope"),
        ("POST", "/v2/models/nope/infer"),
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
    ],
)
def test_unknown_model_is_404(client, method, path) -> None:
    response = client.request(method, path, json={"inputs": [ONE]})
    assert response.status_code == 404
    assert error_of(response) == "model_not_found"
    assert "fake-model" in response.json()["message"]  # says what exists


def test_unknown_route_is_404_json(client) -> None:
    assert error_of(client.get("/v3/whatever")) == "not_found"


def test_body_over_limit_is_413_before_parsing(fake_dir) -> None:
    with TestClient(create_app(settings(fake_dir, max_body_bytes=2048))) as client:
        wait_ready(client)
        big = b"{" + b" " * 4096 + b"}"  # valid JSON, if anyone parsed it
        response = client.post(PREDICT, content=big)
        assert response.status_code == 413 and error_of(response) == "body_too_large"
        chunked = client.post(INFER, content=iter([b" " * 1024] * 4))  # no Content-Length
        assert chunked.status_code == 413 and error_of(chunked) == "body_too_large"
        assert client.post(PREDICT, json={"inputs": [[0.5] * 784]}).status_code == 413
        assert client.post(PREDICT, json={"inputs": [[0] * 784]}).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
def test_reload_without_the_right_token_is_401(client, headers) -> None:
    response = client.post(f"/v1/models/{MODEL}/reload", headers=headers)
    assert response.status_code == 401 and error_of(response) == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_reload_is_404_when_no_token_is_configured(fake_dir) -> None:
    with TestClient(create_app(settings(fake_dir))) as client:
        response = client.post(f"/v1/models/{MODEL}/reload", headers={"Authorization": "Bearer x"})
        assert response.status_code == 404 and error_of(response) == "not_found"


def test_a_checkpoint_the_backend_cannot_serve_is_skipped_not_fatal(
    tmp_path, fake_backend, monkeypatch, caplog
) -> None:
    for name in ("servable", "unservable"):
        save_checkpoint(
            create_model(ModelConfig(arch=ArchConfig(kind="mlp", width=8))), tmp_path / name
        )
    load = FakeBackend.load

    def refuse_unservable(self, path, **kwargs):
        if Path(path).name == "unservable":
            raise UnsupportedModel(f"{path}: the fake backend cannot serve this family")
        return load(self, path, **kwargs)

    monkeypatch.setattr(FakeBackend, "load", refuse_unservable)
    with TestClient(create_app(settings(tmp_path))) as client:
        wait_ready(client)
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["servable"]
        assert client.get("/v1/models/unservable").status_code == 404
    assert "skipping model unservable" in caplog.text


def test_not_ready_is_503_until_warm(fake_dir, fake_backend) -> None:
    gate = threading.Event()
    fake_backend.gate = gate  # warm-up blocks here
    with TestClient(create_app(settings(fake_dir))) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
            response = client.get(path)
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        response = client.post(PREDICT, json={"inputs": [ONE]})
        assert response.status_code == 503 and error_of(response) == "not_ready"
        assert int(response.headers["Retry-After"]) >= 1
        gate.set()
        wait_ready(client)
        assert client.post(PREDICT, json={"inputs": [ONE]}).status_code == 200


def test_full_queue_is_503_with_retry_after(fake_dir, fake_backend) -> None:
    app = create_app(settings(fake_dir, max_batch_size=1, max_queue_size=1))
    gate = threading.Event()

    async def scenario(client: httpx.AsyncClient):
        fake_backend.gate = gate
        batcher = app.state.registry.models[MODEL].scheduler
        solving = asyncio.create_task(client.post(PREDICT, json={"inputs": [ONE]}))
        while batcher.batches < 1:  # the first request is now held in the solve
            await asyncio.sleep(0.005)
        queued = asyncio.create_task(client.post(PREDICT, json={"inputs": [ONE]}))
        while batcher.queued < 1:
            await asyncio.sleep(0.005)
        refused = await client.post(PREDICT, json={"inputs": [ONE]})
        gate.set()
        return refused, await solving, await queued

    refused, solving, queued = asyncio.run(run_app(app, scenario))
    assert refused.status_code == 503 and error_of(refused) == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    assert (solving.status_code, queued.status_code) == (200, 200)


# --- batching -----------------------------------------------------------------------------------
def test_bad_requests_never_disturb_their_batch(fake_dir, fake_backend) -> None:
    app = create_app(settings(fake_dir, max_queue_delay_ms=300))
    bodies = [
        {"inputs": [ONE], "tol": 1e-2},
        {"inputs": [[[2.0] * 28] * 28]},  # out of range
        {"inputs": [[[0.1] * 28] * 28], "tol": 1e-5},
        {"inputs": [ONE], "solver": "newton"},
        {"inputs": [[[0.95] * 28] * 28], "tol": 1e-4, "max_iter": 2},
    ]

    async def scenario(client):
        return await asyncio.gather(*(client.post(PREDICT, json=b) for b in bodies))

    responses = asyncio.run(run_app(app, scenario))
    assert [r.status_code for r in responses] == [200, 422, 200, 422, 200]
    good = [responses[i].json() for i in (0, 2, 4)]
    assert len({g["batch"]["id"] for g in good}) == 1 and good[0]["batch"]["size"] == 3
    assert [g["predictions"][0]["iterations"] for g in good] == [2, 5, 2]
    assert [g["predictions"][0]["converged"] for g in good] == [True, True, False]
    assert [g["predictions"][0]["label"] for g in good] == [5, 1, 9]
    (batch,) = fake_backend.calls[-1:]
    assert batch.tol.tolist() == [1e-2, 1e-5, 1e-4] and batch.max_iter.tolist() == [50, 50, 2]


def test_one_batch_runs_one_solver(fake_dir, fake_backend) -> None:
    app = create_app(settings(fake_dir, max_queue_delay_ms=200))
    solvers = ["picard", "anderson", "picard", "anderson", "picard"]

    async def scenario(client):
        return await asyncio.gather(
            *(client.post(PREDICT, json={"inputs": [ONE], "solver": s}) for s in solvers)
        )

    replies = [r.json() for r in asyncio.run(run_app(app, scenario))]
    batch_of = {
        s: {r["batch"]["id"] for r, t in zip(replies, solvers, strict=True) if t == s}
        for s in solvers
    }
    assert all(len(ids) == 1 for ids in batch_of.values())
    assert batch_of["picard"] != batch_of["anderson"]
    assert sorted(c.solver for c in fake_backend.calls[-2:]) == ["anderson", "picard"]


def test_shutdown_solves_what_is_queued(fake_dir, fake_backend) -> None:
    app = create_app(settings(fake_dir, max_queue_delay_ms=5_000))

    async def main():
        async with app.router.lifespan_context(app):
            while not app.state.registry.ready:
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://fpn")
            pending = [
                asyncio.create_task(client.post(PREDICT, json={"inputs": [ONE]})) for _ in range(3)
            ]
            while app.state.registry.models[MODEL].scheduler.queued < 3:
                await asyncio.sleep(0.005)
            started = time.perf_counter()
        # The lifespan exited: queued requests were solved without waiting out the 5 s delay.
        responses = await asyncio.gather(*pending)
        await client.aclose()
        return responses, time.perf_counter() - started

    responses, seconds = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 3
    assert seconds < 2.0


def test_startup_fails_naming_the_broken_file(tmp_path) -> None:
    model = create_model(ModelConfig(arch=ArchConfig(kind="mlp", width=8)))
    save_checkpoint(model, tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    app = create_app(Settings(model_dir=tmp_path))
    with pytest.raises(Exception, match=r"model\.safetensors"), TestClient(app):
        pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with (
        pytest.raises(Exception, match="no checkpoints"),
        TestClient(create_app(Settings(model_dir=empty))),
    ):
        pass


def test_serving_tunes_the_interpreter_once_models_are_loaded() -> None:
    """Start-up objects leave the collector's view; threshold and switch interval as set."""
    import gc
    import sys

    from service.interpreter import tune_for_serving

    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        alive = [object() for _ in range(10)]  # noqa: F841 - alive at "start-up"
        tune_for_serving(gc_threshold=12_345, switch_interval_ms=0.25)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == 12_345
        assert sys.getswitchinterval() == pytest.approx(0.00025)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
