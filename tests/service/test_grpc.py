"""The Open Inference Protocol over gRPC, against a real ``fpn-serve``, spoken to by NVIDIA's
``tritonclient.grpc`` unchanged (its client, and its own generated stubs for typed contents)."""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
from test_server import INFER, MODEL, metric, scrape

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

CORE = ("probabilities", "label", "iterations", "residual", "converged")


# --- helpers ------------------------------------------------------------------------------------
def client(server) -> tritonclient_grpc.InferenceServerClient:
    return tritonclient_grpc.InferenceServerClient(server.grpc_url)


def infer(server, x: np.ndarray, model: str = MODEL, **kwargs):
    """tritonclient's infer with raw FP32 contents (what ``set_data_from_numpy`` sends)."""
    tensor = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return client(server).infer(model, [tensor], **kwargs)


def grpc_error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def typed_request(x: np.ndarray, datatype: str = "FP32") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed-1")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(x.shape))
    if datatype == "FP32":
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        tensor.contents.uint_contents.extend(x.ravel().astype(int).tolist())
    return request


def http_v2(server, x: np.ndarray, **parameters) -> dict[str, list]:
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "data": x.ravel().tolist()}],
        "parameters": parameters,
    }  # fmt: skip
    response = httpx.post(server.url + INFER, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


# --- health and metadata ------------------------------------------------------------------------
def test_health_and_metadata(server) -> None:
    c = client(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    meta = c.get_server_metadata()
    assert meta.name == "fpn-serve" and "binary_tensor_data" in meta.extensions
    model = c.get_model_metadata(MODEL, as_json=True)
    http = httpx.get(server.url + f"/v2/models/{MODEL}").json()
    assert model["name"] == MODEL and model["platform"] == http["platform"]
    for key in ("inputs", "outputs"):  # one output schema for both protocols
        got = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model[key]]
        assert got == [(t["name"], t["datatype"], t["shape"]) for t in http[key]]
    assert [t["name"] for t in model["outputs"]][:5] == list(CORE)
    assert grpc_error(c.is_model_ready, "nope").status() == "StatusCode.NOT_FOUND"
    assert grpc_error(c.get_model_metadata, "nope").status() == "StatusCode.NOT_FOUND"


# --- inference ----------------------------------------------------------------------------------
def test_raw_contents_round_trip(server, offline, digits) -> None:
    x = digits[:3]
    result = infer(server, x, request_id="raw-1", parameters={"tol": 1e-3, "solver": "picard"})
    response = result.get_response()
    assert response.id == "raw-1" and response.model_name == MODEL
    assert len(response.raw_output_contents) == len(response.outputs)  # raw in, raw out
    reference = offline.predict(x, tol=1e-3, solver="picard")
    assert result.as_numpy("label").tolist() == reference.logits.argmax(1).tolist()
    assert result.as_numpy("iterations").tolist() == reference.stats.iterations.tolist()
    assert result.as_numpy("converged").tolist() == reference.stats.converged.tolist()
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.logits.softmax(1).numpy(), rtol=1e-4, atol=1e-6
    )
    assert result.as_numpy("probabilities").shape == (3, 10)
    assert response.parameters["solver"].string_param == "picard"
    assert response.parameters["tol"].double_param == 1e-3


def test_typed_contents_round_trip(server, offline, digits, mnist_test) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
    x = digits[:2]
    response = stub.ModelInfer(typed_request(x), timeout=30)
    assert not response.raw_output_contents  # typed in, typed out
    outputs = {o.name: o for o in response.outputs}
    reference = offline.predict(x)
    assert list(outputs["label"].contents.int64_contents) == reference.logits.argmax(1).tolist()
    assert list(outputs["iterations"].contents.int_contents) == (
        reference.stats.iterations.tolist()
    )
    assert list(outputs["converged"].contents.bool_contents) == reference.stats.converged.tolist()
    assert len(outputs["probabilities"].contents.fp32_contents) == 20
    assert list(outputs["probabilities"].shape) == [2, 10]
    # UINT8 pixels, scaled by the checkpoint: the same answer as the intensities they make.
    pixels = mnist_test[0][:2][:, None]
    response = stub.ModelInfer(typed_request(pixels, "UINT8"), timeout=30)
    labels = {o.name: o for o in response.outputs}["label"].contents.int64_contents
    expected = offline.predict(pixels.astype(np.float32) / 255).logits.argmax(1)
    assert list(labels) == expected.tolist()


