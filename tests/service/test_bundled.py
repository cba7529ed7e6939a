"""The bundled MNIST model (``checkpoints/mnist-fpn``) served end to end."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import Offline
from service_support import intensities, png_base64

PREDICT = "/v1/models/mnist-fpn/predict"

pytestmark = pytest.mark.slow


def test_bundled_model_predictions_match_offline_and_are_accurate(
    bundled_server, bundled_checkpoint, mnist_test
) -> None:
    images, labels = mnist_test
    x = intensities(images[:512])
    got = []
    with httpx.Client(base_url=bundled_server.url, timeout=60) as client:
        for start in range(0, len(x), 64):
            response = client.post(PREDICT, json={"inputs": x[start : start + 64].tolist()})
            assert response.status_code == 200, response.text
            got += response.json()["predictions"]
    reference = Offline(bundled_checkpoint).predict(x)
    assert [p["label"] for p in got] == reference.logits.argmax(1).tolist()
    assert all(p["converged"] for p in got)
    assert np.mean([p["label"] for p in got] == labels[:512]) >= 0.98


def test_png_of_a_test_digit_is_classified_right(bundled_server, mnist_test) -> None:
    images, labels = mnist_test
    body = {"images": [png_base64(images[i]) for i in range(8)], "top_k": 3}
    response = httpx.post(bundled_server.url + PREDICT, json=body, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == labels[:8].tolist()
    assert all(p["iterations"] >= 1 and p["converged"] for p in predictions)


def test_every_bundled_model_offers_only_the_solvers_its_family_runs(
    bundled_server, backend, mnist_test
) -> None:
    """SPEC §5: a model lists what it runs, a request for another solver is a 422 naming them,
    and every answer names the solver that ran (the explicit twin: its fixed depth)."""
    if backend != "torch":
        pytest.skip("the onnxruntime server holds mnist-fpn only")
    x = intensities(mnist_test[0][:2]).tolist()
    offered = {
        "mnist-fpn": ["anderson", "picard"],
        "mnist-skip-deq": ["anderson", "picard"],
        "mnist-opteq": ["anderson", "picard"],
        "mnist-cdeq": ["bosh3", "dopri5"],
        "mnist-linf": ["picard"],
        "mnist-explicit": ["fixed-depth"],
    }
    with httpx.Client(base_url=bundled_server.url, timeout=60) as client:
        for name, solvers in offered.items():
            meta = client.get(f"/v1/models/{name}").json()
            assert sorted(meta["solvers"]) == solvers, name
            path = f"/v1/models/{name}/predict"
            answer = client.post(path, json={"inputs": x}).json()
            assert answer["solver"]["method"] in solvers
            wrong = "anderson" if "anderson" not in solvers else "bosh3"
            refused = client.post(path, json={"inputs": x, "solver": wrong})
            assert refused.status_code == 422, name
            assert refused.json()["error"] == "invalid_parameter"
            assert all(repr(s) in refused.json()["message"] for s in solvers), refused.text
        depth = client.get("/v1/models/mnist-explicit").json()["config"]["arch"]["depth"]
        twin = client.post("/v1/models/mnist-explicit/predict", json={"inputs": x, "tol": 1e-2})
        assert twin.json()["solver"]["method"] == "fixed-depth"
        assert [p["iterations"] for p in twin.json()["predictions"]] == [depth, depth]
