"""Implicit-depth classifiers: ``y = S(z*)`` with ``z* = T(z*; Q(x))``.

:class:`ImplicitClassifier` holds the three parts (injection ``Q``, operator ``T``, readout ``S``)
and the two ways of running them:

- :meth:`ImplicitClassifier.predict`: inference, no graph, per-sample ``tol``/``max_iter``.
- :meth:`ImplicitClassifier.forward`: training, gradients by the configured backprop mode.

Families (``models.families``) subclass it to change one part: the operator, the initial state,
the solver, or extra outputs. Inputs are raw intensities in [0, 1]; normalisation is part of the
model so that training, evaluation, serving and ONNX export share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backprop import differentiable_fixed_point, unrolled
from .config import ModelConfig
from .operators import ConvOperator, LinearOperator, OperatorFn, SpectralNormalizedMap
from .solvers import SolverStats, get_solver, relative_residual


@dataclass
class ImplicitOutput:
    """logits (B, classes); z (B, ...) the state read out; stats per sample; extras per family."""

    logits: Tensor
    z: Tensor
    stats: SolverStats
    aux_loss: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class ImplicitClassifier(nn.Module):
    """Base class. Subclasses set ``self.injection``, ``self.operator`` and ``self.head``."""

    injection: nn.Module
    operator: nn.Module
    head: nn.Module

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("input_mean", torch.tensor(config.input.mean), persistent=False)
        self.register_buffer("input_std", torch.tensor(config.input.std), persistent=False)

    # --- the three parts ------------------------------------------------------------------
    def inject(self, x: Tensor) -> Tensor:
        """Raw [0, 1] inputs (B, *input.shape) -> injection ``Q(x)``, the shape of the state."""
        x = x.reshape(x.shape[0], *self.config.input.shape)
        return self.injection((x - self.input_mean) / self.input_std)

    def initial_state(self, x: Tensor, qx: Tensor) -> Tensor:
        """Where the solver starts; zeros unless a family knows better."""
        return torch.zeros_like(qx)

    def readout(self, z: Tensor) -> Tensor:
        return self.head(z)

    def prepare_operator(self) -> OperatorFn:
        """``T(z, qx)`` with weights normalised once for this pass."""
        return self.operator.prepare()

    def solve_fixed_point(
        self,
        T: OperatorFn,
        z0: Tensor,
        qx: Tensor,
        *,
        tol: float | Tensor,
        max_iter: int | Tensor,
        solver: str,
        trace: bool = False,
    ) -> tuple[Tensor, SolverStats]:
        """The forward solve (no graph). Families with another notion of solve override this."""
        return get_solver(solver)(
            T,
            z0,
            context=(qx,),
            tol=tol,
            max_iter=max_iter,
            trace=trace,
            **self.config.solver.options(solver),
        )

    def prediction_extras(self, logits: Tensor) -> dict[str, Tensor]:
        """Per-sample extra outputs a family reports at inference (e.g. a certified radius)."""
        return {}

    def contraction_maps(self) -> list[SpectralNormalizedMap]:
        return [m for m in self.modules() if isinstance(m, SpectralNormalizedMap)]

    def tighten_lipschitz(self, steps: int = 500) -> None:
        """Converge every spectral-norm estimate (before saving or measuring)."""
        for m in self.contraction_maps():
            m.tighten(steps)

    def finalize(self) -> None:
        """Make the model ready to be evaluated and saved: converge its spectral-norm estimates.
        Families that record derived quantities (certificates, bounds) extend this."""
        self.tighten_lipschitz()

    # --- running ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        *,
        tol: float | Tensor | None = None,
        max_iter: int | Tensor | None = None,
        solver: str | None = None,
        trace: bool = False,
    ) -> ImplicitOutput:
        """Inference with per-sample ``tol`` / ``max_iter`` (scalars or (B,) tensors)."""
        defaults = self.config.solver
        qx = self.inject(x)
        T = self.prepare_operator()
        z, stats = self.solve_fixed_point(
            T,
            self.initial_state(x, qx),
            qx,
            tol=defaults.tol if tol is None else tol,
            max_iter=defaults.max_iter if max_iter is None else max_iter,
            solver=solver or defaults.method,
            trace=trace,
        )
        logits = self.readout(z)
        return ImplicitOutput(logits, z, stats, extras=self.prediction_extras(logits))

    def forward(
        self,
        x: Tensor,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        solver: str | None = None,
        backprop: str | None = None,
    ) -> ImplicitOutput:
        """Training pass: logits whose gradient follows ``backprop`` (default: the config's)."""
        defaults = self.config.solver
        tol = defaults.tol if tol is None else tol
        max_iter = defaults.max_iter if max_iter is None else max_iter
        mode = backprop or self.config.backprop.mode
        qx = self.inject(x)
        T = self.prepare_operator()
        z0 = self.initial_state(x, qx)
        if mode == "unrolled":
            z, steps = unrolled(T, z0, qx, tol=tol, max_iter=max_iter)
            stats = _uniform_stats(z, steps, tol, T, qx)
        else:
            with torch.no_grad():
                z_star, stats = self.solve_fixed_point(
                    T,
                    z0.detach(),
                    qx.detach(),
                    tol=tol,
                    max_iter=max_iter,
                    solver=solver or defaults.method,
                )
            z = differentiable_fixed_point(
                mode, T, z_star, qx, backprop=self.config.backprop, solver=self.config.solver
            )
        return ImplicitOutput(self.readout(z), z, stats, aux_loss=self.auxiliary_loss(x, qx, z))

    def auxiliary_loss(self, x: Tensor, qx: Tensor, z: Tensor) -> Tensor | None:
        """A family's extra training loss (added to cross-entropy), or None."""
        return None


def _uniform_stats(z: Tensor, steps: int, tol, T: OperatorFn, qx: Tensor) -> SolverStats:
    with torch.no_grad():
        res = relative_residual(T(z, qx), z)
    iterations = torch.full((z.shape[0],), steps, dtype=torch.int64, device=z.device)
    return SolverStats(iterations, res, res <= torch.as_tensor(tol, device=z.device))


class FixedPointClassifier(ImplicitClassifier):
    """The FPN of Fung et al. with a conv or MLP operator (``arch.kind``).

    conv: ``Q`` = conv3×3 → relu → conv3×3/2 → relu → conv3×3 (state C×H/2×W/2);
          ``S`` = maxpool 2 → linear.
    mlp:  ``Q`` = linear; ``S`` = linear.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        arch, in_shape = config.arch, config.input.shape
        if arch.kind == "conv":
            if len(in_shape) != 3:
                raise ValueError(f"conv arch needs (C, H, W) inputs, got shape {in_shape}")
            c_in, h, w = in_shape
            c = arch.channels
            self.injection = nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1),
            )
            spatial = ((h + 1) // 2, (w + 1) // 2)
            self.operator = ConvOperator(c, spatial, arch.gamma)
            pooled = (spatial[0] // 2) * (spatial[1] // 2)
            self.head = nn.Sequential(
                nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c * pooled, config.num_classes)
            )
        else:
            self.injection = nn.Sequential(nn.Flatten(), nn.Linear(config.input.numel, arch.width))
            self.operator = LinearOperator(arch.width, arch.gamma)
            self.head = nn.Linear(arch.width, config.num_classes)


class ExplicitClassifier(FixedPointClassifier):
    """The explicit twin of an FPN: the same parts, ``T`` applied exactly ``arch.depth`` times
    from zero and trained by ordinary backprop. No fixed point, no tolerance."""

    def __init__(self, config: ModelConfig) -> None:
        if config.arch.depth < 1:
            raise ValueError("the explicit family needs arch.depth >= 1")
        super().__init__(config)

    def _run(self, x: Tensor) -> ImplicitOutput:
        qx = self.inject(x)
        T = self.prepare_operator()
        z = self.initial_state(x, qx)
        z, _ = unrolled(T, z, qx, tol=0.0, max_iter=self.config.arch.depth)
        stats = _uniform_stats(z, self.config.arch.depth, float("inf"), T, qx)
        return ImplicitOutput(self.readout(z), z, stats)

    def forward(
        self, x: Tensor, *, tol=None, max_iter=None, solver=None, backprop=None
    ) -> ImplicitOutput:
        """Solver knobs are accepted for interface compatibility and ignored: depth is fixed."""
        return self._run(x)

    @torch.no_grad()
    def predict(
        self, x: Tensor, *, tol=None, max_iter=None, solver=None, trace=False
    ) -> ImplicitOutput:
        """Solver knobs are accepted for interface compatibility and ignored: depth is fixed."""
        out = self._run(x)
        out.extras = self.prediction_extras(out.logits)
        return out


def cross_entropy(output: ImplicitOutput, target: Tensor) -> Tensor:
    loss = F.cross_entropy(output.logits, target)
    return loss if output.aux_loss is None else loss + output.aux_loss