def test_parameters_are_honoured(server, digits) -> None:
    loose = infer(server, digits[:1], parameters={"tol": 1e-2})
    tight = infer(server, digits[:1], parameters={"tol": 1e-6})
    assert loose.as_numpy("iterations")[0] < tight.as_numpy("iterations")[0]
    assert loose.as_numpy("converged")[0] and tight.as_numpy("converged")[0]
    for solver in ("picard", "anderson"):
        one = infer(server, digits[:1], parameters={"max_iter": 1, "tol": 1e-6, "solver": solver})
        assert one.as_numpy("iterations").tolist() == [1]
        assert one.as_numpy("converged").tolist() == [False]
        assert one.get_response().parameters["solver"].string_param == solver
    # Parameters may come as strings too (clients without a double parameter type).
    text = infer(server, digits[:1], parameters={"tol": "1e-2", "max_iter": "50"})
    assert text.as_numpy("iterations").tolist() == loose.as_numpy("iterations").tolist()
    with_deadline = infer(server, digits[:1], parameters={"deadline_ms": 10_000})
    assert with_deadline.as_numpy("converged").tolist() == [True]
    # Requested outputs only, in the order asked.
    requested = [tritonclient_grpc.InferRequestedOutput(n) for n in ("converged", "label")]
    some = infer(server, digits[:2], outputs=requested).get_response()
    assert [o.name for o in some.outputs] == ["converged", "label"]


def test_same_labels_as_http_v2_on_1000_mnist_images(server, mnist_test) -> None:
    images = mnist_test[0][:1000]
    x = (images.astype(np.float32) / 255.0)[:, None]
    grpc_labels, http_labels = [], []
    for start in range(0, len(x), 64):
        batch = x[start : start + 64]
        grpc_labels += infer(server, batch).as_numpy("label").tolist()
        http_labels += http_v2(server, batch)["label"]
    assert len(grpc_labels) == 1000 and grpc_labels == http_labels
    assert np.mean(np.array(grpc_labels) == mnist_test[1][:1000]) >= 0.75


# --- errors -------------------------------------------------------------------------------------
def http_message(server, body: dict, path: str = INFER) -> str:
    return httpx.post(server.url + path, json=body, timeout=30).json()["message"]


@pytest.mark.parametrize(
    "parameters, status",
    [
        ({"tol": 5.0}, "INVALID_ARGUMENT"),
        ({"tol": 1e-9}, "INVALID_ARGUMENT"),
        ({"max_iter": 10_000}, "INVALID_ARGUMENT"),
        ({"solver": "broyden"}, "INVALID_ARGUMENT"),
        ({"deadline_ms": -1}, "INVALID_ARGUMENT"),
    ],
)
def test_parameter_errors_carry_the_http_message(server, digits, parameters, status) -> None:
    error = grpc_error(infer, server, digits[:1], parameters=parameters)
    assert error.status() == f"StatusCode.{status}"
    x = digits[:1]
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "data": x.ravel().tolist()}], "parameters": parameters}  # fmt: skip
    assert error.message() == http_message(server, body)


def test_input_errors_are_invalid_argument(server, digits) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))

    def status(request) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
        return caught.value.code(), caught.value.details()

    wrong_shape = typed_request(np.full((1, 100), 0.5, dtype=np.float32))
    code, message = status(wrong_shape)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in message
    outside = typed_request(np.full((1, 784), 1.5, dtype=np.float32))
    assert status(outside)[0] == grpc.StatusCode.INVALID_ARGUMENT
    nan = typed_request(np.full((1, 784), np.nan, dtype=np.float32))
    assert "NaN or Inf" in status(nan)[1]
    fp64 = typed_request(np.full((1, 784), 0.5, dtype=np.float32))
    fp64.inputs[0].datatype = "FP64"
    assert "FP32 or UINT8" in status(fp64)[1]
    empty = typed_request(np.full((1, 784), 0.5, dtype=np.float32))
    empty.inputs[0].datatype = ""
    assert status(empty)[0] == grpc.StatusCode.INVALID_ARGUMENT
    short_raw = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"\0" * 12])
    short_raw.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    assert "bytes do not match" in status(short_raw)[1]
    unknown_output = typed_request(np.full((1, 784), 0.5, dtype=np.float32))
    unknown_output.outputs.add(name="logits")
    assert "unknown output" in status(unknown_output)[1]
    too_many = typed_request(np.full((65, 784), 0.5, dtype=np.float32))  # FPN_MAX_BATCH_SIZE 64
    code, message = status(too_many)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FPN_MAX_BATCH_SIZE" in message


def test_unknown_model_is_not_found(server, digits) -> None:
    error = grpc_error(infer, server, digits[:1], model="nope")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert (
        error.message()
        == httpx.post(server.url + "/v2/models/nope/infer", json={}).json()["message"]
    )


