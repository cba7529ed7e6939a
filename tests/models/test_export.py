"""ONNX export (``models.onnx``, ``fpn-export``) and the onnxruntime backend that serves it.

- Parity: every bundled checkpoint that exports, on 1,000 MNIST test images, with both solvers
  at two tolerances: labels identical, probabilities within 1e-4, iterations within ±1 of torch.
- Every exportable family (tiny models): the exported solve matches torch, extras included.
- Adaptive depth survives export: per-sample ``tol`` / ``max_iter``, non-finite samples stop
  alone, ``solver`` selects the loop.
- ``fpn-export`` writes one self-contained ``model.onnx``; ``cdeq`` fails with a clear message.
- The onnxruntime backend reproduces the torch backend, and refuses what it cannot serve.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import tiny_model
from typer.testing import CliRunner

from models import (
    CheckpointError,
    SolverConfig,
    load_checkpoint,
    save_checkpoint,
)
from models.checkpoint import read_config

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from models.onnx import runtime as R  # noqa: E402
from models.onnx import verify as V  # noqa: E402
from models.onnx.build import build_onnx  # noqa: E402
from models.onnx.cli import app as export_app  # noqa: E402
from models.onnx.export import export_checkpoint  # noqa: E402
from models.onnx.plan import unexportable_reason  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUNDLED = sorted(p.parent.name for p in (REPO / "checkpoints").glob("*/config.json"))
PARITY_TOLS = (1e-4, 1e-6)


SOLVER = SolverConfig(method="anderson", tol=1e-4, max_iter=50, damping=0.9)


def tiny(family: str, kind: str = "mlp", *, options=None, solver=None, depth: int = 3):
    """A small float32 model in eval mode (the dtype the service runs)."""
    return tiny_model(family, kind, dtype=torch.float32, gamma=0.8, depth=depth,
                      options=options, solver=solver or SOLVER)  # fmt: skip


def session_for(model):
    return R.onnx_session(build_onnx(model).SerializeToString())


def assert_parity(c: dict, *, prob_atol: float = 1e-4) -> None:
    """The acceptance rule: labels identical, probabilities within ``prob_atol``, iterations
    within ±1 of torch except rare float32 near-ties at ``tol`` (``models.onnx.verify.NEAR_TIE``),
    extras (``certified_radius_linf``) within 1e-4."""
    summary = V.agreement(c)
    np.testing.assert_array_equal(c["labels_onnx"], c["labels_torch"])
    assert summary["max_probability_diff"] <= prob_atol, summary
    assert summary["max_iteration_diff"] <= 1, summary
    assert summary["near_ties"] <= 0.005 * len(c["tol"]), summary
    for key in c:
        name = key.removesuffix("_torch")
        if key.endswith("_torch") and f"{name}_onnx" in c and name not in (
            "labels", "iterations", "converged", "residual",
        ):  # fmt: skip
            np.testing.assert_allclose(c[f"{name}_onnx"], c[key], rtol=1e-4, atol=1e-6)


# --- parity on MNIST, bundled checkpoints -------------------------------------------------------
@pytest.fixture(scope="module")
def test_images(data_dir: Path):
    """``test_images(name)``: the first 1,000 test images of dataset ``name`` (``mnist``,
    ``fashion-mnist``), (1000, 1, 28, 28) float32 in [0, 1]."""
    from training.data import load_dataset

    cache: dict[str, np.ndarray] = {}

    def images(name: str) -> np.ndarray:
        if name not in cache:
            if not (data_dir / name / "t10k-images-idx3-ubyte.gz").is_file():
                pytest.skip(f"{name} not found under {data_dir}")
            cache[name] = load_dataset(name, "test", data_dir / name).batch(slice(0, 1000)).numpy()
        return cache[name]

    return images


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_checkpoint_matches_torch(name, test_images, tmp_path) -> None:
    """1,000 test images of the checkpoint's dataset (MNIST unless it was trained on another),
    both solvers, tol 1e-4 and 1e-6: same labels, probabilities within 1e-4, iterations ±1."""
    source = REPO / "checkpoints" / name
    document = read_config(source)
    directory = shutil.copytree(source, tmp_path / name)
    model = load_checkpoint(directory).model
    if unexportable_reason(model):  # e.g. cdeq: refused with the reason, nothing written
        with pytest.raises(R.ExportError, match=r"cannot be exported.*FPN_BACKEND=torch"):
            export_checkpoint(directory)
        assert not (directory / "model.onnx").exists()
        return
    x = test_images(document.get("training", {}).get("dataset") or "mnist")
    result = export_checkpoint(directory, samples=100)  # writes model.onnx, like fpn-export
    session = R.onnx_session(result.path)
    for solver in model.solvers():
        for tol in PARITY_TOLS:
            parts = [
                V.compare(model, session, x[i : i + 250], tol=tol,
                          max_iter=model.config.solver.max_iter, solver=solver)
                for i in range(0, 1000, 250)
            ]  # fmt: skip
            c = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            assert_parity(c)


# --- every family, tiny ---------------------------------------------------------------------------
FAMILY_CASES = [
    ("fpn", "conv", {}),
    ("fpn", "mlp", {}),
    ("deq", "mlp", {}),
    ("explicit", "conv", {}),
    ("skip-deq", "conv", {"skip_variant": "skip"}),
    ("skip-deq", "mlp", {"skip_variant": "skip-reg"}),
    ("opteq", "conv", {}),
    ("linf", "mlp", {}),
]


@pytest.mark.parametrize("family, kind, options", FAMILY_CASES)
def test_exported_family_matches_torch(family, kind, options) -> None:
    model = tiny(family, kind, options=options)
    session = session_for(model)
    x = V.verification_inputs(tuple(model.config.input.shape), 48)
    rng = np.random.default_rng(0)
    tol = 10.0 ** rng.uniform(-6, -2, 48)
    max_iter = rng.integers(1, 60, 48)
    for solver in model.solvers():
        c = V.compare(model, session, x, tol=tol, max_iter=max_iter, solver=solver)
        assert_parity(c, prob_atol=1e-5)
        # Same stop, same residual (up to float32 noise, about 1e-6 relative to the state).
        same = c["iterations_onnx"] == c["iterations_torch"]
        assert same.mean() >= 0.9
        np.testing.assert_allclose(
            c["residual_onnx"][same], c["residual_torch"][same], rtol=1e-3, atol=2e-6
        )
        np.testing.assert_array_equal(c["converged_onnx"][same], c["converged_torch"][same])
    if family == "linf":
        assert "certified_radius_linf" in [o.name for o in session.get_outputs()]


# --- adaptive depth semantics -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fpn_onnx():
    model = tiny("fpn", "mlp")
    return model, session_for(model)


def torch_predict(model, x, **knobs):
    knobs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in knobs.items()}
    return model.predict(torch.from_numpy(x), **knobs)


@pytest.mark.parametrize("solver", ("picard", "anderson"))
def test_per_sample_max_iter_and_tol(fpn_onnx, solver) -> None:
    model, session = fpn_onnx
    x = np.repeat(V.verification_inputs((12,), 1), 6, axis=0)
    tol = np.array([1e-12, 1e-12, 1e-12, 1e-2, 1e-4, 1e-6])
    max_iter = np.array([1, 2, 3, 200, 200, 200])
    got = R.run_onnx(session, x, tol=tol, max_iter=max_iter, solver=solver)
    ref = torch_predict(model, x, tol=tol, max_iter=max_iter, solver=solver)
    assert got["iterations"][:3].tolist() == [1, 2, 3]
    assert not got["converged"][:3].any() and got["converged"][3:].all()
    assert got["iterations"][3] < got["iterations"][4] < got["iterations"][5]
    assert np.abs(got["iterations"] - ref.stats.iterations.numpy()).max() <= 1
    assert (got["residual"][3:] <= tol[3:]).all()


def test_a_non_finite_sample_stops_alone(fpn_onnx) -> None:
    model, session = fpn_onnx
    x = V.verification_inputs((12,), 4)
    alone = R.run_onnx(session, x, tol=1e-5, max_iter=100)
    x_bad = x.copy()
    x_bad[1, 3] = np.inf
    got = R.run_onnx(session, x_bad, tol=1e-5, max_iter=100)
    ref = torch_predict(model, x_bad, tol=1e-5, max_iter=100)
    assert got["iterations"][1] == ref.stats.iterations[1] == 1
    assert not got["converged"][1] and not np.isfinite(got["residual"][1])
    keep = [0, 2, 3]
    np.testing.assert_array_equal(got["iterations"][keep], alone["iterations"][keep])
    np.testing.assert_allclose(got["probabilities"][keep], alone["probabilities"][keep], atol=1e-6)


def test_solver_input_is_optional_and_selects_the_loop(fpn_onnx) -> None:
    model, session = fpn_onnx
    x = V.verification_inputs((12,), 8)
    default = R.run_onnx(session, x, tol=1e-6, max_iter=100)  # no "solver" fed
    anderson = R.run_onnx(session, x, tol=1e-6, max_iter=100, solver="anderson")
    picard = R.run_onnx(session, x, tol=1e-6, max_iter=100, solver="picard")
    np.testing.assert_array_equal(default["iterations"], anderson["iterations"])
    assert model.config.solver.method == "anderson"
    assert not np.array_equal(anderson["iterations"], picard["iterations"])


def test_explicit_depth_ignores_tol_and_max_iter() -> None:
    """The explicit twin's one solver is ``fixed-depth``: exactly ``depth`` applications of ``T``
    whatever ``tol`` / ``max_iter``, and the residual of its last step, as in torch."""
    model = tiny("explicit", depth=4)
    session = session_for(model)
    assert R.solver_names(session.get_modelmeta().custom_metadata_map) == ("fixed-depth",)
    x = V.verification_inputs((12,), 5)
    a = R.run_onnx(session, x, tol=1e-2, max_iter=1)
    b = R.run_onnx(session, x, tol=1e-6, max_iter=50, solver="fixed-depth")
    assert a["iterations"].tolist() == [4] * 5 and a["converged"].all()
    np.testing.assert_array_equal(a["probabilities"], b["probabilities"])
    ref = torch_predict(model, x, tol=1e-2, max_iter=1)
    np.testing.assert_allclose(a["residual"], ref.stats.residual.numpy(), rtol=1e-4)
    with pytest.raises(ValueError, match=r"unknown solver 'picard'.*\['fixed-depth'\]"):
        R.run_onnx(session, x, tol=1e-2, max_iter=1, solver="picard")


# --- fpn-export ---------------------------------------------------------------------------------
def all_tensors(graph):
    """Every tensor stored in ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from all_tensors(attr.g)


