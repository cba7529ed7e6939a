"""ℓ∞-contractive implicit networks (Jafarpour, Davydov, Proskurnikov and Bullo, "Robust implicit
networks via non-Euclidean contractions", NeurIPS 2021).

The model, on the normalised, flattened input ``u``:

    z = relu(A z + B u + b),        y = C z + c + D u.

**Well-posedness.** ReLU is monotone and 1-Lipschitz, so the fixed point exists, is unique and
depends Lipschitz-continuously on ``u`` whenever the ℓ∞ matrix measure
``μ∞(A) = max_i (a_ii + Σ_{j≠i} |a_ij|)`` is below 1 (the paper's condition: it admits matrices
with ``‖A‖ ≥ 1`` that a norm bound would exclude). We keep it by construction, as the paper's code
does: with a free matrix ``P``,

    A = P − diag(|P| 𝟙) + γ I,   so row i has  a_ii + Σ_{j≠i}|a_ij| = γ + p_ii − |p_ii| ≤ γ < 1,

with ``γ = arch.gamma``.

**Average iteration.** ``z ← (1 − α) z + α relu(A z + B u + b)`` (Picard with damping α) is an
ℓ∞ contraction with factor ``1 − α (1 − μ∞(A))`` for every ``α ∈ (0, α*]``,
``α* = 1 / (1 − min(min_i a_ii, 0))``; ``α*`` gives the fastest guaranteed rate. The family's one
solver is ``picard`` with ``α*`` (or the configured ``solver.damping`` if smaller); see
:meth:`LinfClassifier.solvers` for why Anderson is not offered.

**Certified robustness.** For inputs ``u, v``:
``‖z*(u) − z*(v)‖∞ ≤ ‖B‖∞ ‖u − v‖∞ / (1 − μ∞(A))``, hence

    Lip∞(u ↦ y) ≤ ‖C‖∞ ‖B‖∞ / (1 − μ∞(A)) + ‖D‖∞

(``‖M‖∞`` the largest absolute row sum). The model normalises raw inputs ``x ∈ [0, 1]`` as
``u = (x − mean) / std``, so from raw inputs the bound is divided by ``std``:
:meth:`LinfClassifier.lipschitz_bound`. Each logit moves by at most ``L ε`` under an ℓ∞
perturbation of size ε, so the top-1 margin moves by at most ``2 L ε`` and the label cannot change
for ``ε < margin / (2 L)``: ``prediction_extras`` returns this ``certified_radius_linf`` per sample
(raw-input units). It certifies the exact fixed point; the served logits come from a solve to
``tol``, whose error is far below typical margins at the default tolerance.

**Training.** ``options["lipschitz_weight"] > 0`` adds ``weight · L`` to the loss (the paper's
Lipschitz regulariser). ``options["robust_loss"]`` adds a certified-margin loss at radius
``robust_eps`` (raw-input units): ``"lipschitz"`` (logit margins reduced by ``2 L ε``, Tsuzuku et
al.) or ``"interval"`` (worst-case logits from interval bounds through the fixed point, the
mixed-monotone embedding; see :mod:`models.linf_certify`). The loss is
``(1 − κ) CE(clean) + κ CE(worst case)``, with ``κ = robust_weight`` and ``ε`` both ramped up
linearly over the first ``robust_ramp`` fraction of training.
:meth:`LinfClassifier.certify` reports both certificates for a given ε (``fpn-eval --certify``).
The default backprop is JFB (the paper differentiates implicitly:
``--backprop ift``). :meth:`LinfClassifier.finalize` records ``L`` (``lipschitz_bound_linf``),
``μ∞(A)`` and ``α*`` in ``config.options``, so they land in ``config.json``.

**State layout.** ``y = Cz + Du`` reads the input, but a readout sees only the state, so the state
carries the skip term: ``state = [z ; s]`` of width ``arch.width + classes``, with ``s = D u``
fixed (``T`` copies it from the injection, and the solve starts it there). Solves run on ``z``
alone, so ``iterations`` and ``residual`` are exactly those of ``z = relu(Az + Bu + b)``.

The model is dense (``A``, ``B``, ``C``, ``D`` are matrices): ``arch.kind`` must be ``mlp``.

>>> import torch
>>> from models import ArchConfig, InputSpec, ModelConfig, create_model
>>> model = create_model(ModelConfig(family="linf", arch=ArchConfig(kind="mlp", width=16),
...                                  input=InputSpec(shape=(6,)), classes=("a", "b", "c")))
>>> bool(model.operator.measure() <= 0.9 + 1e-6)  # γ, up to float32 rounding
True
>>> out = model.eval().predict(torch.rand(4, 6))
>>> out.extras["certified_radius_linf"].shape
torch.Size([4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .families import register_family
from .implicit import ImplicitClassifier, ImplicitOutput, SolveParts, cross_entropy
from .linf_certify import (
    CERTIFICATES,
    certified_by,
    input_box,
    interval_fixed_point,
    lipschitz_margin_lower_bounds,
    margin_lower_bounds,
    worst_case_cross_entropy,
)
from .operators import OperatorFn
from .options import resolve_options
from .solvers import Picard, SolverStats, Stepper

ROBUST_LOSSES = ("none", "lipschitz", "interval")

DEFAULT_OPTIONS = {
    "lipschitz_weight": 0.0,
    # Certified-margin training (see the module docstring and models.linf_certify).
    "robust_loss": "none",
    "robust_eps": 0.0,
    "robust_weight": 0.5,
    "robust_ramp": 0.4,
    # The embedded (interval) solve: Picard with the average-iteration step.
    "interval_tol": 1e-5,
    "interval_max_iter": 300,
    # Written by finalize() from the weights; informational (predictions recompute them).
    "lipschitz_bound_linf": None,
    "matrix_measure_linf": None,
    "step_size_linf": None,
}


def inf_norm(matrix: Tensor) -> Tensor:
    """Induced ℓ∞ norm: the largest absolute row sum. (m, n) -> ()."""
    return matrix.abs().sum(1).max()


def matrix_measure(matrix: Tensor) -> Tensor:
    """ℓ∞ matrix measure ``μ∞(A) = max_i (a_ii + Σ_{j≠i} |a_ij|)``. (n, n) -> ()."""
    diag = matrix.diagonal()
    return (matrix.abs().sum(1) - diag.abs() + diag).max()


def average_step_size(matrix: Tensor) -> float:
    """The paper's step ``α* = 1 / (1 − min(min_i a_ii, 0))`` (in (0, 1])."""
    return float(1.0 / (1.0 - matrix.diagonal().min().clamp(max=0.0)))


