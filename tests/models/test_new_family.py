"""``families.py`` promises that a new family needs no change elsewhere. This test keeps it: a
family registered here and nowhere else trains, saves, loads, serves through the torch backend
and exports to ONNX, its own solver choice included."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from model_fixtures import prototypes, tiny_model, train_on_prototypes
from torch import Tensor, nn

from models import (
    FAMILIES,
    ImplicitClassifier,
    ModelConfig,
    SolverConfig,
    load_checkpoint,
    register_family,
)
from models.operators import OperatorFn
from models.solvers import Picard, Stepper

TOY = "toy-tanh"
DAMPING = 0.8


class ToyOperator(nn.Module):
    """``T(z; q) = ½ tanh(W z / max(1, ‖W‖_F)) + q``: Lipschitz at most ½ in ``z``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def prepare(self) -> OperatorFn:
        W = self.weight / self.weight.norm().clamp_min(1.0)  # once per pass, as the library's

        def T(z: Tensor, qx: Tensor) -> Tensor:
            return 0.5 * torch.tanh(z @ W.T) + qx

        return T


class ToyClassifier(ImplicitClassifier):
    """Dense layers around :class:`ToyOperator`; it runs damped Picard and nothing else."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        width = config.arch.width
        self.injection = nn.Sequential(nn.Flatten(), nn.Linear(config.input.numel, width))
        self.operator = ToyOperator(width)
        self.head = nn.Linear(width, config.num_classes)

    def solvers(self) -> dict[str, Stepper]:
        return {"picard": Picard(damping=DAMPING)}


@pytest.fixture
def toy_family() -> Iterator[str]:
    register_family(TOY, default_backprop="jfb", description="a test's toy family")(ToyClassifier)
    try:
        yield TOY
    finally:
        FAMILIES.pop(TOY)


def test_a_family_registered_in_a_test_trains_saves_loads_serves_and_exports(
    toy_family, tmp_path
) -> None:
    from models.checkpoint import save_checkpoint
    from service.backends import BatchRequest
    from service.backends.torch_backend import TorchBackend

    # train
    # float32 and a float32-sized default tol, as a real checkpoint (the export is checked at it)
    solver = SolverConfig(method="picard", tol=1e-4, max_iter=100)
    model = tiny_model(toy_family, "mlp", dtype=torch.float32, width=24, solver=solver)
    assert isinstance(model, ToyClassifier) and model.default_solver() == "picard"
    before, after, loss = train_on_prototypes(model, steps=40)
    assert after > max(before, 0.9) and np.isfinite(loss), (before, after, loss)

    # save, load
    directory = save_checkpoint(model.eval(), tmp_path / "toy", metrics={"accuracy": after})
    loaded = load_checkpoint(directory).model
    assert type(loaded) is ToyClassifier and loaded.config == model.config
    x, _ = prototypes(16, model.config.input.shape, 3, seed=1)
    x = x.float()
    reference = loaded.predict(x, tol=1e-5, max_iter=100)
    assert reference.stats.converged.all()

    # serve (torch backend)
    backend = TorchBackend()
    backend.load(directory, device="cpu", num_threads=1)
    request = BatchRequest(
        x=x.numpy(), tol=np.full(16, 1e-5), max_iter=np.full(16, 100, np.int64), solver="picard"
    )
    served = backend.predict(request)
    probabilities = reference.logits.softmax(1).numpy()
    np.testing.assert_allclose(served.probabilities, probabilities, atol=1e-6)
    np.testing.assert_array_equal(served.iterations, reference.stats.iterations.numpy())
    backend.unload()

    # export: the graph runs the family's own damped Picard, and nothing else
    pytest.importorskip("onnxruntime")
    from models.onnx import runtime as R
    from models.onnx.export import export_checkpoint

    result = export_checkpoint(directory, samples=40)
    assert result.verification.ok and result.adaptive
    session = R.onnx_session(result.path)
    metadata = session.get_modelmeta().custom_metadata_map
    assert R.solver_names(metadata) == ("picard",)
    assert float(metadata["fpn.damping"]) == DAMPING
    got = R.run_onnx(session, x.numpy(), tol=1e-5, max_iter=100)
    np.testing.assert_array_equal(got["iterations"], reference.stats.iterations.numpy())
    np.testing.assert_allclose(got["probabilities"], probabilities, atol=1e-5)
