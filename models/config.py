"""Typed model configuration: one dataclass tree, stored verbatim in a checkpoint's ``config.json``.

Every knob has exactly one home here; per-call overrides (``model.solve(x, tol=...)``) are explicit
arguments that default to these values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SolverConfig:
    """Forward fixed-point solver and its defaults (SPEC §5).

    ``damping`` is Picard's averaging α (Krasnoselskii–Mann); ``memory``, ``mixing`` and
    ``regularization`` are Anderson's m, β and λ.
    """

    method: str = "anderson"
    tol: float = 1e-4
    max_iter: int = 50
    damping: float = 1.0
    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-4

    def options(self, method: str | None = None) -> dict[str, float | int]:
        """Keyword arguments that the discrete solver ``method`` (default: ours) accepts, and no
        others (the stepper's own fields; :data:`models.solvers.STEPPERS`)."""
        from .solvers import STEPPERS, stepper_options

        kind = STEPPERS.get(method or self.method)
        return stepper_options(kind, self) if kind is not None else {}


@dataclass(frozen=True)
class BackpropConfig:
    """How gradients reach the parameters through the fixed point.

    - ``jfb``: one differentiable application of ``T`` at the fixed point (Fung et al.).
    - ``ift``: implicit differentiation; the backward linear system is solved by the forward solver
      with ``tol``/``max_iter`` below (Bai et al.).
    - ``neumann``: truncated Neumann series of ``(I - J)^{-1}`` with ``neumann_terms`` terms.
    - ``unrolled``: back-propagate through every forward Picard iteration.
    """

    mode: str = "jfb"
    tol: float = 1e-6
    max_iter: int = 100
    neumann_terms: int = 5


@dataclass(frozen=True)
class ArchConfig:
    """Network shape. ``kind`` picks the operator: ``conv`` (images) or ``mlp`` (flat inputs).

    ``gamma`` < 1 is the Lipschitz bound of ``T`` in ``z`` (see ``models.operators``).
    ``depth`` is only read by the ``explicit`` family (a fixed number of applications of ``T``).
    """

    kind: str = "conv"
    channels: int = 32
    width: int = 128
    gamma: float = 0.9
    depth: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1) for a contraction, got {self.gamma}")
        if self.kind not in ("conv", "mlp"):
            raise ValueError(f"unknown arch kind {self.kind!r}; available: ['conv', 'mlp']")


@dataclass(frozen=True)
class InputSpec:
    """What one input sample looks like and how raw intensities in [0, 1] are normalised."""

    shape: tuple[int, ...] = (1, 28, 28)
    dtype: str = "float32"
    scale: float = 1.0 / 255.0  # raw uint8 pixel -> [0, 1]
    mean: float = 0.1307
    std: float = 0.3081

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model before its weights are loaded."""

    family: str = "fpn"
    arch: ArchConfig = field(default_factory=ArchConfig)
    input: InputSpec = field(default_factory=InputSpec)
    classes: tuple[str, ...] = tuple(str(i) for i in range(10))
    solver: SolverConfig = field(default_factory=SolverConfig)
    backprop: BackpropConfig = field(default_factory=BackpropConfig)
    options: dict[str, Any] = field(default_factory=dict)  # family-specific extras

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        data = dict(data)
        sub = {
            "arch": ArchConfig,
            "input": InputSpec,
            "solver": SolverConfig,
            "backprop": BackpropConfig,
        }
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in sub:
                kwargs[name] = _build(sub[name], value, name)
            elif name in {f.name for f in dataclasses.fields(cls)}:
                kwargs[name] = value
            else:
                raise ValueError(f"unknown model config key {name!r}")
        if "classes" in kwargs:
            kwargs["classes"] = tuple(kwargs["classes"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _build(kind: type, value: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(
            f"unknown keys in {where!r}: {sorted(unknown)}; expected some of {sorted(names)}"
        )
    value = dict(value)
    if "shape" in value:
        value["shape"] = tuple(value["shape"])
    return kind(**value)
