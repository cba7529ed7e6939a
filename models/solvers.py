"""Batched fixed-point solvers with per-sample stopping (SPEC §5), as steppers.

A method is a :class:`Stepper` (optimistix's ``init``/``step`` split): ``start`` makes the per-row
state for new rows, ``step`` advances the rows it is given by one step, and :func:`stop_rule` says
which rows stop. :func:`solve` is the plain loop over them; the serving engine drives the same
steppers one iteration at a time while rows join and leave. One implementation of each method,
whichever way it is driven. A stepper knows nothing about models, HTTP or datasets.

- ``f(z, *context)`` maps a batch of states to a batch of states; row ``i`` of the output may depend
  only on row ``i`` of ``z`` and of each context tensor. Steppers rely on this: they are called on
  any subset of rows, so the work shrinks as samples converge and a sample's answer never depends on
  its batch-mates. Per-row solver state (Anderson's history, an ODE step size) lives in
  :attr:`Step.state`, a dict of tensors whose first dimension is the row.
- ``tol`` and ``max_iter`` are scalars or per-sample tensors of shape ``(B,)``.
- Per-sample residual: :func:`relative_residual`, ``‖f(z) − z‖₂ / max(‖f(z)‖₂, 1e-12)``.
- A sample stops when its residual ≤ its ``tol`` or when another step would take it past
  ``max_iter`` applications of ``f``; ``iterations`` counts those applications. The returned state
  is the last ``f(z)``.
- A non-finite ``f(z)`` stops only that sample: ``converged=False``, and the last finite iterate is
  returned for it.

Example (``0.5·cos`` has the fixed point 0.45018...):

>>> import torch
>>> f = lambda z: 0.5 * torch.cos(z)
>>> z, stats = anderson_solve(f, torch.zeros(3, 1), tol=1e-8, max_iter=50)
>>> [round(v, 5) for v in z.flatten().tolist()]
[0.45018, 0.45018, 0.45018]
>>> bool(stats.converged.all()), bool((stats.iterations < 50).all())
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

Context = tuple[Tensor, ...]
FixedPointMap = Callable[..., Tensor]
State = dict[str, Tensor]

EPS = 1e-12


@dataclass(frozen=True)
class SolverStats:
    """Per-sample solver statistics.

    iterations: (B,) int64, applications of ``f`` to each sample.
    residual:   (B,) float, relative residual at the returned iterate (NaN/Inf if it diverged).
    converged:  (B,) bool, residual ≤ tol.
    trace:      (K, B) float relative residuals per iteration (NaN once a sample stopped), or None.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor | None = None


def relative_residual(fz: Tensor, z: Tensor) -> Tensor:
    """SPEC §5's residual ``‖f(z) − z‖ / max(‖f(z)‖, 1e-12)`` per row: (B, ...) -> (B,).

    The one definition: the solvers, the ODE solve and the exported ONNX graphs follow it (a test
    checks the graphs against it). A diverging iterate whose norm overflows is reported as
    non-finite, never as residual 0.
    """
    fz_flat, z_flat = fz.reshape(fz.shape[0], -1), z.reshape(z.shape[0], -1)
    return _relative_residual_rows(fz_flat, fz_flat - z_flat)


def _relative_residual_rows(fz: Tensor, g: Tensor) -> Tensor:
    """The same from (B, n) rows of ``f(z)`` and of ``g = f(z) − z``."""
    norm = torch.linalg.vector_norm(fz, dim=1)
    res = torch.linalg.vector_norm(g, dim=1) / norm.clamp_min(EPS)
    return torch.where(torch.isfinite(norm), res, torch.nan)


