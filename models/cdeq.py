"""Continuous DEQ: the fixed point as the steady state of an infinite-time neural ODE (Pal,
Edelman and Rackauckas, "Mixing implicit and explicit deep learning with skip DEQs and infinite
time neural ODEs (continuous DEQs)", 2022).

``z* = T(z*; Qx)`` is the equilibrium of

    dz/dt = T(z; Qx) − z,

which is globally attracting when ``T`` is a contraction (the Jacobian ``J − I`` has every
eigenvalue in the disk of radius ``Lip(T) < 1`` around −1). Instead of iterating ``T`` we integrate
this ODE with an adaptive embedded Runge–Kutta method (torchdiffeq's ``bosh3`` or ``dopri5``
tableau and step-size controller) until the steady-state residual ``‖T(z) − z‖ / ‖T(z)‖``
(SPEC §5's; ``‖dz/dt‖`` relative to ``‖T(z)‖``) falls to ``tol``. ``iterations`` counts
evaluations of ``T`` (the ODE's NFE). Forward Euler with step 1 *is* Picard iteration; a
higher-order method pays several evaluations per step for accuracy along a trajectory whose end
point is all that matters, so expect more evaluations than Anderson at the same tolerance (the
benchmark table says how many).

Why not ``torchdiffeq.odeint`` itself: it integrates a batch with one shared step size and one
error norm, so a sample's trajectory, NFE and answer would depend on its batch-mates, samples
could only stop at output times, and a budget could not be enforced inside a call. SPEC §5 wants
each sample to stop on its own, within its ``max_iter``, independently of the batch (a service
batches unrelated requests). :func:`ode_solve` therefore steps the same tableaux with a step size,
error norm and accept/reject decision *per sample*, checks every sample's residual after every
step (free: with first-same-as-last tableaux the step's last stage is ``T`` at the new state), and
drops converged samples from the batch. A test checks the tableaux against torchdiffeq's and a
single-sample trajectory against ``torchdiffeq.odeint``.

Semantics as the solvers of :mod:`models.solvers`: per-sample ``tol``/``max_iter`` (a sample stops
before a step it cannot pay for, so ``iterations ≤ max_iter``), a non-finite stage stops only that
sample (``converged=False``, its last accepted state returned), and the returned state is the last
``T(z)`` while the residual is that of ``z``.

The model (``cdeq`` family) is the FPN's injection, operator and readout with this solve, so its
gradients are those of any fixed point: JFB (the default, as for every family here: one
application of ``T``, cheap and sound for a contraction), or the steady-state adjoint the paper
uses (``--backprop ift``; the tests check both against finite differences).

>>> import torch
>>> z, stats = ode_solve(lambda z: 0.5 * torch.cos(z), torch.zeros(2, 1), tol=1e-6, max_iter=200)
>>> [round(v, 5) for v in z.flatten().tolist()], bool(stats.converged.all())
([0.45018, 0.45018], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .config import ModelConfig
from .families import register_family
from .implicit import FixedPointClassifier, ImplicitClassifier
from .options import resolve_options
from .solvers import (
    Context,
    FixedPointMap,
    SolverStats,
    State,
    Step,
    Stepper,
    relative_residual,
    solve,
)


@dataclass(frozen=True)
class Tableau:
    """An explicit, embedded, first-same-as-last Runge–Kutta pair, as torchdiffeq writes it:
    stage ``i + 1`` is evaluated at ``t + alpha[i] h``, ``y + h Σ_j beta[i][j] k_j``; the solution
    weights are ``c_sol`` (the last stage is ``f`` at the new point) and the error weights
    ``c_error``; ``order`` sets the step-size controller's exponent."""

    alpha: tuple[float, ...]
    beta: tuple[tuple[float, ...], ...]
    c_sol: tuple[float, ...]
    c_error: tuple[float, ...]
    order: int

    @property
    def evaluations(self) -> int:
        """New evaluations of the vector field per step (the first stage is the last step's)."""
        return len(self.alpha)


# The coefficients of torchdiffeq's ``bosh3`` and ``dopri5`` (a test checks them against it).
TABLEAUS: dict[str, Tableau] = {
    "bosh3": Tableau(  # Bogacki–Shampine 3(2)
        alpha=(1 / 2, 3 / 4, 1.0),
        beta=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        c_sol=(2 / 9, 1 / 3, 4 / 9, 0.0),
        c_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        order=3,
    ),
    "dopri5": Tableau(  # Dormand–Prince 5(4)
        alpha=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        beta=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        c_sol=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        c_error=(
            35 / 384 - 1951 / 21600,
            0.0,
            500 / 1113 - 22642 / 50085,
            125 / 192 - 451 / 720,
            -2187 / 6784 + 12231 / 42400,
            11 / 84 - 649 / 6300,
            -1 / 60,
        ),
        order=5,
    ),
}
ODE_METHODS = tuple(sorted(TABLEAUS))

