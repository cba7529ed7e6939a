"""The OpenAPI document is exact (SPEC §7): schemathesis, every check enabled, against a real
``fpn-serve`` with the served model's name supplied, finds nothing. Also the specific findings
of a schema-driven fuzzer, checked directly: all-null fields, an empty V2 datatype, the
reload route's 404, ``Allow`` on 405, no ``_created`` series."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN
from test_server import INFER, MODEL, PREDICT

SCHEMATHESIS_CONFIG = """
[parameters]
"path.name" = "{model}"

# A tensor's contents (its shape against the model's input, the count of values against its
# shape, base64 that decodes to a PNG or JPEG) are checked beyond what JSON Schema can state:
# schema-valid bodies of these two routes may still be refused with a 422 that says why.
[[operations]]
include-path-regex = "/(predict|infer)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "422"]
"""


@pytest.mark.slow
def test_schemathesis_finds_no_failure(server, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "st"
    if not st.exists() and shutil.which("st") is None:
        pytest.skip("schemathesis is not installed")
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG.format(model=MODEL))
    command = [
        str(st), "--config-file", str(config), "--no-color", "run",
        f"{server.url}/openapi.json", "--checks", "all", "--max-examples", "25",
        "--workers", "1", "--seed", "1", "--generation-database", "none",
        "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        "--report", "junit", "--report-dir", str(tmp_path / "report"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    closing = done.stdout.strip().splitlines()[-1]
    assert "passed" in done.stdout and "failure" not in closing, done.stdout[-3000:]
    assert "Traceback" not in server.log()


def test_all_null_fields_are_one_of_inputs_or_images(server) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    predict = schema["components"]["schemas"]["PredictRequest"]
    required = sorted(tuple(choice["required"]) for choice in predict["oneOf"])
    assert required == [("images",), ("inputs",)]  # all-null is not schema-valid
    response = httpx.post(server.url + PREDICT, json={"inputs": None, "images": None})
    assert response.status_code == 422


def test_v2_datatype_is_an_enum_and_an_empty_one_is_refused(server) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    assert schema["V2RequestInput"]["properties"]["datatype"]["enum"] == ["FP32", "UINT8"]
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "", "data": [0.5] * 784}]}
    response = httpx.post(server.url + INFER, json=body)
    assert response.status_code == 422 and response.json()["error"] == "invalid_input"


def test_every_status_a_route_answers_is_documented(server) -> None:
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    documented = {
        (path, method): set(op["responses"])
        for path, ops in paths.items()
        for method, op in ops.items()
    }
    assert {"200", "401", "404", "409", "503"} <= documented[("/v1/models/{name}/reload", "post")]
    for path in ("/v1/models/{name}/predict", "/v2/models/{name}/infer"):
        assert {"200", "404", "413", "422", "503"} <= documented[(path, "post")]
    assert {"200", "503"} <= documented[("/readyz", "get")]
    assert {"200", "503"} <= documented[("/v2/health/ready", "get")]
    assert {"200", "404", "503"} <= documented[("/v2/models/{name}/ready", "get")]


def test_405_carries_allow(server) -> None:
    response = httpx.delete(server.url + f"/v1/models/{MODEL}")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    response = httpx.get(server.url + PREDICT)
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_no_created_series(server) -> None:
    assert "_created" not in httpx.get(server.url + "/metrics").text
