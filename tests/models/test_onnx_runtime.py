"""The export package's two promises outside parity: the onnxruntime backend runs without torch,
and the graphs compute SPEC §5's residual exactly as :func:`models.solvers.relative_residual`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from models.solvers import relative_residual

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from models.onnx import graph as G  # noqa: E402
from models.onnx.runtime import onnx_session  # noqa: E402


@pytest.mark.parametrize(
    "module", ["service.backends.onnx_backend", "models.onnx.runtime", "models.checkpoint_files"]
)
def test_serving_an_export_does_not_import_torch(module) -> None:
    code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def residual_session(shape: tuple[int, ...]):
    """A graph ``(fz, z) -> residual`` written by the exporter's own builder."""
    from onnx import TensorProto as TP
    from onnx import helper

    names = G.Names()
    g = G.Graph(names)
    res = G.relative_residual(g, "fz", "z")
    g.nodes.append(helper.make_node("Identity", [res], ["residual"]))
    inputs = [helper.make_tensor_value_info(n, TP.FLOAT, [None, *shape]) for n in ("fz", "z")]
    output = helper.make_tensor_value_info("residual", TP.FLOAT, [None])
    graph = helper.make_graph(g.nodes, "residual", inputs, [output], names.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = min(proto.ir_version, 10)
    return onnx_session(proto.SerializeToString())


def edge_cases(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (fz, z): random at several scales, zeros, a zero image, huge and tiny norms,
    near-overflow, inf and NaN entries."""
    rng = np.random.default_rng(0)
    fz = [rng.normal(0, s, n) for s in (1e-3, 1.0, 1e3)]
    z = [f + rng.normal(0, 1e-2, n) for f in fz]

    def add(a, b):
        fz.append(np.asarray(a, np.float64) * np.ones(n))
        z.append(np.asarray(b, np.float64) * np.ones(n))

    add(0.0, 0.0)  # both zero: 0 / max(0, 1e-12) = 0
    add(0.0, 1.0)  # f(z) = 0: the 1e-12 floor
    add(1.0, 1.0)  # a fixed point
    add(1e-30, 2e-30)  # below the floor
    add(1e18, 1e18 * (1 + 1e-6))  # large but finite squares
    add(1e30, 0.0)  # squares overflow float32
    add(3e38, -3e38)  # the difference overflows
    add(np.inf, 1.0)  # non-finite image
    add(1.0, np.inf)  # non-finite iterate
    add(np.nan, 1.0)
    fz_rows, z_rows = np.stack(fz), np.stack(z)
    fz_rows[1, 3] = np.inf  # one entry
    return fz_rows.astype(np.float32), z_rows.astype(np.float32)


@pytest.mark.parametrize("shape", [(12,), (2, 3, 3)])
def test_the_graph_residual_is_relative_residual(shape) -> None:
    n = int(np.prod(shape))
    fz, z = edge_cases(n)
    fz, z = fz.reshape(-1, *shape), z.reshape(-1, *shape)
    (got,) = residual_session(shape).run(["residual"], {"fz": fz, "z": z})
    want = relative_residual(torch.from_numpy(fz), torch.from_numpy(z)).numpy()
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