# torchdiffeq's step-size controller constants.
SAFETY, MAX_GROWTH, MAX_SHRINK = 0.9, 10.0, 0.2

# Below a few ulps the controller's error estimates are rounding noise: steps get rejected
# at random and the solve stalls. The local tolerance never goes below this (relative) floor.
_EPS_FLOOR = {
    dt: 8 * torch.finfo(dt).eps
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}

DEFAULT_METHOD, DEFAULT_ERROR_RATIO = "bosh3", 0.1
DEFAULT_OPTIONS = {"ode_method": DEFAULT_METHOD, "ode_error_ratio": DEFAULT_ERROR_RATIO}


@dataclass(frozen=True)
class OdeSteadyState:
    """The stepper for ``dz/dt = f(z, *context) − z`` (see :func:`ode_solve`): one step is one
    embedded Runge–Kutta step per row, accepted or rejected per row, costing
    ``tableau.evaluations`` applications of ``f``; ``start`` evaluates ``f(z0)`` once (the first
    stage, FSAL). Per-row state: ``z``, ``fz = f(z)``, the step size ``h``, the residual ``r``."""

    name: ClassVar[str] = "ode"
    method: str = DEFAULT_METHOD
    error_ratio: float = DEFAULT_ERROR_RATIO
    first_step: float = 1.0
    fixed_depth: ClassVar[None] = None

    def __post_init__(self) -> None:
        if self.method not in TABLEAUS:
            raise ValueError(f"unknown ODE method {self.method!r}; available: {list(ODE_METHODS)}")
        if not 0.0 < self.error_ratio <= 1.0:
            raise ValueError(f"error_ratio must be in (0, 1], got {self.error_ratio}")

    @property
    def cost(self) -> int:
        return TABLEAUS[self.method].evaluations

    def start(self, f: FixedPointMap, z0: Tensor, context: Context, tol: Tensor) -> Step:
        fz = f(z0, *context)  # T(z0): its residual is checked, and dz/dt = fz − z is stage 1
        residual = relative_residual(fz, z0)
        h = torch.full((z0.shape[0],), self.first_step, dtype=z0.dtype, device=z0.device)
        return Step({"z": z0, "fz": fz, "h": h, "r": residual}, z0, fz, residual, 1)

    def step(self, f: FixedPointMap, state: State, context: Context, tol: Tensor) -> Step:
        z, fz, h = state["z"], state["fz"], state["h"]
        tableau = TABLEAUS[self.method]
        shape = (-1,) + (1,) * (z.ndim - 1)  # broadcast a (A,) per-sample value over a state
        floor = _EPS_FLOOR.get(z.dtype, 8 * torch.finfo(torch.float32).eps)
        # Local error tolerance (absolute, per sample): error_ratio · r · rms(T(z)), i.e. a fraction
        # of the current RMS derivative ‖T(z) − z‖, floored at the tol level.
        level = torch.maximum(state["r"].nan_to_num(1.0), tol.to(z.dtype).clamp_min(floor))
        scale = self.error_ratio * level * fz.reshape(fz.shape[0], -1).pow(2).mean(1).sqrt()
        z_new, fz_new, error = _rk_step(f, tableau, z, fz, h.view(shape), context)
        ratio = error.reshape(error.shape[0], -1).pow(2).mean(1).sqrt() / scale.clamp_min(1e-30)
        finite = torch.isfinite(fz_new.reshape(fz_new.shape[0], -1)).all(1) & torch.isfinite(ratio)
        accept = (ratio <= 1.0) & finite
        z = torch.where(accept.view(shape), z_new, z)
        fz = torch.where(accept.view(shape), fz_new, fz)
        # A non-finite stage stops its sample now (its last accepted state is returned).
        fz = torch.where(finite.view(shape), fz, torch.full_like(fz, float("nan")))
        factor = SAFETY * ratio.clamp_min(1e-30).pow(-1.0 / tableau.order)
        factor = factor.clamp(MAX_SHRINK, MAX_GROWTH)
        factor = torch.where(accept, factor.clamp_min(1.0), factor)
        h = h * torch.where(finite, factor, torch.full_like(factor, MAX_SHRINK))
        residual = relative_residual(fz, z)
        return Step({"z": z, "fz": fz, "h": h, "r": residual}, z, fz, residual, tableau.evaluations)


