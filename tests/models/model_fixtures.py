"""Tiny models, inputs and the checks every model family must pass: one module for all of
``tests/models`` (``conftest.py`` wraps the builders as the ``make_model`` / ``make_inputs``
fixtures; tests that need the checks import them from here).

- :func:`tiny_config`, :func:`tiny_model`: models small enough for exact, fast tests (conv: 1×8×8
  in, 4×4×4 state), float64 by default, spectral-norm estimates converged in the final dtype.
- :func:`random_inputs`, :func:`prototypes`: inputs, and noisy class prototypes to learn.
- :func:`assert_unique_fixed_point`: different starting points reach the same ``z*``.
- :func:`assert_gradient_matches_finite_differences`: a backprop mode's gradient against central
  differences of the loss it claims to differentiate (IFT: the true loss through ``z*(θ)``;
  JFB: the loss with ``z*`` held fixed, one differentiable application of ``T``).
- :func:`assert_checkpoint_round_trip`: save, load, same config and same predictions.
- :func:`train_on_prototypes`: a short run on noisy class prototypes that must learn.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models import (
    ArchConfig,
    BackpropConfig,
    ImplicitClassifier,
    InputSpec,
    ModelConfig,
    SolverConfig,
    create_model,
    cross_entropy,
    load_checkpoint,
    save_checkpoint,
)

TINY_INPUT = {"conv": (1, 8, 8), "mlp": (12,)}
KINDS = ("conv", "mlp")
# A precise solve by default, so that checks can compare fixed points tightly.
PRECISE_SOLVER = SolverConfig(method="anderson", tol=1e-10, max_iter=400)
PRECISE_BACKPROP = BackpropConfig(mode="jfb", tol=1e-12, max_iter=500)


def tiny_config(
    family: str = "fpn",
    kind: str = "mlp",
    *,
    gamma: float = 0.7,
    channels: int = 4,
    width: int = 16,
    depth: int = 3,
    classes: int = 3,
    input_shape: tuple[int, ...] | None = None,
    options: dict[str, Any] | None = None,
    solver: SolverConfig | None = None,
    backprop: BackpropConfig | str | None = None,
) -> ModelConfig:
    """A small config; ``backprop`` may be a mode name (with the precise defaults)."""
    if isinstance(backprop, str):
        backprop = BackpropConfig(mode=backprop, tol=1e-12, max_iter=500)
    return ModelConfig(
        family=family,
        arch=ArchConfig(kind=kind, channels=channels, width=width, gamma=gamma, depth=depth),
        input=InputSpec(shape=input_shape or TINY_INPUT[kind], mean=0.5, std=0.3),
        classes=tuple(f"class-{i}" for i in range(classes)),
        solver=solver or PRECISE_SOLVER,
        backprop=backprop or PRECISE_BACKPROP,
        options=dict(options or {}),
    )


def tiny_model(
    family: str = "fpn",
    kind: str = "mlp",
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    train: bool = False,
    **config: Any,
) -> ImplicitClassifier:
    """:func:`tiny_config`'s model, seeded, in ``dtype``, finalised (spectral-norm estimates
    converged in that dtype, so ``Lip(T) ≤ γ`` holds to its precision), in eval mode unless
    ``train``."""
    torch.manual_seed(seed)
    model = create_model(tiny_config(family, kind, **config)).to(dtype)
    model.finalize()
    return model.train(train)


def prototypes(
    n: int, shape: tuple[int, ...], classes: int, *, noise: float = 0.25, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Noisy class prototypes in [0, 1]: inputs (n, *shape) float64 and labels (n,).
    The prototypes depend on ``seed // 1000`` only, so seeds 0 and 1 share them (train / test)."""
    protos = torch.rand(classes, *shape, generator=torch.Generator().manual_seed(seed // 1000))
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(classes, (n,), generator=g)
    x = (protos[labels] + noise * torch.randn(n, *shape, generator=g)).clamp(0.0, 1.0)
    return x.double(), labels


def random_inputs(model: ImplicitClassifier, batch: int, seed: int = 1) -> Tensor:
    """Raw [0, 1] inputs (batch, *input.shape) in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return torch.rand(batch, *model.config.input.shape, generator=g, dtype=dtype)


def assert_unique_fixed_point(
    model: ImplicitClassifier,
    x: Tensor,
    starts: list[Tensor],
    *,
    solver: str | None = None,
    tol: float = 1e-11,
    atol: float = 1e-8,
) -> Tensor:
    """Solve from each start in ``starts`` (and the model's own ``z0``) with ``solver`` (default:
    the family's): every solve converges and all reach the same ``z*``. Returns it."""
    with torch.no_grad():
        qx = model.inject(x)
        T = model.prepare_operator()
        reference, stats = model.solve_fixed_point(
            T, model.initial_state(x, qx), qx, tol=tol, max_iter=2000, solver=solver
        )
        assert stats.converged.all(), stats
        for z0 in starts:
            assert not torch.allclose(z0, reference, atol=10 * atol), "a start must differ from z*"
            z, stats = model.solve_fixed_point(T, z0, qx, tol=tol, max_iter=2000, solver=solver)
            assert stats.converged.all(), stats
            torch.testing.assert_close(z, reference, rtol=0, atol=atol)
    return reference


def _loss(model: ImplicitClassifier, x: Tensor, y: Tensor, mode: str, z_fixed: Tensor | None):
    """The loss a backprop mode differentiates, computed without autograd tricks.

    ``z_fixed is None``: the true loss, ``z*`` solved to machine precision for the current
    parameters. Otherwise JFB's: ``z = T(z_fixed; Qx)`` with ``z_fixed`` held constant."""
    qx = model.inject(x)
    T = model.prepare_operator()
    if z_fixed is None:
        z, stats = model.solve_fixed_point(
            T, model.initial_state(x, qx), qx, tol=1e-13, max_iter=5000,
            solver=model.default_solver(),
        )  # fmt: skip
        assert stats.converged.all()
    else:
        z = T(z_fixed, qx)
    logits = model.readout(z)
    loss = torch.nn.functional.cross_entropy(logits, y)
    aux = model.auxiliary_loss(x, qx, z)
    return loss if aux is None else loss + aux


def assert_gradient_matches_finite_differences(
    model: ImplicitClassifier,
    x: Tensor,
    y: Tensor,
    mode: str,
    *,
    eps: float = 1e-6,
    rtol: float = 1e-4,
    seed: int = 0,
) -> None:
    """For every parameter tensor, the directional derivative along a random direction from
    ``mode``'s backward equals central finite differences of that mode's loss (see :func:`_loss`).
    The model must be in eval mode (fixed spectral-norm vectors) and float64."""
    assert not model.training and next(model.parameters()).dtype == torch.float64
    model.zero_grad(set_to_none=True)
    out = model(x, backprop=mode, tol=1e-13, max_iter=5000)
    cross_entropy(out, y).backward()
    z_fixed = None
    if mode == "jfb":
        with torch.no_grad():
            qx = model.inject(x)
            z_fixed, _ = model.solve_fixed_point(
                model.prepare_operator(), model.initial_state(x, qx), qx, tol=1e-13,
                max_iter=5000, solver=model.default_solver(),
            )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    checked = 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no finite gradient"
        v = torch.randn(p.shape, generator=g, dtype=p.dtype)
        analytic = float((p.grad * v).sum())
        with torch.no_grad():
            p.add_(eps * v)
            plus = float(_loss(model, x, y, mode, z_fixed))
            p.sub_(2 * eps * v)
            minus = float(_loss(model, x, y, mode, z_fixed))
            p.add_(eps * v)
        numeric = (plus - minus) / (2 * eps)
        assert abs(analytic - numeric) <= rtol * max(abs(numeric), 1e-3), (
            f"{mode} gradient of {name}: analytic {analytic:.8g}, finite differences {numeric:.8g}"
        )
        checked += 1
    assert checked > 0


def assert_checkpoint_round_trip(model: ImplicitClassifier, x: Tensor, directory: Path) -> None:
    """save → load gives the same config (options included), weights and predictions (float32;
    ``model`` itself is left as it is)."""
    model = copy.deepcopy(model).float()
    save_checkpoint(model, directory, training={"command": "test"}, metrics={"test_accuracy": 1.0})
    loaded = load_checkpoint(directory).model
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for key, value in saved.items():
        assert torch.equal(value, restored[key]), key
    x = x.float()
    before, after = model.predict(x, tol=1e-5), loaded.predict(x, tol=1e-5)
    torch.testing.assert_close(before.logits, after.logits, rtol=0, atol=0)
    assert torch.equal(before.stats.iterations, after.stats.iterations)
    assert before.extras.keys() == after.extras.keys()
    for key in before.extras:
        torch.testing.assert_close(before.extras[key], after.extras[key], rtol=0, atol=0)


def train_on_prototypes(
    model: ImplicitClassifier, *, steps: int = 60, lr: float = 1e-2, batch: int = 64, seed: int = 0
) -> tuple[float, float, float]:
    """Train ``model`` (its default backprop) on noisy prototypes; returns (accuracy before,
    accuracy after on held-out samples, last training loss)."""
    shape, classes = model.config.input.shape, model.config.num_classes
    x_train, y_train = prototypes(512, shape, classes, seed=seed * 1000)
    x_test, y_test = prototypes(256, shape, classes, seed=seed * 1000 + 1)
    dtype = next(model.parameters()).dtype
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)

    def accuracy() -> float:
        model.eval()
        return float((model.predict(x_test, tol=1e-4).logits.argmax(1) == y_test).double().mean())

    before = accuracy()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = torch.randint(len(y_train), (batch,), generator=g)
        out = model(x_train[rows], tol=1e-4, max_iter=100)
        loss = model.training_loss(out, y_train[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.finalize()
    return before, accuracy(), float(loss.detach())