class LinfOperator(nn.Module):
    """``A = P − diag(|P| 𝟙) + γ I`` (so ``μ∞(A) ≤ γ``) and ``z ↦ relu(A z + q)``."""

    def __init__(self, width: int, gamma: float) -> None:
        super().__init__()
        self.width, self.gamma = width, gamma
        # Small start: row sums of |P| about 1/2, so a_ii ≈ γ − 1/2 and α* starts near 1.
        self.p = nn.Parameter(torch.empty(width, width).uniform_(-1.0 / width, 1.0 / width))

    def matrix(self) -> Tensor:
        """``A`` (n, n), differentiable in ``P``."""
        p = self.p
        eye = torch.eye(self.width, dtype=p.dtype, device=p.device)
        return p - torch.diag(p.abs().sum(1)) + self.gamma * eye

    def measure(self) -> Tensor:
        return matrix_measure(self.matrix())

    def prepare(self) -> OperatorFn:
        A, n = self.matrix(), self.width

        def T(state: Tensor, qx: Tensor) -> Tensor:  # (B, n + K) each
            z = F.relu(state[:, :n] @ A.T + qx[:, :n])
            return torch.cat([z, qx[:, n:]], dim=1)

        return T


class LinfInjection(nn.Module):
    """``u ↦ [B u + b ; D u]``: the implicit layer's input and the output skip term."""

    def __init__(self, in_features: int, width: int, classes: int) -> None:
        super().__init__()
        self.b = nn.Linear(in_features, width)
        self.d = nn.Linear(in_features, classes, bias=False)
        nn.init.zeros_(self.d.weight)

    def forward(self, x: Tensor) -> Tensor:  # (B, *input) -> (B, width + classes)
        u = x.flatten(1)
        return torch.cat([self.b(u), self.d(u)], dim=1)