def ode_solve(
    f: FixedPointMap,
    z0: Tensor,
    *,
    context: Context = (),
    tol: float | Tensor = 1e-4,
    max_iter: int | Tensor = 500,
    method: str = DEFAULT_METHOD,
    error_ratio: float = DEFAULT_ERROR_RATIO,
    first_step: float = 1.0,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Integrate ``dz/dt = f(z, *context) − z`` from ``z0`` until each sample's relative residual
    ``‖f(z) − z‖ / ‖f(z)‖ ≤ tol`` or its ``max_iter`` evaluations of ``f`` are spent.

    Shapes as :func:`models.solvers.picard_solve`: ``z0`` (B, ...), context tensors (B, ...),
    ``tol``/``max_iter`` scalars or (B,). ``method``: ``bosh3`` or ``dopri5``
    (:data:`TABLEAUS`). Every sample has its own step size, accepts or rejects its own steps and
    stops on its own, so its answer never depends on its batch-mates. A step is accepted when
    the RMS of its local error estimate is at most ``error_ratio · max(r, tol) · rms(f(z))``, with
    ``r`` the sample's current residual, i.e. a fraction of the current RMS derivative
    ``‖f(z) − z‖``: a step-size controller lets the state drift by about its tolerance, so the
    residual can reach ``tol`` only if that drift is below it, but the transient needs no accuracy
    (a fixed tight tolerance would cost steps there). An absolute scale also keeps a diverging
    step from being accepted because the state it produced is large. ``first_step`` 1 is the
    Picard scale (an Euler step of size 1 is ``z ← f(z)``). A sample stops before a step it
    cannot pay for. ``trace`` rows are indexed by evaluation count.

    >>> import torch
    >>> A = torch.tensor([[0.5, 0.2], [0.0, 0.3]]); b = torch.tensor([1.0, 2.0])
    >>> z, s = ode_solve(lambda z: z @ A.T + b, torch.zeros(1, 2), tol=1e-7, max_iter=300)
    >>> torch.allclose(z[0], torch.linalg.solve(torch.eye(2) - A, b), atol=1e-5)
    True
    """
    stepper = OdeSteadyState(method=method, error_ratio=error_ratio, first_step=first_step)
    return solve(stepper, f, z0, context=context, tol=tol, max_iter=max_iter, trace=trace)


def _rk_step(
    f: FixedPointMap, tableau: Tableau, z: Tensor, fz: Tensor, h: Tensor, context: Context
) -> tuple[Tensor, Tensor, Tensor]:
    """One embedded RK step of ``dz/dt = f(z) − z`` from ``z`` (with ``f(z) = fz`` known), step
    ``h`` per sample (broadcastable). Returns the new state, ``f`` there (the last stage, FSAL)
    and the local error estimate."""
    k = [fz - z]
    z_stage, f_stage = z, fz
    for beta in tableau.beta:
        z_stage = z + h * sum(b * k_j for b, k_j in zip(beta, k, strict=False) if b != 0.0)
        f_stage = f(z_stage, *context)
        k.append(f_stage - z_stage)
    error = h * sum(c * k_j for c, k_j in zip(tableau.c_error, k, strict=True) if c != 0.0)
    return z_stage, f_stage, error


class ContinuousDEQClassifier(FixedPointClassifier):
    """The FPN's parts, with the fixed point found as an ODE steady state (:func:`ode_solve`).

    Options (``config.options``): ``ode_method`` (``bosh3`` or ``dopri5``) and
    ``ode_error_ratio`` (see :func:`ode_solve`). Its solvers are the ODE methods; the default is
    the configured ``ode_method``.
    """

    def __init__(self, config: ModelConfig) -> None:
        config = resolve_options(config, DEFAULT_OPTIONS, "cdeq")
        super().__init__(config)
        options = config.options
        if options["ode_method"] not in ODE_METHODS:
            raise ValueError(
                f"unknown ode_method {options['ode_method']!r}; available: {sorted(ODE_METHODS)}"
            )

    def solvers(self) -> dict[str, Stepper]:
        """The ODE methods (``bosh3``, ``dopri5``), not the discrete solvers: a cdeq integrates."""
        ratio = float(self.config.options["ode_error_ratio"])
        return {m: OdeSteadyState(method=m, error_ratio=ratio) for m in ODE_METHODS}

    def default_solver(self) -> str:
        return self.config.options["ode_method"]


@register_family(
    "cdeq",
    default_backprop="jfb",
    description="continuous DEQ (Pal et al.): steady state of dz/dt = T(z) - z by adaptive "
    "Runge-Kutta (torchdiffeq's bosh3/dopri5 tableaux, per-sample steps); iterations count "
    "evaluations; options ode_method, ode_error_ratio",
)
def _cdeq(config: ModelConfig) -> ImplicitClassifier:
    return ContinuousDEQClassifier(config)