def per_sample(value: float | int | Tensor, batch: int, dtype: torch.dtype, device) -> Tensor:
    """Broadcast a scalar or (B,) knob to a (B,) tensor on ``device``."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"per-sample knob must be a scalar or shape ({batch},), got {tuple(t.shape)}"
        )
    return t


def stop_rule(
    residual: Tensor, tol: Tensor, iterations: Tensor, max_iter: Tensor, stepper: Stepper
) -> tuple[Tensor, Tensor]:
    """Which rows stop after a step, and which of those converged; every (A,).

    A row stops when it converged, when its iterate is not finite, or when one more step would
    take it past its ``max_iter``. A fixed-depth stepper ignores ``tol`` and ``max_iter``: its rows
    stop after exactly ``fixed_depth`` applications of ``f`` and count as converged when finite.
    """
    finite = torch.isfinite(residual)
    if stepper.fixed_depth is not None:
        return ~finite | (iterations + stepper.cost > stepper.fixed_depth), finite
    converged = residual <= tol
    return converged | ~finite | (iterations + stepper.cost > max_iter), converged


@dataclass
class Step:
    """What a stepper returns for the rows it evaluated ``f`` on.

    state:    the per-row state for the next step (tensors, first dimension = row).
    z, fz:    (A, *shape) the iterate ``f`` was evaluated at, and ``f`` there; a row that stops
              now returns ``fz`` (``z`` when ``fz`` is not finite).
    residual: (A,) ``relative_residual(fz, z)``.
    cost:     applications of ``f`` this call made per row.
    """

    state: State
    z: Tensor
    fz: Tensor
    residual: Tensor
    cost: int


class Stepper(Protocol):
    """One fixed-point method, driven a step at a time.

    ``start`` prepares new rows: their state, or a :class:`Step` when it evaluates ``f`` once (as
    the ODE solve does); ``step`` advances rows by one step. Both may update the given state
    tensors in place; the returned :attr:`Step.state` is what the next step reads. ``cost`` is
    the number of applications of ``f`` per ``step``; ``fixed_depth`` set means an explicit
    network's fixed number of applications, with no tolerance.
    """

    name: ClassVar[str]

    @property
    def cost(self) -> int: ...

    @property
    def fixed_depth(self) -> int | None: ...

    def start(
        self, f: FixedPointMap, z0: Tensor, context: Context, tol: Tensor
    ) -> State | Step: ...

    def step(self, f: FixedPointMap, state: State, context: Context, tol: Tensor) -> Step: ...


@dataclass(frozen=True)
class Picard:
    """Picard iteration ``z ← (1 − α) z + α f(z)`` (Krasnoselskii–Mann when ``α = damping < 1``)."""

    name: ClassVar[str] = "picard"
    damping: float = 1.0
    cost: ClassVar[int] = 1
    fixed_depth: ClassVar[None] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")

    def start(self, f: FixedPointMap, z0: Tensor, context: Context, tol: Tensor) -> State:
        return {"z": z0}

    def step(self, f: FixedPointMap, state: State, context: Context, tol: Tensor) -> Step:
        z = state["z"]
        fz = f(z, *context)
        z_next = fz if self.damping == 1.0 else torch.lerp(z, fz, self.damping)
        return Step({"z": z_next}, z, fz, relative_residual(fz, z), 1)


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration (type II) with memory ``m``, mixing ``β`` and Tikhonov ``λ``.

    Each step solves, per sample, ``min_α ‖Σ α_i g_i‖² + λ min_i ‖g_i‖² ‖α‖²`` s.t. ``Σ α_i = 1``
    (λ is relative, so the method is scale-invariant like the residual) over the last ``m``
    residuals ``g_i = f(x_i) − x_i`` and mixes ``x ← β Σ α_i f(x_i) + (1 − β) Σ α_i x_i``.

    Per-row state: the iterate ``x`` (A, *shape); ring buffers of the last ``m`` images ``F`` and
    residuals ``G`` (A, m, n) with the residuals' Gram matrix (A, m, m), updated by one row per
    step (m·n work, not m²·n); ``k`` (A,) the steps each row has taken, so rows that joined at
    different times keep their own history; ``cleared`` (A,) whether the slots a row has not
    written yet were zeroed (done once, the first time it steps beside rows of another age).
    The iterates themselves are never stored: ``Σ α_i x_i = Σ α_i f(x_i) − Σ α_i g_i``.
    """

    name: ClassVar[str] = "anderson"
    memory: int = 5
    mixing: float = 1.0
    regularization: float = 1e-4
    cost: ClassVar[int] = 1
    fixed_depth: ClassVar[None] = None

    def __post_init__(self) -> None:
        if self.memory < 1:
            raise ValueError(f"memory must be >= 1, got {self.memory}")

    def start(self, f: FixedPointMap, z0: Tensor, context: Context, tol: Tensor) -> State:
        # F and G are not cleared (two full passes over the largest buffers): a plain solve only
        # reads slots it wrote, and the mixed-age path clears the few slots a row has not.
        rows, n, m = z0.shape[0], z0[0].numel(), self.memory
        return {
            "x": z0,
            "F": z0.new_empty(rows, m, n),
            "G": z0.new_empty(rows, m, n),
            "gram": z0.new_zeros(rows, m, m),
            "k": torch.zeros(rows, dtype=torch.int64, device=z0.device),
            "cleared": torch.zeros(rows, dtype=torch.bool, device=z0.device),
        }

    def step(self, f: FixedPointMap, state: State, context: Context, tol: Tensor) -> Step:
        x, F, G, gram, k = state["x"], state["F"], state["G"], state["gram"], state["k"]
        cleared = state["cleared"]
        rows, shape, m = x.shape[0], x.shape[1:], self.memory
        fx = f(x, *context)
        x_flat, fx_flat = x.reshape(rows, -1), fx.reshape(rows, -1)
        g = fx_flat - x_flat
        residual = _relative_residual_rows(fx_flat, g)
        youngest, oldest = (int(v) for v in torch.aminmax(k))  # steps taken so far, per row
        if youngest == oldest:
            # Every row has the same age (a plain solve): slices of the used slots.
            slot, used = oldest % m, min(oldest + 1, m)
            F[:, slot], G[:, slot] = fx_flat, g
            row = torch.bmm(G[:, :used], g.unsqueeze(2)).squeeze(2)  # (A, used) g_i · g
            gram[:, slot, :used], gram[:, :used, slot] = row, row
            system = gram[:, :used, :used].clone()
            mask = None
        else:
            # Rows of different ages (the serving engine): each row's own slot, and its system
            # over its used slots padded by an identity block (zero weights on the others).
            index = torch.arange(rows, device=x.device)
            slots = k % m  # (A,)
            F[index, slots], G[index, slots] = fx_flat, g
            used = min(oldest + 1, m)  # the slots any row uses
            row = torch.bmm(G[:, :used], g.unsqueeze(2)).squeeze(2)  # (A, used)
            gram[index, slots, :used], gram[index, :used, slots] = row, row
            mask = torch.arange(used, device=x.device) < (k + 1).clamp(max=m)[:, None]
            # Slots a younger row has not written yet get weight 0 but are read, and 0 · NaN is
            # NaN: zero them, once per row (newcomers, mostly), not at every step.
            fresh = (~cleared).nonzero().squeeze(1)
            if fresh.numel():
                unwritten = torch.arange(m, device=x.device) > k[fresh, None]  # (r, m)
                rows_of, slots_of = unwritten.nonzero(as_tuple=True)
                F[fresh[rows_of], slots_of] = 0.0
                G[fresh[rows_of], slots_of] = 0.0
                cleared[fresh] = True
            pair = mask[:, :, None] & mask[:, None, :]
            padding = torch.diag_embed((~mask).to(gram.dtype))
            system = torch.where(pair, gram[:, :used, :used], padding)
        k += 1
        # λ is relative to the smallest ‖g_i‖² (the residuals' current scale): an absolute λ swamps
        # the gram as residuals shrink, α tends to uniform weights and Anderson falls behind Picard.
        diag = system.diagonal(dim1=1, dim2=2)  # (A, used) ‖g_i‖²
        norms = diag if mask is None else torch.where(mask, diag, torch.inf)
        scale = norms.amin(1, keepdim=True).clamp_min(torch.finfo(diag.dtype).tiny)  # (A, 1)
        diag.add_(
            self.regularization * scale if mask is None else mask * scale * self.regularization
        )
        # min αᵀ(GGᵀ + λI)α s.t. Σα = 1 is solved by α ∝ (GGᵀ + λI)⁻¹ 1. solve_ex: one sample's
        # singular system must not fail the batch, and it does not synchronise with a GPU.
        ones = system.new_ones(rows, used, 1) if mask is None else mask.to(system.dtype)[..., None]
        weights, info = torch.linalg.solve_ex(system, ones)
        alpha = (weights / weights.sum(1, keepdim=True)).transpose(1, 2)  # (A, 1, used)
        mixed = torch.bmm(alpha, F[:, :used]).squeeze(1)  # Σ α_i f(x_i); no (A, used, n) temporary
        if self.mixing != 1.0:  # β Σ α_i f(x_i) + (1 − β) Σ α_i x_i
            mixed = mixed - (1.0 - self.mixing) * torch.bmm(alpha, G[:, :used]).squeeze(1)
        # The first step is plain Picard; a failed or overflowing extrapolation costs that sample
        # a plain step, never a NaN state (a non-finite entry makes the row sum non-finite).
        ok = (k > 1) & (info == 0) & torch.isfinite(mixed.sum(1))  # (A,)
        x_next = torch.where(ok[:, None], mixed, fx_flat).view(rows, *shape)
        state = {"x": x_next, "F": F, "G": G, "gram": gram, "k": k, "cleared": cleared}
        return Step(state, x, fx, residual, 1)


