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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backprop import differentiable_fixed_point, unrolled
from .config import ModelConfig
from .operators import ConvOperator, LinearOperator, Operator, OperatorFn, SpectralNormalizedMap
from .solvers import (
    STEPPERS,
    FixedDepth,
    SolverStats,
    Stepper,
    relative_residual,
    solve,
    stepper_options,
)


@dataclass
class ImplicitOutput:
    """logits (B, classes); z (B, ...) the state read out; stats per sample; extras per family."""

    logits: Tensor
    z: Tensor
    stats: SolverStats
    aux_loss: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class SolveParts:
    """A model cut for whatever drives its solve: :meth:`ImplicitClassifier.predict` and
    ``forward``, the serving engine (one step at a time, rows joining and leaving), the ONNX export.

    prologue: raw [0, 1] inputs (B, *input.shape) -> (context (B, ...), z0 (B, *state)); run once
              per sample: the injection ``Q(x)`` and the initial state.
    step:     ``f(z, context) -> (B, *state)``, the map whose fixed point is sought; a solver's
              :class:`~models.solvers.Stepper` applies its update around it.
    readout:  ``(z, context) -> logits (B, classes)``, ``S(z)``.
    extras:   ``logits -> {name: (B, ...)}``, a family's per-sample extra outputs (e.g. a
              certified radius); empty for most families.
    """

    prologue: Callable[[Tensor], tuple[Tensor, Tensor]]
    step: OperatorFn
    readout: Callable[[Tensor, Tensor], Tensor]
    extras: Callable[[Tensor], dict[str, Tensor]]


