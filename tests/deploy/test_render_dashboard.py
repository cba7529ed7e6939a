"""deploy/render_dashboard.py against a fake Prometheus HTTP API on loopback."""

from __future__ import annotations

import json
import struct
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

BUCKETS = ["1", "2", "5", "12", "+Inf"]


class FakePrometheus(BaseHTTPRequestHandler):
    """Answers /api/v1/query_range and /api/v1/query with small, plausible data."""

    queries: ClassVar[list[tuple[str, dict[str, str]]]] = []
    fail_with: ClassVar[str | None] = None

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        type(self).queries.append((url.path, params))
        if self.fail_with:
            body = {"status": "error", "errorType": "bad_data", "error": self.fail_with}
            return self._send(400, body)
        expr = params["query"]
        if url.path == "/api/v1/query":
            info = {
                "__name__": "fpn_model_info",
                "model": "mnist-fpn",
                "family": "fpn",
                "backend": "torch",
                "device": "cpu",
            }
            return self._send(200, self._result("vector", [{"metric": info, "value": [1, "1"]}]))
        if url.path != "/api/v1/query_range":
            return self._send(404, {"status": "error", "error": "not found"})
        start, end, step = (float(params[k]) for k in ("start", "end", "step"))
        times = [start + i * step for i in range(int((end - start) / step) + 1)]
        if "sum by (le)" in expr:
            series = [
                {"metric": {"le": le}, "values": [[t, str(5.0 * (i + 1))] for t in times]}
                for i, le in enumerate(BUCKETS)
            ]
        else:
            series = [
                {
                    "metric": {"model": "mnist-fpn", "endpoint": "predict", "code": "200"},
                    "values": [[t, str(0.01 * (1 + j % 7))] for j, t in enumerate(times)],
                }
            ]
        return self._send(200, self._result("matrix", series))

    @staticmethod
    def _result(kind, result):
        return {"status": "success", "data": {"resultType": kind, "result": result}}

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def fake_prometheus() -> Iterator[tuple[str, type[FakePrometheus]]]:
    handler = type("Handler", (FakePrometheus,), {"queries": [], "fail_with": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
        server.server_close()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_substitutes_every_template_variable_form(render_dashboard):
    sub = render_dashboard.substitute
    expr = 'rate(m{model=~"$model"}[$__rate_interval]) + x{a=~"${model}"} + y{b=~"[[model]]"}'
    assert sub(expr, rate_interval="2m") == ('rate(m{model=~".*"}[2m]) + x{a=~".*"} + y{b=~".*"}')
    assert sub('m{model=~"${model:regex}"}', model="a.b") == 'm{model=~"a\\\\.b"}'
    assert sub("max_over_time(m[$__interval])", interval="15s") == "max_over_time(m[15s])"
    assert sub("increase(m[$__range])", range_="1h") == "increase(m[1h])"


def test_unknown_variables_and_bad_durations_are_errors(render_dashboard):
    with pytest.raises(ValueError, match=r"\$cluster"):
        render_dashboard.substitute('m{cluster="$cluster"}')
    with pytest.raises(ValueError, match="duration"):
        render_dashboard.substitute("rate(m[$__rate_interval])", rate_interval="1 minute")


def test_reads_every_target_of_the_dashboard(render_dashboard, dashboard):
    queries = render_dashboard.dashboard_queries(dashboard)
    targets = [
        t["expr"]
        for p in render_dashboard.iter_panels(dashboard)
        for t in p.get("targets", [])
        if t.get("expr")
    ]
    assert [q.expr for q in queries] == targets
    instant = [q for q in queries if q.instant]
    assert [q.panel_type for q in instant] == ["table"]
    assert render_dashboard.template_variable_queries(dashboard) == [
        "label_values(fpn_model_info, model)"
    ]


def test_renders_every_panel_into_one_png(render_dashboard, dashboard, fake_prometheus, tmp_path):
    url, handler = fake_prometheus
    out = tmp_path / "dashboard.png"
    code = render_dashboard.main(
        [
            "--prometheus-url",
            url,
            "--out",
            str(out),
            "--range",
            "10m",
            "--step",
            "30s",
            "--end",
            "1700000000",
            "--rate-interval",
            "45s",
        ]
    )
    assert code == 0
    width, height = png_size(out.read_bytes())
    assert width > 1000 and height > 1000
    expected = {
        render_dashboard.substitute(q.expr, rate_interval="45s", interval="30s", range_="600s")
        for q in render_dashboard.dashboard_queries(dashboard)
    }
    asked = {params["query"] for _path, params in handler.queries}
    assert asked == expected
    assert not any("$" in q for q in asked)
    for path, params in handler.queries:
        if path == "/api/v1/query_range":
            assert (params["start"], params["end"], params["step"]) == (
                "1699999400.000",
                "1700000000.000",
                "30",
            )


def test_one_model_is_matched_literally(render_dashboard, fake_prometheus, tmp_path):
    url, handler = fake_prometheus
    code = render_dashboard.main(
        [
            "--prometheus-url",
            url,
            "--out",
            str(tmp_path / "x.png"),
            "--model",
            "mnist.fpn",
            "--panel",
            "queue depth",
        ]
    )
    assert code == 0
    [(_path, params)] = handler.queries
    assert 'model=~"mnist\\\\.fpn"' in params["query"]


def test_prometheus_errors_fail_with_a_message(render_dashboard, fake_prometheus, tmp_path, capsys):
    url, handler = fake_prometheus
    handler.fail_with = "parse error"
    out = tmp_path / "x.png"
    assert render_dashboard.main(["--prometheus-url", url, "--out", str(out)]) == 1
    assert "parse error" in capsys.readouterr().err
    assert not out.exists()


def test_unreachable_prometheus_fails_with_a_message(render_dashboard, free_port, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert (
        render_dashboard.main(
            ["--prometheus-url", url, "--out", str(tmp_path / "x.png"), "--timeout", "2"]
        )
        == 1
    )
    assert "cannot reach Prometheus" in capsys.readouterr().err


def test_bad_arguments_exit_2(render_dashboard, tmp_path, capsys):
    assert render_dashboard.main(["--range", "ten minutes"]) == 2
    assert render_dashboard.main(["--panel", "no such panel", "--out", str(tmp_path / "x")]) == 2
