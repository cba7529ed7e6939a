"""What to export, asked of the family: its solve parts and the solvers it runs.

A model exports when every one of its solvers is a stepper the graph can run (:data:`LOOPS`
in :mod:`models.onnx.loops` names them). Nothing here knows a family: linf's damped Picard, the
explicit twin's fixed depth or cdeq's ODE solve reach the export as the steppers
``model.solvers()`` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..families import create_model
from ..implicit import ImplicitClassifier
from ..solvers import Stepper
from .loops import LOOPS
from .runtime import ExportError


@dataclass(frozen=True)
class ExportPlan:
    """A model cut into exportable parts, with the solvers to write between them.

    prologue: ``x -> (context, z0)``; step: ``(z, context) -> f(z)``;
    epilogue: ``(z, context) -> (logits, *extras)``.
    solvers:  the family's steppers by name, in the order of the graph's ``solver`` input.
    """

    family: str
    prologue: nn.Module
    step: nn.Module
    epilogue: nn.Module
    solvers: dict[str, Stepper]
    default_solver: str
    state_shape: tuple[int, ...]
    extras: tuple[str, ...]

    @property
    def adaptive(self) -> bool:
        """Whether depth follows ``tol`` / ``max_iter`` (not a fixed-depth network)."""
        return any(s.fixed_depth is None for s in self.solvers.values())


class _Fn(nn.Module):
    """A module around a function, so that torch.export can trace it."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model  # registers the parameters the function reads
        self.fn = fn

    def forward(self, *args: Tensor) -> Any:
        return self.fn(*args)


def unexportable_reason(model: ImplicitClassifier) -> str | None:
    """Why ``model``'s family cannot be exported, or None when it can."""
    for name, stepper in model.solvers().items():
        if type(stepper) not in LOOPS:
            return (
                f"its solver {name!r} is a {type(stepper).__name__} step, which the exported "
                f"graph cannot run (it runs {sorted(k.name for k in LOOPS)})"
            )
    return None


def check_exportable(model: ImplicitClassifier) -> None:
    """Raise :class:`ExportError` naming the reason when ``model``'s family does not export."""
    reason = unexportable_reason(model)
    if reason is not None:
        raise ExportError(
            f"family {model.config.family!r} cannot be exported to ONNX: {reason}; "
            "serve it with FPN_BACKEND=torch"
        )


def check_config_exportable(config: ModelConfig) -> None:
    """:func:`check_exportable` for a checkpoint's config (an untrained model is built)."""
    check_exportable(create_model(config))


def plan_export(model: ImplicitClassifier) -> ExportPlan:
    """The parts and solvers of ``model`` (float32, eval mode) to export."""
    check_exportable(model)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ExportError(f"the exported graph is float32; the model is {sorted(map(str, dtypes))}")
    model.eval()
    parts = model.solve_parts()  # weights normalised once, as in predict()
    probe = torch.rand(2, *model.config.input.shape)
    with torch.no_grad():
        context, z0 = parts.prologue(probe)
        extras = tuple(parts.extras(parts.readout(z0, context)))

    def epilogue(z: Tensor, context: Tensor) -> tuple[Tensor, ...]:
        logits = parts.readout(z, context)
        found = parts.extras(logits)
        return (logits, *(found[k] for k in extras))

    return ExportPlan(
        family=model.config.family,
        prologue=_Fn(model, parts.prologue),
        step=_Fn(model, parts.step),
        epilogue=_Fn(model, epilogue),
        solvers=model.solvers(),
        default_solver=model.default_solver(),
        state_shape=tuple(z0.shape[1:]),
        extras=extras,
    )