class ImplicitClassifier(nn.Module):
    """Base class and the family interface. Subclasses set ``self.injection``, ``self.operator``
    and ``self.head``, and override what their family changes:

    - the parts of a solve (:meth:`solve_parts`; or just :meth:`initial_state`, :meth:`readout`,
      :meth:`prediction_extras`, :meth:`prepare_operator`),
    - the solvers it really runs (:meth:`solvers`, :meth:`default_solver`),
    - its training loss (:meth:`auxiliary_loss`) and what it records when finished
      (:meth:`finalize`).

    Everything else (training, evaluation, the service, the export) asks these methods and never
    checks which family it has.
    """

    injection: nn.Module
    operator: Operator  # an nn.Module too
    head: nn.Module
    input_mean: Tensor  # buffers, scalars (()) from config.input
    input_std: Tensor

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

    def prediction_extras(self, logits: Tensor) -> dict[str, Tensor]:
        """Per-sample extra outputs a family reports at inference (e.g. a certified radius)."""
        return {}

    def solve_parts(self) -> SolveParts:
        """The parts of one pass, with ``T``'s weights normalised once (call again after a
        parameter update). Default: context ``Q(x)``, step ``T``, readout ``S(z)``."""
        T = self.prepare_operator()

        def prologue(x: Tensor) -> tuple[Tensor, Tensor]:
            qx = self.inject(x)
            return qx, self.initial_state(x, qx)

        return SolveParts(prologue, T, lambda z, qx: self.readout(z), self.prediction_extras)

    # --- the solvers it runs ----------------------------------------------------------------
    def solvers(self) -> dict[str, Stepper]:
        """The solve methods this family really runs, by name, configured from
        ``config.solver`` (SPEC §5: the service offers exactly these). Default: Picard and
        Anderson."""
        settings = self.config.solver
        return {name: kind(**stepper_options(kind, settings)) for name, kind in STEPPERS.items()}

    def default_solver(self) -> str:
        """The method used when a call names none: ``config.solver.method`` when offered."""
        offered = self.solvers()
        method = self.config.solver.method
        return method if method in offered else next(iter(offered))

    def stepper(self, name: str | None = None) -> Stepper:
        """The stepper for ``name`` (default: :meth:`default_solver`); a method this family does
        not run is a ``ValueError`` that lists the ones it does."""
        offered = self.solvers()
        name = name or self.default_solver()
        try:
            return offered[name]
        except KeyError:
            raise ValueError(
                f"unknown solver {name!r} for family {self.config.family!r}; "
                f"available: {sorted(offered)}"
            ) from None

    def solve_fixed_point(
        self,
        T: OperatorFn,
        z0: Tensor,
        qx: Tensor,
        *,
        tol: float | Tensor,
        max_iter: int | Tensor,
        solver: str | None = None,
        trace: bool = False,
    ) -> tuple[Tensor, SolverStats]:
        """The forward solve of ``T`` from ``z0`` with this family's ``solver`` (no graph)."""
        return solve(
            self.stepper(solver), T, z0, context=(qx,), tol=tol, max_iter=max_iter, trace=trace
        )

    # --- training and saving ------------------------------------------------------------------
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

    def auxiliary_loss(self, x: Tensor, qx: Tensor, z: Tensor) -> Tensor | None:
        """A family's extra training loss (added to cross-entropy), or None. ``qx`` is the
        prologue's context and ``z`` the backprop mode's differentiable fixed point."""
        return None

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
        parts = self.solve_parts()
        context, z0 = parts.prologue(x)
        z, stats = solve(
            self.stepper(solver),
            parts.step,
            z0,
            context=(context,),
            tol=defaults.tol if tol is None else tol,
            max_iter=defaults.max_iter if max_iter is None else max_iter,
            trace=trace,
        )
        logits = parts.readout(z, context)
        return ImplicitOutput(logits, z, stats, extras=parts.extras(logits))

    def forward(
        self,
        x: Tensor,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        solver: str | None = None,
        backprop: str | None = None,
    ) -> ImplicitOutput:
        """Training pass: logits whose gradient follows ``backprop`` (default: the config's).
        A fixed-depth family is always unrolled: it has no fixed point to differentiate at."""
        defaults = self.config.solver
        tol = defaults.tol if tol is None else tol
        max_iter = defaults.max_iter if max_iter is None else max_iter
        mode = backprop or self.config.backprop.mode
        stepper = self.stepper(solver)
        parts = self.solve_parts()
        qx, z0 = parts.prologue(x)
        if stepper.fixed_depth is not None:
            mode, tol, max_iter = "unrolled", 0.0, stepper.fixed_depth
        if mode == "unrolled":
            z, steps = unrolled(parts.step, z0, qx, tol=tol, max_iter=max_iter)
            stats = _uniform_stats(z, steps, tol, parts.step, qx)
        else:
            z_star, stats = solve(
                stepper, parts.step, z0.detach(), context=(qx.detach(),), tol=tol, max_iter=max_iter
            )
            z = differentiable_fixed_point(
                mode,
                parts.step,
                z_star,
                qx,
                backprop=self.config.backprop,
                solver=self.config.solver,
            )
        logits = parts.readout(z, qx)
        return ImplicitOutput(logits, z, stats, aux_loss=self.auxiliary_loss(x, qx, z))

    # --- training hooks and certificates (families override) -------------------------------
    #: Names of the certificates :meth:`certify` reports; empty: the family certifies nothing.
    certificates: tuple[str, ...] = ()

    def training_loss(self, output: ImplicitOutput, target: Tensor) -> Tensor:
        """The loss the trainer minimises: cross-entropy plus the family's auxiliary loss."""
        return cross_entropy(output, target)

    def set_training_progress(self, fraction: float) -> None:
        """Told before each optimiser step how far training is (0 → 1), for families whose loss
        follows a schedule (e.g. a growing robustness radius). Default: nothing."""

    def certify(self, x: Tensor, labels: Tensor, eps: float) -> dict[str, Tensor]:
        """Per certificate in :attr:`certificates`, (B,) bool: every raw input within ℓ∞
        distance ``eps`` of ``x`` is classified as ``labels``. Families without a certified
        bound raise ``ValueError``."""
        raise ValueError(
            f"the {self.config.family!r} family has no certified bound, so it cannot certify "
            f"robustness (families with one: those whose model lists certificates, e.g. 'linf')"
        )


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
    from zero and trained by ordinary backprop. No fixed point, no tolerance: its one "solver" is
    ``fixed-depth``, and ``tol`` / ``max_iter`` do not apply."""

    def __init__(self, config: ModelConfig) -> None:
        if config.arch.depth < 1:
            raise ValueError("the explicit family needs arch.depth >= 1")
        super().__init__(config)

    def solvers(self) -> dict[str, Stepper]:
        return {FixedDepth.name: FixedDepth(self.config.arch.depth)}


def cross_entropy(output: ImplicitOutput, target: Tensor) -> Tensor:
    loss = F.cross_entropy(output.logits, target)
    return loss if output.aux_loss is None else loss + output.aux_loss
