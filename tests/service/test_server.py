"""End to end: a real ``fpn-serve`` process on a loopback port, spoken to over HTTP."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from conftest import served_device
from prometheus_client.parser import text_string_to_metric_families
from service_support import intensities, png_base64

MODEL = "mnist-tiny"
PREDICT = f"/v1/models/{MODEL}/predict"
INFER = f"/v2/models/{MODEL}/infer"


# --- helpers ------------------------------------------------------------------------------------
def predict(url: str, x: np.ndarray, **knobs) -> dict:
    response = httpx.post(url + PREDICT, json={"inputs": x.tolist(), **knobs}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client: {(name, labels): value}."""
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def post_all(url: str, bodies: list[dict], path: str = PREDICT) -> list[httpx.Response]:
    """POST every body at once (one connection each), answers in the order of ``bodies``."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def stable_image(offline, digits: np.ndarray, tols: list[float]) -> np.ndarray:
    """An image whose iteration count at each tol is the same solved alone or in a batch.

    Batched float32 GEMMs round differently from single-row ones, so a sample whose residual
    lands within rounding of its tol (about 1 in 300 at tol=1e-6) may take one iteration more or
    less in a different batch. The batcher is what is under test, not float rounding.
    """
    for image in digits[:64]:
        batch = np.repeat(image[None], len(tols), axis=0)
        together = offline.predict(batch, tol=np.array(tols), max_iter=200)
        alone = [offline.alone(image[None], tol=t, max_iter=200)[0][1] for t in tols]
        if together.stats.iterations.tolist() == alone:
            return image
    raise AssertionError("no image with rounding-stable iteration counts")


# --- predictions --------------------------------------------------------------------------------
def test_health_and_listing(server, backend) -> None:
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").json()["ready"] is True
    (model,) = httpx.get(server.url + "/v1/models").json()["models"]
    assert model["name"] == MODEL
    device = served_device(backend)  # FPN_DEVICE=auto
    assert (model["family"], model["device"], model["backend"]) == ("fpn", device, backend)
    assert model["input_shape"] == [1, 28, 28] and len(model["classes"]) == 10
    meta = httpx.get(server.url + f"/v1/models/{MODEL}").json()
    assert meta["solver_defaults"] == {"method": "anderson", "tol": 1e-4, "max_iter": 50}
    assert meta["limits"]["min_tol"] == 1e-6 and meta["limits"]["max_iter_limit"] == 500


def test_predictions_equal_offline_predictions(server, offline, digits, mnist_test) -> None:
    x = digits[:32]
    body = predict(server.url, x, return_probabilities=True)
    reference = offline.predict(x)
    got = body["predictions"]
    assert [p["label"] for p in got] == reference.logits.argmax(1).tolist()
    assert [p["iterations"] for p in got] == reference.stats.iterations.tolist()
    assert [p["converged"] for p in got] == reference.stats.converged.tolist()
    np.testing.assert_allclose(
        [p["residual"] for p in got], reference.stats.residual.numpy(), rtol=1e-4, atol=1e-9
    )
    np.testing.assert_allclose(
        [p["probabilities"] for p in got],
        reference.logits.softmax(1).numpy(),
        rtol=1e-4,
        atol=1e-6,
    )
    accuracy = np.mean([p["label"] for p in got] == mnist_test[1][:32])
    assert accuracy >= 0.75  # a few seconds of training; the point is equality above


def test_looser_tol_takes_fewer_iterations(server, digits) -> None:
    loose = predict(server.url, digits[:1], tol=1e-2)["predictions"][0]
    tight = predict(server.url, digits[:1], tol=1e-6)["predictions"][0]
    assert loose["converged"] and tight["converged"]
    assert loose["iterations"] < tight["iterations"]
    assert tight["residual"] <= 1e-6 < loose["residual"] <= 1e-2


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_max_iter_one_is_one_unconverged_iteration(server, digits, solver) -> None:
    (p,) = predict(server.url, digits[:1], max_iter=1, tol=1e-6, solver=solver)["predictions"]
    assert p["iterations"] == 1
    assert p["converged"] is False
    assert p["residual"] > 1e-6


def test_concurrent_tolerances_each_get_their_solo_depth(
    batching_server, backend, offline, digits
) -> None:
    tols = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    image = stable_image(offline, digits, tols)
    alone = [offline.alone(image[None], tol=t, max_iter=200)[0][1] for t in tols]
    before = scrape(batching_server.url)
    bodies = [{"inputs": [image.tolist()], "tol": t, "max_iter": 200} for t in tols]
    responses = asyncio.run(post_all(batching_server.url, bodies))
    after = scrape(batching_server.url)
    replies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses)
    assert [r["predictions"][0]["iterations"] for r in replies] == alone
    assert len(set(alone)) > 2  # the tolerances really asked for different depths
    # The engine (torch) observes fpn_batch_size per iteration, the samples it steps, so its sum
    # counts every iteration of every sample once; the batcher (onnxruntime) per batch solve.
    label = {"model": MODEL}
    stepped = metric(after, "fpn_batch_size_sum", **label) - metric(
        before, "fpn_batch_size_sum", **label
    )
    assert stepped == (sum(alone) if backend == "torch" else len(tols))


def test_200_concurrent_requests_all_answered_once(server, offline, digits) -> None:
    n = 200
    x = digits[:n]
    expected = offline.alone(x)
    before = scrape(server.url)
    responses = asyncio.run(post_all(server.url, [{"inputs": [row.tolist()]} for row in x]))
    after = scrape(server.url)
    assert [r.status_code for r in responses] == [200] * n
    got = [(r.json()["predictions"][0]["label"], r.json()["predictions"][0]["iterations"])
           for r in responses]  # fmt: skip
    assert got == expected  # every answer is its own request's answer: none lost, mixed or doubled
    label = {"model": MODEL}
    assert (
        metric(after, "fpn_samples_total", **label) - metric(before, "fpn_samples_total", **label)
        == n
    )
    ok = {"model": MODEL, "endpoint": "predict", "code": "200"}
    assert (
        metric(after, "fpn_requests_total", **ok) - metric(before, "fpn_requests_total", **ok) == n
    )
    batches = metric(after, "fpn_batch_size_count", **label) - metric(
        before, "fpn_batch_size_count", **label
    )
    assert 1 <= batches <= n


def test_png_upload_is_classified_like_its_pixels(server, offline, mnist_test) -> None:
    images, labels = mnist_test
    x = intensities(images[:50])
    reference = offline.predict(x).logits.argmax(1).numpy()
    i = int(np.flatnonzero(reference == labels[:50])[0])  # a digit the tiny model gets right
    body = {"images": [png_base64(images[i])], "top_k": 3}
    response = httpx.post(server.url + PREDICT, json=body)
    assert response.status_code == 200, response.text
    (p,) = response.json()["predictions"]
    assert p["label"] == labels[i] and p["class"] == str(labels[i])
    assert len(p["top_k"]) == 3 and p["top_k"][0]["class"] == p["class"]
    assert p["iterations"] == offline.alone(x[i : i + 1])[0][1]


def test_v2_infer_round_trip(server, offline, digits) -> None:
    x = digits[:3]
    body = {
        "id": "req-1",
        "inputs": [{"name": "input", "shape": [3, 1, 28, 28], "datatype": "FP32",
                    "data": x.ravel().tolist()}],
        "parameters": {"tol": 1e-3, "max_iter": 40, "solver": "picard"},
    }  # fmt: skip
    response = httpx.post(server.url + INFER, json=body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["model_name"] == MODEL and reply["id"] == "req-1"
    outputs = {o["name"]: o for o in reply["outputs"]}
    metadata = httpx.get(server.url + f"/v2/models/{MODEL}").json()
    # Every output the metadata announces (extras included) comes back with its datatype.
    assert set(outputs) == {o["name"] for o in metadata["outputs"]}
    for announced in metadata["outputs"]:
        got = outputs[announced["name"]]
        assert got["datatype"] == announced["datatype"]
        assert got["shape"] == [3, *announced["shape"][1:]]
        assert len(got["data"]) == int(np.prod(got["shape"]))
    reference = offline.predict(x, tol=1e-3, max_iter=40, solver="picard")
    assert outputs["label"]["data"] == reference.logits.argmax(1).tolist()
    assert outputs["iterations"]["data"] == reference.stats.iterations.tolist()
    assert outputs["converged"]["data"] == reference.stats.converged.tolist()
    # UINT8 pixels, nested data, and only the outputs asked for.
    pixels = (x * 255).round().astype(np.uint8)
    body = {
        "inputs": [{"name": "input", "shape": [3, 1, 28, 28], "datatype": "UINT8",
                    "data": pixels.tolist()}],
        "outputs": [{"name": "label"}, {"name": "iterations"}],
    }  # fmt: skip
    reply = httpx.post(server.url + INFER, json=body).json()
    assert [o["name"] for o in reply["outputs"]] == ["label", "iterations"]
    assert reply["outputs"][0]["data"] == offline.predict(x).logits.argmax(1).tolist()


def test_v2_health_and_metadata(server) -> None:
    assert httpx.get(server.url + "/v2").json()["name"] == "fpn-serve"
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    assert httpx.get(server.url + f"/v2/models/{MODEL}/ready").status_code == 200
    meta = httpx.get(server.url + f"/v2/models/{MODEL}").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]


# --- metrics ------------------------------------------------------------------------------------
def test_metrics_expose_every_spec_metric(server, digits, backend, spec_metrics) -> None:
    predict(server.url, digits[:2])
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in spec_metrics.items():
        family_name = name.removesuffix("_total") if kind == "counter" else name
        assert family_name in families, f"{name} missing from /metrics"
        assert families[family_name].type == kind
    info = families["fpn_model_info"].samples
    device = served_device(backend)
    assert [s.labels for s in info] == [
        {"model": MODEL, "family": "fpn", "backend": backend, "device": device}
    ]
    buckets = [
        float(s.labels["le"]) for s in families["fpn_solver_iterations"].samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    ]  # fmt: skip
    assert buckets == [1, 2, 3, 5, 8, 12, 20, 30, 50, 75, 100, 150, 200, 300, 500]


def test_metric_counts_match_requests_sent(server, backend, digits) -> None:
    before = scrape(server.url)
    results = [predict(server.url, digits[i : i + 2], tol=1e-3) for i in range(0, 8, 2)]  # 4 x 2
    results.append(predict(server.url, digits[:3], max_iter=1, tol=1e-6))  # 3 unconverged
    bad = httpx.post(server.url + PREDICT, json={"inputs": [[2.0]]})
    missing = httpx.post(server.url + "/v1/models/nope/predict", json={})
    v2 = httpx.post(server.url + INFER, json={"inputs": [{"name": "input", "shape": [1, 784],
                    "datatype": "FP32", "data": digits[0].ravel().tolist()}]})  # fmt: skip
    assert (bad.status_code, missing.status_code, v2.status_code) == (422, 404, 200)
    after = scrape(server.url)

    def delta(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    m = {"model": MODEL}
    assert delta("fpn_requests_total", code="200", endpoint="predict", **m) == 5
    assert delta("fpn_requests_total", code="422", endpoint="predict", **m) == 1
    assert delta("fpn_requests_total", code="404", endpoint="predict", model="") == 1
    assert delta("fpn_requests_total", code="200", endpoint="infer", **m) == 1
    assert delta("fpn_request_duration_seconds_count", endpoint="predict", **m) == 6
    assert delta("fpn_request_duration_seconds_count", endpoint="infer", **m) == 1
    samples = 4 * 2 + 3 + 1
    assert delta("fpn_samples_total", **m) == samples
    assert delta("fpn_solver_iterations_count", **m) == samples
    assert delta("fpn_solver_residual_count", **m) == samples
    assert delta("fpn_queue_duration_seconds_count", **m) == 6  # one per queued request
    predictions = [p for r in results for p in r["predictions"]]
    v2_out = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    iterations = sum(p["iterations"] for p in predictions) + sum(v2_out["iterations"])
    assert delta("fpn_solver_iterations_sum", **m) == iterations
    failed = sum(not p["converged"] for p in predictions) + v2_out["converged"].count(False)
    assert failed >= 3
    assert delta("fpn_solver_nonconverged_total", **m) == failed
    if backend == "torch":  # the engine: one batch-size observation per iteration, one solve
        # duration per sample
        assert delta("fpn_batch_size_count", **m) == delta("fpn_engine_iterations_total", **m) > 0
        assert delta("fpn_solve_duration_seconds_count", **m) == samples
    else:  # the batcher: sequential requests, one batch and one solve each
        assert delta("fpn_batch_size_count", **m) == 6
        assert delta("fpn_solve_duration_seconds_count", **m) == 6
    assert metric(after, "fpn_queue_depth", **m) == 0