@torch.no_grad()
def solve(
    stepper: Stepper,
    f: FixedPointMap,
    z0: Tensor,
    *,
    context: Context = (),
    tol: float | Tensor = 1e-4,
    max_iter: int | Tensor = 50,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """Run ``stepper`` on a batch until every sample stops (the plain loop).

    Shapes: ``z0`` (B, ...), each context tensor (B, ...), ``tol``/``max_iter`` scalar or (B,).
    Finished rows leave the batch on the iteration they stop, so the work shrinks as samples
    converge; a batch whose samples all need the same depth pays no indexing cost.
    """
    batch, device = z0.shape[0], z0.device
    tol_rows = per_sample(tol, batch, torch.float64, device)
    max_iter_rows = per_sample(max_iter, batch, torch.int64, device)
    if batch and (max_iter_rows < 1).any():
        raise ValueError("max_iter must be >= 1 for every sample")
    if stepper.fixed_depth is not None:
        max_iter_rows = torch.full_like(max_iter_rows, stepper.fixed_depth)
    out = z0.clone()
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    residual = torch.full((batch,), float("nan"), dtype=z0.dtype, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    limit = int(max_iter_rows.max()) if batch else 0
    history = torch.full((limit, batch), float("nan"), dtype=z0.dtype, device=device)
    if batch == 0:
        return out, SolverStats(iterations, residual, converged, history if trace else None)

    index, context = torch.arange(batch, device=device), tuple(context)
    spent = 0  # applications of f so far: the same for every row still running
    started = stepper.start(f, z0, context, tol_rows)
    result = started if isinstance(started, Step) else None
    state = started.state if isinstance(started, Step) else started
    while True:
        if result is not None:
            spent += result.cost
            if trace:
                history[spent - 1, index] = result.residual
            spent_rows = torch.full_like(index, spent)
            done, ok = stop_rule(result.residual, tol_rows, spent_rows, max_iter_rows, stepper)
            if bool(done.any()):
                rows = index[done]
                finite = torch.isfinite(result.residual[done])
                shape = (-1,) + (1,) * (z0.ndim - 1)
                out[rows] = torch.where(finite.view(shape), result.fz[done], result.z[done])
                iterations[rows], residual[rows] = spent, result.residual[done]
                converged[rows] = ok[done]
                keep = ~done
                if not bool(keep.any()):
                    break
                index, tol_rows, max_iter_rows = index[keep], tol_rows[keep], max_iter_rows[keep]
                context = tuple(c[keep] for c in context)
                state = {name: t[keep] for name, t in state.items()}
        result = stepper.step(f, state, context, tol_rows)
        state = result.state
    return out, SolverStats(iterations, residual, converged, history if trace else None)


def picard_solve(
    f: FixedPointMap,
    z0: Tensor,
    *,
    context: Context = (),
    tol: float | Tensor = 1e-4,
    max_iter: int | Tensor = 50,
    damping: float = 1.0,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """:func:`solve` with :class:`Picard`.

    >>> import torch
    >>> A = torch.tensor([[0.5, 0.1], [0.0, 0.3]]); b = torch.tensor([1.0, 2.0])
    >>> z, s = picard_solve(lambda z: z @ A.T + b, torch.zeros(1, 2), tol=1e-10, max_iter=200)
    >>> torch.allclose(z[0], torch.linalg.solve(torch.eye(2) - A, b), atol=1e-6)
    True
    """
    stepper = Picard(damping=damping)
    return solve(stepper, f, z0, context=context, tol=tol, max_iter=max_iter, trace=trace)


def anderson_solve(
    f: FixedPointMap,
    z0: Tensor,
    *,
    context: Context = (),
    tol: float | Tensor = 1e-4,
    max_iter: int | Tensor = 50,
    memory: int = 5,
    mixing: float = 1.0,
    regularization: float = 1e-4,
    trace: bool = False,
) -> tuple[Tensor, SolverStats]:
    """:func:`solve` with :class:`Anderson`.

    >>> import torch
    >>> A = torch.tensor([[0.9, 0.05], [0.0, 0.8]]); b = torch.tensor([1.0, 2.0])
    >>> z, s = anderson_solve(lambda z: z @ A.T + b, torch.zeros(1, 2), tol=1e-10, max_iter=200)
    >>> torch.allclose(z[0], torch.linalg.solve(torch.eye(2) - A, b), atol=1e-5)
    True
    """
    stepper = Anderson(memory=memory, mixing=mixing, regularization=regularization)
    return solve(stepper, f, z0, context=context, tol=tol, max_iter=max_iter, trace=trace)


@dataclass(frozen=True)
class FixedDepth:
    """``f`` applied exactly ``depth`` times (an explicit network): no tolerance, no early exit."""

    name: ClassVar[str] = "fixed-depth"
    depth: int
    cost: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    @property
    def fixed_depth(self) -> int:
        return self.depth

    def start(self, f: FixedPointMap, z0: Tensor, context: Context, tol: Tensor) -> State:
        return {"z": z0}

    def step(self, f: FixedPointMap, state: State, context: Context, tol: Tensor) -> Step:
        z = state["z"]
        fz = f(z, *context)
        return Step({"z": fz}, z, fz, relative_residual(fz, z), 1)


# The discrete methods every iterative family offers by default, by name.
STEPPERS: dict[str, type[Picard] | type[Anderson]] = {"picard": Picard, "anderson": Anderson}

SOLVERS: dict[str, Callable[..., tuple[Tensor, SolverStats]]] = {
    "picard": picard_solve,
    "anderson": anderson_solve,
}


def stepper_options(kind: type, settings: Any) -> dict[str, Any]:
    """The fields of ``settings`` (e.g. a ``SolverConfig``) that stepper class ``kind`` takes."""
    names = {f.name for f in fields(kind) if f.init}
    return {name: getattr(settings, name) for name in names if hasattr(settings, name)}


def get_solver(name: str) -> Callable[..., tuple[Tensor, SolverStats]]:
    """Look a solver up by name; unknown names list what exists."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(SOLVERS)}") from None