class LinfReadout(nn.Module):
    """``[z ; s] ↦ C z + c + s``."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.width = width
        self.c = nn.Linear(width, classes)

    def forward(self, state: Tensor) -> Tensor:
        return self.c(state[:, : self.width]) + state[:, self.width :]


class LinfClassifier(ImplicitClassifier):
    """See the module docstring."""

    injection: LinfInjection
    operator: LinfOperator
    head: LinfReadout

    def __init__(self, config: ModelConfig) -> None:
        config = resolve_options(config, DEFAULT_OPTIONS, "linf")
        if config.arch.kind != "mlp":
            raise ValueError(
                f"the linf family is dense: it needs arch kind 'mlp' (fpn-train --arch mlp), "
                f"got {config.arch.kind!r}"
            )
        if float(config.options["lipschitz_weight"]) < 0:
            raise ValueError("lipschitz_weight must be >= 0")
        _check_robust_options(config.options)
        super().__init__(config)
        n, k = config.arch.width, config.num_classes
        self.width = n
        self.injection = LinfInjection(config.input.numel, n, k)
        self.operator = LinfOperator(n, config.arch.gamma)
        self.head = LinfReadout(n, k)

    # --- the parts ---------------------------------------------------------------------------
    def initial_state(self, x: Tensor, qx: Tensor) -> Tensor:
        """``[0 ; D u]``: the skip term starts (and stays) at its value."""
        state = torch.zeros_like(qx)
        state[:, self.width :] = qx[:, self.width :]
        return state

    def solve_parts(self) -> SolveParts:
        """Solves run on ``z`` alone (the skip block ``s = D u`` is constant): the prologue gives
        ``z0 = 0`` with context ``[B u + b ; D u]``, the readout puts ``s`` back."""
        T, n = self.prepare_operator(), self.width

        def prologue(x: Tensor) -> tuple[Tensor, Tensor]:
            qx = self.inject(x)
            return qx, self.initial_state(x, qx)[:, :n]

        def step(z: Tensor, qx: Tensor) -> Tensor:  # (A, n), (A, n + K) -> (A, n)
            return T(torch.cat([z, qx[:, n:]], dim=1), qx)[:, :n]

        def readout(z: Tensor, qx: Tensor) -> Tensor:
            return self.readout(torch.cat([z, qx[:, n:]], dim=1))

        return SolveParts(prologue, step, readout, self.prediction_extras)

    def solvers(self) -> dict[str, Stepper]:
        """Only ``picard``: the paper's average iteration, step ``min(α*, solver.damping)``, an
        ℓ∞ contraction by construction. Undamped, ``z ↦ relu(A z + q)`` need not contract (only
        ``μ∞(A) < 1`` is kept; ``‖A‖∞`` may be far above 1), and Anderson's first and fallback
        steps are undamped: on a robustly trained model its trajectories are chaotic enough that
        torch and onnxruntime disagree by several iterations. So it is not offered."""
        alpha = average_step_size(self.operator.matrix().detach())
        damping = min(alpha, float(self.config.solver.damping))
        return {Picard.name: Picard(damping=damping)}

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
        """On the full state ``[z ; s]`` with the full ``T``: solves for ``z`` alone."""
        n = self.width

        def core(z: Tensor, q: Tensor) -> Tensor:  # (A, n), (A, n + K) -> (A, n)
            return T(torch.cat([z, q[:, n:]], dim=1), q)[:, :n]

        z, stats = super().solve_fixed_point(
            core, z0[:, :n], qx, tol=tol, max_iter=max_iter, solver=solver, trace=trace
        )
        return torch.cat([z, qx[:, n:]], dim=1), stats

    # --- the certificate -----------------------------------------------------------------------
    def lipschitz_bound(self) -> Tensor:
        """``(‖C‖∞ ‖B‖∞ / (1 − μ∞(A)) + ‖D‖∞) / std``: ℓ∞ Lipschitz bound from raw inputs to logits.
        Differentiable (the regulariser uses it)."""
        mu = self.operator.measure()
        implicit = inf_norm(self.head.c.weight) * inf_norm(self.injection.b.weight) / (1.0 - mu)
        return (implicit + inf_norm(self.injection.d.weight)) / self.input_std

    def prediction_extras(self, logits: Tensor) -> dict[str, Tensor]:
        """``certified_radius_linf`` (B,): top-1 margin over twice the Lipschitz bound."""
        with torch.no_grad():
            if logits.shape[1] < 2:  # one class: no perturbation can change the label
                return {"certified_radius_linf": torch.full_like(logits[:, 0], float("inf"))}
            top = logits.topk(2, dim=1).values
            margin = top[:, 0] - top[:, 1]
            return {"certified_radius_linf": margin / (2.0 * self.lipschitz_bound())}

    def auxiliary_loss(self, x: Tensor, qx: Tensor, z: Tensor) -> Tensor | None:
        weight = float(self.config.options["lipschitz_weight"])
        return weight * self.lipschitz_bound() if weight > 0 else None

    # --- certified-margin training and certificates -------------------------------------------
    certificates = CERTIFICATES
    _progress = 1.0

    def set_training_progress(self, fraction: float) -> None:
        """Ramp ``robust_eps`` and ``robust_weight`` over the first ``robust_ramp`` of training."""
        self._progress = float(fraction)

    def _robust_schedule(self) -> tuple[float, float]:
        """The current ``(ε, κ)`` of the certified-margin loss."""
        options = self.config.options
        ramp = float(options["robust_ramp"])
        scale = 1.0 if ramp <= 0 else min(1.0, self._progress / ramp)
        return float(options["robust_eps"]) * scale, float(options["robust_weight"]) * scale

    def forward(self, x: Tensor, **kwargs) -> ImplicitOutput:
        """Training pass; with a robust loss on, also ``extras["margin_lower"]`` (B, K, K): lower
        bounds of ``y_i − y_j`` over the current ε-ball, for :meth:`training_loss`."""
        out = super().forward(x, **kwargs)
        method = self.config.options["robust_loss"]
        eps, _ = self._robust_schedule()
        if self.training and method != "none" and eps > 0:
            out.extras["margin_lower"] = self._margin_lower(
                x, out, eps, method, differentiable=True
            )
        return out

    def _margin_lower(
        self, x: Tensor, out: ImplicitOutput, eps: float, method: str, *, differentiable: bool
    ) -> Tensor:
        if method == "lipschitz":
            return lipschitz_margin_lower_bounds(out.logits, self.lipschitz_bound(), eps)
        centre, radius = input_box(self, x, eps)
        options = self.config.options
        z_lo, z_hi = interval_fixed_point(
            self,
            centre,
            radius,
            out.z[:, : self.width].detach(),
            tol=float(options["interval_tol"]),
            max_iter=int(options["interval_max_iter"]),
            differentiable=differentiable,
        )
        return margin_lower_bounds(self, z_lo, z_hi, centre, radius)

    def training_loss(self, output: ImplicitOutput, target: Tensor) -> Tensor:
        """``(1 − κ) CE(clean) + κ CE(worst case)`` plus the Lipschitz regulariser."""
        lower = output.extras.get("margin_lower")
        if lower is None:
            return cross_entropy(output, target)
        _, kappa = self._robust_schedule()
        clean = F.cross_entropy(output.logits, target)
        loss = (1.0 - kappa) * clean + kappa * worst_case_cross_entropy(lower, target)
        return loss if output.aux_loss is None else loss + output.aux_loss

    @torch.no_grad()
    def certify(self, x: Tensor, labels: Tensor, eps: float) -> dict[str, Tensor]:
        """Per certificate, (B,) bool: every raw input within ℓ∞ distance ``eps`` of ``x`` (and in
        ``[0, 1]``) is classified as ``labels``.

        - ``lipschitz``: the served ``certified_radius_linf`` exceeds ``eps`` and the prediction is
          ``labels`` (the served radius, exactly).
        - ``interval``: interval bounds through the fixed point (rigorous for the exact fixed
          point, see :mod:`models.linf_certify`).
        """
        out = self.predict(x)
        radius = out.extras["certified_radius_linf"]
        lipschitz = (out.logits.argmax(1) == labels) & (radius > eps)
        lower = self._margin_lower(x, out, eps, "interval", differentiable=False)
        return {"lipschitz": lipschitz, "interval": certified_by(lower, labels)}

    def finalize(self) -> None:
        """Record the bound, ``μ∞(A)`` and ``α*`` of the current weights in ``config.options``."""
        super().finalize()
        with torch.no_grad():
            A = self.operator.matrix()
            recorded = {
                "lipschitz_bound_linf": float(self.lipschitz_bound()),
                "matrix_measure_linf": float(matrix_measure(A)),
                "step_size_linf": average_step_size(A),
            }
        self.config = self.config.replace(options={**self.config.options, **recorded})


def _check_robust_options(options: dict) -> None:
    if options["robust_loss"] not in ROBUST_LOSSES:
        raise ValueError(
            f"unknown robust_loss {options['robust_loss']!r}; available: {list(ROBUST_LOSSES)}"
        )
    if float(options["robust_eps"]) < 0:
        raise ValueError("robust_eps must be >= 0 (raw-input units, [0, 1] pixels)")
    if not 0.0 <= float(options["robust_weight"]) <= 1.0:
        raise ValueError("robust_weight must be in [0, 1]")


@register_family(
    "linf",
    default_backprop="jfb",
    description="l-infinity contractive implicit network (Jafarpour et al.): mu_inf(A) < 1 by "
    "construction, average iteration, certified l-infinity radius; option lipschitz_weight",
)
def _linf(config: ModelConfig) -> ImplicitClassifier:
    return LinfClassifier(config)