def test_fpn_export_writes_one_self_contained_file(tmp_path) -> None:
    directory = save_checkpoint(tiny("fpn"), tmp_path / "tiny")
    result = CliRunner().invoke(
        export_app, ["--checkpoint", str(directory), "--samples", "40", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["verification"]["ok"] and summary["adaptive"]
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "model.onnx", "model.safetensors",
    ]  # fmt: skip
    proto = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    tensors = list(all_tensors(proto.graph))
    assert len(tensors) > 5 and all(t.data_location == onnx.TensorProto.DEFAULT for t in tensors)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fpn.family"] == "fpn" and meta["fpn.solvers"] == "picard,anderson"
    R.check_fresh(directory, meta)  # fingerprints of the files it came from


def test_unexportable_family_fails_clearly(tmp_path) -> None:
    directory = save_checkpoint(tiny("cdeq"), tmp_path / "ode")
    result = CliRunner().invoke(export_app, ["--checkpoint", str(directory)])
    assert result.exit_code == 1
    assert "'cdeq' cannot be exported to ONNX" in result.output
    assert "FPN_BACKEND=torch" in result.output
    assert not (directory / "model.onnx").exists()


def test_missing_checkpoint_names_the_file(tmp_path) -> None:
    result = CliRunner().invoke(export_app, ["--checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "config.json: missing" in result.output


# --- the onnxruntime backend --------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    directory = save_checkpoint(tiny("linf"), tmp_path_factory.mktemp("ck") / "tiny-linf")
    export_checkpoint(directory, samples=40)
    return directory


def test_backend_matches_the_torch_backend(exported) -> None:
    from service.backends import BatchRequest, get_backend

    onnx_backend, torch_backend = get_backend("onnxruntime")(), get_backend("torch")()
    info = onnx_backend.load(exported, device="auto", num_threads=1)
    torch_info = torch_backend.load(exported, device="cpu", num_threads=1)
    assert (info.device, info.config.family) == ("cpu", "linf")
    assert (info.solvers, info.default_solver) == (torch_info.solvers, torch_info.default_solver)
    assert info.solvers == ("picard",)  # linf: the average iteration only
    x = V.verification_inputs((12,), 16)
    for solver in info.solvers:
        request = BatchRequest(
            x=x, tol=np.full(16, 1e-5), max_iter=np.arange(1, 17, dtype=np.int64), solver=solver
        )
        got, ref = onnx_backend.predict(request), torch_backend.predict(request)
        np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=1e-5)
        np.testing.assert_array_equal(got.iterations, ref.iterations)
        np.testing.assert_array_equal(got.converged, ref.converged)
        assert got.iterations.dtype == np.int64 and got.converged.dtype == bool
        np.testing.assert_allclose(
            got.extras["certified_radius_linf"], ref.extras["certified_radius_linf"], rtol=1e-4
        )
    onnx_backend.unload()


def test_backend_refuses_what_it_cannot_serve(exported, tmp_path) -> None:
    from service.backends.onnx_backend import OnnxBackend, choose_providers

    # no model.onnx
    bare = save_checkpoint(tiny("fpn"), tmp_path / "bare")
    with pytest.raises(CheckpointError, match=r"model\.onnx: missing.*fpn-export --checkpoint"):
        OnnxBackend().load(bare, device="cpu", num_threads=1)
    # stale: the weights changed after the export
    stale = shutil.copytree(exported, tmp_path / "stale")
    model = load_checkpoint(stale).model
    with torch.no_grad():
        model.head.c.bias.add_(1.0)
    save_checkpoint(model, stale)
    with pytest.raises(CheckpointError, match=r"stale, model\.safetensors changed"):
        OnnxBackend().load(stale, device="cpu", num_threads=1)
    # a family without an export
    ode = save_checkpoint(tiny("cdeq"), tmp_path / "ode")
    with pytest.raises(CheckpointError, match=r"'cdeq' cannot be exported.*FPN_BACKEND=torch"):
        OnnxBackend().load(ode, device="cpu", num_threads=1)
    # CUDA asked for, but this onnxruntime has no CUDA provider
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    assert choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == (
        "CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "DEFAULT"},
    )  # fmt: skip