def test_request_over_the_body_limit_is_resource_exhausted(tiny_queue_server) -> None:
    x = np.full((1, 784), 0.5, dtype=np.float32)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(
        grpc.insecure_channel(tiny_queue_server.grpc_url)
    )
    big = service_pb2.ModelInferRequest(model_name=MODEL)  # FPN_MAX_BODY_BYTES=65536
    big.inputs.add(name="input", datatype="FP32", shape=[24, 784])
    big.raw_input_contents.append(np.repeat(x, 24, axis=0).tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(big, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "FPN_MAX_BODY_BYTES" in caught.value.details()


def test_full_queue_is_unavailable(slow_server) -> None:
    """One solving, one queued (FPN_MAX_QUEUE_SIZE=1): the rest are refused at once."""
    c = tritonclient_grpc.InferenceServerClient(slow_server.grpc_url)
    x = np.full((1, 1, 28, 28), 0.5, dtype=np.float32)
    tensor = tritonclient_grpc.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x)
    outcomes: list = []
    for _ in range(8):
        c.async_infer("slow", [tensor], callback=lambda result, error: outcomes.append(error))
    deadline = time.monotonic() + 60
    while len(outcomes) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    errors = [e for e in outcomes if e is not None]
    assert len(outcomes) == 8 and errors and len(errors) < 8
    assert {e.status() for e in errors} == {"StatusCode.UNAVAILABLE"}
    assert "queued" in errors[0].message()


# --- deadlines and cancellation -----------------------------------------------------------------
def test_a_deadline_caps_iterations_and_a_missed_one_is_cancelled(slow_server) -> None:
    """A full solve of the slow model takes 500 iterations (~200 ms). With a 20 ms gRPC
    deadline the sample's iterations are capped to what fits: the answer, unconverged, makes it
    in time, or arrives just too late, or the call, past its deadline before its answer is
    ready, is counted as cancelled; never an error, never the full solve."""
    x = np.full((1, 1, 28, 28), 0.5, dtype=np.float32)
    full = int(infer(slow_server, x, model="slow").as_numpy("iterations")[0])
    assert full >= 20
    for _ in range(3):
        before = scrape(slow_server.url)
        try:
            result = infer(slow_server, x, model="slow", client_timeout=0.02)
        except InferenceServerException as error:
            assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
            result = None
        time.sleep(0.5)  # the server finishes (or drops) it
        after = scrape(slow_server.url)

        def delta(name: str, after=after, before=before, **labels) -> float:
            return metric(after, name, **labels) - metric(before, name, **labels)

        on_grpc = {"model": "slow", "endpoint": "grpc_infer"}
        cancelled = delta("fpn_requests_cancelled_total", **on_grpc)
        answered = delta("fpn_requests_total", code="200", **on_grpc)
        assert cancelled + answered == 1
        if result is not None:
            assert answered == 1 and result.as_numpy("converged").tolist() == [False]
        assert delta("fpn_solver_iterations_sum", model="slow") < full
        for code in ("500", "503"):
            assert delta("fpn_requests_total", model="slow", endpoint="grpc_infer", code=code) == 0


def test_a_cancelled_call_is_dropped_and_counted(slow_server) -> None:
    """Two calls: the first solves for seconds, the second waits in the queue (one row, one
    queued sample) and is cancelled there once the server holds it; it is never solved."""
    x = np.full((1, 1, 28, 28), 0.5, dtype=np.float32)
    tensor = tritonclient_grpc.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x)
    c = tritonclient_grpc.InferenceServerClient(slow_server.grpc_url)
    assert c.is_server_live()  # the channel is connected: both calls leave at once
    before = scrape(slow_server.url)
    done: list = []
    # The first call solves 5,000 iterations (seconds), so the second surely waits behind it;
    # it is cancelled once the server holds it (the one queued sample).
    c.async_infer(
        "slow", [tensor], callback=lambda result, error: done.append(error),
        parameters={"max_iter": 5000},
    )  # fmt: skip
    time.sleep(0.05)
    queued = c.async_infer("slow", [tensor], callback=lambda result, error: done.append(error))
    held = time.monotonic() + 5
    while time.monotonic() < held:
        if metric(scrape(slow_server.url), "fpn_queue_depth", model="slow") >= 1:
            break
        time.sleep(0.005)
    queued.cancel()
    deadline = time.monotonic() + 30
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    after = scrape(slow_server.url)
    assert done[0] is None or done[1] is None  # the first one was answered

    def delta(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("fpn_requests_cancelled_total", model="slow", endpoint="grpc_infer") == 1
    assert delta("fpn_samples_total", model="slow") == 1  # the cancelled sample never ran
    assert delta("fpn_requests_total", model="slow", endpoint="grpc_infer", code="200") == 1
    assert "Traceback" not in slow_server.log()
